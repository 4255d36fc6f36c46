"""The OPLoRA paper's synthetic task: LoRA on a linear layer whose target update has rank 8.

Model ``y = (W0 + s B A) x``, 200 -> 600, frozen ``W0``; the data come from ``W* = W0 + dW``
with ``dW`` of rank 8 (singular values log-spaced from 10 to 0.1: badly conditioned factors, the
case where first-order methods on B and A crawl), standard Gaussian inputs, label noise 0.1,
batches of 64 drawn fresh every step; loss ``0.5 mean_t ||y_t - target_t||^2``. LoRA rank 8,
standard initialisation (A Kaiming, B = 0).
Evaluation: the same loss against the clean targets on 2048 held-out inputs (0 is reachable).

Each optimizer (OPLoRA, ScaledOPLoRA, SVDLoRA, RiemannianLoRA, and SGD / Adam on the LoRA
factors) runs at every lr of a grid from 0.001 to 10 and several seeds; the plots show the loss
curves at each optimizer's best lr (lowest mean final loss) and the final loss against lr.

Run:  python examples/linear_task.py            (about 5 minutes on 2 CPU cores)
      python examples/linear_task.py --quick    (a few seconds; a smoke run, not for the plots)
Writes examples/results/linear_task{.csv,_lr.csv,.md,.png,_lr.png}.
"""

from __future__ import annotations

import argparse
import math
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
N_IN, N_OUT, RANK, BATCH = 200, 600, 8, 64
LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DIVERGED = 1e6  # an evaluation loss above this (or non-finite) ends a run as diverged


@dataclass
class Task:
    w0: torch.Tensor       # N_OUT x N_IN, frozen base weight
    w_star: torch.Tensor   # target weight, W0 + rank-8 update
    scales: torch.Tensor   # input feature scales
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    noise: float = 0.1

    @staticmethod
    def make(seed: int) -> "Task":
        gen = torch.Generator().manual_seed(seed)
        w0 = torch.randn(N_OUT, N_IN, generator=gen) / math.sqrt(N_IN)
        u, _ = torch.linalg.qr(torch.randn(N_OUT, RANK, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(N_IN, RANK, generator=gen))
        sv = torch.logspace(1.0, -1.0, RANK)
        w_star = w0 + (u * sv) @ v.T
        scales = torch.ones(N_IN)
        eval_x = torch.randn(2048, N_IN, generator=gen) * scales
        return Task(w0, w_star, scales, eval_x, eval_x @ w_star.T)

    def batch(self, gen: torch.Generator):
        x = torch.randn(BATCH, N_IN, generator=gen) * self.scales
        y = x @ self.w_star.T + self.noise * torch.randn(BATCH, N_OUT, generator=gen)
        return x, y


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (pred - target).square().sum(1).mean()


def make_model(task: Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(N_IN, N_OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(task.w0)
    return oplora.LoRALinear(base, r=RANK, alpha=RANK)


def factors(model):
    return [model.lora_A.weight, model.lora_B.weight]


# name -> (lr -> optimizer for the model). Momentum 0.75 as in the paper's stochastic runs.
OPTIMIZERS: Dict[str, Callable[[nn.Module, float], torch.optim.Optimizer]] = {
    "OPLoRA": lambda m, lr: oplora.OPLoRA(m, lr=lr, momentum=0.75, seed=0),
    "ScaledOPLoRA": lambda m, lr: oplora.ScaledOPLoRA(m, lr=lr, betas=(0.75, 0.999), seed=0),
    "SVDLoRA": lambda m, lr: oplora.SVDLoRA(m, lr=lr, momentum=0.75),
    "RiemannianLoRA": lambda m, lr: oplora.RiemannianLoRA(m, lr=lr, damping=1e-3, base_kwargs={"momentum": 0.75}),
    "SGD": lambda m, lr: torch.optim.SGD(factors(m), lr=lr, momentum=0.75),
    "Adam": lambda m, lr: torch.optim.Adam(factors(m), lr=lr),
}


def run(task: Task, name: str, lr: float, seed: int, steps: int, every: int) -> List[float]:
    """Evaluation losses at steps 0, every, 2 every, ..., steps (inf from divergence on)."""
    model = make_model(task, seed)
    opt = OPTIMIZERS[name](model, lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                value = loss_fn(model(task.eval_x), task.eval_y).item()
            if not math.isfinite(value) or value > DIVERGED:
                curve += [math.inf] * (steps // every + 1 - len(curve))
                break
            curve.append(value)
        if step == steps:
            break
        x, y = task.batch(gen)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        try:
            opt.step()
        except FloatingPointError:  # the captured gradient overflowed: diverged
            curve += [math.inf] * (steps // every + 1 - len(curve))
            break
    if hasattr(opt, "close"):
        opt.close()
    return curve


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="evaluate every this many steps")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 seed, 3 lrs (smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs, args.every = 40, 1, [0.003, 0.01, 0.03], 10
        args.out = os.path.join(args.out, "quick")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    task = Task.make(0)
    info = machine_info(torch.device("cpu"))
    command = " ".join(["python examples/linear_task.py", *(argv if argv is not None else sys.argv[1:])])

    curves: Dict[tuple, List[float]] = {}
    jobs = [(name, lr, seed) for name in args.optimizers for lr in args.lrs for seed in range(args.seeds)]
    start = time.perf_counter()
    for name, lr, seed in tqdm(jobs, desc="linear task", unit="run"):
        curves[name, lr, seed] = run(task, name, lr, seed, args.steps, args.every)
    elapsed = time.perf_counter() - start

    final = {(n, lr): sum(curves[n, lr, s][-1] for s in range(args.seeds)) / args.seeds
             for n in args.optimizers for lr in args.lrs}
    best = {n: min(args.lrs, key=lambda lr: final[n, lr]) for n in args.optimizers}
    initial = curves[args.optimizers[0], args.lrs[0], 0][0]

    steps_axis = list(range(0, args.steps + 1, args.every))
    rows = [{"optimizer": n, "lr": lr, "seed": s, "step": st, "eval_loss": v}
            for (n, lr, s), c in curves.items() for st, v in zip(steps_axis, c)]
    sweep = [{"optimizer": n, "lr": lr, "final_eval_loss_mean": final[n, lr], "best_lr": best[n] == lr,
              **info, "command": command} for n in args.optimizers for lr in args.lrs]
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "linear_task.csv"), rows)
    write_csv(os.path.join(args.out, "linear_task_lr.csv"), sweep)

    header = ["optimizer", "best lr", f"final loss (mean of {args.seeds} seeds)", "lrs within 10x of best"]
    table = []
    for n in sorted(args.optimizers, key=lambda n: final[n, best[n]]):
        robust = sum(final[n, lr] <= 10 * final[n, best[n]] for lr in args.lrs)
        table.append([n, f"{best[n]:g}", f"{final[n, best[n]]:.3e}", f"{robust} of {len(args.lrs)}"])
    print(format_table(header, table))
    with open(os.path.join(args.out, "linear_task.md"), "w") as f:
        f.write(f"# Synthetic linear task ({N_IN} -> {N_OUT}, rank-{RANK} target, batch {BATCH})\n\n")
        f.write(f"Command: `{command}`  \nMachine: {info['device_name']}, {info['cpu_threads']} threads; "
                f"torch {info['torch']}; {info['date']}; {elapsed:.0f} s.  \n")
        f.write(f"{args.steps} steps, lr grid {', '.join(f'{lr:g}' for lr in args.lrs)}, {args.seeds} seeds; "
                f"evaluation loss at step 0: {initial:.3e}.\n\n")
        f.write(format_table(header, table, markdown=True) + "\n")
    if not args.no_plot:
        plot(args, curves, final, best, steps_axis, initial)
    return 0


def plot(args, curves, final, best, steps_axis, initial) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(OPTIMIZERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    pair = [n for n in ("OPLoRA", "SVDLoRA") if n in args.optimizers]
    fig, axes = plt.subplots(1, 2 if len(pair) == 2 else 1, figsize=(13 if len(pair) == 2 else 7, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    for n in args.optimizers:
        runs = torch.tensor([curves[n, best[n], s] for s in range(args.seeds)])
        mean = runs.mean(0)
        ax.plot(steps_axis, mean, label=f"{n} (lr {best[n]:g})", color=colors[n])
        if args.seeds > 1:
            ax.fill_between(steps_axis, runs.min(0).values, runs.max(0).values, color=colors[n], alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("evaluation loss (clean targets)")
    ax.set_title(f"Linear {N_IN}->{N_OUT}, rank-{RANK} target, LoRA r={RANK}, batch {BATCH}: best lr each")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if len(pair) == 2:
        # OPLoRA against its ideal at equal lr: the lrs where SVDLoRA converges.
        ax = axes[0, 1]
        stable = [lr for lr in args.lrs if math.isfinite(final["SVDLoRA", lr]) and final["SVDLoRA", lr] < initial]
        shades = plt.cm.viridis([i / max(1, len(stable) - 1) * 0.85 for i in range(len(stable))])
        for lr, shade in zip(stable, shades):
            for n, style in zip(pair, ("-", "--")):
                mean = torch.tensor([curves[n, lr, s] for s in range(args.seeds)]).mean(0)
                ax.plot(steps_axis, mean, style, color=shade, label=f"{n} lr {lr:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("OPLoRA (solid) tracks SVDLoRA (dashed) at equal lr")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "linear_task.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ceiling = 2 * initial
    for n in args.optimizers:
        values = [min(final[n, lr], ceiling) for lr in args.lrs]
        ax.plot(args.lrs, values, marker="o", label=n, color=colors[n])
    ax.axhline(initial, color="gray", linestyle=":", label="loss at step 0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final evaluation loss (mean of {args.seeds} seeds; diverged shown at 2x start)")
    ax.set_title(f"Final loss after {args.steps} steps against lr")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "linear_task_lr.png"), dpi=120)
    plt.close("all")


if __name__ == "__main__":
    sys.exit(main())
