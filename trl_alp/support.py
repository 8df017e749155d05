"""Sampling-support replay: exact ratios when rollouts were sampled with top-k, top-p or min-p.

With truncated sampling the rollout engine samples from μ restricted to the kept set S_t and renormalised,
``μ_S(y) = μ(y) / μ(S_t)``; vLLM reports exactly that (``processed_logprobs``). The training forward gives π over the
whole vocabulary, so ``π(y) / μ_S(y)`` is off by the kept mass on every token (0.8 at ``top_p=0.8``). The replay
compares like with like: ``log π_S(y) = z_y − logsumexp_{v ∈ S_t} z_v`` (``z`` the temperature-scaled logits), the
policy restricted to the support the engine sampled from.

The rollout side records S_t per token (the sampled token and the top kept tokens, at most ``max_tokens`` of them),
carried through TRL's lists as `SupportedLogp` floats
and into the batch as a row-padded id table (`pack_supports`). The training side gathers the LM-head rows of S_t
only (``|S_t| × hidden`` per token, never ``vocab``), in chunks under activation checkpointing
(`replayed_log_probs`).

A support larger than ``max_tokens`` is cut: its head H (the kept ids) is replayed and the engine says how much of
S_t's mass the head holds, ``c = μ_S(H)`` (its *cover*), so ``log π(S_t) ≈ log π(H) − log c``. That is exact when the
policy and the engine split S_t's mass between head and tail alike (on-policy), an approximation otherwise; the cut
fraction is logged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessorList, MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# Ids gathered per checkpointed chunk of the replay: bounds its transient memory to CHUNK_IDS × hidden floats.
CHUNK_IDS = 16384


class SupportedLogp(float):
    """A rollout log-prob that also carries the ids of the support it was sampled from.

    A float, so TRL's list handling (tool-call concatenation, truncation, ``torch.tensor``) keeps working; the ids
    ride along with the value through it.
    """

    support: tuple[int, ...]
    truncated: bool  # the support held more tokens than were kept
    log_mass: float  # log μ(S_t), the engine's kept mass (NaN where the engine does not report it: vLLM)
    log_cover: float  # log μ_S(kept ids): 0 for a whole support, below 0 for a cut one

    def __new__(
        cls,
        value: float,
        support: tuple[int, ...],
        truncated: bool = False,
        log_mass: float = math.nan,
        log_cover: float = 0.0,
    ):
        self = super().__new__(cls, value)
        self.support, self.truncated, self.log_mass, self.log_cover = support, truncated, log_mass, log_cover
        return self

    def __reduce__(self):  # pickled across processes (TRL gathers vLLM outputs) with its support
        return (SupportedLogp, (float(self), self.support, self.truncated, self.log_mass, self.log_cover))


def truncates(top_k: int | None, top_p: float, min_p: float | None) -> bool:
    """Whether these sampling settings sample from a truncated support."""
    return (top_k or 0) > 0 or top_p < 1.0 or min_p is not None


def support_warpers(top_k: int | None, top_p: float, min_p: float | None) -> LogitsProcessorList:
    """transformers' truncation warpers, in the order ``generate`` applies them after the temperature."""
    warpers = LogitsProcessorList()
    if (top_k or 0) > 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=min_p))
    return warpers


def kept_support(scaled: torch.Tensor, warpers: LogitsProcessorList, max_tokens: int):
    """The support the warpers keep from temperature-scaled scores ``(batch, vocab)``.

    Returns ``(log_probs, log_mass, ids, size)``: the renormalised log-probs over the support (``-inf`` outside),
    ``log μ(S_t)`` per row, the ids of the most probable kept tokens ``(batch, max_tokens)`` (``-1`` past the
    support) and the full support size per row.
    """
    warped = warpers(None, scaled.clone())
    kept = torch.isfinite(warped)
    log_probs = torch.log_softmax(warped, dim=-1)
    log_mass = torch.logsumexp(scaled.masked_fill(~kept, -torch.inf), dim=-1) - torch.logsumexp(scaled, dim=-1)
    values, ids = warped.topk(min(max_tokens, warped.size(-1)), dim=-1)
    return log_probs, log_mass, ids.masked_fill(~torch.isfinite(values), -1), kept.sum(-1)


def sampled_support(log_probs: torch.Tensor, ids: torch.Tensor, size: torch.Tensor, sampled: torch.Tensor):
    """Close one sampling step of `kept_support`'s output once the token ``sampled (batch, 1)`` is known.

    Returns the ids with the sampled token appended where a cut support lacks it (``-1`` elsewhere), and each row's
    log cover: the share of μ_S the ids hold, 0 for a whole support.
    """
    missing = ~(ids == sampled).any(-1, keepdim=True)
    ids = torch.cat([ids, torch.where(missing, sampled, -1)], dim=-1)
    stored = log_probs.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, -torch.inf)
    cut = size > (ids >= 0).sum(-1)
    return ids, torch.where(cut, torch.logsumexp(stored, dim=-1).clamp(max=0.0), 0.0)


def supported_logp(value: float, ids: list[int], size: int, log_mass: float, log_cover: float) -> SupportedLogp:
    """One token's `SupportedLogp` from a row of `sampled_support`'s ids (``-1`` padded) and the support's size."""
    support = tuple(i for i in ids if i >= 0)
    return SupportedLogp(value, support, size > len(support), log_mass, log_cover)


def support_from_top_logprobs(
    values: list[float | None], ids: list[int], token: int, top_n: int, bound: int
) -> SupportedLogp | None:
    """The sampled token's log-prob and support from an engine's top-N processed log-probs (vLLM's format).

    `values`/`ids` are sorted by rank, the sampled token included (last when it ranks below the top N); tokens outside
    S_t have ``-inf``. The support is complete when a ``-inf`` shows among the top N, or when N reaches `bound` (the
    most a support can hold: ``top_k`` or the vocabulary); otherwise it is marked truncated. ``None`` (vLLM's NaN)
    stays ``None``.
    """
    sampled = values[ids.index(token)]
    if sampled is None:
        return None
    kept = [(i, v) for i, v in zip(ids, values, strict=True) if v is not None and v > -math.inf]
    top = values[:top_n]
    complete = any(v is None or v == -math.inf for v in top) or len(top) < top_n or top_n >= bound
    cover = 0.0 if complete else min(0.0, math.log(math.fsum(math.exp(v) for _, v in kept)))
    return SupportedLogp(sampled, tuple(i for i, _ in kept), not complete, log_cover=cover)


def support_stats(rows: list[list[float]]) -> dict[str, float]:
    """Mean support size, truncated fraction and (where the engine reports it) mean kept mass μ(S_t) of a batch."""
    values = [v for row in rows for v in row if isinstance(v, SupportedLogp)]
    if not values:
        return {}
    stats = {
        "size": sum(len(v.support) for v in values) / len(values),
        "truncated_frac": sum(v.truncated for v in values) / len(values),
    }
    masses = [math.exp(v.log_mass) for v in values if not math.isnan(v.log_mass)]
    if masses:
        stats["engine_kept_mass"] = sum(masses) / len(masses)
    return stats


def pack_supports(rows: list[list[float]], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-padded support table of a batch's rollout log-probs.

    Returns ``ids (batch, L)`` (each row's supports concatenated in token order, ``-1`` padding), ``counts (batch,
    width)`` (support size per completion token; 0 where the value carries no support: tool output, padding) and
    ``covers (batch, width)`` (each support's log cover). Rows stay rows, so TRL's shuffling and splitting of the batch
    keep the table aligned.
    """
    counts = torch.zeros((len(rows), width), dtype=torch.long)
    covers = torch.zeros((len(rows), width))
    flat: list[list[int]] = []
    for b, row in enumerate(rows):
        ids: list[int] = []
        for t, value in enumerate(row[:width]):
            support = getattr(value, "support", ())
            counts[b, t] = len(support)
            covers[b, t] = getattr(value, "log_cover", 0.0)
            ids.extend(support)
        flat.append(ids)
    table = torch.full((len(rows), max([len(ids) for ids in flat] + [1])), -1, dtype=torch.long)
    for b, ids in enumerate(flat):
        table[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table, counts, covers


class RolloutSupports:
    """A generation batch's rollout rows and their sampling supports, packed into a table once per token width: TRL's
    old and reference passes and the batch itself all read it."""

    def __init__(self, rows: list[list[float]]):
        self.rows = rows
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def carried_by(rows: list[list[float]]) -> bool:
        """Whether `rows` carry supports (an engine of this package's; a custom ``rollout_func`` may return none)."""
        return any(isinstance(value, SupportedLogp) for row in rows for value in row)

    def table(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pack_supports` of the rows at `width` token columns."""
        if width not in self._tables:
            self._tables[width] = pack_supports(self.rows, width)
        return self._tables[width]


def _scaled_logits(hidden, weight, bias, ids, temperature, logit_scale, softcap):
    """TRL's fused-head transform of the logits ``hidden · W[ids]`` (scale, soft-cap, temperature), in fp32."""
    z = (hidden.float() * weight[ids].float()).sum(-1)
    if bias is not None:
        z = z + bias[ids].float()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _chunk_logsumexp(hidden, weight, bias, token_index, ids, num_tokens, temperature, logit_scale, softcap):
    z = _scaled_logits(hidden[token_index], weight, bias, ids, temperature, logit_scale, softcap)
    peak = torch.full((num_tokens,), -torch.inf, device=z.device).scatter_reduce(
        0, token_index, z.detach(), reduce="amax"
    )
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    sums = torch.zeros(num_tokens, device=z.device).index_add(0, token_index, torch.exp(z - peak[token_index]))
    return torch.log(torch.where(sums > 0, sums, 1.0)) + peak  # a token without support: 0, and a zero gradient


def replayed_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    counts: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    log_cover: torch.Tensor | None = None,
    chunk_ids: int = CHUNK_IDS,
) -> torch.Tensor:
    """``log π_S(y) = z_y − logsumexp_{v ∈ S_t} z_v`` per token, differentiable in `hidden`, `weight` and `bias`.

    Args:
        hidden: ``(N, H)`` hidden states that predict each token (the LM head's input).
        weight: the LM head's weight.
        bias: the LM head's bias, or ``None``.
        targets: ``(N,)`` the sampled tokens.
        counts: ``(N,)`` support size per token; tokens with 0 get 0.
        ids: ``(sum(counts),)`` the supports' ids, token after token.
        temperature: the sampling temperature the logits are divided by.
        logit_scale: the model's logit multiplier, as TRL's fused head applies it.
        softcap: the model's final logit soft-cap, or ``None``.
        log_cover: ``(N,)`` log μ_S of each token's ids where its support was cut (0 elsewhere): the replay then
            takes ``log π(S_t) ≈ log π(ids) − log_cover``.
        chunk_ids: ids per checkpointed chunk (its gathered weight rows are recomputed in backward, never kept).
    """
    num_tokens = targets.numel()
    target_z = _scaled_logits(hidden, weight, bias, targets, temperature, logit_scale, softcap)
    token_index = torch.repeat_interleave(torch.arange(num_tokens, device=counts.device), counts)
    parts, starts = [], torch.cumsum(counts, 0) - counts
    first = 0
    while first < num_tokens:  # chunks of whole tokens, about chunk_ids ids each
        last = int(torch.searchsorted(starts, starts[first] + chunk_ids, right=False).clamp(min=first + 1))
        lo, hi = int(starts[first]), int(starts[last - 1] + counts[last - 1])
        local = token_index[lo:hi] - first
        args = (hidden[first:last], weight, bias, local, ids[lo:hi], last - first, temperature, logit_scale, softcap)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        parts.append(
            checkpoint(_chunk_logsumexp, *args, use_reentrant=False) if needs_grad else _chunk_logsumexp(*args)
        )
        first = last
    log_norm = torch.cat(parts) if parts else target_z.new_zeros(0)
    if log_cover is not None:
        log_norm = log_norm - log_cover.to(log_norm)
    return torch.where(counts > 0, target_z - log_norm, 0.0)


def head_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a causal LM's logits, read from its config as TRL's fused LM head reads them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


@contextlib.contextmanager
def replay_forward(
    causal_lm: torch.nn.Module,
    input_ids: torch.Tensor,
    logits_to_keep: int,
    ids: torch.Tensor,
    counts: torch.Tensor,
    covers: torch.Tensor,
    temperature: float,
) -> Iterator[list[torch.Tensor]]:
    """Within the context, each forward of `causal_lm` (TRL runs one per chunk of rows, in order) also replays the
    support of its rows' completion tokens; yields the list of ``(rows, logits_to_keep)`` results, one per forward.

    The replay reads the backbone's last hidden state from a forward hook: the very forward TRL runs (with ALP's noise
    when it is armed), so the replayed log-probs carry the same gradient path as TRL's.
    """
    if counts.size(1) != logits_to_keep:
        raise ValueError(f"support table has {counts.size(1)} token columns, the forward scores {logits_to_keep}")
    head = causal_lm.get_output_embeddings()
    scale, softcap = head_transform(causal_lm.config)
    results: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        start, rows = sum(r.size(0) for r in results), hidden.size(0)
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        table = ids[start : start + rows]
        replayed = replayed_log_probs(
            hidden[:, -logits_to_keep - 1 : -1].reshape(-1, hidden.size(-1)),
            weight,
            bias,
            input_ids[start : start + rows, -logits_to_keep:].reshape(-1).to(weight.device),
            counts[start : start + rows].reshape(-1).to(weight.device),
            table[table >= 0].to(weight.device),
            temperature,
            scale,
            softcap,
            covers[start : start + rows].reshape(-1).to(weight.device),
        )
        results.append(replayed.view(rows, logits_to_keep))

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield results
    finally:
        handle.remove()
