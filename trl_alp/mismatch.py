"""Training–inference mismatch on purpose, for users (and CI) without a fast inference engine.

A vLLM engine differs from the trainer by kernels and precision. Without one, rollouts can be made to differ the same
way: generate under autocast in bf16/fp16 while training in fp32, and/or from fake-quantised weights (per-output-channel
symmetric round-to-nearest). The rollout log-probs captured during such a generation are those of the engine that
really sampled, so the ratio sees the mismatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

ROLLOUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ROLLOUT_WEIGHT_BITS = (4, 8)


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
        if dtype is not None:
            if dtype not in ROLLOUT_DTYPES:
                raise ValueError(f"alp_rollout_dtype must be one of {list(ROLLOUT_DTYPES)} or None, got {dtype!r}")
            device_type = next(model.parameters()).device.type
            stack.enter_context(torch.autocast(device_type, dtype=ROLLOUT_DTYPES[dtype]))
        yield
