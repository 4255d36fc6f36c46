"""``oplora-bench --suite kernels`` at its --smoke size on the CPU, through the Triton interpreter: it
runs end to end, writes CSV + markdown + PNG, and its derived columns are the arithmetic of its
measured ones (bytes per pass, floor = bytes / bandwidth, ratios)."""

import csv
import math
import os

import pytest
from oplora.bench import SUITES
from oplora.bench import kernels as bench
from oplora.bench import main as bench_main
from oplora_kernels import row_pass as rp

PROVIDERS = {"row pass triton", "row pass torch", "oplora step triton", "oplora step torch", "scaled step triton",
             "scaled step torch", "adamw grads+step", "adamw step"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not rp.interpreting():
        pytest.skip("the CPU smoke run needs the Triton interpreter: TRITON_INTERPRET=1")
    out = tmp_path_factory.mktemp("bench")
    argv = ["--suite", "kernels", "--smoke", "--device", "cpu", "--scopes", "q,model", "--out", str(out), "--quiet",
            "--repeats", "1"]
    assert bench_main(argv) == 0
    with open(out / "kernels_cpu_smoke.csv") as f:
        return out, list(csv.DictReader(f))


def test_registered_as_the_kernels_suite():
    assert SUITES["kernels"] == "oplora.bench.kernels"


def test_smoke_writes_csv_markdown_and_plot(smoke):
    out, rows = smoke
    assert os.path.getsize(out / "kernels_cpu_smoke.png") > 10_000
    md = (out / "kernels_cpu_smoke.md").read_text()
    assert "oplora-bench --suite kernels --smoke" in md and "SPEC section 4 ratios" in md and "| model |" in md
    kernel_rows = [r for r in rows if r["scope"] != "lorsum vs svd"]
    assert {(r["scope"], r["provider"]) for r in kernel_rows} == {(s, p) for s in ("layer q", "model")
                                                                  for p in PROVIDERS}
    assert {r["provider"] for r in rows if r["scope"] == "lorsum vs svd"} >= {"lorsum iters=1", "torch.linalg.svd",
                                                                              "torch.svd_lowrank"}
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] and r["triton"] and r["date"] and "--smoke" in r["command"]
        assert float(r["bandwidth_GBps"]) > 0


def test_bytes_floor_and_ratios_are_consistent(smoke):
    _, rows = smoke
    kernel_rows = [r for r in rows if r["scope"] != "lorsum vs svd"]
    bandwidth = float(kernel_rows[0]["bandwidth_GBps"]) * 1e9
    by = {(r["scope"], r["provider"]): r for r in kernel_rows}
    r, tokens = 4, 48
    layers = [(40, 40)] * 4 + [(72, 40)] * 2 + [(40, 72)]
    one_pass = sum(2 * tokens * (m + n) + 4 * 2 * r * (m + n) for m, n in layers)  # bf16 rows, fp32 thin
    assert int(by[("model", "row pass triton")]["bytes"]) == one_pass
    assert int(by[("model", "oplora step triton")]["bytes"]) == 2 * one_pass
    assert int(by[("model", "scaled step torch")]["bytes"]) == 3 * one_pass
    assert int(by[("layer q", "row pass torch")]["bytes"]) == 2 * tokens * 80 + 4 * 2 * r * 80
    for row in kernel_rows:
        t, floor = float(row["time_median_s"]), float(row["floor_s"])
        assert floor == pytest.approx(int(row["bytes"]) / bandwidth)
        assert float(row["x_floor"]) == pytest.approx(t / floor)
        adamw = float(by[(row["scope"], "adamw grads+step")]["time_median_s"])
        assert float(row["x_adamw"]) == pytest.approx(t / adamw)
        assert float(row["time_min_s"]) <= t <= float(row["time_max_s"]) and math.isfinite(t)


def test_refuses_a_full_run_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="CUDA GPU"):
        bench.main(["--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--scopes"):
        bench.main(["--smoke", "--device", "cpu", "--scopes", "lm_head", "--out", str(tmp_path)])
