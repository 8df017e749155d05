"""The sharp grid's pre-registered analysis: the paper's four claims, corrections compared paired by seed.

Fixed before any run (and only changed by a commit that says so):

* **metrics**, one number per run (`trl_alp.experiments.stress.summarize_history`): the last-third log(P98/P2) width
  of the sequence ratio, the max k3 KL(μ‖π), the number of steps with k3 above the grid's spike threshold — all three
  of the *clean* policy π against the engine μ (an ALP run logs it beside its perturbed ratio), so every correction
  is measured on the same quantity — the final held-out reward, the final pass@8, and the mean entropy of the
  clean policy over the last third of the steps (changed after the first full grid: TRL's logged `entropy` is the
  loss forward's, which ALP perturbs, so it differed between ALP and its baseline at step 1, before any update);
* **comparisons**, each a pair (ALP variant, baseline) on one metric, in every cell (`CLAIMS`);
* **statistics**: the mean paired difference over the seeds both runs finished, a 95 % percentile bootstrap interval
  of it (10 000 resamples, seed 0), the exact two-sided sign-flip permutation p-value (Monte Carlo above 16 seeds),
  and Holm's step-down adjustment over every comparison of a claim in a cell;
* **verdict** of a claim, from the primary cell (bf16 engine, stale): *shown* when the claim's primary comparison
  favours ALP with an adjusted p below 0.05, *contrary* when it favours the baseline so, else *not shown* (for the
  layer claim: shown when all layers beat every partial selection so).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..corrections import CORRECTIONS
from .runner import finite, markdown_table, number

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
EXACT_SIGN_FLIPS = 16  # seeds up to which the permutation test enumerates every sign pattern


@dataclass(frozen=True)
class Metric:
    key: str  # a result's key, or "eval_final.<key>" for a held-out evaluation number
    better: str  # "lower" or "higher": the direction the paper claims for ALP
    label: str


METRICS = {
    "width": Metric("clean_log_ratio_width", "lower", "log(P98/P2) of the clean sequence ratio, last third"),
    "kl_max": Metric("clean_k3_kl_max", "lower", "max k3 KL(μ‖π)"),
    "spikes": Metric("clean_kl_spikes", "lower", "steps with k3 above the spike threshold"),
    "reward": Metric("reward_final", "higher", "final held-out reward"),
    "pass": Metric("eval_final.pass@8", "higher", "final held-out pass@8"),
    "entropy": Metric("clean_entropy_last_third", "higher", "entropy of the clean policy, last third"),
}

# Each claim: (its pairs, its metrics); the first pair on the first metric is the primary comparison.
CLAIMS = {
    "tails": (
        (("seq-alp", "seq-bypass"), ("seq-alp@auto", "seq-bypass"), ("token-alp", "token-bypass")),
        ("width", "kl_max", "spikes"),
    ),
    "performance": (
        (
            ("seq-alp", "seq-bypass"),
            ("seq-alp@auto", "seq-bypass"),
            ("token-alp", "token-bypass"),
            ("seq-alp", "token-mis"),
            ("seq-alp", "grpo"),
        ),
        ("reward",),
    ),
    "exploration": ((("seq-alp", "seq-bypass"), ("token-alp", "token-bypass")), ("entropy", "pass")),
    "layers": (
        tuple(("seq-alp", f"seq-alp@{group}") for group in ("early", "middle", "late", "logits")),
        ("reward", "width"),
    ),
}
PRIMARY_CELL = "vllm-bf16-s16"


def metric_value(result: dict, metric: Metric) -> float:
    """A run's value of `metric` (NaN where the run has none)."""
    value = result
    for part in metric.key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and metric.key == "clean_entropy_last_third" and not _perturbs(result):
        value = result.get("entropy_last_third")  # a record from before the clean entropy was logged: no noise, same
    return float(value) if isinstance(value, (int, float)) and finite(value) else math.nan


def clean_entropy_curve(result: dict) -> list[float] | None:
    """A run's entropy of the clean policy per step (None for an older ALP record that logged only the perturbed one)."""
    history = result.get("history", {})
    if "clean_entropy" in history:
        return history["clean_entropy"]
    return None if _perturbs(result) else history.get("entropy")


def _perturbs(result: dict) -> bool:
    return CORRECTIONS[result["correction"].split("@")[0]].perturbs


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[seed] − b[seed]`` over the seeds where both are finite, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b)) if finite(a[s]) and finite(b[s])]


def sign_flip_p(differences: Sequence[float], seed: int = 0, draws: int = 100_000) -> float:
    """Two-sided p-value of the mean paired difference under the null of symmetric differences (exact for up to
    `EXACT_SIGN_FLIPS` pairs, else Monte Carlo with `draws` sign patterns). NaN without pairs."""
    n = len(differences)
    if n == 0:
        return math.nan
    observed = abs(sum(differences))
    tolerance = 1e-12 * max(1.0, observed)
    if n <= EXACT_SIGN_FLIPS:
        patterns = itertools.product((1, -1), repeat=n)
        hits = sum(
            abs(sum(s * d for s, d in zip(p, differences, strict=True))) >= observed - tolerance for p in patterns
        )
        return hits / 2**n
    rng = random.Random(seed)
    hits = sum(
        abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed - tolerance for _ in range(draws)
    )
    return (hits + 1) / (draws + 1)


def bootstrap_ci(
    differences: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences` (NaNs without pairs)."""
    if not differences:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(statistics.fmean(rng.choices(differences, k=n)) for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in the family)."""
    finite_ones = sorted((p, i) for i, p in enumerate(pvalues) if finite(p))
    adjusted = [math.nan] * len(pvalues)
    running, m = 0.0, len(finite_ones)
    for rank, (p, i) in enumerate(finite_ones):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def favours(mean_difference: float, metric: Metric) -> str:
    """Which side a mean difference (ALP variant − baseline) favours: "alp", "baseline" or "none"."""
    if not finite(mean_difference) or mean_difference == 0:
        return "none"
    return "alp" if (mean_difference < 0) == (metric.better == "lower") else "baseline"


def compare_cell(runs: dict[str, dict[int, dict]], claim: str) -> list[dict]:
    """Every comparison of `claim` in one cell: ``runs[correction][seed]`` is a run's result."""
    pairs, metric_names = CLAIMS[claim]
    rows = []
    for metric_name in metric_names:
        metric = METRICS[metric_name]
        for alp, baseline in pairs:
            a = {seed: metric_value(r, metric) for seed, r in runs.get(alp, {}).items()}
            b = {seed: metric_value(r, metric) for seed, r in runs.get(baseline, {}).items()}
            diffs = paired_differences(a, b)
            mean = statistics.fmean(diffs) if diffs else math.nan
            low, high = bootstrap_ci(diffs)
            rows.append(
                {
                    "claim": claim,
                    "metric": metric_name,
                    "alp": alp,
                    "baseline": baseline,
                    "pairs": len(diffs),
                    "alp_mean": _mean(a.values()),
                    "baseline_mean": _mean(b.values()),
                    "difference": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "p": sign_flip_p(diffs),
                    "favours": favours(mean, metric),
                }
            )
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
        row["significant"] = finite(adjusted) and adjusted < ALPHA
    return rows


def _mean(values) -> float:
    values = [v for v in values if finite(v)]
    return statistics.fmean(values) if values else math.nan


def verdict(rows: list[dict], claim: str) -> str:
    """A claim's verdict from its comparisons in the primary cell (see the module docstring)."""
    if claim == "layers":
        primary = [r for r in rows if r["metric"] == CLAIMS[claim][1][0]]
        if primary and all(r["significant"] and r["favours"] == "alp" for r in primary):
            return "shown"
        if any(r["significant"] and r["favours"] == "baseline" for r in primary):
            return "contrary"
        return "not shown"
    primary = rows[0] if rows else None
    if primary is None or not primary["pairs"]:
        return "not measured"
    if primary["significant"]:
        return "shown" if primary["favours"] == "alp" else "contrary"
    return "not shown"


def analyse(results: list[dict], primary_cell: str = PRIMARY_CELL) -> dict:
    """All comparisons of every claim in every cell, and each claim's verdict (from `primary_cell`)."""
    by_cell: dict[str, dict[str, dict[int, dict]]] = {}
    for r in results:
        by_cell.setdefault(r["cell"], {}).setdefault(r["correction"], {})[r["seed"]] = r
    comparisons = {cell: {claim: compare_cell(runs, claim) for claim in CLAIMS} for cell, runs in by_cell.items()}
    primary = comparisons.get(primary_cell, {})
    verdicts = {claim: verdict(primary.get(claim, []), claim) for claim in CLAIMS}
    return {"primary_cell": primary_cell, "alpha": ALPHA, "verdicts": verdicts, "comparisons": comparisons}


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of one claim's comparisons in one cell."""
    body = [
        [
            METRICS[r["metric"]].label,
            f"{r['alp']} − {r['baseline']}",
            str(r["pairs"]),
            f"{number(r['alp_mean'], '.4g')} vs {number(r['baseline_mean'], '.4g')}",
            f"{number(r['difference'], '+.4g')} [{number(r['ci_low'], '+.3g')}, {number(r['ci_high'], '+.3g')}]",
            number(r["p"], ".3f"),
            number(r["p_holm"], ".3f") + (" *" if r["significant"] else ""),
            r["favours"],
        ]
        for r in rows
    ]
    header = ("metric", "comparison", "seeds", "means", "difference [95 % CI]", "p", "p (Holm)", "favours")
    return markdown_table(header, body)
