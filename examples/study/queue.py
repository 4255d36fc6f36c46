"""The queue of runs: which come next (:func:`pending`: each optimizer's middle lr first, then its
neighbours, then the edges; an edge that is best extends the grid; then the other seeds at the best
lr), the claims that share them among worker processes (:func:`claim`: a lock file holding the
worker's pid, taken over when that process is dead), and where each optimizer stands
(:func:`summarize`)."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .optimizers import HALF_DECADE, half_decades
from .results import RunKey, better, final_value, finished, runs_of
from .task import Task


def center_out(lrs: Sequence[float]) -> List[float]:
    """The grid from its middle outwards (middle, below, above, ...)."""
    order = sorted(lrs)
    mid = (len(order) - 1) // 2
    out = [order[mid]]
    for d in range(1, len(order)):
        out += [order[i] for i in (mid - d, mid + d) if 0 <= i < len(order)]
    return out


def best_lr(task: Task, grid_runs: Dict[float, List[Dict[str, str]]]) -> Optional[float]:
    """The lr with the best final metric among finished seed-0 runs, or None."""
    best = None
    for lr, rows in sorted(grid_runs.items()):
        if finished(rows, task.steps) and (best is None or better(task, final_value(task, rows),
                                                                  final_value(task, grid_runs[best]))):
            best = lr
    return best


def pending(task: Task, grids: Dict[str, Sequence[float]], seeds: int,
            done: Dict[RunKey, List[Dict[str, str]]]) -> Tuple[List[RunKey], bool]:
    """The runs still to do, in order, and whether more may follow once running ones finish."""
    rounds: List[List[RunKey]] = []
    blocked = False
    for name, grid in grids.items():
        seed0 = {k.lr: rows for k, rows in done.items() if k.optimizer == name and k.seed == 0}
        order = center_out(grid)
        for i, lr in enumerate(order):
            while len(rounds) <= i:
                rounds.append([])
            if not finished(seed0.get(lr, []), task.steps):
                rounds[i].append(RunKey(name, lr, 0))
        if not all(finished(seed0.get(lr, []), task.steps) for lr in grid):
            blocked = True
            continue
        # The grid is complete: extend past an edge that is best, then add the seeds.
        lrs = sorted(set(grid) | set(seed0))
        running = [lr for lr in lrs if not finished(seed0[lr], task.steps)]  # an extension under way
        if running:
            rounds.append([RunKey(name, lr, 0) for lr in running])
            blocked = True
            continue
        best = best_lr(task, seed0)  # every lr of seed0 is finished by now
        extra = [lr for lr in lrs if not min(grid) <= lr <= max(grid)]  # the extensions so far
        if best in (lrs[0], lrs[-1]) and len(extra) < task.extend:
            lr = half_decades(best, 2)[1] if best == lrs[-1] else _half_decade_below(best)
            if not finished(seed0.get(lr, []), task.steps):
                rounds.append([RunKey(name, lr, 0)])
                blocked = True
                continue
        for seed in range(1, seeds):
            key = RunKey(name, best, seed)
            if not finished(done.get(key, []), task.steps):
                rounds.append([key])
    return [k for r in rounds for k in r], blocked


def _half_decade_below(lr: float) -> float:
    """The lr half a decade below ``lr`` on the 1-3-10 ladder (3e-3 -> 1e-3, 1e-3 -> 3e-4)."""
    return half_decades(lr / 10, 2)[1] if half_decades(lr / 10, 2)[1] < lr else lr / HALF_DECADE


# --- claims --------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: str, key: RunKey) -> bool:
    """Take ``key`` for this process (a lock file with its pid); a dead process's claim is taken over."""
    path = os.path.join(folder, key.tag + ".claim")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def others_running(folder: str) -> bool:
    """Whether a live process other than this one holds a claim in ``folder``."""
    for name in os.listdir(folder):
        if name.endswith(".claim"):
            try:
                with open(os.path.join(folder, name)) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and _alive(pid):
                return True
    return False


# --- where each optimizer stands -----------------------------------------------------------------
@dataclass
class Summary:
    optimizer: str
    grid: Dict[float, float]           # lr -> final selection metric (seed 0)
    best: Optional[float]
    finals: List[float]                # the final metric of each seed at the best lr
    final_train: Dict[float, float]    # lr -> mean train loss over the last interval (seed 0)
    s_per_step: float                  # median over finished runs of wall_s / steps
    curves: Dict[int, List[Tuple[int, float, float]]]  # seed -> (step, wall_s, metric) at the best lr
    complete: bool


def summarize(task: Task, grids: Dict[str, Sequence[float]], seeds: int, rows: List[Dict[str, str]]) -> List[Summary]:
    done = runs_of(rows)
    out = []
    for name in grids:
        seed0 = {k.lr: r for k, r in done.items() if k.optimizer == name and k.seed == 0 and finished(r, task.steps)}
        best = best_lr(task, seed0)
        finals, curves = [], {}
        for k, r in sorted(done.items(), key=lambda kv: kv[0].seed):
            if k.optimizer == name and k.lr == best:
                curves[k.seed] = [(int(x["step"]), float(x["wall_s"]), float(x[task.select]) if x[task.select] else math.nan)
                                  for x in r]
                if finished(r, task.steps):
                    finals.append(final_value(task, r))
        rates = [float(r[-1]["wall_s"]) / int(r[-1]["step"]) for r in seed0.values() if int(r[-1]["step"])]
        todo, blocked = pending(task, {name: grids[name]}, seeds, done)
        out.append(Summary(name, {lr: final_value(task, r) for lr, r in sorted(seed0.items())}, best, finals,
                           {lr: float(r[-1]["train_loss"]) for lr, r in sorted(seed0.items())},
                           statistics.median(rates) if rates else math.nan, curves, not todo and not blocked))
    return out
