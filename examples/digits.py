"""Real data: LoRA fine-tuning of an MLP on handwritten digits (scikit-learn's ``load_digits``).

1797 real 8x8 digit images (shipped inside scikit-learn, nothing is downloaded). An MLP
64 -> 128 -> 128 -> 10 is pretrained with Adam on the digits 0-4 only; then its three Linear
layers get rank-4 LoRA adapters (``oplora.add_lora``, everything else frozen) and the adapters
are fine-tuned on the digits 5-9 (70% train / 30% test, mini-batches of 64, cross-entropy) with
each optimizer: OPLoRA, ScaledOPLoRA, SVDLoRA, RiemannianLoRA, and SGD / Adam on the factors.
Each optimizer runs at every lr of a small grid; the plots show test loss and test accuracy on
the new digits at each optimizer's best lr (lowest final training loss).

Set-up: ``pip install scikit-learn matplotlib`` (the ``examples`` extra: ``pip install
oplora[examples]``; ``make test`` installs it).
Run:  python examples/digits.py            (about 1 minute on 2 CPU cores)
Writes examples/results/digits{.csv,.md,.png}. ``tests/examples/test_examples.py`` runs a CI-sized version.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import oplora
from oplora.bench._common import format_table, machine_info, write_csv

HERE = os.path.dirname(os.path.abspath(__file__))
OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
RANK, BATCH = 4, 64

# name -> (model, lr) -> optimizer. SGD and Adam train the LoRA factors only, like the others.
OPTIMIZERS: Dict[str, Callable[[nn.Module, float], torch.optim.Optimizer]] = {
    "OPLoRA": lambda m, lr: oplora.OPLoRA(m, lr=lr, momentum=0.9, seed=0),
    "ScaledOPLoRA": lambda m, lr: oplora.ScaledOPLoRA(m, lr=lr, seed=0),
    "SVDLoRA": lambda m, lr: oplora.SVDLoRA(m, lr=lr, momentum=0.9),
    "RiemannianLoRA": lambda m, lr: oplora.RiemannianLoRA(m, lr=lr, damping=1e-3, base_kwargs={"momentum": 0.9}),
    "SGD": lambda m, lr: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=0.9),
    "Adam": lambda m, lr: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr),
}
LRS = {
    "OPLoRA": (0.03, 0.1, 0.3, 1.0),
    "ScaledOPLoRA": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "SVDLoRA": (0.03, 0.1, 0.3, 1.0),
    "RiemannianLoRA": (0.003, 0.01, 0.03, 0.1, 0.3),
    "SGD": (0.003, 0.01, 0.03, 0.1, 0.3),
    "Adam": (0.001, 0.003, 0.01, 0.03, 0.1),
}


@dataclass
class Data:
    old_x: torch.Tensor
    old_y: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @staticmethod
    def load(seed: int = 0) -> "Data":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        y = torch.tensor(digits.target, dtype=torch.long)
        old = torch.isin(y, torch.tensor(OLD))
        new_x, new_y = x[~old], y[~old]
        perm = torch.randperm(len(new_y), generator=torch.Generator().manual_seed(seed))
        cut = int(0.7 * len(perm))
        return Data(x[old], y[old], new_x[perm[:cut]], new_y[perm[:cut]], new_x[perm[cut:]], new_y[perm[cut:]])


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def pretrain(data: Data, seed: int = 0, epochs: int = 30) -> nn.Module:
    """The MLP trained with Adam on the old digits only."""
    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.old_y), generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.old_x[idx]), data.old_y[idx]).backward()
            opt.step()
    return model


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        logits = model(x)
        return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def finetune(pretrained: nn.Module, data: Data, name: str, lr: float, epochs: int, seed: int = 0) -> Dict[str, List[float]]:
    """LoRA fine-tuning on the new digits; per-epoch train loss (running mean), test loss, test acc."""
    model = _copy(pretrained)
    torch.manual_seed(seed)
    oplora.add_lora(model, ["0", "2", "4"], r=RANK, alpha=RANK)
    opt = OPTIMIZERS[name](model, lr)
    gen = torch.Generator().manual_seed(seed + 1)
    history: Dict[str, List[float]] = {"train_loss": [], "test_loss": [], "test_acc": []}
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
    train_loss, _ = evaluate(model, data.train_x, data.train_y)
    for key, value in zip(history, (train_loss, test_loss, test_acc)):
        history[key].append(value)
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(data.train_y), generator=gen).split(BATCH):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        model.eval()
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
        history["train_loss"].append(total / count)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
    if hasattr(opt, "close"):
        opt.close()
    return history


def _copy(model: nn.Module) -> nn.Module:
    clone = make_mlp()
    clone.load_state_dict(model.state_dict())
    return clone


def compare(data: Data, pretrained: nn.Module, epochs: int, lrs: Dict[str, Sequence[float]],
            progress: bool = True) -> Dict[tuple, Dict[str, List[float]]]:
    """Every (optimizer, lr) of ``lrs``; returns their histories."""
    jobs = [(name, lr) for name, grid in lrs.items() for lr in grid]
    results = {}
    for name, lr in tqdm(jobs, desc="digits fine-tune", unit="run", disable=not progress):
        results[name, lr] = finetune(pretrained, data, name, lr, epochs)
    return results


def best_lrs(results) -> Dict[str, float]:
    """Per optimizer, the lr of the lowest final training loss."""
    best: Dict[str, float] = {}
    for (name, lr), hist in results.items():
        if name not in best or hist["train_loss"][-1] < results[name, best[name]]["train_loss"][-1]:
            best[name] = lr
    return best


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    info = machine_info(torch.device("cpu"))
    command = " ".join(["python examples/digits.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    data = Data.load()
    pretrained = pretrain(data)
    old_loss, old_acc = evaluate(pretrained, data.old_x, data.old_y)
    print(f"pretrained on digits 0-4: loss {old_loss:.3f}, accuracy {old_acc:.3f} "
          f"({len(data.old_y)} images); fine-tuning on 5-9: {len(data.train_y)} train, {len(data.test_y)} test")
    results = compare(data, pretrained, args.epochs, {n: LRS[n] for n in args.optimizers})
    best = best_lrs(results)
    elapsed = time.perf_counter() - start

    rows = [{"optimizer": n, "lr": lr, "epoch": e, "train_loss": h["train_loss"][e], "test_loss": h["test_loss"][e],
             "test_acc": h["test_acc"][e], "best_lr": best[n] == lr, **info, "command": command}
            for (n, lr), h in results.items() for e in range(len(h["train_loss"]))]
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "digits.csv"), rows)
    header = ["optimizer", "best lr", "final train loss", "test loss", "test accuracy"]
    table = [[n, f"{best[n]:g}", f"{results[n, best[n]]['train_loss'][-1]:.4f}",
              f"{results[n, best[n]]['test_loss'][-1]:.4f}", f"{results[n, best[n]]['test_acc'][-1]:.3f}"]
             for n in sorted(best, key=lambda n: results[n, best[n]]["train_loss"][-1])]
    print(format_table(header, table))
    with open(os.path.join(args.out, "digits.md"), "w") as f:
        f.write("# LoRA fine-tuning on new digits (scikit-learn load_digits)\n\n")
        f.write(f"Command: `{command}`  \nMachine: {info['device_name']}, {info['cpu_threads']} threads; "
                f"torch {info['torch']}; {info['date']}; {elapsed:.0f} s.  \n")
        f.write(f"MLP 64-128-128-10 pretrained on digits 0-4 (accuracy {old_acc:.3f}); rank-{RANK} LoRA on its "
                f"3 Linear layers fine-tuned on digits 5-9 for {args.epochs} epochs of batch {BATCH}; "
                "best lr per optimizer by final training loss, lr grids in examples/digits.py.\n\n")
        f.write(format_table(header, table, markdown=True) + "\n")
    if not args.no_plot:
        plot(args, results, best)
    return 0


def plot(args, results, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(OPTIMIZERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name in args.optimizers:
        hist = results[name, best[name]]
        epochs = range(len(hist["train_loss"]))
        label = f"{name} (lr {best[name]:g})"
        axes[0].plot(epochs, hist["train_loss"], label=label, color=colors[name])
        axes[1].plot(epochs, hist["test_loss"], label=label, color=colors[name])
        axes[2].plot(epochs, hist["test_acc"], label=label, color=colors[name])
    for ax, title in zip(axes, ("training loss", "test loss (digits 5-9)", "test accuracy (digits 5-9)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Rank-{RANK} LoRA fine-tuning of a digits MLP on unseen classes, best lr per optimizer")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "digits.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
