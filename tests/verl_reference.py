"""Write tests/verl_reference.json: what verl's own rollout-rejection functions return on fixed inputs.

verl is not a dependency of trl-alp (it needs Ray, tensordict, omegaconf, ...), so `tests/test_rejection.py` reads
verl's answers from that file instead of importing verl. Regenerate it in a scratch environment where verl imports
(its helper runs on CPU), once per verl version, each run adding what that version has:

* verl 0.9.1: ``compute_rollout_rejection_mask`` (``rollout_rs``, the k1/k2/k3 criteria), section ``rollout_rs``;
* verl 0.6.1: ``compute_rollout_correction_and_rejection_mask(rollout_token_veto_threshold=...)`` (the veto, removed
  in later versions), section ``veto``.

    python -m venv /tmp/verlenv   # plus torch (CPU), ray, tensordict, omegaconf, hydra-core, codetiming, dill, ...
    PYTHONPATH=<unzipped verl 0.9.1 wheel> /tmp/verlenv/bin/python tests/verl_reference.py
    PYTHONPATH=<unzipped verl 0.6.1 wheel> /tmp/verlenv/bin/python tests/verl_reference.py  # needs transformers 4

The inputs are stored in the file too (float64, exact), so the test never depends on a random generator.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

PATH = Path(__file__).with_name("verl_reference.json")
BATCH, LENGTH = 12, 10

# (criteria, threshold) as verl's rollout_rs / rollout_rs_threshold take them: every criterion, loose and tight, one-
# number k1 bands, an asymmetric k1 band and chains of several criteria.
ROLLOUT_RS_CASES = [
    ("token_k1", "0.5_1.5"),
    ("token_k1", 2.0),
    ("token_k2", 0.05),
    ("token_k2", 0.5),
    ("token_k3", 0.05),
    ("token_k3", 0.5),
    ("seq_sum_k1", "0.2_3.0"),
    ("seq_sum_k1", 5.0),
    ("seq_sum_k2", 0.5),
    ("seq_sum_k2", 3.0),
    ("seq_sum_k3", 0.5),
    ("seq_sum_k3", 3.0),
    ("seq_mean_k1", "0.8_1.1"),
    ("seq_mean_k1", 1.5),
    ("seq_mean_k2", 0.02),
    ("seq_mean_k2", 0.2),
    ("seq_mean_k3", 0.01),
    ("seq_mean_k3", 0.2),
    ("seq_max_k2", 0.3),
    ("seq_max_k2", 3.0),
    ("seq_max_k3", 0.3),
    ("seq_max_k3", 3.0),
    ("token_k1,seq_max_k3", "0.4_1.8,3.0"),
    ("seq_mean_k3,seq_sum_k1", "0.01,5.0"),
    ("token_k3,seq_mean_k1,seq_max_k2", 1.5),
]
VETO_THRESHOLDS = [1e-4, 0.1, 0.5]


def reference_inputs() -> dict[str, list]:
    """Old and rollout log-probs with spreads from 0.02 to 3 nats, ragged lengths, one empty completion, padding that
    holds junk, and one catastrophic token (π_old/μ ≈ e^-11)."""
    g = torch.Generator().manual_seed(0)
    old = -3 * torch.rand(BATCH, LENGTH, generator=g, dtype=torch.float64)
    spread = torch.tensor([0.02, 0.1, 0.3, 1.0, 3.0, 0.05, 0.5, 0.2, 2.0, 0.01, 0.7, 0.4], dtype=torch.float64)
    rollout = old + spread.unsqueeze(1) * torch.randn(BATCH, LENGTH, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 9, 7, 10, 4, 1, 10, 0, 6, 10, 3, 8])
    mask = (torch.arange(LENGTH) < lengths.unsqueeze(1)).to(torch.float64)
    old[1, 3], rollout[1, 3] = -11.5, -0.5  # the veto's case: one token far below any floor
    junk = mask == 0
    old[junk], rollout[junk] = -40.0, 0.0  # padding must never count
    return {"old_logps": old.tolist(), "rollout_logps": rollout.tolist(), "mask": mask.tolist()}


def _rollout_rs_section(helper, inputs) -> list[dict]:
    old, rollout, mask = (torch.tensor(inputs[k], dtype=torch.float64) for k in ("old_logps", "rollout_logps", "mask"))
    cases = []
    for criteria, threshold in ROLLOUT_RS_CASES:
        kept, metrics = helper.compute_rollout_rejection_mask(old - rollout, mask, criteria, threshold)
        per_criterion = {
            name: {
                key: metrics[f"rollout_rs_{name}_{key}"] for key in ("masked_fraction", "seq_masked_fraction", "mean")
            }
            for name in criteria.split(",")
        }
        cases.append({"criteria": criteria, "threshold": threshold, "kept": kept.tolist(), "metrics": per_criterion})
    return cases


def _veto_section(helper, inputs) -> list[dict]:
    old, rollout, mask = (torch.tensor(inputs[k], dtype=torch.float64) for k in ("old_logps", "rollout_logps", "mask"))
    cases = []
    for threshold in VETO_THRESHOLDS:
        _, kept, metrics = helper.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, rollout_token_veto_threshold=threshold
        )
        cases.append(
            {
                "threshold": threshold,
                "kept": kept.tolist(),
                "veto_fraction": metrics["rollout_corr/rollout_is_veto_fraction"],
                "catastrophic_token_fraction": metrics["rollout_corr/rollout_is_catastrophic_token_fraction"],
            }
        )
    return cases


def dump(data: dict) -> str:
    """JSON with one line per input tensor and per case, so that a regeneration diffs by case."""
    lines = ["{", ' "inputs": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in data["inputs"].items()]
    lines[-1] = lines[-1].rstrip(",")
    lines.append(" },")
    for section in ("rollout_rs", "veto"):
        if section in data:
            lines += [
                f" {json.dumps(section)}: {{",
                f'  "source": {json.dumps(data[section]["source"])},',
                '  "cases": [',
            ]
            lines += [f"   {json.dumps(case)}," for case in data[section]["cases"]]
            lines[-1] = lines[-1].rstrip(",")
            lines += ["  ]", " },"]
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join([*lines, "}"]) + "\n"


def main() -> None:
    import verl
    import verl.trainer.ppo.rollout_corr_helper as helper

    data = json.loads(PATH.read_text()) if PATH.exists() else {"inputs": reference_inputs()}
    inputs = data["inputs"]
    source = f"verl {verl.__version__}, verl/trainer/ppo/rollout_corr_helper.py"
    if hasattr(helper, "SUPPORTED_ROLLOUT_RS_OPTIONS"):
        data["rollout_rs"] = {"source": source, "cases": _rollout_rs_section(helper, inputs)}
    if "rollout_token_veto_threshold" in helper.compute_rollout_correction_and_rejection_mask.__code__.co_varnames:
        data["veto"] = {"source": source, "cases": _veto_section(helper, inputs)}
    assert all(math.isfinite(x) for row in inputs["old_logps"] for x in row)
    PATH.write_text(dump(data))
    print(f"wrote {PATH} ({source}): {sorted(k for k in data if k != 'inputs')}")


if __name__ == "__main__":
    main()
