"""Memory of OPLoRA, ScaledOPLoRA and AdamW on the same LoRA model (``oplora-bench --suite memory``).

What it measures, per optimizer, on one model (a stack of transformer-like blocks -- LoRA on the
attention projections q, k, v, o and the MLP up/down layers -- built with the same seed for
every optimizer, trained on a fixed random regression batch):

* **optimizer state** -- bytes of the tensors in ``opt.state``, counted directly (each storage
  once). SPEC target: OPLoRA's state equals the LoRA parameters (1x; AdamW's two moments 2x).
* **held after backward** -- live bytes after ``loss.backward()`` minus live bytes at the start
  of the step (``zero_grad`` done): the factor gradients for every optimizer, plus for the
  capturing optimizers the X and sD they keep until ``step()``. **capture overhead** = that
  minus AdamW's. SPEC target: at most one copy of the LoRA inputs and output gradients,
  ``sum over LoRA layers of T (n + m)`` elements (``one copy of X, D`` below). Layers that share
  their input (q, k, v) share the captured X, so it can stay well below.
* **transient peak** -- the highest live bytes during forward, backward and ``step()`` above the
  step's start, and **peak** = model parameters and buffers + state + transient peak.
* **leak** (``--leak-steps N``) -- live bytes at the start of step N minus at the start of step
  10: a hook or a capture that leaks shows up as growth (0 bytes expected).

How "live bytes" are counted. CUDA: ``torch.cuda.memory_allocated`` and
``max_memory_allocated`` (the caching allocator's own count of bytes in live tensors). CPU: the
``torch.profiler`` memory events (``profile_memory=True``): c10's CPU allocator reports every
allocation and free with its size, so the running sum over the events is the bytes of live
tensor storages -- independent of glibc's malloc caching or RSS, and seeing all of torch (which
``tracemalloc`` does not). The trace starts before the optimizer is built, so every block freed
inside it was also allocated inside it and the sum is exact; phases are ``record_function``
ranges. The profiler slows the run down; no times are reported here.

Results: ``memory_<device>[_smoke].{csv,md,png}`` in ``--out`` (default ``bench/results``), with
the machine, versions, date and command. ``--smoke`` is a seconds-long size for CI.

``--accumulation 1,2,4,8,16``: instead, what is held between backward and step, the peak and the
step time as micro-batches accumulate, on a SmolLM2-shaped model, for AdamW and OPLoRA /
ScaledOPLoRA with ``capture="rows"`` and ``"auto"`` (:mod:`oplora.bench._accumulation`); writes
``memory_accumulation_<device>.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import oplora

from ._common import choose_device, format_table, machine_info, markdown_header, suite_parser, write_results
from ._smollm import SHAPES
from ._trace import MemoryTrace, Phase, state_bytes, tensor_bytes

__all__ = ["MemoryTrace", "Phase", "LoRABench", "measure", "main", "OPTIMIZERS"]

MiB = 2.0**20


# --- the model ------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block with plain Linear projections (so LoRA can wrap each)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


@dataclass
class LoRABench:
    """One benchmark size: ``layers`` blocks of width ``d``, LoRA rank ``r`` on q, k, v, o, up,
    down; a batch of ``batch`` sequences of ``seq`` tokens."""

    d: int
    layers: int
    heads: int
    r: int
    batch: int
    seq: int

    TARGETS = ("q", "k", "v", "o", "up", "down")

    def model(self, device: torch.device, seed: int = 0) -> nn.Module:
        """The model with LoRA adapters (B = 0 would make the first step special: a small
        random B instead, the same for every optimizer)."""
        torch.manual_seed(seed)
        model = nn.Sequential(*(Block(self.d, self.heads) for _ in range(self.layers))).to(device)
        oplora.add_lora(model, list(self.TARGETS), r=self.r, alpha=2 * self.r)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, oplora.LoRALinear):
                    module.lora_B.weight.normal_(0.0, 0.01)
        return model

    def batch_tensors(self, device: torch.device, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.seq, self.d, generator=g)
        return x.to(device), torch.randn(self.batch, self.seq, self.d, generator=g).to(device)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def label(self) -> str:
        return f"{self.layers} blocks d={self.d} r={self.r} T={self.tokens}"


SIZES = {
    "cpu": LoRABench(d=768, layers=2, heads=12, r=16, batch=4, seq=256),
    "cuda": LoRABench(d=2048, layers=4, heads=16, r=16, batch=8, seq=1024),
    "smoke": LoRABench(d=64, layers=2, heads=4, r=4, batch=2, seq=16),
}

#: name -> optimizer over the model (AdamW trains the LoRA factors only, like the others: the
#: model has no other trainable parameter).
OPTIMIZERS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "OPLoRA": lambda m: oplora.OPLoRA(m, lr=1e-2, momentum=0.9, seed=0),
    "ScaledOPLoRA": lambda m: oplora.ScaledOPLoRA(m, lr=1e-3, seed=0),
    "AdamW": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3),
}


def lora_layers(model: nn.Module) -> List[oplora.LoRALinear]:
    return [m for m in model.modules() if isinstance(m, oplora.LoRALinear)]


def measure(name: str, size: LoRABench, device: torch.device, *, steps: int = 3, leak_steps: int = 0,
            build: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None) -> Dict[str, object]:
    """Memory of optimizer ``name`` (a key of :data:`OPTIMIZERS`, or any ``build``) on ``size``.

    Runs ``steps`` training steps (the last one is measured, after the state exists) and, with
    ``leak_steps > 10``, that many in all, comparing live bytes at the starts of step 10 and of
    the last. Returns one result row (bytes as ints)."""
    build = build or OPTIMIZERS[name]
    model = size.model(device)
    x, y = size.batch_tensors(device)
    layers = lora_layers(model)
    elem = layers[0].lora_A.weight.element_size()
    total = max(steps, leak_steps)
    with MemoryTrace(device) as trace:
        opt = build(model)
        for i in range(total):
            opt.zero_grad(set_to_none=True)
            if leak_steps > 10 and i in (10, total - 1):
                with trace.phase(f"leak{i}"):
                    pass
            last = i == steps - 1
            with trace.phase("forward") if last else contextlib.nullcontext():
                loss = nn.functional.mse_loss(model(x), y)
            with trace.phase("backward") if last else contextlib.nullcontext():
                loss.backward()
            with trace.phase("step") if last else contextlib.nullcontext():
                opt.step()
            del loss
        state = state_bytes(opt)
        if hasattr(opt, "close"):
            opt.close()
    fwd, bwd, stp = (trace.phases[k] for k in ("forward", "backward", "step"))
    base = fwd.start
    lora_params = tensor_bytes(p for m in layers for p in (m.lora_A.weight, m.lora_B.weight))
    model_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    xd = sum(size.tokens * (m.lora_A.weight.shape[1] + m.lora_B.weight.shape[0]) for m in layers) * elem
    transient = max(fwd.peak, bwd.peak, stp.peak) - base
    row: Dict[str, object] = {
        "optimizer": name, "size": size.label(), "d": size.d, "layers": size.layers, "r": size.r,
        "tokens": size.tokens, "lora_layers": len(layers), "model_bytes": model_bytes,
        "lora_param_bytes": lora_params, "state_bytes": state, "state_ratio": state / lora_params,
        "activations_bytes": fwd.end - base, "held_after_backward_bytes": bwd.end - base,
        "one_copy_xd_bytes": xd, "transient_peak_bytes": transient,
        "peak_bytes": model_bytes + base + transient, "step_peak_bytes": stp.peak - base,
    }
    if leak_steps > 10:
        row["leak_steps"] = total
        row["leak_bytes"] = trace.phases[f"leak{total - 1}"].start - trace.phases["leak10"].start
    return row


def add_capture_overhead(rows: List[Dict[str, object]]) -> None:
    """``capture_bytes`` = held after backward minus AdamW's (which holds the factor gradients
    only), and its ratio to one copy of the LoRA inputs and output gradients."""
    adamw = next((r for r in rows if r["optimizer"] == "AdamW"), None)
    for row in rows:
        if adamw is None:
            row["capture_bytes"], row["capture_ratio"] = "", ""
            continue
        row["capture_bytes"] = row["held_after_backward_bytes"] - adamw["held_after_backward_bytes"]
        row["capture_ratio"] = row["capture_bytes"] / row["one_copy_xd_bytes"]


def _mib(v) -> str:
    return "" if v == "" else f"{v / MiB:.2f}"


HEADER = ["optimizer", "LoRA params MiB", "state MiB", "state / LoRA params", "held after backward MiB",
          "capture overhead MiB", "one copy of X, D MiB", "capture / one copy", "transient peak MiB",
          "peak MiB", "leak bytes"]


def table(rows: Sequence[Dict[str, object]], markdown: bool = False) -> str:
    body = [[r["optimizer"], _mib(r["lora_param_bytes"]), _mib(r["state_bytes"]), f"{r['state_ratio']:.3f}",
             _mib(r["held_after_backward_bytes"]), _mib(r["capture_bytes"]), _mib(r["one_copy_xd_bytes"]),
             "" if r["capture_ratio"] == "" else f"{r['capture_ratio']:.3f}", _mib(r["transient_peak_bytes"]),
             _mib(r["peak_bytes"]), str(r.get("leak_bytes", ""))] for r in rows]
    return format_table(HEADER, body, markdown=markdown)


def plot(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    keys = [("lora_param_bytes", "LoRA params"), ("state_bytes", "optimizer state"),
            ("held_after_backward_bytes", "held after backward"), ("one_copy_xd_bytes", "one copy of X, D"),
            ("transient_peak_bytes", "transient peak")]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(keys))]
        bars = ax.bar(xs, [row[k] / MiB for k, _ in keys], width, label=row["optimizer"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label for _, label in keys])
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser("memory", __doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model: seconds, for CI")
    p.add_argument("--size", metavar="D:LAYERS:R:BATCH:SEQ", default=None,
                   help="model width, blocks, LoRA rank, batch, sequence length (default: per device)")
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=3, help="training steps, the last measured (default 3)")
    p.add_argument("--leak-steps", type=int, default=0,
                   help="also run this many steps and report live-byte growth from step 10 (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--accumulation", metavar="K,K,...", default=None,
                   help="instead: the accumulation axis on a SmolLM2-shaped model (oplora.bench._accumulation), "
                        "e.g. 1,2,4,8,16 micro-batches per step")
    p.add_argument("--layers", type=int, default=30, help="with --accumulation: SmolLM2 blocks (default all 30)")
    p.add_argument("--micro-batch", metavar="BATCH:SEQ", default="4:128",
                   help="with --accumulation: sequences x tokens per micro-batch (default 4:128)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="with --accumulation: which of AdamW, 'OPLoRA auto', 'OPLoRA rows', 'OPLoRA budget0', "
                        "'ScaledOPLoRA auto', 'ScaledOPLoRA rows', 'ScaledOPLoRA budget0' (default all)")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m",
                   help="with --accumulation: the blocks' shape (llama-2-7b: Llama-2-7B's width-4096 blocks behind a "
                        "1024-token vocabulary; use --layers 1 or 2 on a CPU)")
    p.add_argument("--targets", choices=["attention", "all"], default="attention",
                   help="with --accumulation: LoRA on q, k, v, o (default) or on every linear layer")
    p.add_argument("--r", type=int, default=8, help="with --accumulation: LoRA rank (default 8)")
    return p


def main_accumulation(args, argv: Sequence[str], device: torch.device) -> int:
    """The ``--accumulation`` run: writes ``memory_accumulation_<device>[_smoke].{csv,md,png}``."""
    from . import _accumulation as acc

    try:
        micro = [int(v) for v in args.accumulation.split(",")]
        batch, seq = (int(v) for v in args.micro_batch.split(":"))
    except ValueError:
        raise SystemExit("--accumulation K,K,... and --micro-batch BATCH:SEQ take integers") from None
    configs = args.configs or list(acc.CONFIGS)
    unknown = [c for c in configs if c not in acc.CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(acc.CONFIGS)}")
    info = machine_info(device)
    command = " ".join(["oplora-bench", *argv])
    log = None if args.quiet else (lambda s: print(s, flush=True))
    what = f"{args.shape} ({args.layers} blocks), r{args.r} on " + \
        ("q, k, v, o" if args.targets == "attention" else "every linear layer")
    if log:
        log(f"oplora-bench memory --accumulation on {info['device_name']}: {what}, micro-batches of {batch} x {seq} "
            f"tokens, {len(configs)} configurations")
    rows = acc.run(micro, configs, layers=args.layers, r=args.r, batch=batch, seq=seq, device=device,
                   trace_cls=MemoryTrace, log=log, shape=args.shape, targets=args.targets)
    rows = [{**info, "command": command, **row} for row in rows]
    if log:
        log(acc.table(rows))
    shape = "" if args.shape == "smollm2-135m" and args.targets == "attention" else f"_{args.shape}_{args.targets}"
    stem = os.path.join(args.out, f"memory_accumulation{shape}_{device.type}{'_smoke' if args.smoke else ''}")
    markdown = markdown_header(
        f"Optimizer memory against gradient accumulation ({device.type})", command, info,
        machine=f", {info['cpu_threads']} CPU threads",
        notes=[f"model: {what}, from its config (random weights); micro-batches of {batch} x {seq} tokens; the "
               "second step measured",
               "held = live bytes after the last backward minus after zero_grad (factor gradients + capture); "
               "capture = opt.capture_bytes(); counted = oplora.capture_memory's count of that capture (rows, auto, "
               "or capture_budget=0's bounded); bound = sum over layers of min(T (m + n), m n) x 4 bytes",
               "times measured inside the memory trace (the profiler slows allocations a little)"])
    markdown += acc.table(rows, markdown=True) + "\n"
    title = f"memory against accumulation, {what}, on {info['device_name']}, torch {info['torch']}"
    write_results(stem, rows, markdown, None if args.no_plot else lambda path: acc.plot(rows, path, title),
                  quiet=args.quiet)
    return 0


def parse_size(text: str) -> LoRABench:
    try:
        d, layers, r, batch, seq = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected D:LAYERS:R:BATCH:SEQ, e.g. 768:2:16:4:256") from None
    heads = next(h for h in (16, 12, 8, 4, 2, 1) if d % h == 0)
    return LoRABench(d=d, layers=layers, heads=heads, r=r, batch=batch, seq=seq)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``oplora-bench --suite memory``); returns the exit status 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the measured step has the optimizer state)")
    device = choose_device(args, "memory")
    if args.accumulation:
        return main_accumulation(args, argv, device)
    size = parse_size(args.size) if args.size else SIZES["smoke" if args.smoke else device.type]
    info = machine_info(device)
    command = " ".join(["oplora-bench", *argv])
    if not args.quiet:
        print(f"oplora-bench memory on {info['device_name']} ({device.type}), torch {info['torch']}; "
              f"{size.label()}, {len(args.optimizers)} optimizers", flush=True)
    rows = []
    for name in args.optimizers:
        rows.append(measure(name, size, device, steps=args.steps, leak_steps=args.leak_steps))
        if not args.quiet:
            print(f"  {name}: state {rows[-1]['state_bytes'] / MiB:.2f} MiB, "
                  f"peak {rows[-1]['peak_bytes'] / MiB:.1f} MiB", flush=True)
    add_capture_overhead(rows)
    rows = [{**info, "command": command, **row} for row in rows]
    if not args.quiet:
        print(table(rows))
    stem = os.path.join(args.out, f"memory_{device.type}{'_smoke' if args.smoke else ''}")
    measure_how = ("torch.cuda.memory_allocated / max_memory_allocated" if device.type == "cuda" else
                   "torch.profiler memory events of c10's CPU allocator (bytes of live tensor storages)")
    markdown = markdown_header(
        f"Optimizer memory ({device.type})", command, info, machine=f", {info['cpu_threads']} CPU threads",
        notes=[f"model: {size.label()} ({len(LoRABench.TARGETS)} LoRA layers per block: "
               f"{', '.join(LoRABench.TARGETS)}), float32; step {args.steps} measured",
               f"live bytes from {measure_how}",
               "capture overhead = held after backward minus AdamW's (AdamW holds the factor gradients only); "
               "one copy of X, D = sum over LoRA layers of T (n + m) elements"]) + table(rows, markdown=True) + "\n"
    title = (f"optimizer memory, {size.label()}, on {info['device_name']} ({device.type}), "
             f"torch {info['torch']}, {info['date']}")
    write_results(stem, rows, markdown, None if args.no_plot else lambda path: plot(rows, path, title),
                  quiet=args.quiet)
    return 0
