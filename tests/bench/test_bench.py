"""The main job, oplora-bench, at its --smoke size: it runs, writes CSV + markdown + PNG, and its
numbers are the ones the providers produce (accuracy ordering, speedup arithmetic)."""

import csv
import os
import subprocess
import sys

import pytest

from oplora.bench import lorsum as bench


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(out), "--quiet", "--repeats", "1"]) == 0
    with open(out / "lorsum_cpu_smoke.csv") as f:
        return out, list(csv.DictReader(f))


def test_smoke_writes_csv_markdown_and_plot(smoke):
    out, rows = smoke
    assert os.path.getsize(out / "lorsum_cpu_smoke.png") > 10_000
    md = (out / "lorsum_cpu_smoke.md").read_text()
    assert "oplora-bench --smoke" in md and "| lorsum iters=1 |" in md
    providers = {r["provider"] for r in rows}
    assert providers == {"lorsum iters=0", "lorsum iters=1", "lorsum iters=2", "form T", "torch.linalg.svd",
                         "torch.svd_lowrank"}
    assert len(rows) == len(bench.SMOKE_GRID) * len(providers)
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] and r["triton"] and r["date"]
        assert int(r["cpu_threads"]) >= 1
        assert float(r["time_min_s"]) <= float(r["time_median_s"]) <= float(r["time_max_s"])


def test_smoke_accuracy_is_measured_against_the_optimum(smoke):
    _, rows = smoke
    for case in {(r["m"], r["n"]) for r in rows}:
        by = {r["provider"]: r for r in rows if (r["m"], r["n"]) == case}
        assert by["form T"]["rel_err"] == ""
        assert float(by["torch.linalg.svd"]["rel_err"]) < 1e-5
        for name, r in by.items():
            if name != "form T":
                assert float(r["objective_ratio"]) >= 1 - 1e-6  # nothing beats the truncated SVD
        errs = [float(by[f"lorsum iters={k}"]["rel_err"]) for k in (0, 1, 2)]
        assert errs[2] < errs[1] < errs[0] < 1e-2
        svd = float(by["torch.linalg.svd"]["time_median_s"])
        lors = by["lorsum iters=1"]
        assert float(lors["speedup_vs_svd"]) == pytest.approx(svd / float(lors["time_median_s"]))


def test_custom_rectangular_case_runs_and_plots(tmp_path):
    assert bench.main(["--case", "96x64:4:32", "--device", "cpu", "--out", str(tmp_path), "--quiet",
                       "--repeats", "1"]) == 0
    with open(tmp_path / "lorsum_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["m"], r["n"], r["r"], r["tokens"]) for r in rows} == {("96", "64", "4", "32")}
    assert os.path.getsize(tmp_path / "lorsum_cpu.png") > 10_000


def test_bad_case_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--case", "100x100:200:64", "--out", "unused"])
    assert "r <= min(m, n)" in capsys.readouterr().err


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "oplora.bench", "--help"], capture_output=True, text=True, check=True)
    assert "--smoke" in out.stdout and "--case" in out.stdout


def test_module_entry_point_returns_the_exit_code(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "oplora.bench", "--case", "100x100:200:64"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "r <= min(m, n)" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "oplora.bench", "--case", "48x40:4:16", "--device", "cpu", "--out",
                         str(tmp_path), "--quiet", "--repeats", "1", "--no-plot"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_without_matplotlib_the_plot_is_skipped_and_the_tables_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(["--case", "48x40:4:16", "--device", "cpu", "--out", str(tmp_path), "--quiet",
                       "--repeats", "1"]) == 0
    assert (tmp_path / "lorsum_cpu.csv").exists() and (tmp_path / "lorsum_cpu.md").exists()
    assert not (tmp_path / "lorsum_cpu.png").exists()
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
