"""Capture the log-probs of the sampled tokens during ``transformers`` generation.

TRL stores rollout log-probs only on the vLLM path. On the ``generate`` path this module adds a logits processor
that keeps the previous step's log-softmax (one ``batch × vocab`` fp32 tensor, never the whole history) and, when
the next step shows which token was sampled, gathers that token's log-prob.

Which distribution is recorded. ``generate`` runs custom logits processors after its own processors (repetition
penalty, suppressed tokens, ...) and before the sampling warpers (temperature, top-k, top-p, min-p). The recorder
applies the temperature itself, so it records ``log softmax(logits / T)`` of the model that sampled: the same form
as TRL's training log-probs (also ``logits / T``, no truncation), which keeps the ratio consistent. With top-k,
top-p or min-p the tokens were really sampled from the truncated, renormalised distribution; the recorded value
ignores that renormalisation (the trainer warns once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList


class SampledLogprobRecorder(LogitsProcessor):
    """Logits processor that records ``log softmax(scores / temperature)`` of each sampled token."""

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.reset()

    def reset(self) -> None:
        self._pending: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []
        self.results: list[torch.Tensor] = []  # one (batch, new_tokens) tensor per finished `generate` call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:  # the last column of input_ids is the token sampled from `_pending`
            self._steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """Close one ``generate`` call: gather the final token and return ``(batch, new_tokens)`` log-probs."""
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, sequences[:, -1:]).squeeze(-1))
        logps = torch.stack(self._steps, dim=1) if self._steps else sequences.new_zeros((sequences.size(0), 0)).float()
        self._pending, self._steps = None, []
        self.results.append(logps)
        return logps


@contextlib.contextmanager
def record_generate_logprobs(model: nn.Module, temperature: float = 1.0) -> Iterator[SampledLogprobRecorder]:
    """Within the context, every ``model.generate(...)`` call also records the sampled tokens' log-probs.

    ``recorder.results[i]`` holds the ``(batch, new_tokens)`` log-probs of the i-th call, aligned with the generated
    tokens (``sequences[:, prompt_length:]``).
    """
    recorder = SampledLogprobRecorder(temperature)
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
