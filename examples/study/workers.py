"""The work: one run to its end with a checkpoint at every evaluation (:func:`train`, which resumes
from it), a worker taking runs from the queue until none is left (:func:`work`), and the cost of
an optimizer's step measured alone (:func:`step_cost`)."""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from oplora.bench.memory import MemoryTrace, tensor_bytes

from .optimizers import build_optimizer
from .queue import claim, others_running, pending
from .results import Results, RunKey, runs_of
from .task import Task


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
            if (not todo and not blocked) or not others_running(folder):
                return count
            time.sleep(poll)  # the rest is claimed, or waits on runs other workers are finishing
            continue
        try:
            say(f"{mine.tag}: start")
            train(task, mine, results, folder, say)
            count += 1
        finally:
            os.remove(os.path.join(folder, mine.tag + ".claim"))


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
