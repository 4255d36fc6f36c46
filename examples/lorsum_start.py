"""Why OPLoRA's first steps are weak from PEFT's init, measured on SmolLM2-135M: the LoRSum objective.

Each OPLoRA step solves ``min ||B' A' - T||^2 (+ prox)`` over rank-r factors, ``T = B A - lr G``
(G = s D^T X, the gradient of B A; the momentum term is zero at step 1), by ``iters`` rounds of
alternating half-steps; the optimum is the rank-r truncated SVD of T (SVDLoRA's step). PEFT starts
LoRA at B = 0: the first half-step, A's (the default ``start="A"``), then has nothing to fit and
A stays A0, and B's half-step only projects -lr G onto A0's random row space. ``start="B"`` fits
B first and then A to it: one block power iteration from A0.

This script follows OPLoRA (its defaults, constant lr) for a few steps on the Shakespeare batches
of ``lm_study.py`` and, at each step, for every one of the 120 LoRA layers, solves that step's
problem with each start side and 1-2 rounds (``oplora.lorsum``, float64) and reports the share of the optimal decrease each reaches:
``(f(B A) - f(B' A')) / (f(B A) - f(SVD_r(T)))``, with the optimizer's prox (``lr * 1e-2``) and without with ``f(W) = ||W - T||_F^2`` -- the median over
layers. Writes ``examples/results/lorsum_start.{md,csv}``.

Run: ``python examples/lorsum_start.py`` (a few minutes on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lm_finetune  # noqa: E402
import oplora  # noqa: E402
from oplora.bench._common import format_table, machine_info, write_csv  # noqa: E402

# (start, iters, prox): the defaults, the other start side, more rounds, and no proximal term.
VARIANTS = [("A", 1, 1e-2), ("B", 1, 1e-2), ("B", 2, 1e-2), ("A", 1, 0.0), ("B", 1, 0.0), ("B", 2, 0.0)]


def label(start: str, iters: int, prox: float) -> str:
    return f"start={start} iters={iters} prox={prox:g}"


def decrease_shares(b: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lr: float) -> Dict[str, float]:
    """The share of the optimal decrease of ``||B'A' - (BA - lr G)||^2`` each variant reaches."""
    b, a, g = b.double(), a.double(), g.double()
    target = b @ a - lr * g
    r = b.shape[1]
    s = torch.linalg.svdvals(target)
    f0 = float(torch.linalg.matrix_norm(b @ a - target) ** 2)
    best = float((s[r:] ** 2).sum())
    out = {}
    eye = torch.eye(g.shape[1], dtype=torch.float64)
    for start, iters, prox in VARIANTS:
        nb, na = oplora.lorsum(terms=[(b, a), (g, eye)], coeffs=[1.0, -lr], init=(b, a), iters=iters,
                               prox=lr * prox, start=start)
        f = float(torch.linalg.matrix_norm(nb @ na - target) ** 2)
        out[label(start, iters, prox)] = (f0 - f) / (f0 - best)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=1e-3, help="OPLoRA's lr (constant here; default 1e-3)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = lm_finetune.load_model()
    data = lm_finetune.Data.build(tokenizer, 32)
    batches = data.train_batches(max(args.steps), 4, 0)
    model = lm_finetune.with_lora(base, 8, torch.device("cpu"), seed=0)
    layers = [(name, mod) for name, mod in model.named_modules() if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")]
    for _, mod in layers:  # the dense gradient of the effective weight, for the measurement only
        mod.base_layer.weight.requires_grad_(True)
    opt = oplora.create_optimizer(model, "oplora", lr=args.lr, seed=0, other_kwargs={"lr": 0.0})
    rows: List[Dict[str, object]] = []
    for step in range(1, max(args.steps) + 1):
        ids = batches[step - 1]
        model(input_ids=ids, labels=ids).loss.backward()
        if step in args.steps:
            shares: Dict[str, List[float]] = {}
            for name, mod in layers:
                b, a = mod.lora_B["default"].weight, mod.lora_A["default"].weight
                g = mod.scaling["default"] * mod.base_layer.weight.grad
                for key, value in decrease_shares(b.detach(), a.detach(), g, args.lr).items():
                    shares.setdefault(key, []).append(value)
            b_norm = statistics.median(float(mod.lora_B["default"].weight.detach().norm()) for _, mod in layers)
            row = {"step": step, "lr": args.lr, "median_B_norm": b_norm,
                   **{k: statistics.median(v) for k, v in shares.items()}}
            rows.append(row)
            print(f"step {step}: ||B|| {b_norm:.3g}; " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()
                                                                   if k.startswith("start")), flush=True)
        opt.step()  # the trajectory is OPLoRA's own (defaults: start A, iters 1)
        opt.zero_grad(set_to_none=True)
        for _, mod in layers:
            mod.base_layer.weight.grad = None
    opt.close()
    info = machine_info(torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "lorsum_start.csv"), rows)
    head = ["step", "median ||B||", *(label(*v) for v in VARIANTS)]
    body = [[str(r["step"]), f"{r['median_B_norm']:.3g}", *(f"{r[label(*v)]:.1%}" for v in VARIANTS)] for r in rows]
    with open(os.path.join(args.out, "lorsum_start.md"), "w") as f:
        f.write("# The LoRSum objective along OPLoRA's first steps from PEFT's init (B = 0)\n\n"
                f"- command: `python examples/lorsum_start.py {' '.join(argv or sys.argv[1:])}`\n"
                f"- machine: {info['device_name']}, torch {info['torch']}; {info['date']}\n"
                f"- SmolLM2-135M, PEFT LoRA r=8 on q,k,v,o (120 layers), batches of 4 x 32 tokens; the trajectory "
                f"is OPLoRA's (defaults, lr {args.lr:g} constant); at each listed step every layer's step problem "
                "is solved by each variant (oplora.lorsum, float64; the optimizer's prox p enters as lr * p)\n"
                "- entries: median over layers of the share of the optimal decrease of ||B'A' - T||^2 "
                "(optimum: the truncated SVD of T = BA - lr G)\n\n"
                + format_table(head, body, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
