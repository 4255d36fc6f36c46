"""The machinery both fine-tuning studies share (``lm_study.py``, ``classification_study.py``).

A study is a :class:`Task` (a model with PEFT LoRA, its batches, its loss, its evaluation) run
by every optimizer of :data:`OPTIMIZERS` over an lr grid, with linear warmup and cosine decay
(``transformers.get_cosine_schedule_with_warmup``), then with more seeds at each optimizer's best
lr. Runs are long, so the study is built to span sessions:

* every evaluation appends one row to the study's CSV as it happens (``optimizer, lr, seed,
  step, wall_s, train_loss`` + the task's metrics + ``status``);
* a checkpoint of the trainable parameters, the optimizer and the scheduler is saved at every
  evaluation (``<out>/<study>_runs/``, git-ignored), so a run killed mid-way resumes from its last
  evaluation (its later rows are dropped first) and a finished run is skipped;
* ``--workers N`` starts N processes (one CPU thread each by default) that take runs from one
  queue; a run is claimed with a lock file holding the worker's pid, so a crashed worker's run is
  picked up again by the next start.

The queue is ordered so that a study cut short is still balanced: each optimizer's middle lr
first, then its neighbours, then the grid's edges; once an optimizer's grid is complete, a best
lr on the grid's edge adds the next lr beyond it (the best lr must lie inside the grid), and a
best lr inside it adds the other seeds there.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import oplora
from oplora.bench._common import format_table, machine_info, save_figure
from oplora.bench.memory import MemoryTrace, tensor_bytes

HALF_DECADE = math.sqrt(10.0)


# --- optimizers ----------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0, **kw)


def _loraplus(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    kw.setdefault("loraplus_lr_ratio", 16.0)  # the LoRA+ paper's and PEFT's documented choice
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **kw)


def _riemannian(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **kw)


def _oplora(kind: str, **defaults) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
        args = {**defaults, **kw}
        if kind != "svd":
            args.setdefault("seed", seed)
        return oplora.create_optimizer(model, kind, lr=lr, **args)
    return build


# name -> builder(model, lr, seed, **variant). Each is what its documentation tells a user to
# write; nothing but the LoRA factors (and a task's head) is trainable.
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": _adamw,
    "LoRA+": _loraplus,
    "Riemannian": _riemannian,
    "OPLoRA": _oplora("oplora", momentum=0.9),
    "ScaledOPLoRA": _oplora("scaled"),
    "SVDLoRA": _oplora("svd", momentum=0.9),
}


_ITEMS = re.compile(r",(?![^()]*\))")  # commas outside parentheses


def _parse_value(text: str):
    if text.startswith("(") and text.endswith(")"):  # a tuple, e.g. betas=(0.9,0.99)
        return tuple(_parse_value(item.strip()) for item in _ITEMS.split(text[1:-1]) if item.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def split_name(name: str) -> Tuple[str, Dict[str, object]]:
    """``"OPLoRA[start=B,iters=2]"`` -> ``("OPLoRA", {"start": "B", "iters": 2})``; a value in
    parentheses is a tuple: ``"ScaledOPLoRA[betas=(0.9,0.99)]"``."""
    match = re.fullmatch(r"([^\[\]]+)(?:\[(.*)\])?", name)
    if not match or match.group(1) not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}, optionally with "
                         "keyword arguments in brackets, e.g. OPLoRA[start=B,iters=2]")
    kwargs = {}
    for item in filter(None, _ITEMS.split(match.group(2) or "")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = _parse_value(value.strip())
    return match.group(1), kwargs


def build_optimizer(name: str, model: nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    base, kwargs = split_name(name)
    return OPTIMIZERS[base](model, lr, seed, **kwargs)


def half_decades(low: float, count: int) -> Tuple[float, ...]:
    """``count`` lrs from ``low`` upwards, half a decade apart, on the 1-3-10 ladder
    (``half_decades(3e-4, 4) == (3e-4, 1e-3, 3e-3, 1e-2)``)."""
    out = []
    for i in range(count):
        value = low * HALF_DECADE ** i
        exp = math.floor(math.log10(value) + 1e-9)
        mantissa = value / 10 ** exp
        out.append(float(f"{(1 if mantissa < 2 else 3 if mantissa < 6 else 10) * 10 ** exp:.0e}"))
    return tuple(out)


# --- the task ------------------------------------------------------------------------------------
class Task:
    """What a study trains and measures. Subclasses set the attributes and the five methods."""

    name: str                       # the results' stem, e.g. "lm_study"
    title: str                      # one line for the markdown and the plot
    metrics: Tuple[str, ...]        # evaluation columns, e.g. ("heldout_loss", "heldout_ppl")
    select: str                     # the metric that picks the best lr
    higher_is_better: bool = False
    steps: int = 300
    warmup: int = 30
    eval_every: int = 50
    extend: int = 2                 # lrs a grid may grow by past an edge that is best
    description: str = ""           # the set-up, for the markdown

    def setup(self) -> None:
        """Load the model and the data (once per worker)."""
        raise NotImplementedError

    def model(self, seed: int) -> nn.Module:
        """A fresh PEFT model for seed ``seed`` (its LoRA init drawn from it)."""
        raise NotImplementedError

    def batch(self, seed: int, step: int):
        """Training batch ``step`` of seed ``seed`` (the same for every optimizer)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """The metrics on the held-out data (``model`` is in eval mode under no_grad)."""
        raise NotImplementedError

    def broken(self, metrics: Dict[str, float], start: Dict[str, float]) -> bool:
        """Whether a run whose evaluation gives ``metrics`` (``start``: at step 0) is beyond saving;
        it is then stopped and counted as diverged. Default: never (only NaN/Inf stops a run)."""
        return False


@dataclass(frozen=True)
class RunKey:
    optimizer: str
    lr: float
    seed: int

    @property
    def tag(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=_+-]", "_", f"{self.optimizer}_lr{self.lr:g}_seed{self.seed}")


def _key(row: Dict[str, str]) -> RunKey:
    return RunKey(row["optimizer"], float(row["lr"]), int(row["seed"]))


class Results:
    """The study's CSV, shared by the workers (every read-modify-write under one ``flock``)."""

    def __init__(self, path: str, metrics: Sequence[str]):
        self.path = path
        self.columns = ["optimizer", "lr", "seed", "step", "wall_s", "train_loss", *metrics, "status"]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def _locked(self):
        handle = open(self.path + ".lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def rows(self) -> List[Dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: Dict[str, object]) -> None:
        with self._locked():
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
                if new:
                    writer.writeheader()
                writer.writerow({c: row.get(c, "") for c in self.columns})

    def truncate(self, key: RunKey, after_step: int) -> None:
        """Drop ``key``'s rows past ``after_step`` (a run resumed from that step's checkpoint)."""
        with self._locked():
            rows = self.rows()
            keep = [r for r in rows if _key(r) != key or int(r["step"]) <= after_step]
            if len(keep) != len(rows):
                with open(self.path + ".tmp", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(keep)
                os.replace(self.path + ".tmp", self.path)


def runs_of(rows: Iterable[Dict[str, str]]) -> Dict[RunKey, List[Dict[str, str]]]:
    out: Dict[RunKey, List[Dict[str, str]]] = {}
    for row in rows:
        out.setdefault(_key(row), []).append(row)
    for rows_ in out.values():
        rows_.sort(key=lambda r: int(r["step"]))
    return out


def finished(rows: List[Dict[str, str]], steps: int) -> bool:
    return bool(rows) and (rows[-1]["status"] == "diverged" or int(rows[-1]["step"]) >= steps)


def final_value(task: Task, rows: List[Dict[str, str]]) -> float:
    """The selection metric at the end of a finished run; the worst value when it diverged."""
    value = float(rows[-1][task.select]) if rows[-1][task.select] not in ("", None) else math.nan
    if rows[-1]["status"] == "diverged" or not math.isfinite(value):
        return -math.inf if task.higher_is_better else math.inf
    return value


def better(task: Task, a: float, b: float) -> bool:
    return a > b if task.higher_is_better else a < b


# --- the queue -----------------------------------------------------------------------------------
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


# --- one run -------------------------------------------------------------------------------------
def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, warmup, steps)


def _trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module) -> Dict[str, float]:
    model.eval()
    try:
        return task.evaluate(model)
    finally:
        model.train()


def train(task: Task, key: RunKey, results: Results, folder: str, say: Callable[[str], None]) -> None:
    """Run ``key`` to the end (or to divergence), resuming from its checkpoint when there is one."""
    model = task.model(key.seed)
    opt = build_optimizer(key.optimizer, model, key.lr, key.seed)
    sched = warmup_cosine(opt, task.warmup, task.steps)
    ckpt_path = os.path.join(folder, key.tag + ".pt")
    start, wall, losses = 0, 0.0, []
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in ckpt["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start, wall = ckpt["step"], ckpt["wall"]
        say(f"{key.tag}: resumed at step {start}")
    results.truncate(key, start if start else -1)  # a run without a checkpoint restarts from nothing
    if start == 0:
        first = _evaluate(task, model)
        results.append({"optimizer": key.optimizer, "lr": key.lr, "seed": key.seed, "step": 0, "wall_s": 0.0, **first})
    else:
        row0 = runs_of(results.rows())[key][0]
        first = {m: float(row0[m]) for m in task.metrics}
    t_run = time.time()
    for step in range(start, task.steps):
        batch = task.batch(key.seed, step)
        t0 = time.perf_counter()
        status = ""
        try:
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
        except (FloatingPointError, RuntimeError) as err:  # the LoRSum optimizers refuse NaN/Inf
            if "nan" not in str(err).lower() and "inf" not in str(err).lower() and "finite" not in str(err).lower():
                raise
            status, loss = "diverged", torch.tensor(math.nan)
        sched.step()
        opt.zero_grad(set_to_none=True)
        wall += time.perf_counter() - t0
        losses.append(loss.item())
        if status or not math.isfinite(losses[-1]):
            results.append({"optimizer": key.optimizer, "lr": key.lr, "seed": key.seed, "step": step + 1,
                            "wall_s": round(wall, 3), "train_loss": losses[-1], "status": "diverged"})
            say(f"{key.tag}: diverged at step {step + 1}")
            break
        if (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
            metrics = _evaluate(task, model)
            mean_loss = statistics.mean(losses)
            broken = task.broken(metrics, first)
            results.append({"optimizer": key.optimizer, "lr": key.lr, "seed": key.seed, "step": step + 1,
                            "wall_s": round(wall, 3), "train_loss": mean_loss, **metrics,
                            "status": "diverged" if broken else ""})
            if broken:
                say(f"{key.tag}: stopped at step {step + 1} as diverged: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items()) + " (the task's rule)")
                break
            losses = []
            torch.save({"params": _trainable_state(model), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "wall": wall}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
            rate = (time.time() - t_run) / (step + 1 - start)
            say(f"{key.tag}: step {step + 1}/{task.steps}: train loss {mean_loss:.3f}, "
                + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + f" ({rate:.2f} s/step with evaluation, {rate * (task.steps - step - 1) / 60:.0f} min left)")
    if hasattr(opt, "close"):
        opt.close()
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)  # the run is over (its rows are the record)


# --- workers -------------------------------------------------------------------------------------
def work(task: Task, grids: Dict[str, Sequence[float]], seeds: int, results: Results, folder: str,
         say: Callable[[str], None], poll: float = 30.0) -> int:
    """Take runs from the queue until none is left; returns the number of runs done here."""
    os.makedirs(folder, exist_ok=True)
    task.setup()
    count = 0
    while True:
        todo, blocked = pending(task, grids, seeds, runs_of(results.rows()))
        mine = next((key for key in todo if claim(folder, key)), None)
        if mine is None:
            if (not todo and not blocked) or not _others_running(folder):
                return count
            time.sleep(poll)  # the rest is claimed, or waits on runs other workers are finishing
            continue
        try:
            say(f"{mine.tag}: start")
            train(task, mine, results, folder, say)
            count += 1
        finally:
            os.remove(os.path.join(folder, mine.tag + ".claim"))


def _others_running(folder: str) -> bool:
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


def logger(prefix: str) -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {prefix}{msg}", flush=True)
    return say


# --- cost of a step --------------------------------------------------------------------------------------
def step_cost(task: Task, name: str, lr: float, steps: int = 10) -> Dict[str, float]:
    """Memory and time of training steps of a fresh seed-0 model with optimizer ``name``:
    ``state_bytes`` (tensors in ``opt.state``), ``peak_bytes`` (the model's parameters and buffers
    + the highest live tensor bytes of step 2, from ``MemoryTrace``), and ``step_s``, the median
    wall time of steps 3 .. ``steps`` + 2 (forward, backward, optimizer step), measured one run at a
    time -- the runs' own clocks are shared with the other workers."""
    model = task.model(0)
    model_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    device = next(model.parameters()).device
    with MemoryTrace(device) as trace:
        opt = build_optimizer(name, model, lr, 0)
        for step in range(2):
            with trace.phase(f"step{step}"):
                task.loss(model, task.batch(0, step)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        state = tensor_bytes(v for entry in opt.state.values() for v in entry.values() if torch.is_tensor(v))
    times = []
    for step in range(2, steps + 2):
        t0 = time.perf_counter()
        task.loss(model, task.batch(0, step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if hasattr(opt, "close"):
        opt.close()
    return {"state_bytes": state, "peak_bytes": model_bytes + trace.phases["step1"].peak,
            "step_s": statistics.median(times), "threads": torch.get_num_threads()}


# --- the report ----------------------------------------------------------------------------------
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
        _plot(task, sums, memory, os.path.join(out, task.name + ".png"),
              f"{task.title}; {info['device_name']}, torch {info['torch']}")
    return text


def _seconds(value) -> str:
    return "" if value in (None, "") else f"{float(value):.3g}"


def _plot(task: Task, sums: List[Summary], memory: Dict[str, Dict[str, object]], path: str, title: str) -> None:
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


# --- the command line ----------------------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--optimizers", nargs="+", default=None, help=f"default: every one ({', '.join(OPTIMIZERS)})")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR,...",
                   help="the lr grid of one optimizer, which it adds (variants such as 'OPLoRA[start=B]=1e-3,3e-3'); "
                        "without --optimizers, only the --grid ones run")
    p.add_argument("--seeds", type=int, default=2, help="seeds at each best lr (default 2)")
    p.add_argument("--extend", type=int, default=2,
                   help="lrs a grid may grow by past an edge that is best (default 2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2); 0: run in this process")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the task's); the warmup and the evaluation interval "
                        "scale with it (a longer-run study: give it its own --name)")
    p.add_argument("--name", default=None,
                   help="results stem (default: the study's); e.g. a separate file for variants of the optimizers")
    p.add_argument("--report", action="store_true", help="only write the markdown and plot from the CSV")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the report's measurement of each optimizer's step (memory and time, one at a time)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke: a few steps, two optimizers, in-process")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    return p


def scale_schedule(task: Task, steps: int) -> None:
    """``task`` trained ``steps`` steps, its warmup and evaluation interval scaled alike (300 steps
    with 30 of warmup and an evaluation every 50 become 1,000, 100 and 167)."""
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    ratio = steps / task.steps
    task.warmup = max(0, round(task.warmup * ratio))
    task.eval_every = max(1, round(task.eval_every * ratio))
    task.steps = steps


def grids_from(args, defaults: Dict[str, Sequence[float]]) -> Dict[str, Tuple[float, ...]]:
    names = args.optimizers if args.optimizers is not None else ([] if args.grid else list(defaults))
    grids = {}
    for name in names:
        base = split_name(name)[0]
        if name not in defaults:  # a variant without a --grid of its own: its optimizer's grid
            print(f"{name}: no --grid given, using {base}'s grid {', '.join(f'{lr:g}' for lr in defaults[base])}")
        grids[name] = tuple(defaults.get(name, defaults[base]))
    for item in args.grid:
        name, _, lrs = item.rpartition("=")
        split_name(name)
        grids[name] = tuple(float(x) for x in lrs.split(","))
    for name in grids:
        split_name(name)
    return grids


def main(task: Task, defaults: Dict[str, Sequence[float]], argv: Optional[Sequence[str]], script: str) -> int:
    args = parser(task.title).parse_args(argv)
    torch.set_num_threads(args.threads)
    grids = grids_from(args, defaults)
    task.extend = args.extend
    if args.steps is not None:
        scale_schedule(task, args.steps)
    if args.name:
        task.name = args.name
    out = os.path.join(args.out, "quick") if args.quick else args.out
    results = Results(os.path.join(out, task.name + ".csv"), task.metrics)
    folder = os.path.join(out, task.name + "_runs")
    if args.worker_id is not None:
        work(task, grids, args.seeds, results, folder, logger(f"[w{args.worker_id}] "))
        return 0
    say = logger("")
    if not args.report:
        if args.workers == 0:
            work(task, grids, args.seeds, results, folder, say, poll=1.0)
        else:
            argv_ = list(sys.argv[1:] if argv is None else argv)
            procs = [subprocess.Popen([sys.executable, script, *argv_, "--worker-id", str(i)])
                     for i in range(args.workers)]
            codes = [p.wait() for p in procs]
            if any(codes):
                say(f"workers exited with {codes}")
                return 1
    memory_path = os.path.join(out, task.name + "_memory.csv")
    memory = {r["optimizer"]: r for r in _read(memory_path)}
    if not args.no_memory:
        task.setup()
        sums = summarize(task, grids, args.seeds, results.rows())
        for s in sums:
            if s.optimizer not in memory and s.best is not None:
                memory[s.optimizer] = {"optimizer": s.optimizer, "lr": s.best, **step_cost(task, s.optimizer, s.best)}
                say(f"{s.optimizer}: peak {memory[s.optimizer]['peak_bytes'] / 2**20:.1f} MiB, "
                    f"{memory[s.optimizer]['step_s']:.3f} s/step")
        _write(memory_path, list(memory.values()))
    command = " ".join([f"python examples/{os.path.basename(script)}",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    text = report(task, grids, args.seeds, results, out, command, machine_info(torch.device("cpu")), memory,
                  plot=not args.no_plot, threads=args.threads, workers=max(args.workers, 1))
    print(text)
    return 0


def _read(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: str, rows: List[Dict[str, object]]) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def cli(full: Callable[[], Task], quick: Callable[[], Task], grids: Dict[str, Sequence[float]],
        quick_grids: Dict[str, Sequence[float]], argv: Optional[Sequence[str]], script: str) -> int:
    """A study's command line: ``--quick`` runs ``quick()`` in-process on ``quick_grids`` (one seed,
    no grid extension, no measurement), anything else ``full()`` on ``grids`` (:func:`main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" not in argv:
        return main(full(), grids, argv, script)
    task = quick()
    task.title += " (--quick smoke)"
    argv = ["--workers", "0", "--seeds", "1", "--extend", "0", "--no-memory", *argv]
    if "--optimizers" not in argv:
        argv += ["--optimizers", *quick_grids]
    return main(task, {**grids, **quick_grids}, argv, script)
