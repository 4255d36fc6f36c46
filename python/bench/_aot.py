"""Ahead-of-time compilation of the Triton row pass for NVIDIA GPUs, on a machine without one.

The tests run the kernels through Triton's interpreter, which hides compile errors, register
spills and the GPU's own dot precision. ``triton.compile(ASTSource(fn, signature, constexprs,
attrs), target=GPUTarget("cuda", arch, 32))`` needs no GPU: it lowers the kernel to PTX and
assembles it with the ``ptxas`` bundled in Triton's wheel. This module does that for every
specialization the GPU benchmarks launch, for sm_80 and sm_90, and reads ``ptxas -v``.

Which specializations: derived from the launcher, never listed by hand.
  1. The kernels suite's workloads (``oplora.bench.kernels``: the 7B-shaped block at its full
     rank and the smoke block at its smoke rank, each ``--dtype``) run on the CPU, with few
     tokens, through every ``... triton`` provider -- the step engine with the Triton ops for
     OPLoRA and ScaledOPLoRA (K-FAC statistics), the bare row pass with the suite's
     ``--block-t``/``--block-c`` -- with ``oplora_kernels.row_pass.row_pass`` swapped for a
     recorder (that answers with the reference, so the engine's later passes are the real ones).
  2. Every recorded call goes through ``plan_launches`` (the launch keys: row dtypes, products,
     statistics, padded widths, alignment), and ``_launch`` runs with the kernel swapped for a
     recorder: the constexprs and launch options are the ones ``_launch`` passes, with the
     ``tl.dot`` precision of ``default_precision`` on a GPU of that arch and ``row_pass``'s
     defaults for what the caller left out.
  3. The unaligned twin of every call: the same jobs with the rows as column-offset views
     (unaligned address and row stride), so ``ALIGNED=False`` compiles too.
  4. Triton's own JIT binder (``create_function_from_signature`` and ``_pack_args`` for the
     target's backend) turns the recorded arguments into the signature, constexprs, pointer
     divisibility attributes and options a launch on that GPU would compile with.
Tokens do not change a launch key (only the number of tiles), so few rows suffice; the 32
blocks of the full model scope repeat one block's keys. The memory suite's CUDA size (float32
rows, rank 16) launches a subset of the float32 keys.

What is read: ``ptxas -v`` (Triton's ``ptxas``, the flags of Triton's own ``make_cubin``) on the
PTX: registers per thread, spill stores and loads, stack frame. Shared memory is Triton's
allocation (``metadata.shared``, dynamic shared memory, which ``ptxas`` does not count).

``python -m oplora.bench._aot`` prints the table; ``--write`` rewrites
``bench/results/row_pass_ptxas.{md,csv}``; ``--json PATH`` writes every result (errors
included) for ``tests/backends/test_compile.py``. It re-executes itself with ``TRITON_INTERPRET=0`` when
the interpreter is on (interpreted kernels cannot be compiled). Exit status 1 on any compile error.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

from ._aot_report import (COMMAND, KEY, MEASURED, SPILL_BUDGET, TABLE, WHAT_IF, _products,  # noqa: F401
                          csv_rows, markdown, versions, what_if_line, write_table)

#: sm_80 (A100) and sm_90 (H100/H200).
ARCHS = (80, 90)
def _dtype_name(dt) -> str:
    return str(dt).replace("triton.language.", "")


# ----------------------------------------------------------------------------------------------
# Specializations, from the launcher
# ----------------------------------------------------------------------------------------------


def _record_row_pass_calls() -> List[Tuple[str, list, dict]]:
    """Run the kernels suite's Triton providers on the CPU with a recording row pass; returns
    ``(label, jobs, kwargs)`` per ``row_pass`` call."""
    import torch

    from oplora import reference
    from oplora.backends import triton_ops as _triton_ops
    from oplora_kernels import row_pass as rp

    from . import kernels as kb

    calls: List[Tuple[str, list, dict]] = []
    label = [""]

    def recorder(jobs, **kwargs):
        calls.append((label[0], list(jobs), kwargs))
        return [reference.row_pass([x.float() for x in xs], [g.float() for g in gs], qd, qx, st)
                for xs, gs, qd, qx, st in jobs]

    defaults = kb.build_parser().parse_args([])
    cpu = torch.device("cpu")
    with mock.patch.object(rp, "row_pass", recorder):
        for size_name, size in (("7B", kb.FULL), ("smoke", kb.SMOKE)):
            for dtype in kb.DTYPES.values():
                r = size["rank"]
                layers = kb.make_layers(size["block"], 1, r, 8, dtype, cpu, 0)
                label[0] = f"{size_name} warm-up"
                kb.warm_states(layers, r, _triton_ops.OPS)
                for name, setup in kb.providers(layers, r, defaults.block_t, defaults.block_c).items():
                    if name.endswith("triton"):
                        label[0] = f"{size_name} {name.replace(' triton', '')}"
                        setup()()
    return calls


def _unaligned(jobs: list) -> list:
    """The jobs with every row chunk as a view one element into a one-column-wider buffer."""
    import torch

    def shift(t):
        buf = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype)
        view = buf[:, 1:]
        view.copy_(t)
        return view

    return [([shift(x) for x in xs], [shift(g) for g in gs], qd, qx, st) for xs, gs, qd, qx, st in jobs]


def specializations(archs: Sequence[int] = ARCHS, overrides: Optional[Dict[str, int]] = None) -> List[Dict]:
    """Every (specialization, arch) the GPU benchmarks launch, with what launches it.

    Each entry: ``row`` (the :data:`KEY` columns and ``launched_by``) and ``compile`` (the
    kernel's module and name, ``signature``, ``constexprs``, ``attrs``, ``options`` as Triton's
    JIT would pass them to ``triton.compile`` for ``arch``). ``overrides`` replaces ``row_pass``
    options of every call (``block_t``, ``block_c``, ``num_warps``, ``num_stages``: what-if
    tables for tuning). Must run with the interpreter off.
    """
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from oplora_kernels import row_pass as rp

    if rp.interpreting():
        raise RuntimeError("specializations(): TRITON_INTERPRET=1 is set; compiled kernels need it off")
    kernel = rp._row_pass_kernel
    row_pass_defaults = {k: p.default for k, p in inspect.signature(rp.row_pass).parameters.items()
                         if p.default is not inspect.Parameter.empty}
    launched: List[Tuple[tuple, dict]] = []

    class _KernelRecorder:  # stands in for the kernel: kernel[grid](*args, **kwargs) is recorded
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((args, kwargs))

    calls = _record_row_pass_calls()
    calls += [(f"{label} (unaligned twin)", _unaligned(jobs), kw) for label, jobs, kw in calls]
    specs: Dict[tuple, Dict] = {}
    for arch in archs:
        cap = (arch // 10, arch % 10)
        with mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: cap):
            gpu_precision = rp.default_precision(torch.device("cuda"))
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for label, jobs, kw in calls:
            opts = {**row_pass_defaults, **kw, **(overrides or {})}
            precision = opts["precision"] or gpu_precision
            dummy = torch.zeros(1)
            outputs = [(dummy, dummy, dummy, dummy) for _ in jobs]
            launched.clear()
            with mock.patch.object(rp, "_row_pass_kernel", _KernelRecorder()):
                for launch in rp.plan_launches(jobs, outputs, opts["block_t"]):
                    rp._launch(launch, torch.device("cpu"), opts["block_t"], opts["block_c"], precision,
                               opts["num_warps"], opts["num_stages"])
            for args, kwargs in launched:
                kwargs = {**kwargs, "debug": bool(kernel.debug or knobs.runtime.debug),
                          "instrumentation_mode": knobs.compilation.instrumentation_mode}
                bound, spec, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
                row = {"kernel": kernel.__name__, "x_dtype": _dtype_name(kwargs["X_DTYPE"]),
                       "g_dtype": _dtype_name(kwargs["G_DTYPE"]), "has_qd": kwargs["HAS_QD"],
                       "has_qx": kwargs["HAS_QX"], "stats": kwargs["STATS"], "aligned": kwargs["ALIGNED"],
                       "block_t": kwargs["BLOCK_T"], "block_c": kwargs["BLOCK_C"], "block_kd": kwargs["BLOCK_KD"],
                       "block_kx": kwargs["BLOCK_KX"], "precision": kwargs["PRECISION"],
                       "num_warps": options.num_warps, "num_stages": options.num_stages, "arch": arch}
                key = (tuple(row[k] for k in KEY), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
                entry = specs.setdefault(key, {"row": {**row, "launched_by": []}, "compile": {
                    "module": kernel.__module__, "name": kernel.__name__, "signature": signature,
                    "constexprs": constexprs, "attrs": attrs, "options": options.__dict__, "arch": arch}})
                if label not in entry["row"]["launched_by"]:
                    entry["row"]["launched_by"].append(label)
    out = list(specs.values())
    out.sort(key=lambda e: [str(e["row"][k]) for k in KEY])
    return out


# ----------------------------------------------------------------------------------------------
# Compile one specialization (in a worker process) and read ptxas -v
# ----------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, spill stores/loads and stack frame (bytes) from ``ptxas -v``'s log (one entry
    function). Raises ``ValueError`` when the log has none."""
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise ValueError(f"no register/spill report in the ptxas log:\n{log}")
    return {"registers": int(regs.group(1)), "stack_frame": int(spill.group(1)),
            "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3))}


def compile_one(job: Dict) -> Dict:
    """``triton.compile`` one specialization for its arch, then ``ptxas -v`` on its PTX.
    Returns ``{"ok", "error", "seconds", **measured}``; never raises."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
        arch = job["arch"]
        src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
        # Triton's make_cubin runs ptxas -v and prints its log when asked: that is the report of the
        # very command Triton assembles with. A cached kernel skips make_cubin: then run ptxas -v
        # on the PTX with the same flags (line info, -v, the arch's --gpu-name).
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(job["options"]))
        report = log.getvalue()
        if "Used" not in report:
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "kernel.ptx")
                with open(ptx, "w") as f:
                    f.write(compiled.asm["ptx"])
                cmd = [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", ptx,
                       "-o", ptx + ".cubin"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ptxas -v failed ({proc.returncode}):\n{proc.stderr}")
            report = proc.stderr
        measured = parse_ptxas(report)
        measured["shared_bytes"] = int(compiled.metadata.shared)
        return {"ok": True, "error": "", "seconds": time.perf_counter() - t0, **measured}
    except Exception as exc:  # reported per specialization; the caller fails on any
        text = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "error": text[-4000:], "seconds": time.perf_counter() - t0}


def compile_all(specs: Sequence[Dict], jobs: int) -> List[Dict]:
    """Compile every specialization in ``jobs`` spawned processes; one result row per spec
    (its :data:`KEY` columns, ``launched_by``, ``ok``/``error`` and the measured columns)."""
    work = [s["compile"] for s in specs]
    if jobs <= 1:
        results = [compile_one(w) for w in work]
    else:
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_one, work))
    return [{**s["row"], **res} for s, res in zip(specs, results)]


# ----------------------------------------------------------------------------------------------
# The committed table
# ----------------------------------------------------------------------------------------------


def _jsonable(results: Sequence[Dict]) -> List[Dict]:
    return [{k: v for k, v in r.items()} for r in results]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m oplora.bench._aot [--write] [--json PATH] [--jobs N] [--arch 80 --arch 90]``;
    returns 1 when a specialization fails to compile, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m oplora.bench._aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"rewrite {TABLE}.{{md,csv}} (run from the repository root)")
    p.add_argument("--out", default=TABLE, help=f"table path without extension (default {TABLE})")
    p.add_argument("--json", default=None, metavar="PATH", help="write every result (errors included) as JSON")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--arch", type=int, action="append", default=None, help="compute capability x10 (default 80, 90)")
    for opt in ("block-t", "block-c", "num-warps", "num-stages"):
        p.add_argument(f"--{opt}", type=int, default=None,
                       help=f"what-if: every launch with this {opt.replace('-', '_')} (not with --write)")
    args = p.parse_args(argv)
    launch = {k: getattr(args, k) for k in ("block_t", "block_c", "num_warps", "num_stages")
              if getattr(args, k) is not None}
    if launch and args.write:
        p.error("--write records the launcher's own options: drop the what-if options")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Interpreted kernels cannot be compiled: start again with the interpreter off.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.call([sys.executable, "-m", "oplora.bench._aot", *argv], env=env)
    t0 = time.perf_counter()
    specs = specializations(tuple(args.arch or ARCHS), launch)
    results = compile_all(specs, args.jobs)
    seconds = time.perf_counter() - t0
    failed = [r for r in results if not r["ok"]]
    ok = [r for r in results if r["ok"]]
    if ok:
        from ._common import format_table

        print(format_table(["dtype", "products", "stats", "aligned", "K pad", "arch", "regs", "spill st/ld", "smem"],
                           [[r["x_dtype"], _products(r), str(r["stats"]), str(r["aligned"]),
                             f"{r['block_kd']}/{r['block_kx']}", str(r["arch"]), str(r["registers"]),
                             f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared_bytes"])] for r in ok]))
    for r in failed:
        print(f"COMPILE ERROR {r['x_dtype']} {_products(r)} stats={r['stats']} aligned={r['aligned']} "
              f"sm_{r['arch']}:\n{r['error']}", file=sys.stderr)
    print(f"{len(results)} specializations ({len(failed)} failed) in {seconds:.1f} s, {args.jobs} processes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "seconds": seconds, "results": _jsonable(results)}, f, indent=1)
    if args.write:
        if failed:
            print("not writing the table: fix the compile errors first", file=sys.stderr)
        else:
            what_if = []
            for overrides in WHAT_IF:
                what_if.append(what_if_line(overrides, compile_all(specializations(tuple(args.arch or ARCHS),
                                                                                   overrides), args.jobs)))
                print(f"what-if: {what_if[-1]}")
            print("wrote " + ", ".join(write_table(results, args.out, what_if)))
    return 1 if failed else 0


if __name__ == "__main__":
    # Re-enter through the package, so that the spawned workers import compile_one by its module name.
    from oplora.bench._aot import main as _main

    sys.exit(_main())
