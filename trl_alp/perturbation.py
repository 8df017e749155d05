"""Layerwise perturbation: learnable Gaussian noise on the input of decoder layers, through forward pre-hooks.

At the input of each selected decoder layer l the hidden state becomes ``h + σ_l · ε`` with ``ε ~ N(0, I)`` of
the same shape and ``σ_l = exp(s_l)`` one learnable scalar per layer. The noise enters before the layer's input
norm, so it also flows into the residual stream.

Two properties make this cheap and safe:

* ε is drawn from a generator seeded by ``(seed, global step, micro step, layer, rank)``, so any recomputation
  (activation checkpointing that re-runs hooks) gets the identical noise, and backward regenerates ε instead of
  storing it (or takes the ε that the recomputation just before it drew, `NoiseStash`): no extra activation memory.
* Hooks exist only inside :meth:`LayerPerturbation.active` and fire only when gradients are enabled and the
  perturbation is not :meth:`~LayerPerturbation.suspended`, so generation, old/reference log-prob passes and
  evaluation are never perturbed (σ calibration alone forces them on for its no-grad forwards, :meth:`forced`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Where decoder layers live, in the order they are tried (after unwrapping DDP/FSDP/DeepSpeed and PEFT wrappers).
LAYER_CONTAINER_PATHS = (
    "model.layers",  # Llama, Qwen2/2.5/3, Mistral, Gemma 1/2/3 (text), Phi-3
    "model.language_model.layers",  # Gemma 3 and other vision-language wrappers
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "layers",
)

_MASK64 = (1 << 63) - 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip distributed wrappers (``.module``) and PEFT wrappers (``get_base_model()``) to reach the causal LM."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is not model:
                model = base
                continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)`` for the decoder-layer container of `model`.

    `path` is a dotted attribute path relative to the unwrapped model (e.g. ``"model.layers"``); without it the
    known containers in :data:`LAYER_CONTAINER_PATHS` are tried in order.
    """
    base = unwrap_model(model)
    candidates = (path,) if path else LAYER_CONTAINER_PATHS
    for candidate in candidates:
        obj: object = base
        for part in candidate.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return candidate, obj
    if path:
        raise ValueError(
            f"alp_layers_path={path!r} does not name a non-empty nn.ModuleList on {type(base).__name__}. "
            "Give the dotted path of the decoder-layer list relative to the causal LM, e.g. 'model.layers'."
        )
    raise ValueError(
        f"Could not find the decoder layers of {type(base).__name__}: looked for an nn.ModuleList at "
        f"{', '.join(LAYER_CONTAINER_PATHS)}. Set `alp_layers_path` in ALPConfig to the dotted path of the "
        "decoder-layer list relative to the causal LM (e.g. 'model.layers')."
    )


# The layer groups `alp_layers` accepts by name (besides indices and ranges).
_LAYER_GROUPS = ("all", "none", "early", "middle", "late", "logits")


def _layer_ranges(spec: str | Sequence[int] | None) -> str | list[tuple[int, int]]:
    """Syntax of a layer selection: a layer group name, or inclusive ``(lo, hi)`` ranges. Raises on malformed input."""
    if spec is None:
        return "all"
    if not isinstance(spec, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise ValueError(f"alp_layers={spec!r}: a list selection must hold ints only.")
        return [(i, i) for i in spec]
    text = spec.strip().lower()
    if text in _LAYER_GROUPS:
        return text
    if "logits" in text:
        raise ValueError(
            f"alp_layers={spec!r}: 'logits' (the logits-only ablation) cannot be combined with decoder layers."
        )
    ranges = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(
                f"alp_layers={spec!r} is malformed: use 'all', 'none', 'early', 'middle', 'late', 'logits', an "
                "index '3', an inclusive range '0-5', a comma-separated mix '0-2,7', or a list of ints."
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"alp_layers={spec!r}: range '{part.strip()}' is empty (end before start).")
        ranges.append((lo, hi))
    return ranges


def validate_layer_spec(spec: str | Sequence[int] | None) -> None:
    """Check the syntax of a layer selection without knowing the model (config-time validation)."""
    _layer_ranges(spec)


def is_logits_only(spec: str | Sequence[int] | None) -> bool:
    """Whether a layer selection is the logits-only ablation (noise on the final hidden state, no decoder layer)."""
    return _layer_ranges(spec) == "logits"


def parse_layer_spec(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Turn a layer selection into sorted, unique layer indices of a `num_layers`-deep stack.

    Accepted: ``"all"`` (or None), ``"none"``, ``"early"`` / ``"middle"`` / ``"late"`` (thirds of the stack),
    ``"3"``, ``"0-5"`` (inclusive range), comma-separated mixes such as ``"0-2,7"``, or a list of ints.
    """
    parsed = _layer_ranges(spec)
    if parsed == "all":
        return list(range(num_layers))
    if parsed in ("none", "logits"):  # "logits" perturbs no decoder layer (see LayerPerturbation)
        return []
    if isinstance(parsed, str):  # thirds of the stack; each group keeps at least one layer
        bounds = {"early": (0, 1), "middle": (1, 2), "late": (2, 3)}[parsed]
        start, stop = (round(b * num_layers / 3) for b in bounds)
        return list(range(min(start, num_layers - 1), max(stop, start + 1)))
    indices = sorted({i for lo, hi in parsed for i in range(lo, hi + 1)})
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        shown = bad if len(bad) <= 6 else f"[{bad[0]}, {bad[1]}, ..., {bad[-1]}] ({len(bad)} layers)"
        given = repr(spec)
        if len(given) > 40:  # a long spec is shown by its ends
            given = (
                f"{given[:20]} ... {given[-12:]} ({len(spec)} {'characters' if isinstance(spec, str) else 'items'})"
            )
        raise ValueError(f"alp_layers={given} selects layers {shown}, but the model has layers 0..{num_layers - 1}.")
    return indices


def noise_seed(seed: int, step: int, micro_step: int, layer: int, rank: int) -> int:
    """Mix the noise coordinates into one 63-bit generator seed (splitmix64 finaliser over each coordinate)."""
    x = 0x9E3779B97F4A7C15
    for value in (seed, step, micro_step, layer, rank):
        x = (x ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & _MASK64


_GENERATORS = threading.local()  # per thread (autograd may run backward in another thread): device -> Generator


def seeded_noise(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise in fp32, fully determined by `seed`, `shape` and `device`.

    One cached generator per device and thread is reseeded for every draw (reseeding resets the whole state, so the
    result does not depend on earlier draws).
    """
    device = torch.device(device)
    cache = getattr(_GENERATORS, "by_device", None)
    if cache is None:
        cache = _GENERATORS.by_device = {}
    generator = cache.get(device)
    if generator is None:
        generator = cache[device] = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


class NoiseStash:
    """The unit noise ε that a recomputed forward drew, kept for the backward that follows it (one per device).

    Where activation checkpointing re-runs the hooks (transformers < 5.18, FSDP's checkpoint wrapper), a layer's
    recomputation runs right before its backward: keeping ε there saves the backward its own draw, for one
    hidden-state tensor alive during that layer's backward. An entry is taken only with the same seed and shape, so
    it is always the ε the backward would draw.
    """

    def __init__(self):
        self._entries: dict[torch.device, tuple[int, torch.Tensor]] = {}

    def keep(self, seed: int, noise: torch.Tensor) -> None:
        self._entries[noise.device] = (seed, noise)

    def take(self, seed: int, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        entry = self._entries.get(device)
        if entry is None or entry[0] != seed or entry[1].shape != shape:
            return None
        del self._entries[device]
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()


class _AddSeededNoise(torch.autograd.Function):
    """``h + σ · s · ε`` whose backward regenerates ε from its seed (or takes it from a `NoiseStash`) instead of
    saving it.

    ``s`` is an optional detached per-token scale (relative σ); dL/dσ = Σ dL/dh' · s · ε. The noise buffer is
    scaled in place and becomes the output so no other hidden-sized tensor is allocated (in backward, the product
    with the gradient is taken in place too); the values are those of ``hidden + (σ · s · ε).to(hidden.dtype)``.
    """

    @staticmethod
    def forward(ctx, hidden, sigma, seed, scale, stash, keep):
        ctx.seed, ctx.shape, ctx.device, ctx.stash = seed, hidden.shape, hidden.device, stash
        ctx.save_for_backward(scale)
        noise = seeded_noise(hidden.shape, seed, hidden.device)
        if keep:  # a recomputation: ε stays as drawn for the backward, the scaled noise gets a buffer of its own
            stash.keep(seed, noise)
            noise = noise * (scale if scale is not None else sigma.float())
            if scale is not None:
                noise.mul_(sigma.float())
        else:
            if scale is not None:
                noise.mul_(scale)
            noise.mul_(sigma.float())
        if hidden.dtype != torch.float32:
            noise = noise.to(hidden.dtype)
        return noise.add_(hidden)

    @staticmethod
    def backward(ctx, grad_output):
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            (scale,) = ctx.saved_tensors
            noise = ctx.stash.take(ctx.seed, ctx.shape, ctx.device) if ctx.stash is not None else None
            if noise is None:
                noise = seeded_noise(ctx.shape, ctx.seed, ctx.device)
            if scale is not None:
                noise.mul_(scale)
            # a hidden-sized product then a sum (not a fused dot: its other summation order changes σ's gradient in
            # the last bits, and with it every later step of a run)
            grad_sigma = noise.mul_(grad_output).sum().reshape(1)
        return grad_output, grad_sigma, None, None, None, None


def add_seeded_noise(
    hidden: torch.Tensor,
    sigma: torch.Tensor,
    seed: int,
    scale: torch.Tensor | None = None,
    stash: NoiseStash | None = None,
    keep: bool = False,
) -> torch.Tensor:
    """Return ``hidden + sigma * scale * ε(seed)``, differentiable in `hidden` and `sigma` (a one-element tensor).

    With `stash`, the backward takes ε from it when a matching one is there; `keep` puts this forward's ε there.
    """
    return _AddSeededNoise.apply(hidden, sigma.reshape(1), seed, scale, stash, keep and stash is not None)


def hidden_rms(hidden: torch.Tensor) -> torch.Tensor:
    """Detached per-token RMS of `hidden`, ``(..., 1)`` in fp32: the scale of relative σ."""
    return hidden.detach().float().pow(2).mean(-1, keepdim=True).sqrt()


class LayerPerturbation(nn.Module):
    """One learnable noise scale per perturbed site, applied through hooks that exist only inside :meth:`active`.

    Sites are the inputs of the selected decoder layers (forward pre-hooks) or, for the logits-only ablation, the
    output of the model's backbone: the final hidden state that the LM head projects (a forward hook).

    It is deliberately *not* a submodule of the model: σ is neither saved with the model weights nor sent to vLLM
    by weight sync. Its parameter is ``log_sigma`` (σ = exp(log_sigma) > 0).

    Args:
        layers: The model's decoder-layer container (see `find_decoder_layers`).
        layer_indices: Indices of the layers whose input is perturbed (see `parse_layer_spec`).
        init_sigma: Initial σ₀ of every site, a finite number > 0.
        learnable: Whether ``log_sigma`` takes gradients.
        seed: Base seed of the noise; each draw is seeded by (seed, step, micro-step, site, rank).
        relative: Multiply each token's noise by its detached hidden-state RMS.
        final_module: For the logits-only ablation, the backbone whose output (the final hidden state) is
            perturbed; then `layer_indices` must be empty.

    Raises:
        ValueError: A non-finite or non-positive `init_sigma`, or `final_module` together with layers.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        layer_indices: Sequence[int],
        init_sigma: float = 0.02,
        learnable: bool = True,
        seed: int = 0,
        relative: bool = False,
        final_module: nn.Module | None = None,
    ):
        super().__init__()
        if not (math.isfinite(init_sigma) and init_sigma > 0):
            raise ValueError(f"alp_init_sigma must be a finite number > 0, got {init_sigma!r}")
        if final_module is not None and layer_indices:
            raise ValueError("The logits-only site cannot be combined with decoder layers.")
        self.layer_indices = list(layer_indices)
        # plain lists: the hooked modules are not registered as submodules
        self._sites: list[tuple[nn.Module, bool]] = [(layers[i], False) for i in self.layer_indices]
        self.labels = [str(i) for i in self.layer_indices]
        if final_module is not None:
            self._sites.append((final_module, True))
            self.labels.append("final")
        self.log_sigma = nn.Parameter(
            torch.full((len(self._sites),), math.log(init_sigma), dtype=torch.float32), requires_grad=learnable
        )
        self.seed = seed
        self.relative = relative
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._coords: tuple[int, int, int] | None = None
        self._suspended = 0
        self._forced = 0
        self._stash = NoiseStash()
        self.applied = [0] * len(self._sites)  # hook applications per site since the last `active()`

    @property
    def sigma(self) -> torch.Tensor:
        """σ per site, detached, ``(num_sites,)``."""
        return self.log_sigma.detach().exp()

    @property
    def is_active(self) -> bool:
        """Whether the hooks are registered (inside :meth:`active`)."""
        return bool(self._handles)

    def _perturb(self, slot: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The perturbed `hidden`, or None when this forward must stay clean."""
        if self._coords is None or self._suspended or not (torch.is_grad_enabled() or self._forced):
            return None
        step, micro_step, rank = self._coords
        layer = self.layer_indices[slot] if slot < len(self.layer_indices) else -1
        seed = noise_seed(self.seed, step, micro_step, layer, rank)
        sigma = self.log_sigma[slot].exp().to(hidden.device)
        # a site applied again in this micro-step with grad is a checkpoint recomputation: its backward comes next
        keep = self.applied[slot] > 0 and torch.is_grad_enabled() and self.log_sigma.requires_grad
        self.applied[slot] += 1
        scale = hidden_rms(hidden) if self.relative else None
        return add_seeded_noise(hidden, sigma, seed, scale, self._stash, keep)

    def _pre_hook(self, slot: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None:
                raise RuntimeError(
                    f"Decoder layer {self.labels[slot]} ({type(module).__name__}) was called without hidden states "
                    "as first positional argument or `hidden_states=` keyword; ALP cannot perturb it."
                )
            noisy = self._perturb(slot, hidden)
            if noisy is None:
                return None
            if args:
                return (noisy, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": noisy}

        return hook

    def _output_hook(self, slot: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            noisy = self._perturb(slot, hidden)
            if noisy is None:
                return None
            if isinstance(output, tuple):
                return (noisy, *output[1:])
            output.last_hidden_state = noisy
            return output

        return hook

    @contextlib.contextmanager
    def active(self, step: int, micro_step: int, rank: int = 0) -> Iterator[LayerPerturbation]:
        """Register the hooks for one training micro-step (forward *and* backward) and always remove them.

        Args:
            step: The optimizer step (``state.global_step``), part of the noise seed.
            micro_step: The micro-step inside the gradient-accumulation window, part of the noise seed.
            rank: The process index, part of the noise seed (independent noise across processes).

        Yields:
            This perturbation, with the hooks registered; they are removed on exit, even on an exception.
        """
        if self._handles:
            raise RuntimeError("LayerPerturbation.active() is not re-entrant.")
        self._coords = (int(step), int(micro_step), int(rank))
        self.applied = [0] * len(self._sites)
        try:
            for slot, (module, is_output) in enumerate(self._sites):
                if is_output:
                    handle = module.register_forward_hook(self._output_hook(slot))
                else:
                    handle = module.register_forward_pre_hook(self._pre_hook(slot), with_kwargs=True)
                self._handles.append(handle)
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._coords = None
            self._stash.clear()

    @contextlib.contextmanager
    def forced(self) -> Iterator[None]:
        """Let the hooks fire under ``torch.no_grad()`` too (σ calibration's noisy forwards); needs :meth:`active`."""
        if not self._handles:
            raise RuntimeError("LayerPerturbation.forced() must be used inside active().")
        self._forced += 1
        try:
            yield
        finally:
            self._forced -= 1

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Turn the hooks into no-ops (for generation and no-grad passes that run inside a training step)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1


def build_perturbation(
    model: nn.Module,
    layers: str | Sequence[int] | None,
    layers_path: str | None,
    init_sigma: float,
    *,
    perturbs: bool,
    learnable: bool,
    seed: int,
    relative: bool = False,
) -> tuple[LayerPerturbation, str | None]:
    """The perturbation an `ALPConfig` asks for on `model`, and where its layers live (None without noise).

    Without noise (`perturbs` False: Bypass, GRPO, TIS, MIS) it perturbs nothing and has no σ to learn.
    """
    if not perturbs:
        return LayerPerturbation(nn.ModuleList(), [], init_sigma, learnable=False, seed=seed), None
    path, decoder_layers = find_decoder_layers(model, layers_path)
    indices = parse_layer_spec(layers, len(decoder_layers))
    final = unwrap_model(model).base_model if is_logits_only(layers) else None
    logger.info("ALP: noise on %s", "the final hidden state" if final is not None else f"{path}{indices}")
    perturbation = LayerPerturbation(
        decoder_layers,
        indices,
        init_sigma=init_sigma,
        learnable=learnable and (bool(indices) or final is not None),
        seed=seed,
        relative=relative,
        final_module=final,
    )
    return perturbation, path
