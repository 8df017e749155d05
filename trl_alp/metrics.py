"""Diagnostics of the importance ratio and of the training–rollout mismatch, as plain floats.

Inputs are already gathered across processes (NaN marks padding); every function ignores NaN entries and reads its
results back to the host in one transfer (one device sync per function, not one per number).
"""

from __future__ import annotations

import math

import torch

from .loss import LOG_RATIO_CLAMP, alp_log_weights, k3, sequence_log_ratio
from .support import support_stats

QUANTILES = {
    "q01": 0.01,
    "q02": 0.02,
    "q05": 0.05,
    "q25": 0.25,
    "q50": 0.5,
    "q75": 0.75,
    "q95": 0.95,
    "q98": 0.98,
    "q99": 0.99,
}
TAIL_FACTORS = (2, 5, 10)


def _finite(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().flatten()
    return values[torch.isfinite(values)]


def quantile_stats(values: torch.Tensor) -> dict[str, float]:
    """``q01 … q99``, ``min`` and ``max`` of the finite entries of `values` (NaN for all when there are none)."""
    values = _finite(values)
    if values.numel() == 0:
        return {name: math.nan for name in (*QUANTILES, "min", "max")}
    qs = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=values.dtype, device=values.device))
    return dict(zip((*QUANTILES, "min", "max"), torch.cat([qs, torch.stack(values.aminmax())]).tolist(), strict=True))


def mismatch_stats(token_log_ratio: torch.Tensor, seq_mean_log_ratio: torch.Tensor) -> dict[str, float]:
    """Mismatch between training log-probs π and rollout log-probs μ on the tokens μ sampled.

    `token_log_ratio` holds ``log π(y_t) − log μ(y_t)`` of every completion token, `seq_mean_log_ratio` its mean
    over each sequence. Returns

    * ``k1_kl``: mean of ``log μ − log π`` (unbiased estimate of KL(μ‖π); can be negative on a batch);
    * ``k3_kl``: mean of ``r − 1 − log r`` with ``r = π/μ`` (low-variance, non-negative estimate of KL(μ‖π);
      `trl_alp.loss.k3` in float64, as σ₀ calibration computes it);
    * ``abs_logp_diff``: mean ``|log π − log μ|``;
    * ``log_ppl_diff``: mean over sequences of ``log PPL_π − log PPL_μ`` (= −mean log-ratio of the sequence).
    """
    log_r = _finite(token_log_ratio)
    seq = _finite(seq_mean_log_ratio)
    # mean() of an empty tensor is NaN, which is the value to report when nothing was sampled
    values = torch.stack([(-log_r).mean(), k3(log_r.double()).mean().float(), log_r.abs().mean(), (-seq).mean()])
    return dict(zip(("k1_kl", "k3_kl", "abs_logp_diff", "log_ppl_diff"), values.tolist(), strict=True))


def weight_diagnostics(log_ratio: torch.Tensor) -> dict[str, float]:
    """Heavy-tail diagnostics of importance weights ``w = exp(log_ratio)`` (token or sequence level).

    * ``chi2``: ``mean(w²) − 1``, the χ² divergence estimate (0 when on-policy);
    * ``ess``: normalised effective sample size ``(Σw)² / (N·Σw²)`` in (0, 1];
    * ``frac_above_{k}x`` / ``frac_below_{k}x``: fraction of weights ``> k`` / ``< 1/k`` for k in 2, 5, 10.
    """
    log_w = _finite(log_ratio).double().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    names = ["chi2", "ess"] + [f"frac_{side}_{k}x" for k in TAIL_FACTORS for side in ("above", "below")]
    if log_w.numel() == 0:
        return dict.fromkeys(names, math.nan)
    w = torch.exp(log_w)
    values = [w.pow(2).mean() - 1, w.sum().pow(2) / (w.numel() * w.pow(2).sum())]
    for k in TAIL_FACTORS:
        values += [(log_w > math.log(k)).double().mean(), (log_w < -math.log(k)).double().mean()]
    return dict(zip(names, torch.stack(values).tolist(), strict=True))


class ALPMetrics:
    """ALP's diagnostics of a trainer, reduced across processes and appended to its ``_metrics[mode]``.

    Every method reduces or gathers over the processes: every rank calls them in the same order.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def __getitem__(self, mode: str):
        return self.trainer._metrics[mode]

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """The mean of `values` over the tokens of `mask`, over every process."""
        values = values.expand_as(mask).float()
        local = torch.stack([(values * mask).sum(), mask.sum().float()])
        total, count = self.trainer.accelerator.reduce(local, reduction="sum").tolist()
        return total / max(count, 1.0)

    def masked_means(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """:meth:`masked_mean` of several ``(values, mask)`` pairs, reduced over the processes in one collective."""
        local = torch.stack(
            [
                torch.stack([torch.where(mask.bool(), values.expand_as(mask).float(), 0.0).sum(), mask.sum().float()])
                for values, mask in pairs
            ]
        )
        totals = self.trainer.accelerator.reduce(local, reduction="sum").tolist()
        return [total / max(count, 1.0) for total, count in totals]

    def gather_flat(self, values: torch.Tensor) -> torch.Tensor:
        """Gather 1-D tensors of different lengths from every process (NaN-padded)."""
        accelerator = self.trainer.accelerator
        values = values.detach().float().contiguous()
        if accelerator.num_processes > 1:
            values = accelerator.pad_across_processes(values, dim=0, pad_index=math.nan)
            values = accelerator.gather(values)
        return values

    def log_ratio(self, mode: str, prefix: str, logps, rollout_logps, mask) -> None:
        """Quantiles, tail fractions, χ², ESS and KL estimates of ``π/μ`` at token and sequence level."""
        metrics = self[mode]
        valid = mask.bool() & torch.isfinite(rollout_logps)
        rollout_logps = torch.nan_to_num(rollout_logps, nan=0.0, posinf=0.0, neginf=0.0)
        logps, valid_f = logps.detach(), valid.float()
        token = self.gather_flat(alp_log_weights(logps, rollout_logps, valid_f, "token")[valid])
        seq = self.gather_flat(sequence_log_ratio(logps, rollout_logps, valid_f, "sequence"))
        seq_mean = self.gather_flat(sequence_log_ratio(logps, rollout_logps, valid_f, "geometric"))
        for level, values in (("token", token), ("seq", seq)):
            for name, value in quantile_stats(torch.exp(values)).items():
                metrics[f"{prefix}/ratio/{level}/{name}"].append(value)
            for name, value in weight_diagnostics(values).items():
                metrics[f"{prefix}/ratio/{level}/{name}"].append(value)
        for name, value in mismatch_stats(token, seq_mean).items():
            metrics[f"{prefix}/mismatch/{name}"].append(value)

    def log_sigma(self, mode: str, perturbation) -> None:
        """σ of every perturbed site (``alp/sigma/layer_<label>``) and its min, mean and max."""
        sigma = perturbation.sigma
        if not sigma.numel():
            return
        metrics = self[mode]
        for label, value in zip(perturbation.labels, sigma.tolist(), strict=True):
            metrics[f"alp/sigma/layer_{label}"].append(value)
        metrics["alp/sigma/min"].append(sigma.min().item())
        metrics["alp/sigma/mean"].append(sigma.mean().item())
        metrics["alp/sigma/max"].append(sigma.max().item())

    def log_faults(self, mode: str, faults: torch.Tensor) -> None:
        """Masked tokens dropped for a non-finite rollout / training log-prob (`trl_alp.loss.drop_nonfinite`)."""
        rollout, numerator = self.trainer.accelerator.reduce(faults, reduction="sum").tolist()
        self[mode]["alp/faults/rollout_nonfinite"].append(rollout)
        self[mode]["alp/faults/numerator_nonfinite"].append(numerator)

    def log_kept_mass(self, mode: str, unreplayed_logps, logps, counts, mask) -> None:
        """π(S_t), the mass the policy being trained keeps on each token's sampling support: what the replay divides
        out (``alp/support/policy_kept_mass``, over the tokens that carry a support)."""
        kept = torch.exp(unreplayed_logps - logps.detach())
        self[mode]["alp/support/policy_kept_mass"].append(self.masked_mean(kept, mask * (counts > 0)))

    def log_calibration(self, calibration) -> None:
        """What σ₀'s calibration chose (`trl_alp.calibration.Calibration`), at the step it ran."""
        metrics = self["train"]
        metrics["alp/sigma/calibrated"].append(calibration.sigma)
        metrics["alp/sigma/calibration_mismatch_kl"].append(calibration.mismatch_kl)
        metrics["alp/sigma/calibration_noise_kl"].append(calibration.noise_kl)

    def log_clip(self, mode: str, clip_stats: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """The clipped shares under ALP's names and TRL's (``clip_ratio/*``)."""
        metrics = self[mode]
        low = self.masked_mean(clip_stats["low"], mask)
        high = self.masked_mean(clip_stats["high"], mask)
        metrics["alp/clip/low"].append(low)
        metrics["alp/clip/high"].append(high)
        metrics["alp/clip/dual"].append(self.masked_mean(clip_stats["dual"], mask))
        metrics["clip_ratio/low_mean"].append(low)
        metrics["clip_ratio/high_mean"].append(high)
        metrics["clip_ratio/region_mean"].append(self.masked_mean(clip_stats["low"] | clip_stats["high"], mask))

    def log_rejection(self, mode: str, rejection, band_rejected: torch.Tensor | None, mask: torch.Tensor) -> float:
        """The shares each rollout-rejection criterion rejects (``alp/rollout_rejection/*``), in two collectives.

        Per criterion of `rejection` (a `trl_alp.rejection.RolloutRejection`, or None) and for ``veto``:
        ``masked_frac`` (valid tokens it rejects) and ``seq_masked_frac`` (sequences with tokens that have any); per
        verl criterion the ``mean`` of its statistic over the valid tokens (a sequence statistic counts once per
        token, as verl's ``rollout_rs_<option>_mean``) and its ``max`` over tokens or sequences; for the veto
        ``token_frac`` (valid tokens under the floor); the ratio band's `band_rejected` as ``alp/rollout_mask/
        {masked_frac, seq_masked_frac}``. ``alp/rollout_rejection/masked_frac`` and ``seq_masked_frac`` count every
        criterion together, the ratio band included.

        Returns:
            That combined ``masked_frac``.
        """
        prefix = "alp/rollout_rejection"
        has_tokens = mask.amax(-1, keepdim=True)
        everything = band_rejected if band_rejected is not None else torch.zeros_like(mask, dtype=torch.bool)
        shares: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        peaks: list[tuple[str, torch.Tensor]] = []
        if rejection is not None:
            for name, rejected in rejection.rejected.items():
                shares.append((f"{prefix}/{name}/masked_frac", rejected, mask))
                shares.append((f"{prefix}/{name}/seq_masked_frac", rejected.any(-1, keepdim=True), has_tokens))
                everything = everything | rejected
            for name, statistic in rejection.statistics.items():
                values, over = (statistic, mask) if statistic.dim() == 2 else (statistic.unsqueeze(-1), has_tokens)
                shares.append((f"{prefix}/{name}/mean", values, mask))  # per token, as verl's `_mean`
                peaks.append((f"{prefix}/{name}/max", values.float().masked_fill(~over.bool(), -math.inf).amax()))
            if rejection.below_veto is not None:
                shares.append((f"{prefix}/veto/token_frac", rejection.below_veto, mask))
        if band_rejected is not None:
            shares.append(("alp/rollout_mask/masked_frac", band_rejected, mask))
            shares.append(("alp/rollout_mask/seq_masked_frac", band_rejected.any(-1, keepdim=True), has_tokens))
        shares.append((f"{prefix}/masked_frac", everything, mask))
        shares.append((f"{prefix}/seq_masked_frac", everything.any(-1, keepdim=True), has_tokens))
        metrics = self[mode]
        for (name, _, _), value in zip(shares, self.masked_means([(v, m) for _, v, m in shares]), strict=True):
            metrics[name].append(value)
        if peaks:
            local = torch.stack([peak for _, peak in peaks])[None]
            for (name, _), value in zip(peaks, self.trainer.accelerator.gather(local).amax(0).tolist(), strict=True):
                metrics[name].append(value if math.isfinite(value) else math.nan)
        return metrics[f"{prefix}/masked_frac"][-1]

    def log_support(self, mode: str, rows) -> None:
        """Support size, truncated share and the engine's kept mass of a generation batch (``alp/support/*``)."""
        stats = support_stats(rows or [])
        names = ("size", "truncated_frac", "engine_kept_mass")
        accelerator = self.trainer.accelerator
        local = torch.tensor([stats.get(name, math.nan) for name in names], device=accelerator.device)
        values = accelerator.gather(local[None]).nanmean(0).tolist()
        for name, value in zip(names, values, strict=True):
            if not math.isnan(value):
                self[mode][f"alp/support/{name}"].append(value)
