"""The study's markdown report (:func:`report`): the ranking at each optimizer's best lr, each
seed, the grid, the step's cost, the set-up, and (through :mod:`study.plots`) the figure."""

from __future__ import annotations

import math
import os
import statistics
from importlib import metadata
from typing import Dict, Sequence

from oplora.bench._common import format_table

from . import plots
from .queue import summarize
from .results import Results
from .task import Task


def _versions() -> str:
    """The versions of the libraries a study's numbers depend on besides torch."""
    found = []
    for name in ("oplora", "transformers", "peft"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _fmt(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.4g}"


def report(task: Task, grids: Dict[str, Sequence[float]], seeds: int, results: Results, out: str, command: str,
           info: Dict[str, object], memory: Dict[str, Dict[str, int]], plot: bool = True, threads: int = 1,
           workers: int = 1) -> str:
    """Write ``<out>/<task.name>.md`` (and ``.png``) from the CSV; returns the markdown."""
    sums = summarize(task, grids, seeds, results.rows())
    ranked = sorted(sums, key=lambda s: (statistics.mean(s.finals) if s.finals else math.inf)
                    * (-1 if task.higher_is_better else 1))
    head = ["optimizer", "best lr", f"final {task.select} (mean over seeds)", "seeds", "each seed", "spread",
            "s/step alone", "s/step in the study", "opt state MiB", "peak MiB", "complete"]
    body = []
    for s in ranked:
        mem = memory.get(s.optimizer, {})
        mib = lambda b: f"{int(b) / 2**20:.1f}" if b not in (None, "") else ""  # noqa: E731
        body.append([s.optimizer, "" if s.best is None else f"{s.best:g}",
                     _fmt(statistics.mean(s.finals)) if s.finals else "", str(len(s.finals)),
                     ", ".join(_fmt(v) for v in s.finals),
                     f"{max(s.finals) - min(s.finals):.3g}"
                     if len(s.finals) > 1 and all(map(math.isfinite, s.finals)) else "",
                     _seconds(mem.get("step_s")), f"{s.s_per_step:.2f}", mib(mem.get("state_bytes")),
                     mib(mem.get("peak_bytes")),
                     "yes" if s.complete else "no"])
    grid_body = [[s.optimizer, ", ".join(f"{lr:g}: {_fmt(v)}" for lr, v in s.grid.items())] for s in sums]
    loss_body = [[s.optimizer, ", ".join(f"{lr:g}: {_fmt(v)}" for lr, v in s.final_train.items())] for s in sums]
    text = (f"# {task.title}\n\n- command: `{command}`\n- machine: {info['device_name']}, {info['cpu_threads']} "
            f"CPU thread(s) in the report's process; torch {info['torch']}, {_versions()}, Python {info['python']}; "
            f"report written {info['date']}\n"
            f"{task.description}"
            f"- schedule: {task.steps} steps, linear warmup {task.warmup} steps then cosine decay to 0 "
            f"(transformers.get_cosine_schedule_with_warmup); evaluation every {task.eval_every} steps\n"
            f"- best lr: the best final {task.select} of seed 0 over the grid (a best lr on the grid's edge "
            f"extends the grid); then {seeds} seeds at that lr (seed: LoRA init, batch order, optimizer seed)\n"
            "- s/step alone: the median of 10 training steps (forward, backward, optimizer) of a fresh model at "
            f"the best lr, measured after the runs, one optimizer at a time, {threads} CPU thread(s); the "
            "wall-clock panel of the plot is steps x this. s/step in the study: the runs' own clocks, shared "
            f"with {workers - 1} other worker(s) and other jobs on the machine: indicative only\n"
            "- memory: training step 2 of a fresh model (oplora.bench.memory.MemoryTrace: live tensor bytes)\n\n"
            + format_table(head, body, markdown=True)
            + f"\n\nFinal {task.select} at each lr (seed 0):\n\n"
            + format_table(["optimizer", "lr: value"], grid_body, markdown=True)
            + "\n\nFinal training loss (mean over the last evaluation interval) at each lr (seed 0):\n\n"
            + format_table(["optimizer", "lr: loss"], loss_body, markdown=True) + "\n")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, task.name + ".md"), "w") as f:
        f.write(text)
    if plot:
        plots.plot(task, sums, memory, os.path.join(out, task.name + ".png"),
              f"{task.title}; {info['device_name']}, torch {info['torch']}")
    return text


def _seconds(value) -> str:
    return "" if value in (None, "") else f"{float(value):.3g}"
