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


def test_whole_step_against_adamw_in_the_same_case():
    """The whole training step (forward + backward + step) over AdamW's of the same case, of the
    medians and of the fastest steps, and the issue's targets read from the medians (512 tokens, r 8)."""
    from oplora.bench.model import table, targets_summary, whole_over_adamw

    def row(optimizer, targets, fb, st, tokens=512):
        return dict(targets=targets, lora_layers=120, r=8, tokens=tokens, optimizer=optimizer, fwd_bwd_s=fb,
                    step_s=st, fwd_bwd_min_s=0.9 * fb, step_min_s=st / 2, step_over_fwd_bwd=st / fb, floor_s=0.0,
                    x_floor="")

    rows = [row("AdamW", "qkvo", 1.0, 0.01), row("OPLoRA auto", "qkvo", 1.02, 0.03),
            row("ScaledOPLoRA auto", "qkvo", 1.05, 0.1), row("OPLoRA auto", "all", 1.0, 0.05)]
    ratios, fastest = whole_over_adamw(rows), whole_over_adamw(rows, fastest=True)
    assert ratios[0] == 1.0 and ratios[1] == pytest.approx(1.05 / 1.01) and 3 not in ratios  # no AdamW for "all"
    assert fastest[1] == pytest.approx((0.918 + 0.015) / 0.905)
    lines = [line for line in targets_summary(rows) if "whole training step" in line]
    assert len(lines) == 2 and "1.040x of the medians, 1.031x of the fastest (target <= 1.05x: met" in lines[0]
    assert "missed" in lines[1]
    assert "whole step / AdamW's" in table(rows, markdown=True) and "fastest / AdamW's fastest" in table(rows)
