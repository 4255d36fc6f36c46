"""``oplora-bench --suite memory``: the live-byte meter counts what was allocated, the --smoke run
writes its results and meets the SPEC memory targets (OPLoRA state = 1x the LoRA parameters,
AdamW 2x; capture overhead at most one copy of the LoRA inputs and output gradients), and a
training loop keeps memory flat (a leak shows up as growth)."""

import csv
import os

import pytest
import torch

from oplora.bench import memory as bench

TINY = bench.LoRABench(d=32, layers=1, heads=2, r=2, batch=1, seq=8)


def test_trace_counts_live_tensor_bytes():
    with bench.MemoryTrace(torch.device("cpu")) as trace:
        with trace.phase("alloc"):
            a = torch.empty(1_000_000, dtype=torch.uint8)
            b = torch.empty(2_000_000, dtype=torch.uint8)
            del a
            c = torch.empty(500_000, dtype=torch.uint8)
        with trace.phase("free"):
            del b
    assert trace.phases["alloc"].start == 0
    assert trace.phases["alloc"].peak == 3_000_000
    assert trace.phases["alloc"].end == 2_500_000
    assert trace.phases["free"].end == 500_000 and trace.phases["free"].peak == 2_500_000
    assert c.numel() == 500_000


def test_smoke_run_meets_the_memory_targets(tmp_path):
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--quiet", "--steps", "2"]) == 0
    with open(tmp_path / "memory_cpu_smoke.csv") as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"OPLoRA", "ScaledOPLoRA", "AdamW"}
    ratio = {name: float(r["state_ratio"]) for name, r in rows.items()}
    assert ratio["OPLoRA"] == pytest.approx(1.0, abs=1e-3)  # momentum factors = LoRA size
    assert 2.0 <= ratio["AdamW"] < 2.05  # two moments (+ step counters)
    assert 1.0 <= ratio["ScaledOPLoRA"] < 1.5  # momentum + the two K-FAC vectors
    for name in ("OPLoRA", "ScaledOPLoRA"):
        r = rows[name]
        assert 0 < float(r["capture_ratio"]) <= 1.0  # at most one copy of X and D
        assert int(r["held_after_backward_bytes"]) > int(rows["AdamW"]["held_after_backward_bytes"])
        assert int(r["peak_bytes"]) > int(r["model_bytes"]) + int(r["state_bytes"])
    assert int(rows["AdamW"]["capture_bytes"]) == 0
    assert int(rows["AdamW"]["state_bytes"]) == int(rows["AdamW"]["lora_param_bytes"]) * 2 + 4 * 2 * 12
    md = (tmp_path / "memory_cpu_smoke.md").read_text()
    assert "oplora-bench --smoke" in md and "| OPLoRA |" in md and rows["OPLoRA"]["torch"] in md
    assert os.path.getsize(tmp_path / "memory_cpu_smoke.png") > 10_000


class Leaky(torch.optim.SGD):
    """SGD that keeps a copy of a parameter at every step: memory grows by design."""

    def __init__(self, params):
        super().__init__(params, lr=1e-3)
        self.kept = []

    def step(self, closure=None):
        self.kept.append(self.param_groups[0]["params"][0].detach().clone())
        return super().step(closure)


@pytest.mark.parametrize("name", ["OPLoRA", "ScaledOPLoRA"])
def test_training_loop_keeps_memory_flat(name):
    row = bench.measure(name, TINY, torch.device("cpu"), steps=2, leak_steps=40)
    assert row["leak_steps"] == 40 and row["leak_bytes"] == 0


def test_leak_check_sees_a_leak():
    build = lambda model: Leaky([p for p in model.parameters() if p.requires_grad])  # noqa: E731
    row = bench.measure("leaky", TINY, torch.device("cpu"), steps=2, leak_steps=30, build=build)
    first = TINY.r * TINY.d * 4  # the first LoRA factor (A, r x n), kept once per step
    assert row["leak_bytes"] == (30 - 1 - 10) * first


def test_accumulation_axis_holds_at_most_the_bound_and_stays_flat_once_folded(tmp_path):
    """One SmolLM2-shaped block, micro-batches of 2 x 64 tokens: with capture="auto" what is held
    stays within sum min(T (m + n), m n) x 4 bytes and stops growing once every layer folded;
    with capture="rows" it grows with every micro-batch."""
    argv = ["--accumulation", "1,4,8", "--layers", "1", "--micro-batch", "2:64", "--smoke", "--device", "cpu",
            "--configs", "AdamW", "OPLoRA auto", "OPLoRA rows", "--out", str(tmp_path), "--quiet", "--no-plot"]
    assert bench.main(argv) == 0
    with open(tmp_path / "memory_accumulation_cpu_smoke.csv") as f:
        rows = {(r["config"], int(r["micro_batches"])): r for r in csv.DictReader(f)}
    capture = {key: int(r["capture_bytes"]) for key, r in rows.items()}
    for micro in (1, 4, 8):
        assert capture["OPLoRA auto", micro] <= int(rows["OPLoRA auto", micro]["bound_bytes"])
        assert capture["AdamW", micro] == 0
    assert capture["OPLoRA auto", 4] == capture["OPLoRA auto", 8] < capture["OPLoRA rows", 8]
    assert capture["OPLoRA rows", 8] == 2 * capture["OPLoRA rows", 4]
    assert os.path.exists(tmp_path / "memory_accumulation_cpu_smoke.md")


def test_accumulation_axis_on_a_real_width_llama_2_7b_block(tmp_path):
    """``--shape llama-2-7b``: one width-4096 block, LoRA r16 on every linear layer, micro-batches
    of 1 x 256 tokens (rows outweigh every layer's sketch): capture_budget=0 holds the same bytes
    at 1 and 2 micro-batches (its sketches) while capture="auto" doubles, each exactly what
    oplora.capture_memory counts."""
    argv = ["--accumulation", "1,2", "--layers", "1", "--micro-batch", "1:256", "--smoke", "--device", "cpu",
            "--shape", "llama-2-7b", "--targets", "all", "--r", "16", "--configs", "OPLoRA auto", "OPLoRA budget0",
            "--out", str(tmp_path), "--quiet", "--no-plot"]
    assert bench.main(argv) == 0
    with open(tmp_path / "memory_accumulation_llama-2-7b_all_cpu_smoke.csv") as f:
        rows = {(r["config"], int(r["micro_batches"])): int(r["capture_bytes"]) for r in csv.DictReader(f)}
        f.seek(0)
        counted = {(r["config"], int(r["micro_batches"])): int(r["counted_bytes"]) for r in csv.DictReader(f)}
    assert rows == counted
    assert rows["OPLoRA budget0", 1] == rows["OPLoRA budget0", 2] < rows["OPLoRA auto", 1]
    assert rows["OPLoRA auto", 2] == 2 * rows["OPLoRA auto", 1]
