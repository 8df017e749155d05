"""Rollout log-probs on the ``transformers`` generate path, and an induced-mismatch rollout engine.

TRL stores rollout log-probs only on the vLLM path. On the ``generate`` path this module adds a logits processor
that keeps the previous step's log-softmax (one ``batch × vocab`` fp32 tensor, never the whole history) and, when
the next step shows which token was sampled, gathers that token's log-prob. It keeps its own copy on purpose: later
processors and warpers may modify the scores in place (a logits processor that forces tokens does).

Which distribution is recorded. ``generate`` runs custom logits processors after its own processors (repetition
penalty, suppressed tokens, ...) and before the sampling warpers (temperature, top-k, top-p, min-p). The recorder
applies the temperature itself, so it records ``log softmax(logits / T)`` of the model that sampled: the same form
as TRL's training log-probs (also ``logits / T``, no truncation), which keeps the ratio consistent. With top-k,
top-p or min-p the tokens were really sampled from the truncated, renormalised distribution: given the truncation
settings, the recorder applies transformers' own warpers to its copy and records ``log μ_S(y)`` and the kept support
S_t (`trl_alp.support`), which the trainer replays on the training side.

Induced mismatch. A vLLM engine differs from the trainer by kernels and precision. Without one, rollouts can be made to
differ the same
way: generate under autocast in bf16/fp16 while training in fp32, and/or from fake-quantised weights (per-output-channel
symmetric round-to-nearest). The rollout log-probs captured during such a generation are those of the engine that
really sampled, so the ratio sees the mismatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .support import kept_support, sampled_support, supported_logp

# autocast dtype of each alp_rollout_dtype on the generate path ("float32": none, the model's own precision)
ROLLOUT_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROLLOUT_WEIGHT_BITS = (4, 8)


class SampledLogprobRecorder(LogitsProcessor):
    """Logits processor that records ``log softmax(scores / temperature)`` of each sampled token.

    With `warpers` (the truncation of top-k/top-p/min-p) it records the log-prob under the truncated, renormalised
    distribution instead, and the support of every step (`support.kept_support`, at most `max_support` ids).
    """

    def __init__(self, temperature: float = 1.0, warpers: LogitsProcessorList | None = None, max_support: int = 0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.warpers = warpers if warpers else None
        self.max_support = max_support
        self.reset()

    def reset(self) -> None:
        self._pending: torch.Tensor | None = None
        self._pending_support: tuple[torch.Tensor, ...] | None = None
        self._steps: list[torch.Tensor] = []
        self._support_steps: list[tuple[torch.Tensor, ...]] = []
        self.results: list[torch.Tensor] = []  # one (batch, new_tokens) tensor per finished `generate` call
        # per call, with warpers: ids (batch, new_tokens, max_support + 1), -1 padded; the support's size, log kept
        # mass and log cover (`trl_alp.support`), each (batch, new_tokens)
        self.supports: list[tuple[torch.Tensor, ...]] = []

    def _close_step(self, sampled: torch.Tensor) -> None:
        self._steps.append(self._pending.gather(-1, sampled).squeeze(-1))
        if self._pending_support is not None:
            ids, log_mass, size = self._pending_support
            ids, log_cover = sampled_support(self._pending, ids, size, sampled)
            self._support_steps.append((ids, size, log_mass, log_cover))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:  # the last column of input_ids is the token sampled from `_pending`
            self._close_step(input_ids[:, -1:])
        scaled = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        if self.warpers is None:
            # one fused log_softmax kernel: on CPU it beats a logsumexp-only variant (a composite of four kernels)
            self._pending = torch.log_softmax(scaled, dim=-1)
        else:
            self._pending, log_mass, ids, size = kept_support(scaled, self.warpers, self.max_support)
            self._pending_support = (ids, log_mass, size)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """Close one ``generate`` call: gather the final token and return ``(batch, new_tokens)`` log-probs."""
        if self._pending is not None:
            self._close_step(sequences[:, -1:])
        logps = torch.stack(self._steps, dim=1) if self._steps else sequences.new_zeros((sequences.size(0), 0)).float()
        if self.warpers is not None:
            if self._support_steps:
                self.supports.append(
                    tuple(torch.stack(parts, dim=1) for parts in zip(*self._support_steps, strict=True))
                )
            else:
                rows = sequences.size(0)
                empty = sequences.new_zeros((rows, 0))
                self.supports.append((sequences.new_full((rows, 0, 1), -1), empty, empty.float(), empty.float()))
        self._pending, self._pending_support, self._steps, self._support_steps = None, None, [], []
        self.results.append(logps)
        return logps

    def rows(self, completion_ids: list[list[int]]) -> list[list[float]]:
        """The last call's log-probs as TRL's rows, one per completion and cut to its length; with warpers each value
        is a `SupportedLogp` carrying its support."""
        rows = [row[: len(ids)].tolist() for row, ids in zip(self.results[-1].cpu(), completion_ids, strict=True)]
        if self.warpers is None:
            return rows
        ids, sizes, masses, covers = (t.cpu().tolist() for t in self.supports[-1])
        return [
            [supported_logp(*token) for token in zip(*row)]
            for row in zip(rows, ids, sizes, masses, covers, strict=True)
        ]


@contextlib.contextmanager
def record_generate_logprobs(
    model: nn.Module, temperature: float = 1.0, warpers: LogitsProcessorList | None = None, max_support: int = 0
) -> Iterator[SampledLogprobRecorder]:
    """Within the context, every ``model.generate(...)`` call also records the sampled tokens' log-probs (and, with
    `warpers`, their supports: see `SampledLogprobRecorder`).

    ``recorder.results[i]`` holds the ``(batch, new_tokens)`` log-probs of the i-th call, aligned with the generated
    tokens (``sequences[:, prompt_length:]``).
    """
    recorder = SampledLogprobRecorder(temperature, warpers, max_support)
    original = model.generate
    had_own = "generate" in vars(model)

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(recorder)
        output = original(*args, logits_processor=processors, **kwargs)
        recorder.finish(output if isinstance(output, torch.Tensor) else output.sequences)
        return output

    model.generate = generate
    try:
        yield recorder
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round-to-nearest quantise–dequantise of a 2-D weight."""
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / levels
    return (weight / scale).round().clamp(-levels, levels) * scale


@contextlib.contextmanager
def quantized_weights(model: nn.Module, bits: int) -> Iterator[int]:
    """Temporarily replace every ``nn.Linear`` weight (LM head included) by its fake-quantised value.

    The originals are restored on exit, even on error; yields the number of weights replaced.
    """
    if bits not in ROLLOUT_WEIGHT_BITS:
        raise ValueError(f"alp_rollout_weight_bits must be one of {ROLLOUT_WEIGHT_BITS}, got {bits!r}")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.weight.dim() == 2:
                    saved.append((module.weight, module.weight.detach().clone()))
                    module.weight.copy_(fake_quantize(module.weight.float(), bits).to(module.weight.dtype))
        yield len(saved)
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


@contextlib.contextmanager
def rollout_engine(model: nn.Module, dtype: str | None = None, weight_bits: int | None = None) -> Iterator[None]:
    """Run generation inside this context to sample from a lower-precision engine (no-op when both are None)."""
    with contextlib.ExitStack() as stack:
        if weight_bits is not None:
            stack.enter_context(quantized_weights(model, weight_bits))
        if dtype is not None and dtype not in ROLLOUT_DTYPES:
            raise ValueError(f"alp_rollout_dtype must be one of {list(ROLLOUT_DTYPES)} or None, got {dtype!r}")
        if ROLLOUT_DTYPES.get(dtype) is not None:
            device_type = next(model.parameters()).device.type
            stack.enter_context(torch.autocast(device_type, dtype=ROLLOUT_DTYPES[dtype]))
        yield
