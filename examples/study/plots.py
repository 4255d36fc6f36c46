"""The report's figure: the selection metric against steps and against training time at each
optimizer's best lr, and the final metric and training loss against lr (:func:`plot`)."""

from __future__ import annotations

import math
from typing import Dict, List

from oplora.bench._common import save_figure

from .queue import Summary
from .task import Task


def plot(task: Task, sums: List[Summary], memory: Dict[str, Dict[str, object]], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plot skipped")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    for s in sums:
        color = None
        for seed, curve in sorted(s.curves.items()):
            steps, walls, values = zip(*curve)
            line, = axes[0].plot(steps, values, marker="o", ms=3, color=color, alpha=1.0 if seed == 0 else 0.5,
                                 label=f"{s.optimizer} lr={s.best:g}" if seed == 0 else None)
            color = line.get_color()
            step_s = memory.get(s.optimizer, {}).get("step_s")
            minutes = [(float(step_s) * n if step_s not in (None, "") else w) / 60 for n, w in zip(steps, walls)]
            axes[1].plot(minutes, values, marker="o", ms=3, color=color,
                         alpha=1.0 if seed == 0 else 0.5, label=f"{s.optimizer}" if seed == 0 else None)
        if s.grid:
            lrs = list(s.grid)
            axes[2].plot(lrs, [s.grid[lr] for lr in lrs], marker="o", color=color, label=s.optimizer)
            axes[3].plot(lrs, [s.final_train[lr] for lr in lrs], marker="o", color=color, label=s.optimizer)
    axes[0].set_title(f"{task.select} at each optimizer's best lr (faint: other seeds)")
    axes[0].set_xlabel("step")
    axes[1].set_title(f"{task.select} against training time (steps x s/step alone)")
    axes[1].set_xlabel("minutes")
    axes[2].set_title(f"final {task.select} against lr (seed 0)")
    axes[3].set_title("final training loss against lr (seed 0)")
    for ax in axes[2:]:
        ax.set_xscale("log")
        ax.set_xlabel("lr")
    for ax in axes[:3]:
        ax.set_ylabel(task.select)
    if not task.higher_is_better:
        # Everything starts from the pretrained model's value: cut the axes a little above it, so
        # that a diverged run (thousands) leaves the top instead of flattening the others.
        starts = [c[0][2] for s in sums for c in s.curves.values() if c and c[0][0] == 0 and math.isfinite(c[0][2])]
        finite = [v for s in sums for c in s.curves.values() for _, _, v in c if math.isfinite(v)]
        finite += [v for s in sums for v in s.grid.values() if math.isfinite(v)]
        for ax in axes[:3]:
            ax.set_yscale("log")
            if starts and finite:
                ax.set_ylim(0.95 * min(finite), 1.15 * max(starts))
        axes[2].set_title(f"final {task.select} against lr (seed 0; off the top: diverged)")
    axes[3].set_ylabel("cross-entropy")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, title)
