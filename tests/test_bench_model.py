"""``oplora-bench --suite model`` at its --smoke size: every optimizer and case is measured, the
ratios are the times' own, the arithmetic floor is there for the LoRSum optimizers, and the
results are written."""

import csv

import pytest

from oplora.bench import SUITES, main

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_model_suite_smoke_writes_every_optimizer_and_case(tmp_path):
    assert SUITES["model"] == "oplora.bench.model"
    assert main(["--suite", "model", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--quiet",
                 "--no-plot", "--threads", "1"]) == 0
    with open(tmp_path / "model_cpu_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["targets"], r["optimizer"]) for r in rows} == {
        (t, o) for t in ("qkvo", "all") for o in ("AdamW", "OPLoRA rows", "OPLoRA auto", "ScaledOPLoRA rows",
                                                 "ScaledOPLoRA auto")}
    for r in rows:
        assert r["tokens"] == "64" and int(r["lora_layers"]) == (4 if r["targets"] == "qkvo" else 7)
        assert float(r["step_over_fwd_bwd"]) == pytest.approx(float(r["step_s"]) / float(r["fwd_bwd_s"]))
        assert (float(r["floor_s"]) > 0) == (r["optimizer"] != "AdamW")
    md = (tmp_path / "model_cpu_smoke.md").read_text()
    assert "oplora-bench --suite model --smoke" in md and "## Targets and fits" in md
