"""A sharp starting policy: a tiny model pretrained on a verifiable task before RL starts.

The ALP paper attributes heavy-tailed importance ratios to *locally sharp* policies — confident models whose rare
low-probability tokens carry most of the training–inference mismatch — over long completions. A randomly initialised
model is flat (per-token entropy ≈ 2.3 nats on the stress test's digits task), so this module builds one that is not:
the tiny Qwen2 shape vLLM's CPU build accepts, trained by next-token prediction on the *running sums* task
(`trl_alp.tasks.running_sums_dataset`: given ``N`` digits, write their running sums mod 10) until its token accuracy
on held-out prompts reaches a set level. It then writes most digits with near certainty and errs on a few, so
`trl_alp.tasks.running_sums_reward` (the share of digits right before the first error) starts well between 0 and 1.

Everything is deterministic from the seed (one CPU thread, seeded data and initialisation); the model is built once
and saved in the cache folder (`models.cache_dir`) with ``sharpness.json``: its sharpness measured on held-out prompts
(median per-token entropy, share of sampled tokens below p = 0.01, reward, pass@k).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from ..tasks import running_sums_dataset, running_sums_example, running_sums_reward
from .models import TINY_VLLM_SHAPE, build_tiny_model, build_tokenizer, cache_dir
from .runner import sample_completions

logger = logging.getLogger(__name__)

SHARPNESS_FILE = "sharpness.json"
LOW_PROB = 0.01  # a sampled token below this probability is in the low-probability tail


@dataclass(frozen=True)
class SharpSpec:
    """How a sharp starting policy is pretrained."""

    digits: int  # N: prompt digits, and completion digits (a completion is N + 1 tokens with the end of turn)
    max_steps: int  # pretraining steps at most
    target_accuracy: float  # stop once the held-out token accuracy reaches this
    batch_size: int = 32
    learning_rate: float = 3e-3  # AdamW, linear warm-up over `warmup_steps`, then constant
    warmup_steps: int = 50
    eval_every: int = 50
    num_layers: int = TINY_VLLM_SHAPE["num_layers"]
    hidden_size: int = TINY_VLLM_SHAPE["hidden_size"]
    max_position_embeddings: int = TINY_VLLM_SHAPE["max_position_embeddings"]
    device: str = "cpu"  # "cuda" for the GPU-scale policy


SPECS = {
    # 64-digit running sums; token accuracy 0.95 leaves ~1 error per completion on average
    "running-sums-64": SharpSpec(digits=64, max_steps=2000, target_accuracy=0.95),
    # the GPU-scale regime (`trl-alp stress --grid sharp-gpu`): 256-digit completions, an 8-layer model, on CUDA
    "running-sums-256": SharpSpec(
        digits=256,
        max_steps=20_000,
        target_accuracy=0.99,
        batch_size=64,
        learning_rate=1e-3,
        eval_every=200,
        num_layers=8,
        hidden_size=512,
        max_position_embeddings=1024,
        device="cuda",
    ),
    # the tests' variant: seconds to build, same code
    "running-sums-tiny": SharpSpec(
        digits=6, max_steps=30, target_accuracy=0.5, batch_size=8, eval_every=10, num_layers=2
    ),
}


def sharp_tokenizer(spec: SharpSpec):
    """The tiny byte-level BPE, also trained on running-sums text, so each `` d`` (space, digit) is one token."""
    rng = random.Random(0)
    texts = tuple(" ".join(running_sums_example(rng, spec.digits)) for _ in range(64))
    return build_tokenizer(extra_texts=texts)


def _encode(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batch(tokenizer, rows) -> tuple:
    import torch

    pairs = [_encode(tokenizer, row["prompt"], row["answer"]) for row in rows]
    width = max(len(ids) for ids, _ in pairs)
    ids = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in pairs]
    labels = [labels + [-100] * (width - len(labels)) for _, labels in pairs]
    return torch.tensor(ids), torch.tensor(labels)


def token_stats(model, tokenizer, rows) -> dict[str, float]:
    """Teacher-forced token accuracy, median entropy and mean log-prob of the answers' tokens."""
    import torch

    device = next(model.parameters()).device
    ids, labels = (t.to(device) for t in _batch(tokenizer, rows))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)[mask]
    chosen = logps.gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask]
    return {
        "token_accuracy": (logits.argmax(-1) == labels)[mask].float().mean().item(),
        "median_entropy": entropy.median().item(),
        "mean_logp": chosen.mean().item(),
    }


def pretrain(spec: SharpSpec, seed: int = 0, progress: bool = True):
    """Pretrain a sharp policy: returns ``(model, tokenizer, log)``; `log` holds the held-out token statistics at
    every evaluation and the step where `spec.target_accuracy` was reached (or `max_steps`)."""
    import torch

    threads = torch.get_num_threads()
    if spec.device == "cpu":
        torch.set_num_threads(1)  # deterministic from the seed, whatever the machine's cores
    try:
        tokenizer = sharp_tokenizer(spec)
        model = build_tiny_model(
            tokenizer,
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            max_position_embeddings=spec.max_position_embeddings,
            seed=seed,
        ).to(spec.device)
        held_out = list(running_sums_dataset(256, seed=seed + 10_000, digits=spec.digits))
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / spec.warmup_steps))
        log, start = [], time.perf_counter()
        model.train()
        for step in tqdm(range(1, spec.max_steps + 1), desc="pretraining", disable=not progress):
            rows = [running_sums_row(rng, spec.digits) for _ in range(spec.batch_size)]
            ids, labels = (t.to(spec.device) for t in _batch(tokenizer, rows))
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            warmup.step()
            if step % spec.eval_every == 0 or step == spec.max_steps:
                model.eval()
                stats = token_stats(model, tokenizer, held_out[:64])
                model.train()
                log.append({"step": step, "loss": loss.item(), **stats, "seconds": time.perf_counter() - start})
                logger.info("pretraining step %d: %s", step, stats)
                if stats["token_accuracy"] >= spec.target_accuracy:
                    break
        model.eval()
        return model, tokenizer, log
    finally:
        torch.set_num_threads(threads)


def running_sums_row(rng: random.Random, digits: int) -> dict:
    prompt, answer = running_sums_example(rng, digits)
    return {"prompt": [{"role": "user", "content": prompt}], "answer": answer}


def sample_stats(model, tokenizer, dataset, samples: int, seed: int, max_new_tokens: int) -> dict[str, float]:
    """Sharpness of a policy where it samples: `samples` completions per prompt (temperature 1, no truncation).

    Returns the median per-token entropy and the share of sampled tokens with probability below `LOW_PROB`, the
    mean reward, and pass@k for k = 1 and `samples` (a prompt passes when a completion is right to the last digit).
    """
    import torch

    out, prompt_length = sample_completions(
        model,
        tokenizer,
        dataset["prompt"],
        samples,
        seed,
        max_new_tokens,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, prompt_length:]
    logps = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)  # (batch, new, vocab)
    alive = torch.ones_like(new, dtype=torch.bool)
    alive[:, 1:] = (new[:, :-1] != tokenizer.eos_token_id).cumprod(-1).bool()  # up to and with the end of turn
    entropy = -(logps.exp() * logps).sum(-1)[alive]
    sampled = logps.gather(-1, new[..., None])[..., 0][alive]
    completions = tokenizer.batch_decode(new, skip_special_tokens=True)
    digits = [d for d in dataset["digits"] for _ in range(samples)]
    rewards = running_sums_reward([[{"role": "assistant", "content": c}] for c in completions], digits)
    solved = [[r == 1.0 for r in rewards[i : i + samples]] for i in range(0, len(rewards), samples)]
    return {
        "median_entropy": entropy.median().item(),
        "low_prob_share": (sampled < math.log(LOW_PROB)).float().mean().item(),
        "reward": sum(rewards) / len(rewards),
        "pass@1": sum(sum(s) / samples for s in solved) / len(solved),
        f"pass@{samples}": sum(any(s) for s in solved) / len(solved),
        "completion_tokens": alive.sum(-1).float().mean().item(),
    }


def sharp_model_path(name: str = "running-sums-64", seed: int = 0, progress: bool = True) -> str:
    """The folder of the sharp policy `name` (one of `SPECS`), pretrained and measured once, then cached.

    The folder holds the model, its tokenizer and ``sharpness.json``: the spec, the pretraining log and
    `sample_stats` on 64 held-out prompts with 8 samples each.
    """
    if name not in SPECS:
        raise ValueError(f"sharp policy {name!r}: choose from {list(SPECS)}")
    spec = SPECS[name]
    target = os.path.join(cache_dir(), f"sharp-{name}-seed{seed}")
    if os.path.exists(os.path.join(target, SHARPNESS_FILE)):
        return target
    logger.info("Pretraining the sharp policy %s (seed %d) into %s (once)", name, seed, target)
    model, tokenizer, log = pretrain(spec, seed, progress)
    held_out = running_sums_dataset(64, seed=seed + 20_000, digits=spec.digits)
    stats = sample_stats(model, tokenizer, held_out, samples=8, seed=seed, max_new_tokens=spec.digits + 1)
    model = model.cpu()
    model.config._name_or_path = target
    tmp = f"{target}.partial-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"name": name, "seed": seed, "spec": asdict(spec), "pretraining": log, "sharpness": stats}
    with open(os.path.join(tmp, SHARPNESS_FILE), "w") as f:
        json.dump(record, f, indent=2)
    if os.path.exists(target):  # another process built it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def read_sharpness(path: str) -> dict:
    with open(os.path.join(path, SHARPNESS_FILE)) as f:
        return json.load(f)
