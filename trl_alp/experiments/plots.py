"""The experiments' plots: ratio envelopes like the ALP paper's Figure 2, read from runs' ``trainer_state.json``, and the
stress test's phase diagram."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .analysis import clean_entropy_curve
from .runner import load_log_history, read_json, series, state_path

ENVELOPE_KEYS = ("q02", "q25", "q50", "q75", "q98")


def envelope_data(history: list[dict], level: str = "seq") -> dict[str, tuple[list[int], list[float]]]:
    """The quantile series ``alp/ratio/{level}/q02 … q98`` plus ``kl`` (k3 mismatch) and ``reward``."""
    data = {q: series(history, f"alp/ratio/{level}/{q}") for q in ENVELOPE_KEYS}
    data["kl"] = series(history, "alp/mismatch/k3_kl")
    data["reward"] = series(history, "reward")
    return data


def load_envelopes(
    run_dirs: Sequence[str], labels: Sequence[str] | None = None, level: str = "seq"
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The envelope data of every run, by label. Raises ``ValueError`` when a run logged no ratio quantiles, so
    nothing is drawn for it (an empty plot would look like a run without mismatch)."""
    labels = list(labels) if labels is not None else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    data, empty = {}, []
    for run_dir, label in zip(run_dirs, labels, strict=True):
        data[label] = envelope_data(load_log_history(run_dir), level)
        if not data[label]["q50"][0]:
            empty.append(run_dir)
    if empty:
        raise ValueError(f"nothing to plot: {'; '.join(_why_empty(d, level) for d in empty)}")
    return data


def _why_empty(run_dir: str, level: str) -> str:
    """Why a run has no `alp/ratio/{level}/*` values, from the trainer_state.json it was read from."""
    path = state_path(run_dir)
    state = read_json(path)
    steps, every = state.get("global_step", 0), state.get("logging_steps")
    if every and steps < every:
        return (
            f"{path} records {steps} steps but metrics are logged every {every} steps (logging_steps), so none was "
            "logged: train with --logging_steps 1"
        )
    return f"{path} holds no alp/ratio/{level}/* values (was the run trained with ALPGRPOTrainer?)"


def plot_envelopes(
    run_dirs: Sequence[str], output: str, labels: Sequence[str] | None = None, level: str = "seq"
) -> dict[str, dict]:
    """Write a PNG with, per run (one colour each): the ratio's P2–P98 and P25–P75 envelopes and median on a log
    axis, the k3 KL between training and rollout policy, and the reward. Returns the plotted data by label."""
    return draw_envelopes(load_envelopes(run_dirs, labels, level), output, level)


def draw_envelopes(plotted: dict[str, dict], output: str, level: str = "seq") -> dict[str, dict]:
    """Draw data from `load_envelopes` into the PNG `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ratio, ax_kl, ax_reward) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (label, data) in enumerate(plotted.items()):
        color = f"C{i}"
        steps, lo = data["q02"]
        ax_ratio.fill_between(steps, lo, data["q98"][1], color=color, alpha=0.15, linewidth=0)
        ax_ratio.fill_between(steps, data["q25"][1], data["q75"][1], color=color, alpha=0.35, linewidth=0)
        ax_ratio.plot(*data["q50"], color=color, label=label)
        ax_kl.plot(*data["kl"], color=color, label=label)
        ax_reward.plot(*data["reward"], color=color, label=label)
    ax_ratio.set_yscale("log")
    ax_ratio.axhline(1.0, color="black", linewidth=0.5)
    name = "sequence" if level == "seq" else "token"
    ax_ratio.set_title(f"{name}-level ratio π/μ: P2–P98, P25–P75, median")
    ax_kl.set_title("k3 KL(μ‖π) training vs rollout")
    ax_reward.set_title("reward")
    for ax in (ax_ratio, ax_kl, ax_reward):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return plotted


OUTCOME_COLORS = {"learned": "#4caf50", "stalled": "#ffe082", "unstable": "#fb8c00", "collapsed": "#e53935"}


def plot_phase_diagram(
    table: dict[str, dict[str, dict]], cells: list[str], corrections: list[str], outcomes: Sequence[str], path: str
) -> None:
    """Write the stress test's correction × cell grid as a PNG, coloured by outcome and annotated with the final
    reward (mean ± std over seeds).

    Args:
        table: The aggregated rows by cell and correction (`trl_alp.experiments.stress.aggregate`).
        cells: The columns, weakest mismatch first.
        corrections: The rows.
        outcomes: The outcome names, best first (each a key of `OUTCOME_COLORS`).
        path: Where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    outcomes = list(outcomes)
    grid = [
        [outcomes.index(table[c][k]["outcome"]) if k in table.get(c, {}) else math.nan for c in cells]
        for k in corrections
    ]
    # Sized so that its text stays legible when a page shows it at a page's width (about 8 in): narrow cells, the
    # legend below the grid rather than beside it.
    height = 0.55 * len(corrections) + 2.2
    fig, ax = plt.subplots(figsize=(max(1.25 * len(cells) + 1.8, 6.0), height))  # 6 in: the title and legend
    colors = ListedColormap([OUTCOME_COLORS[o] for o in outcomes])
    ax.imshow(grid, cmap=colors, vmin=0, vmax=len(outcomes) - 1, aspect="auto")
    for i, correction in enumerate(corrections):
        for j, cell in enumerate(cells):
            row = table.get(cell, {}).get(correction)
            if row is not None:
                collapsed = row["outcomes"]["collapsed"]
                text = f"{row['reward_final']:.2f}±{row['reward_final_std']:.2f}"
                text += f"\ncollapsed {collapsed}/{row['seeds']}" if collapsed else ""
                ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(cells)), cells, rotation=20, ha="right", fontsize=9)
    ax.set_yticks(range(len(corrections)), corrections, fontsize=9)
    ax.set_xlabel("mismatch cell, weak → strong", fontsize=9)
    ax.set_title("final reward (mean ± std over seeds), colour = outcome", fontsize=10)
    handles = [Patch(color=OUTCOME_COLORS[o], label=o) for o in outcomes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))  # 0.4 in at the bottom for the legend
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exploration(results: Sequence[dict], cells: Sequence[str], path: str) -> None:
    """Write the exploration figure of a grid with held-out evaluations: per cell, the clean policy's entropy over
    training (mean over seeds, per correction) above the final held-out pass@8 (mean and the seeds' min–max).

    Args:
        results: Finished run results (`trl_alp.experiments.stress.summarize_history`), with ``eval_final["pass@8"]``;
            a run without the clean policy's entropy (`trl_alp.experiments.analysis.clean_entropy_curve`) has no curve.
        cells: The columns, in the grid's order; a cell without results is left out.
        path: Where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_cell: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        by_cell.setdefault(r["cell"], {}).setdefault(r["correction"], []).append(r)
    cells = [c for c in cells if c in by_cell]
    if not cells:
        return
    # one colour per correction in every panel
    names = list(dict.fromkeys(r["correction"] for r in results))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    fig, axes = plt.subplots(2, len(cells), figsize=(3.6 * len(cells), 6.4), squeeze=False)
    for j, cell in enumerate(cells):
        corrections = list(by_cell[cell])
        top, bottom = axes[0][j], axes[1][j]
        for correction in corrections:
            curves = [c for c in map(clean_entropy_curve, by_cell[cell][correction]) if c]
            if curves:
                length = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
                top.plot(range(1, length + 1), mean, label=correction, lw=1.2, color=colors[correction])
            values = [r["eval_final"]["pass@8"] for r in by_cell[cell][correction] if r.get("eval_final")]
            if values:
                i, m = corrections.index(correction), sum(values) / len(values)
                spread = [[m - min(values)], [max(values) - m]]
                bottom.errorbar(i, m, yerr=spread, fmt="o", capsize=3, color=colors[correction])
        top.set_title(cell, fontsize=10)
        top.set_xlabel("step", fontsize=9)
        bottom.set_xticks(range(len(corrections)), corrections, rotation=60, ha="right", fontsize=8)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean policy entropy (nats/token),\nmean over seeds", fontsize=9)
    axes[1][0].set_ylabel("final held-out pass@8\n(mean, seeds' min–max)", fontsize=9)
    axes[0][0].legend(fontsize=6, ncol=2, loc="best")  # the first cell has every correction
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
