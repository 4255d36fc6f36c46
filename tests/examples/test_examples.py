"""The examples run, and their claims hold at CI size.

``examples/digits.py`` at CI size: OPLoRA reaches a clearly lower training loss than plain SGD on
the LoRA factors after the same number of steps, SGD taking its best lr of a grid.
``examples/linear_task.py --quick`` runs end to end and writes its CSV and markdown.
"""

import csv
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

pytest.importorskip("sklearn")

import digits  # noqa: E402
import linear_task  # noqa: E402


@pytest.fixture(scope="module")
def digits_setup():
    data = digits.Data.load()
    return data, digits.pretrain(data, epochs=15)


def test_pretrained_mlp_knows_the_old_digits_but_not_the_new(digits_setup):
    data, model = digits_setup
    assert digits.evaluate(model, data.old_x, data.old_y)[1] > 0.95
    assert digits.evaluate(model, data.test_x, data.test_y)[1] == 0.0  # never saw a 5-9


def test_oplora_beats_sgd_on_the_factors_at_equal_steps(digits_setup):
    data, model = digits_setup
    epochs = 4
    results = digits.compare(data, model, epochs, {"OPLoRA": (0.3,), "SGD": (0.01, 0.03, 0.1)}, progress=False)
    sgd = min(results["SGD", lr]["train_loss"][-1] for lr in (0.01, 0.03, 0.1))
    oplora_loss = results["OPLoRA", 0.3]["train_loss"][-1]
    start = results["OPLoRA", 0.3]["train_loss"][0]
    assert math.isfinite(oplora_loss) and oplora_loss < 0.05 * start
    assert oplora_loss < 0.5 * sgd, (oplora_loss, sgd)
    assert results["OPLoRA", 0.3]["test_acc"][-1] > 0.8


def test_linear_task_quick_run_writes_results(tmp_path):
    assert linear_task.main(["--quick", "--no-plot", "--out", str(tmp_path),
                             "--optimizers", "OPLoRA", "SGD"]) == 0
    out = tmp_path / "quick"
    with open(out / "linear_task_lr.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"OPLoRA", "SGD"} and len(rows) == 6
    finals = {(r["optimizer"], float(r["lr"])): float(r["final_eval_loss_mean"]) for r in rows}
    best = {name: min(v for (n, _), v in finals.items() if n == name) for name in ("OPLoRA", "SGD")}
    assert math.isfinite(best["SGD"]) and best["OPLoRA"] < 0.2 * best["SGD"], best
    assert "| OPLoRA |" in (out / "linear_task.md").read_text()


def test_quickstart_runs_and_its_loss_falls():
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")], capture_output=True,
                         text=True, check=True).stdout
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:])), out
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.5, out
