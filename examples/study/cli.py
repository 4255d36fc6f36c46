"""A study's command line (:func:`cli`, :func:`main`): the options, the runs in this process or in
``--workers`` worker processes, each optimizer's step measured into ``<name>_memory.csv``, then
the report."""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from oplora.bench._common import machine_info

from .optimizers import OPTIMIZERS, split_name
from .queue import summarize
from .report import report
from .results import Results
from .task import Task
from .workers import logger, step_cost, work

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # examples/, whose results/ is --out's default


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
    p.add_argument("--out", default=os.path.join(EXAMPLES, "results"))
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
