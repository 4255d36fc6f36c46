"""What a study trains and measures: :class:`Task`, which each study script subclasses."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class Task:
    """What a study trains and measures. Subclasses set the attributes and the five methods."""

    name: str                       # the results' stem, e.g. "lm_study"
    title: str                      # one line for the markdown and the plot
    metrics: Tuple[str, ...]        # evaluation columns, e.g. ("heldout_loss", "heldout_ppl")
    select: str                     # the metric that picks the best lr
    higher_is_better: bool = False
    steps: int = 300
    warmup: int = 30
    eval_every: int = 50
    extend: int = 2                 # lrs a grid may grow by past an edge that is best
    description: str = ""           # the set-up, for the markdown

    def setup(self) -> None:
        """Load the model and the data (once per worker)."""
        raise NotImplementedError

    def model(self, seed: int) -> nn.Module:
        """A fresh PEFT model for seed ``seed`` (its LoRA init drawn from it)."""
        raise NotImplementedError

    def batch(self, seed: int, step: int):
        """Training batch ``step`` of seed ``seed`` (the same for every optimizer)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """The metrics on the held-out data (``model`` is in eval mode under no_grad)."""
        raise NotImplementedError

    def broken(self, metrics: Dict[str, float], start: Dict[str, float]) -> bool:
        """Whether a run whose evaluation gives ``metrics`` (``start``: at step 0) is beyond saving;
        it is then stopped and counted as diverged. Default: never (only NaN/Inf stops a run)."""
        return False
