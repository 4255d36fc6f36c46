"""``examples/study/``, the machinery of the fine-tuning studies: the queue (grid order, edge
extension, seeds), the shared CSV, claims, and a run killed mid-way resuming to the same rows as
an uninterrupted one. On a tiny PEFT model, so it runs in seconds."""

import math
import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from study.cli import grids_from, parser, scale_schedule  # noqa: E402
from study.optimizers import build_optimizer, half_decades, split_name  # noqa: E402
from study.queue import _half_decade_below, claim, pending, summarize  # noqa: E402
from study.report import report  # noqa: E402
from study.results import Results, RunKey, final_value, finished, runs_of  # noqa: E402
from study.task import Task  # noqa: E402
from study.workers import train  # noqa: E402


class Tiny(Task):
    name = "tiny"
    title = "tiny regression"
    metrics = ("test_loss",)
    select = "test_loss"
    steps, warmup, eval_every = 6, 1, 2

    def __init__(self, stop_at=None):
        self.stop_at = stop_at
        self.calls = 0

    def setup(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(8, 4, generator=g, dtype=torch.float64)
        self.x = torch.randn(64, 8, generator=g, dtype=torch.float64)

    def model(self, seed):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        base.requires_grad_(False)
        return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                         init_lora_weights="gaussian"))

    def batch(self, seed, step):
        g = torch.Generator().manual_seed(1000 * seed + step)
        x = torch.randn(16, 8, generator=g, dtype=torch.float64)
        return x, torch.tanh(x @ self.w)

    def loss(self, model, batch):
        self.calls += 1
        if self.stop_at is not None and self.calls > self.stop_at:
            raise KeyboardInterrupt("killed")
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, model):
        return {"test_loss": float(((model(self.x) - torch.tanh(self.x @ self.w)) ** 2).mean())}


def _rows(key, task, folder, stop_at=None):
    task.setup()
    results = Results(os.path.join(folder, "tiny.csv"), task.metrics)
    runs = os.path.join(folder, "runs")
    os.makedirs(runs, exist_ok=True)
    task.stop_at = stop_at
    try:
        train(task, key, results, runs, lambda msg: None)
    except KeyboardInterrupt:
        pass
    return results


@pytest.mark.parametrize("name", ["AdamW", "OPLoRA", "ScaledOPLoRA", "LoRA+"])
def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path, name):
    key = RunKey(name, 1e-2, 0)
    whole = _rows(key, Tiny(), str(tmp_path / "whole")).rows()
    assert [int(r["step"]) for r in whole] == [0, 2, 4, 6]
    # Killed in step 4 (after the checkpoint of step 2 and the row of step 2), then run again.
    cut = _rows(key, Tiny(), str(tmp_path / "cut"), stop_at=3)
    assert [int(r["step"]) for r in cut.rows()] == [0, 2]
    assert os.path.exists(tmp_path / "cut" / "runs" / (key.tag + ".pt"))
    again = _rows(key, Tiny(), str(tmp_path / "cut")).rows()
    assert [int(r["step"]) for r in again] == [0, 2, 4, 6]
    for a, b in zip(whole, again):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"], (name, a, b)
    assert float(whole[-1]["test_loss"]) < float(whole[0]["test_loss"])
    assert not os.path.exists(tmp_path / "cut" / "runs" / (key.tag + ".pt"))  # removed when the run is over
    # Rows of a run whose checkpoint is gone (a fresh clone) are replaced, not doubled.
    _rows(key, Tiny(), str(tmp_path / "lost"), stop_at=3)
    os.remove(tmp_path / "lost" / "runs" / (key.tag + ".pt"))
    assert [int(r["step"]) for r in _rows(key, Tiny(), str(tmp_path / "lost")).rows()] == [0, 2, 4, 6]


def test_a_run_the_task_calls_broken_stops_as_diverged(tmp_path):
    task = Tiny()
    task.broken = lambda metrics, start: metrics["test_loss"] > 0.5 * start["test_loss"]  # never reached
    key = RunKey("AdamW", 1e-2, 0)
    rows = _rows(key, task, str(tmp_path)).rows()
    assert [int(r["step"]) for r in rows] == [0, 2] and rows[-1]["status"] == "diverged"
    assert finished(rows, task.steps) and final_value(task, rows) == math.inf


def test_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    results = Results(str(tmp_path / "r.csv"), ("m",))
    key, other = RunKey("AdamW", 1e-3, 0), RunKey("AdamW", 3e-3, 0)
    for step in (0, 2, 4):
        results.append({"optimizer": "AdamW", "lr": 1e-3, "seed": 0, "step": step, "m": step})
        results.append({"optimizer": "AdamW", "lr": 3e-3, "seed": 0, "step": step, "m": step})
    results.truncate(key, 2)
    runs = runs_of(results.rows())
    assert [r["step"] for r in runs[key]] == ["0", "2"] and [r["step"] for r in runs[other]] == ["0", "2", "4"]


def _done(task, name, lr, seed, value, diverged=False):
    rows = [{"optimizer": name, "lr": str(lr), "seed": str(seed), "step": "0", "wall_s": "0", "test_loss": "9", "train_loss": "",
             "status": ""},
            {"optimizer": name, "lr": str(lr), "seed": str(seed), "step": str(task.steps), "wall_s": "6", "test_loss": str(value),
             "train_loss": "1", "status": "diverged" if diverged else ""}]
    return {RunKey(name, lr, seed): rows}


def test_queue_order_extension_and_seeds():
    task = Tiny()
    grid = {"AdamW": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "OPLoRA": (1e-3, 3e-3, 1e-2)}
    todo, blocked = pending(task, grid, 2, {})
    # Middle lrs of every optimizer first, then their neighbours, then the edges.
    assert todo[:2] == [RunKey("AdamW", 1e-3, 0), RunKey("OPLoRA", 3e-3, 0)]
    assert [k.lr for k in todo if k.optimizer == "AdamW"] == [1e-3, 3e-4, 3e-3, 1e-4, 1e-2]
    assert blocked and len(todo) == 8
    done = {}
    for lr, value in zip(grid["AdamW"], (5.0, 4.0, 3.0, 3.5, math.nan)):
        done.update(_done(task, "AdamW", lr, 0, value, diverged=math.isnan(value)))
    for lr, value in zip(grid["OPLoRA"], (5.0, 4.0, 3.0)):  # best on the upper edge
        done.update(_done(task, "OPLoRA", lr, 0, value))
    todo, blocked = pending(task, grid, 2, done)
    assert todo == [RunKey("AdamW", 1e-3, 1), RunKey("OPLoRA", 3e-2, 0)] and blocked
    done.update(_done(task, "OPLoRA", 3e-2, 0, 3.5))  # the extension is worse: 1e-2 is inside now
    done.update(_done(task, "AdamW", 1e-3, 1, 3.1))
    todo, blocked = pending(task, grid, 2, done)
    assert todo == [RunKey("OPLoRA", 1e-2, 1)] and not blocked
    done.update(_done(task, "OPLoRA", 1e-2, 1, 3.2))
    assert pending(task, grid, 2, done) == ([], False)
    sums = {s.optimizer: s for s in summarize(task, grid, 2, [r for rows in done.values() for r in rows])}
    assert sums["AdamW"].best == 1e-3 and sorted(sums["AdamW"].finals) == [3.0, 3.1] and sums["AdamW"].complete
    assert sums["AdamW"].grid[1e-2] == math.inf  # diverged counts as the worst
    assert sums["OPLoRA"].best == 1e-2 and 3e-2 in sums["OPLoRA"].grid


def test_extension_stops_after_the_limit_and_higher_is_better():
    task = Tiny()
    task.higher_is_better, task.extend = True, 1
    grid = {"AdamW": (1e-3, 3e-3, 1e-2)}
    done = {}
    for lr, value in zip(grid["AdamW"] + (3e-2,), (0.5, 0.6, 0.7, 0.8)):  # always better upwards
        done.update(_done(task, "AdamW", lr, 0, value))
    todo, blocked = pending(task, grid, 2, done)
    assert todo == [RunKey("AdamW", 3e-2, 1)] and not blocked  # no second extension


def test_an_extension_under_way_comes_before_the_seeds():
    # A killed worker leaves an extension half-run: it must be finished (its lr may turn out best)
    # before the seeds, not passed over because the finished lrs no longer have their best on the edge.
    task = Tiny()
    grid = {"OPLoRA": (1e-3, 3e-3, 1e-2)}
    done = {}
    for lr, value in zip(grid["OPLoRA"], (3.0, 4.0, 5.0)):  # best on the lower edge
        done.update(_done(task, "OPLoRA", lr, 0, value))
    assert pending(task, grid, 2, done) == ([RunKey("OPLoRA", 3e-4, 0)], True)
    half = _done(task, "OPLoRA", 3e-4, 0, 2.5)
    half[RunKey("OPLoRA", 3e-4, 0)][-1]["step"] = str(task.steps // 2)
    done.update(half)
    assert pending(task, grid, 2, done) == ([RunKey("OPLoRA", 3e-4, 0)], True)
    done.update(_done(task, "OPLoRA", 3e-4, 0, 2.5))
    assert pending(task, grid, 2, done)[0] == [RunKey("OPLoRA", 1e-4, 0)]


def test_the_report_shows_each_seed_and_a_diverged_seed_sinks_the_mean(tmp_path):
    task = Tiny()
    grid = {"AdamW": (1e-3, 3e-3, 1e-2), "OPLoRA": (1e-3, 3e-3, 1e-2)}
    results = Results(str(tmp_path / "tiny.csv"), task.metrics)
    done = {}
    for lr, value in zip(grid["AdamW"], (4.0, 3.0, 5.0)):
        done.update(_done(task, "AdamW", lr, 0, value))
        done.update(_done(task, "OPLoRA", lr, 0, value + 0.5))
    done.update(_done(task, "AdamW", 3e-3, 1, 3.2))
    done.update(_done(task, "OPLoRA", 3e-3, 1, math.nan, diverged=True))
    for rows in done.values():
        for row in rows:
            results.append(row)
    info = {"device_name": "cpu", "cpu_threads": 1, "torch": torch.__version__, "python": "3", "date": "today"}
    md = report(task, grid, 2, results, str(tmp_path), "cmd", info, {}, plot=False)
    first = {}  # the summary table's row of each optimizer (the later tables have one too)
    for line in md.splitlines():
        first.setdefault(line.split(" | ")[0], line)
    assert "| 3.1 | 2 | 3, 3.2 | 0.2 |" in first["| AdamW"]
    assert "| diverged | 2 | 3.5, diverged |  |" in first["| OPLoRA"]
    assert md.index("| AdamW |") < md.index("| OPLoRA |")  # ranked by the mean


def test_claims_exclude_live_workers_and_take_over_dead_ones(tmp_path):
    key = RunKey("OPLoRA[start=B]", 1e-3, 0)
    assert "[" not in key.tag and "]" not in key.tag
    assert claim(str(tmp_path), key)
    assert not claim(str(tmp_path), key)  # this (live) process holds it
    with open(tmp_path / (key.tag + ".claim"), "w") as f:
        f.write("999999999")  # a pid that does not exist
    assert claim(str(tmp_path), key)


def test_optimizer_names_with_arguments():
    assert split_name("OPLoRA[start=B,iters=2,prox=0.001]") == ("OPLoRA", {"start": "B", "iters": 2,
                                                                          "prox": 0.001})
    assert split_name("LoRA+") == ("LoRA+", {})
    assert split_name("ScaledOPLoRA[iters=0,betas=(0.9,0.99),damping=1e-05]") == (
        "ScaledOPLoRA", {"iters": 0, "betas": (0.9, 0.99), "damping": 1e-5})
    with pytest.raises(SystemExit, match="unknown optimizer"):
        split_name("Adam")
    assert half_decades(1e-4, 5) == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert half_decades(3e-5, 4) == (3e-5, 1e-4, 3e-4, 1e-3)  # the 1-3-10 ladder, never 9e-5
    assert [_half_decade_below(lr) for lr in (3e-3, 1e-3, 9e-4)] == [1e-3, 3e-4, 3e-4]
    model = Tiny().model(0)
    opt = build_optimizer("OPLoRA[start=B,iters=2]", model, 1e-2, 0)
    assert opt.param_groups[0]["start"] == "B" and opt.param_groups[0]["iters"] == 2
    opt.close()


def test_a_variant_without_a_grid_of_its_own_uses_its_optimizers():
    defaults = {"OPLoRA": (1e-3, 3e-3), "AdamW": (1e-4,)}
    args = parser("t").parse_args(["--optimizers", "OPLoRA[prox=0]", "AdamW"])
    assert grids_from(args, defaults) == {"OPLoRA[prox=0]": (1e-3, 3e-3), "AdamW": (1e-4,)}
    args = parser("t").parse_args(["--optimizers", "OPLoRA[prox=0]", "--grid", "OPLoRA[prox=0]=1e-2"])
    assert grids_from(args, defaults) == {"OPLoRA[prox=0]": (1e-2,)}
    with pytest.raises(SystemExit, match="unknown optimizer"):
        grids_from(parser("t").parse_args(["--optimizers", "Adam[x=1]"]), defaults)


def test_a_longer_run_scales_its_warmup_and_evaluations():
    task = Tiny()
    task.steps, task.warmup, task.eval_every = 300, 30, 50
    scale_schedule(task, 1000)
    assert (task.steps, task.warmup, task.eval_every) == (1000, 100, 167)
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        scale_schedule(task, 0)
