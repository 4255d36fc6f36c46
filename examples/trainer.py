"""Recipe: OPLoRA / ScaledOPLoRA inside the Hugging Face ``Trainer`` on a PEFT LoRA model.

The recipe (everything else is an ordinary Trainer run)::

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=[...], modules_to_save=["classifier"]))
    opt = oplora.create_optimizer(model, "oplora", lr=0.1, other_kwargs={"lr": 3e-3})   # or "scaled"
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup_steps, total_steps)
    args = transformers.TrainingArguments(..., gradient_accumulation_steps=2)   # max_grad_norm: see below
    trainer = transformers.Trainer(model=model, args=args, train_dataset=..., optimizers=(opt, sched))
    trainer.train()                                    # resume: trainer.train(resume_from_checkpoint=...)

Why each line:

* ``optimizers=(opt, sched)``: the optimizer is built from the model (it finds the LoRA layers and
  installs the hooks that capture X and sD); the LoRA factors are param group 0, every other
  trainable parameter (here the classifier head of ``modules_to_save``) group 1, trained by
  AdamW with ``other_kwargs``. Any transformers/torch scheduler drives both groups.
* ``max_grad_norm``: the Trainer's clipping (1.0 by default) works: its ``clip_grad_norm_``
  rescales every ``.grad`` by one coefficient, and the optimizer, which steps from the captured
  activations and their gradients rather than from the factors' ``.grad``, applies that coefficient
  to what it captured (``tests/stacks/test_trainer.py``). It measures the norm of the factor gradients
  ``(B^T G, G A^T)`` and the head's. To clip by the norm of the full gradient ``G`` of each LoRA
  layer instead -- what full fine-tuning would clip --, set ``max_grad_norm=0.0`` here and pass
  ``create_optimizer(model, "oplora", ..., max_grad_norm=1.0)``. The demo below clips neither.
* ``gradient_accumulation_steps``: works as it does for AdamW: every micro-batch's backward pass
  is captured, and the step uses all of them, exactly one step on the concatenated batch
  (``tests/stacks/test_trainer.py``). The Trainer divides each micro-batch loss by the number of
  micro-batches unless it believes the model already normalised it by ``num_items_in_batch``
  (a model whose ``forward`` takes ``**kwargs``). Causal LMs do; a sequence classifier such as
  BERT's (transformers 5) takes ``**kwargs`` but ignores it, so set
  ``trainer.loss_is_scaled_for_ga = False`` for it -- for AdamW as well, whose gradients would
  otherwise be multiplied by the accumulation steps.
* checkpoints: ``optimizer.pt`` holds the momentum (and K-FAC statistics), ``scheduler.pt`` the
  schedule; ``resume_from_checkpoint`` continues the run as if never interrupted.

The demo (real data shipped with scikit-learn, nothing downloaded): the setting of
``examples/digits.py`` -- an MLP 64 -> 128 -> 128 -> 10 pretrained on the digits 0-4 of
``load_digits`` -- wrapped as a model that returns ``{"loss", "logits"}`` (any ``nn.Module`` can go
through the Trainer), with PEFT LoRA (r=4) on its three Linear layers, fine-tuned on the digits 5-9
through the same ``Trainer`` (micro-batch 32, gradient accumulation 2, cosine schedule) with
OPLoRA, ScaledOPLoRA and the Trainer's own default AdamW (``optimizers`` not given); each at the
best lr ``examples/digits.py`` found for it. Test loss and accuracy on the new digits every epoch.
``tests/stacks/test_trainer.py`` tests the recipe on transformers models (BERT, Llama) built from configs.

Set-up: ``pip install "oplora[examples,lm]"`` (``make test`` installs both).
Run:  python examples/trainer.py            (under a minute per optimizer on 2 CPU cores)
      python examples/trainer.py --quick    (CI smoke)
Writes examples/results/trainer{.csv,.md,.png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import oplora  # noqa: E402
from oplora.bench._common import format_table, machine_info, write_csv  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import digits  # noqa: E402  (the data and the pretrained MLP of examples/digits.py)

#: name -> (optimizer name for oplora.create_optimizer, or None for the Trainer's own AdamW; lr),
#: each at its best lr in examples/digits.py.
RECIPES = {
    "OPLoRA": ("oplora", 0.3),
    "ScaledOPLoRA": ("scaled", 3.0),
    "AdamW (Trainer default)": (None, 0.03),
}


class Pixels(torch.utils.data.Dataset):
    """Images (64 pixels, standardised) and labels as the dicts the Trainer collates."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "labels": self.y[i]}


class Classifier(nn.Module):
    """The Trainer's model contract: ``forward(**batch)`` returns the loss (and the logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor, labels: Optional[torch.Tensor] = None):
        logits = self.net(pixels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build_model(pretrained: nn.Module, seed: int = 0):
    """A copy of the pretrained MLP with PEFT LoRA (r=4, alpha=4) on its three Linear layers."""
    import peft

    net = digits.make_mlp()
    net.load_state_dict(pretrained.state_dict())
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=digits.RANK, lora_alpha=digits.RANK, lora_dropout=0.0,
                             target_modules=["net.0", "net.2", "net.4"])
    return peft.get_peft_model(Classifier(net), config)


def accuracy(pred) -> Dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def train(name: str, pretrained: nn.Module, train_set, test_set, *, epochs: int, batch: int, out: str,
          seed: int = 0):
    """Fine-tune with recipe ``name`` through the Trainer; returns the Trainer's log history."""
    import transformers

    which, lr = RECIPES[name]
    model = build_model(pretrained, seed)
    steps = epochs * (len(train_set) // (2 * batch))
    optimizers = (None, None)
    if which is not None:
        opt = oplora.create_optimizer(model, which, lr=lr, seed=seed)
        optimizers = (opt, transformers.get_cosine_schedule_with_warmup(opt, steps // 20, steps))
    args = transformers.TrainingArguments(
        output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch, gradient_accumulation_steps=2,
        per_device_eval_batch_size=1024, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=steps // 20,
        weight_decay=0.0, max_grad_norm=0.0,  # no clipping, for any optimizer (see the docstring)
        eval_strategy="epoch", logging_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=seed, data_seed=seed, remove_unused_columns=False,
        label_names=["labels"])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                                   compute_metrics=accuracy, optimizers=optimizers)
    trainer.train()
    if which is not None:
        optimizers[0].close()
    return trainer.state.log_history


def rows_from(history: List[dict], name: str) -> List[Dict[str, object]]:
    train_loss = {round(h["epoch"]): h["loss"] for h in history if "loss" in h}
    return [{"optimizer": name, "epoch": round(h["epoch"]), "train_loss": train_loss.get(round(h["epoch"]), ""),
             "test_loss": h["eval_loss"], "test_accuracy": h["eval_accuracy"]}
            for h in history if "eval_accuracy" in h]


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        axes[0].plot([r["epoch"] for r in mine], [r["test_loss"] for r in mine], marker="o", label=name)
        axes[1].plot([r["epoch"] for r in mine], [r["test_accuracy"] for r in mine], marker="o", label=name)
    axes[0].set_ylabel("test loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train every recipe through the Trainer, print the table, write CSV, markdown and plot."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="micro-batch (2 are accumulated per step)")
    p.add_argument("--optimizers", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 epoch after a short pretraining")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    data = digits.Data.load()
    pretrained = digits.pretrain(data, epochs=3 if args.quick else 30)
    train_set, test_set = Pixels(data.train_x, data.train_y), Pixels(data.test_x, data.test_y)
    if args.quick:
        args.epochs = 1
    info = machine_info(torch.device("cpu"))
    command = " ".join(["python examples/trainer.py", *argv])
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.optimizers:
            print(f"{name}: training {args.epochs} epochs through transformers.Trainer", flush=True)
            rows += rows_from(train(name, pretrained, train_set, test_set, epochs=args.epochs, batch=args.batch,
                                    out=os.path.join(scratch, name.split()[0])), name)
            last = rows[-1]
            print(f"  test loss {last['test_loss']:.4f}, test accuracy {last['test_accuracy']:.3f}", flush=True)
    elapsed = time.time() - t0
    final = [[name, f"{RECIPES[name][1]:g}", f"{r['test_loss']:.4f}", f"{r['test_accuracy']:.3f}",
              str(next((x["epoch"] for x in rows if x["optimizer"] == name and x["test_accuracy"] >= 0.9), "-"))]
             for name in args.optimizers for r in [[x for x in rows if x["optimizer"] == name][-1]]]
    header = ["optimizer", "lr", "final test loss", "final test accuracy", "first epoch >= 90%"]
    print(format_table(header, final))
    out = os.path.join(args.out, "quick") if args.quick else args.out
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "trainer.csv"), [{**r, "device": info["device_name"]} for r in rows])
    with open(os.path.join(out, "trainer.md"), "w") as f:
        f.write("# OPLoRA through transformers.Trainer (MLP pretrained on digits 0-4, PEFT LoRA r=4 on 5-9)\n\n"
                f"- command: `{command}`\n- machine: {info['device_name']}, {info['cpu_threads']} CPU threads; torch "
                f"{info['torch']}, transformers {transformers.__version__}; {info['date']}; {elapsed:.0f} s\n"
                f"- {len(train_set)} training / {len(test_set)} test images, micro-batch {args.batch} x 2 accumulated, "
                f"{args.epochs} epochs, cosine schedule with 5% warm-up\n\n")
        f.write(format_table(header, final, markdown=True) + "\n")
    if not args.no_plot:
        plot(rows, os.path.join(out, "trainer.png"),
             f"MLP + PEFT LoRA through transformers.Trainer, digits 5-9; {info['device_name']}, {info['date']}")
    print(f"wrote {out}/trainer.{{csv,md{'' if args.no_plot else ',png'}}} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
