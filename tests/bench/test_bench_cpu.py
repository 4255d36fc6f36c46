"""``oplora-bench --suite cpu`` at its --smoke size: it runs every provider and writes CSV + markdown
(+ PNG) with the machine, the command and the torch/C++ ratio."""

import csv

import pytest

from oplora.bench import main

pytest.importorskip("oplora.backends.cpu_ops", reason="the C++ extension oplora._cpu is not built")


def test_cpu_suite_smoke_writes_results(tmp_path):
    assert main(["--suite", "cpu", "--smoke", "--threads", "1,2", "--quiet", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "cpu_smoke.csv")))
    providers = {(r["m"], r["threads"], r["provider"]) for r in rows}
    for m in ("96", "200"):
        for threads in ("1", "2"):
            for name in ("scaled cpp", "scaled torch", "oplora cpp", "oplora torch", "svd"):
                assert (m, threads, name) in providers
    for r in rows:
        assert float(r["time_median_s"]) > 0 and r["device"] == "cpu" and r["command"].startswith("oplora-bench")
        if r["provider"].endswith("cpp"):
            assert float(r["torch_over_cpp"]) > 0
    md = (tmp_path / "cpu_smoke.md").read_text()
    assert "| scaled cpp |" in md and "target case 2048x2048 r16 T2048 at 2 threads not in this run" in md
    assert (tmp_path / "cpu_smoke.png").stat().st_size > 0
