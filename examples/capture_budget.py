"""How far is a sketched step from the exact one? ``capture_budget`` on real SmolLM2 gradients.

With ``capture_budget=`` a layer whose rows no longer fit keeps a sketch of its gradient
(``oplora.capture.sketch``) whose size does not grow with tokens. This measures what that costs in the
step: SmolLM2-135M + PEFT LoRA r=8 on q, k, v, o (120 layers, the LM study's set-up) is first
trained ``--warm`` steps with the exact optimizer (so that B is no longer zero: from PEFT's B = 0
the first step is exact by construction), then one step on a large batch (``--batch`` x
``--seq`` tokens) is taken from the same state exactly (``capture="rows"``) and with a budget of
zero bytes (every layer whose rows outweigh its sketch is sketched) at each ``--sketch-ranks``.
Reported per configuration: the relative Frobenius error of the step ``Delta(s B A)`` over all
layers together (and the worst layer), the bytes held between backward and step, and the
backward's time::

    python examples/capture_budget.py                    # ScaledOPLoRA, 8 x 256 tokens, ranks 8 .. 128
    python examples/capture_budget.py --optimizer OPLoRA --lr 1e-2

Writes ``examples/results/capture_budget{.csv,.md}`` (nothing is downloaded; ~5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lm_finetune  # noqa: E402
import oplora  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def products(model):
    """``s B A`` of every LoRA layer (float64), by name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            b = module.lora_B["default"].weight.detach().double()
            a = module.lora_A["default"].weight.detach().double()
            out[name] = module.scaling["default"] * (b @ a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="ScaledOPLoRA", choices=["ScaledOPLoRA", "OPLoRA"])
    p.add_argument("--lr", type=float, default=3e-3, help="default: ScaledOPLoRA's best lr in the LM study")
    p.add_argument("--warm", type=int, default=30, help="exact steps of 4 x 32 tokens before the measured step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--sketch-ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cls = getattr(oplora, args.optimizer)

    base, tokenizer = lm_finetune.load_model()
    data = lm_finetune.Data.build(tokenizer, 32)
    model = lm_finetune.with_lora(base, 8, torch.device("cpu"), seed=0)
    opt = cls(model, lr=args.lr, seed=0, capture="rows")
    print(f"capture_budget: {args.warm} exact {args.optimizer} steps at lr {args.lr} ...", flush=True)
    for ids in data.train_batches(args.warm, 4, seed=0):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    start_model, start_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.close()
    before = products(model)
    long = lm_finetune.Data.build(tokenizer, args.seq)
    ids = long.train_batches(1, args.batch, seed=1)[0]

    def one_step(**capture):
        model.load_state_dict(start_model)
        step_opt = cls(model, lr=args.lr, seed=0, **capture)
        step_opt.load_state_dict(copy.deepcopy(start_state))  # the step updates the loaded tensors in place
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        backward_s = time.perf_counter() - t0
        held = step_opt.capture_bytes()
        sketched = sum(type(site.folded).__name__ == "Sketch" for site in step_opt._sites)
        step_opt.step()
        step_opt.close()
        after = products(model)
        model.zero_grad(set_to_none=True)
        return {name: after[name] - before[name] for name in before}, held, backward_s, sketched

    exact, exact_held, exact_s, _ = one_step(capture="rows")
    norm2 = sum(float(d.square().sum()) for d in exact.values())
    rows = [dict(config="exact (capture='rows')", sketch_rank="", sketched_layers=0, rel_error=0.0,
                 worst_layer_error=0.0, held_MiB=exact_held / 2**20, backward_s=exact_s)]
    print(f"  exact: held {exact_held / 2**20:.1f} MiB, backward {exact_s:.2f} s", flush=True)
    for k in args.sketch_ranks:
        got, held, secs, sketched = one_step(capture_budget=0, sketch_rank=k)
        err2 = sum(float((got[n] - exact[n]).square().sum()) for n in exact)
        worst = max(float((got[n] - exact[n]).norm() / exact[n].norm().clamp_min(1e-30)) for n in exact)
        rows.append(dict(config="capture_budget=0", sketch_rank=k, sketched_layers=sketched,
                         rel_error=math.sqrt(err2 / norm2), worst_layer_error=worst, held_MiB=held / 2**20,
                         backward_s=secs))
        print(f"  sketch_rank {k}: {sketched} layers sketched, step error {rows[-1]['rel_error']:.4f} "
              f"(worst layer {worst:.4f}), held {held / 2**20:.1f} MiB, backward {secs:.2f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "capture_budget")
    with open(path + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    command = "python examples/capture_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(path + ".md", "w") as f:
        f.write("# A sketched step against the exact one: SmolLM2-135M, LoRA r=8 on q, k, v, o\n\n")
        f.write(f"- command: `{command.strip()}`\n")
        f.write(f"- machine: {platform.processor() or platform.machine()}, {args.threads} threads; torch "
                f"{torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
        f.write(f"- {args.optimizer} at lr {args.lr}: {args.warm} exact steps of 4 x 32 tokens, then one step on "
                f"{args.batch} x {args.seq} tokens from that state, exact and with `capture_budget=0` (every layer "
                "whose rows outweigh its sketch is sketched); error: ||Delta(sBA) - Delta(sBA)_exact||_F / "
                "||Delta(sBA)_exact||_F over all 120 layers together, and the worst layer's\n")
        f.write("- backward s: the measured backward's wall time, one run each (on a machine shared with other "
                "jobs it is indicative only)\n\n")
        f.write("| config | sketch_rank | layers sketched | step error | worst layer | held MiB | backward s |\n")
        f.write("|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['config']} | {r['sketch_rank']} | {r['sketched_layers']} | {r['rel_error']:.4f} | "
                    f"{r['worst_layer_error']:.4f} | {r['held_MiB']:.1f} | {r['backward_s']:.2f} |\n")
    print(f"wrote {path}.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
