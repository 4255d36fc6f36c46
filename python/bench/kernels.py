"""GPU kernels: the fused Triton step against its bandwidth floor, the torch path and AdamW.

``oplora-bench --suite kernels`` (the full run, on a CUDA GPU; one command, nothing to edit) and
``oplora-bench --suite kernels --smoke`` (tiny sizes; on a CPU through the Triton interpreter when
``TRITON_INTERPRET=1`` is set, as the tests do -- seconds, numbers meaningless).

Workload: LoRA layers of a 7B-shaped transformer, ``--blocks`` (32) blocks of q, k, v, o
(4096 x 4096) and the MLP (gate, up: 4096 -> 11008; down: 11008 -> 4096), rank ``--rank`` (16),
``--tokens`` (4096) captured rows per layer in ``--dtype`` (bfloat16): per layer, ``X``
(T x n) and ``G = s D`` (T x m), factors ``B``, ``A`` and a warm momentum state (one step taken
before timing). Scopes: each distinct layer shape alone (``layer q``, ``layer gate``,
``layer down``) and the whole model (``model``, all layers in one step).

Providers per scope (each a full call, CUDA-synchronised, median of ``--repeats``):
  * ``row pass triton`` / ``row pass torch``: one A-side pass of every layer (the step's and the
    momentum's right-hand sides, K = 2r columns) through the backend's ``row_pass``; the torch
    one gets the rows already upcast to float32, as the torch backend holds them during a step.
  * ``oplora step triton`` / ``oplora step torch``: ``OPLoRA`` (momentum 0.9, iters 1, prox
    1e-2) for every layer through the step engine with the Triton ops / the torch ops
    (``OPLORA_BACKEND=torch``) -- 2 passes over the rows.
  * ``scaled step triton`` / ``scaled step torch``: ``ScaledOPLoRA`` (diagonal K-FAC) -- 3 passes.
  * ``adamw grads+step``: what AdamW needs beyond the frozen model's backward: the LoRA
    gradients ``grad_B = s D^T (X A^T)``, ``grad_A = s (D B)^T X`` (bf16 GEMMs, as autograd
    computes them) and a fused ``torch.optim.AdamW`` step; ``adamw step``: the step alone.

Bytes and floor: ``bytes`` is what the operation must read and write at the least: each pass
reads X and G once (``T (m + n)`` elements each), plus the thin operands; AdamW's gradients
read X and G once. ``floor_s = bytes / bandwidth``, the bandwidth measured on this device with a
large device-to-device copy (read + write bytes / time). ``x_floor = time / floor_s``;
``x_adamw`` = time / the ``adamw grads+step`` time of the same scope (for reference only: AdamW
reads no activations, so it is no yardstick for the step). ``params``: the frozen weights
(sum of m n) of the scope's layers; ``fwd_bwd_s = 6 params tokens / rate``, a forward+backward
over the same tokens at the bf16 matmul rate measured on this device (an 8192^3 product of
random matrices); ``x_fwd_bwd = time / fwd_bwd_s``. ``tensor_ops`` and
``triton_launches``: what one call launches (``oplora.bench._common.count_ops``): the step engine
stacks same-shaped layers, so the ``model`` scope's step should cost about as many as one
layer's of each shape together, not 224 layers' worth.

LoRSum vs SVD at 4096 x 4096, r 16 (``oplora.bench.lorsum``): LoRSum iters 0/1/2 vs
``torch.linalg.svd`` and ``torch.svd_lowrank`` of the explicit matrix, time and accuracy.

Output in ``--out`` (default ``bench/results``): ``kernels_<device>[_smoke].csv`` (one row per
scope and provider, with the machine, versions, date and command), ``.md`` (tables and the
SPEC section 4 ratios and the targets, ``oplora.bench._kernels_report``) and ``.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import oplora
from .. import backends as _backend
from ..optim import engine
from ..optim import functional as F
from . import lorsum as lorsum_bench
from ._common import (choose_device, count_ops, machine_info, markdown_header, measure, suite_parser,
                      write_results)
from ._kernels_report import kernel_table, plot, targets

#: (name, m = out features, n = in features) of one transformer block's LoRA layers.
BLOCK_7B = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
            ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]
BLOCK_SMOKE = [("q", 40, 40), ("k", 40, 40), ("v", 40, 40), ("o", 40, 40), ("gate", 72, 40), ("up", 72, 40),
               ("down", 40, 72)]
#: The workload of a full run and of ``--smoke`` (the defaults of --blocks, --rank, --tokens);
#: ``oplora.bench._aot`` compiles the specializations both launch.
FULL = dict(block=BLOCK_7B, blocks=32, rank=16, tokens=4096)
SMOKE = dict(block=BLOCK_SMOKE, blocks=1, rank=4, tokens=48)
OPLORA = dict(lr=1e-3, momentum=0.9, dampening=0.0, iters=1, prox=1e-2, start="A")
SCALED = dict(lr=1e-3, betas=(0.9, 0.999), damping=0.1, metric_power=1.0, iters=1, prox=1e-2, start="A",
              metric="diag", statistics="kfac", loss_reduction="mean", init_metric_scale=1.0)
PASSES = {"row pass": 1, "oplora step": 2, "scaled step": 3}
SCALE = 2.0  # s = alpha / r
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoRALayer:
    """One layer's factors, captured rows and optimizer states (OPLoRA's and ScaledOPLoRA's)."""

    name: str
    b: torch.Tensor
    a: torch.Tensor
    x: torch.Tensor
    g: torch.Tensor
    state: Dict
    scaled_state: Dict

    @property
    def m(self) -> int:
        return self.b.shape[0]

    @property
    def n(self) -> int:
        return self.a.shape[1]


def make_layers(block: Sequence[Tuple[str, int, int]], blocks: int, r: int, tokens: int, dtype: torch.dtype,
                device: torch.device, seed: int) -> List[LoRALayer]:
    """``blocks`` copies of ``block``'s layers with random factors and rows (one generator)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for i in range(blocks):
        for name, m, n in block:
            def randn(*shape, std=1.0):
                return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

            layers.append(LoRALayer(f"{i}.{name}", randn(m, r, std=0.02), randn(r, n, std=n ** -0.5),
                                    randn(tokens, n), randn(tokens, m, std=SCALE / tokens), {}, {}))
    return layers


def oplora_plans(layers: Sequence[LoRALayer], r: int) -> List[F.Plan]:
    return [F.plan_oplora(L.b, L.a, [(L.x, L.g)], L.state, momentum_rank=r, seed=i, **OPLORA)
            for i, L in enumerate(layers)]


def scaled_plans(layers: Sequence[LoRALayer], r: int) -> List[F.Plan]:
    return [F.plan_scaled_oplora(L.b, L.a, [(L.x, L.g)], L.scaled_state, momentum_rank=r, seed=i, **SCALED)
            for i, L in enumerate(layers)]


def step(plans: Sequence[F.Plan], ops) -> List[F.Update]:
    """One optimizer step of every plan's layer through the step engine on ``ops``."""
    solved = engine.solve([p.layer for p in plans], ops)
    return [p.finish(s) for p, s in zip(plans, solved)]


def warm_states(layers: Sequence[LoRALayer], r: int, ops) -> None:
    """One step of each optimizer, so that timed steps start from a warm momentum/statistics
    state (the first step also draws the momentum start on the CPU)."""
    for plans, key in ((oplora_plans(layers, r), "state"), (scaled_plans(layers, r), "scaled_state")):
        for L, upd in zip(layers, step(plans, ops)):
            getattr(L, key).update(upd.state)


def row_pass_jobs(layers: Sequence[LoRALayer], r: int, ops) -> List[tuple]:
    """One A-side pass per layer: K = 2r right-hand side columns (step and momentum)."""
    jobs = []
    for L in layers:
        qd = torch.randn(L.m, 2 * r, device=L.b.device) / math.sqrt(L.m)
        jobs.append(([ops.rows(L.x, torch.float32)], [ops.rows(L.g, torch.float32)], qd, None, False))
    return jobs


def adamw_setup(layers: Sequence[LoRALayer]) -> Tuple[torch.optim.Optimizer, List[torch.nn.Parameter]]:
    params = []
    for L in layers:
        params += [torch.nn.Parameter(L.b.clone()), torch.nn.Parameter(L.a.clone())]
    fused = params[0].device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused) if fused else torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    return opt, params


def adamw_grads(layers: Sequence[LoRALayer], params: Sequence[torch.nn.Parameter]) -> None:
    """The LoRA gradients autograd computes for AdamW (``G`` already holds ``s D``)."""
    for L, pb, pa in zip(layers, params[0::2], params[1::2]):
        torch.mm(L.g.mT, L.x @ pa.detach().mT, out=pb.grad)
        torch.mm((L.g @ pb.detach()).mT, L.x, out=pa.grad)


def row_bytes(layers: Sequence[LoRALayer]) -> int:
    return sum(L.x.numel() * L.x.element_size() + L.g.numel() * L.g.element_size() for L in layers)


def thin_bytes(layers: Sequence[LoRALayer], k: int) -> int:
    """float32 right-hand sides in and products out of one pass (K columns on the m or n side)."""
    return sum(4 * k * (L.m + L.n) for L in layers)


def provider_bytes(provider: str, layers: Sequence[LoRALayer], r: int) -> int:
    """The least bytes ``provider`` must move (see the module docstring)."""
    for kind, passes in PASSES.items():
        if provider.startswith(kind):
            return passes * (row_bytes(layers) + thin_bytes(layers, 2 * r))
    # AdamW: parameters, gradients and both moments (all in the parameters' dtype) read,
    # parameters and moments written.
    adam = 7 * sum(L.b.numel() + L.a.numel() for L in layers) * layers[0].b.element_size()
    return adam + (row_bytes(layers) if provider == "adamw grads+step" else 0)


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s: read + write bytes of a large copy / its median time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * nbytes / timing.median


def measure_matmul_rate(device: torch.device, n: int) -> float:
    """bf16 matrix-product rate in FLOP/s: ``2 n^3`` / the median time of an n x n x n product
    (random operands: zeros run faster on some GPUs)."""
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    timing = measure(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n ** 3 / timing.median


def providers(layers: Sequence[LoRALayer], r: int, block_t: int, block_c: int
              ) -> Dict[str, Callable[[], Callable[[], object]]]:
    """Name -> a setup that returns the call to time, for one scope. Setups run one at a time, so
    that only one provider's extra memory (the torch path's float32 rows) is alive at once."""
    from oplora_kernels import row_pass as triton_row_pass

    triton_ops, torch_ops = _backend.load("triton"), _backend.load("torch")

    def row_pass_triton():
        jobs = row_pass_jobs(layers, r, triton_ops)
        return lambda: triton_row_pass.row_pass(jobs, block_t=block_t, block_c=block_c)

    def row_pass_torch():
        jobs = row_pass_jobs(layers, r, torch_ops)
        return lambda: torch_ops.row_pass(jobs)

    def adamw(with_grads: bool):
        opt, params = adamw_setup(layers)
        return (lambda: (adamw_grads(layers, params), opt.step())) if with_grads else opt.step

    return {
        "row pass triton": row_pass_triton,
        "row pass torch": row_pass_torch,
        "oplora step triton": lambda: lambda: step(oplora_plans(layers, r), triton_ops),
        "oplora step torch": lambda: lambda: step(oplora_plans(layers, r), torch_ops),
        "scaled step triton": lambda: lambda: step(scaled_plans(layers, r), triton_ops),
        "scaled step torch": lambda: lambda: step(scaled_plans(layers, r), torch_ops),
        "adamw grads+step": lambda: adamw(True),
        "adamw step": lambda: adamw(False),
    }


def run_scope(scope: str, layers: List[LoRALayer], r: int, tokens: int, bandwidth: float, device: torch.device, *,
              repeats: int, warmup: int, block_t: int, block_c: int, log: Callable[[str], None],
              matmul_rate: float) -> List[Dict]:
    """Time every provider on one scope; one row each. A provider that runs out of GPU memory
    gets a row with NaN times and the note ``out of memory``. ``matmul_rate`` (FLOP/s) prices
    a forward+backward over the scope's tokens (module docstring)."""
    warm_states(layers, r, _backend.load("triton"))
    rows = []
    params = sum(L.m * L.n for L in layers)
    for name, setup in providers(layers, r, block_t, block_c).items():
        log(f"  {scope}: {name}")
        nbytes = provider_bytes(name, layers, r)
        row: Dict[str, object] = {"scope": scope, "provider": name, "layers": len(layers), "m": layers[0].m,
                                  "n": layers[0].n, "r": r, "tokens": tokens, "dtype": str(layers[0].x.dtype),
                                  "bytes": nbytes, "floor_s": nbytes / bandwidth, "params": params,
                                  "fwd_bwd_s": 6 * params * tokens / matmul_rate, "note": ""}
        try:
            call = setup()
            timing = measure(call, device, warmup=warmup, repeats=repeats)
            row.update(count_ops(call))
        except torch.cuda.OutOfMemoryError:
            nan = float("nan")
            row.update(time_median_s=nan, time_min_s=nan, time_max_s=nan, repeats=0, tensor_ops=-1,
                       triton_launches=-1, note="out of memory")
        else:
            row.update(time_median_s=timing.median, time_min_s=timing.low, time_max_s=timing.high,
                       repeats=len(timing.samples))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    adamw = next(r_["time_median_s"] for r_ in rows if r_["provider"] == "adamw grads+step")
    for row in rows:
        row["x_floor"] = row["time_median_s"] / row["floor_s"]
        row["x_adamw"] = row["time_median_s"] / adamw
        row["x_fwd_bwd"] = row["time_median_s"] / row["fwd_bwd_s"]
    return rows


def lorsum_rows(device: torch.device, smoke: bool, repeats: int, warmup: int) -> List[Dict]:
    case = lorsum_bench.Case(128, 128, 8, 128) if smoke else lorsum_bench.Case(4096, 4096, 16, 4096)
    return lorsum_bench.run([case], device, repeats=repeats, warmup=warmup, step_ratio=0.05, prox=0.0,
                            oversample=8, seed=0, progress=False)


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser("kernels", __doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu (only with --smoke and TRITON_INTERPRET=1)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 block: seconds (CPU interpreter or GPU)")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks in the model scope (default 32)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--tokens", type=int, default=None, help="captured rows per layer (default 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="rows and factors (default bfloat16)")
    p.add_argument("--block-t", type=int, default=128, help="row pass rows per program (row pass provider)")
    p.add_argument("--block-c", type=int, default=64, help="row pass columns per slice (row pass provider)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 10, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 2, smoke 1)")
    p.add_argument("--scopes", default=None, metavar="NAMES",
                   help="comma-separated scopes to run: layer names (q, gate, down) and/or model (default: all)")
    p.add_argument("--no-lorsum", action="store_true", help="skip LoRSum vs SVD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``oplora-bench --suite kernels``); returns the exit status 0.

    Raises ``SystemExit`` with the reason when it cannot run: unknown ``--scopes``, no GPU for a
    full run, the Triton backend unavailable, CPU tensors without ``TRITON_INTERPRET=1`` or CUDA
    tensors with it.
    """
    from oplora_kernels import row_pass as triton_row_pass

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    size = SMOKE if args.smoke else FULL
    block = size["block"]
    shapes = {}
    for name, m, n in block:
        shapes.setdefault((m, n), name)  # one layer scope per distinct shape
    known = [*shapes.values(), "model"]
    chosen = known if args.scopes is None else [s.strip() for s in args.scopes.split(",") if s.strip()]
    if not chosen or any(s not in known for s in chosen):
        raise SystemExit(f"oplora-bench --suite kernels: --scopes {args.scopes!r}: choose from {', '.join(known)}")
    device = choose_device(args, "kernels")
    if _backend.load("triton") is None:
        raise SystemExit(f"oplora-bench --suite kernels: the Triton backend is unavailable: {_backend.reason('triton')}")
    if device.type == "cpu" and not (args.smoke and triton_row_pass.interpreting()):
        raise SystemExit("oplora-bench --suite kernels measures on a CUDA GPU; on a CPU only --smoke runs, through the "
                         "Triton interpreter: TRITON_INTERPRET=1 oplora-bench --suite kernels --smoke")
    if device.type == "cuda" and triton_row_pass.interpreting():
        raise SystemExit("oplora-bench --suite kernels: TRITON_INTERPRET=1 is set; unset it to measure the compiled "
                         "kernels on the GPU")
    blocks, r, tokens = args.blocks or size["blocks"], args.rank or size["rank"], args.tokens or size["tokens"]
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    info = machine_info(device)
    command = " ".join(["oplora-bench", *([] if "--suite" in argv else ["--suite", "kernels"]), *argv])
    print(f"oplora-bench gpu on {info['device_name']} ({device.type}), torch {info['torch']}, triton {info['triton']}; "
          f"backend for {device.type}: {oplora.backend_info()['selected'][device.type]}", flush=True)

    bandwidth = measure_bandwidth(device, (1 << 20) * (16 if args.smoke else 2048))
    matmul_rate = measure_matmul_rate(device, 128 if args.smoke else 8192)
    rows: List[Dict] = []
    for (m, n), name in shapes.items():
        if name not in chosen:
            continue
        layers = make_layers([(name, m, n)], 1, r, tokens, dtype, device, args.seed)
        rows += run_scope(f"layer {name}", layers, r, tokens, bandwidth, device, repeats=repeats, warmup=warmup,
                          block_t=args.block_t, block_c=args.block_c, log=log, matmul_rate=matmul_rate)
        del layers
    if "model" in chosen:
        layers = make_layers(block, blocks, r, tokens, dtype, device, args.seed)
        rows += run_scope("model", layers, r, tokens, bandwidth, device, repeats=repeats, warmup=warmup,
                          block_t=args.block_t, block_c=args.block_c, log=log, matmul_rate=matmul_rate)
        del layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    svd_rows = [] if args.no_lorsum else lorsum_rows(device, args.smoke, min(repeats, 5), warmup)

    meta = {**info, "command": command, "bandwidth_GBps": bandwidth / 1e9, "matmul_bf16_TFLOPs": matmul_rate / 1e12}
    csv_rows = [{**meta, **row} for row in rows] + [{**meta, "scope": "lorsum vs svd", **row} for row in svd_rows]
    summary = targets(rows, svd_rows)
    print(kernel_table(rows))
    if svd_rows:
        print(lorsum_bench.table(svd_rows))
    print("\n".join(summary))

    stem = os.path.join(args.out, f"kernels_{device.type}{'_smoke' if args.smoke else ''}")
    markdown = (markdown_header(
        f"Fused Triton step vs torch path vs AdamW ({device.type})", command, info,
        machine=f"; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s, bf16 matmul {matmul_rate / 1e12:.3g} TFLOP/s",
        notes=[f"workload: {blocks} blocks x {len(block)} LoRA layers, r {r}, {tokens} tokens, {args.dtype}; "
               f"row pass blocks {args.block_t} x {args.block_c}; medians of {repeats} calls after {warmup} warm-up"])
                + "## SPEC section 4 ratios\n\n"
                + "\n".join(f"- {line}" for line in summary) + "\n\n## Kernels\n\n"
                + kernel_table(rows, markdown=True) + "\n")
    if svd_rows:
        markdown += "\n## LoRSum vs SVD\n\n" + lorsum_bench.table(svd_rows, markdown=True) + "\n"
    title = f"oplora kernels on {info['device_name']}, torch {info['torch']}, triton {info['triton']}, {info['date']}"
    write_results(stem, csv_rows, markdown, None if args.no_plot else lambda path: plot(rows, svd_rows, path, title))
    return 0
