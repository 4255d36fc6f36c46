"""Fused row pass: every thin product of a LoRSum pass, and the diagonal K-FAC sums, in one read.

For one LoRA layer with captured rows ``X_j`` (T_j x n) and ``G_j`` (T_j x m, the captured
``s D_j``), right-hand sides ``qd`` (m x Kd) and ``qx`` (n x Kx), the pass computes
(``oplora.reference.row_pass``)::

    px = sum_j X_j^T (G_j qd)     (n x Kd)     A-side half-steps (step and momentum columns)
    pd = sum_j G_j^T (X_j qx)     (m x Kx)     B-side half-steps
    sx = sum_j colsum(X_j^2)      (n,)         diagonal K-FAC statistics
    sg = sum_j colsum(G_j^2)      (m,)

Blocking. One program owns ``BLOCK_T`` consecutive rows of one chunk of one layer (a *tile*):

1. it streams the tile's rows of G (or X) in ``BLOCK_C``-column slices and accumulates the
   ``BLOCK_T x Kd`` intermediate ``u = G_tile qd`` (``v = X_tile qx``) in registers;
2. it streams the tile's rows of X (or G) and adds ``X_tile^T u`` (``G_tile^T v``), one
   ``BLOCK_C x Kd`` slice at a time, into ``px`` (``pd``) with float32 atomic adds.

A pass with only ``qd`` (or only ``qx``) -- the engine's usual case -- thus reads G once and X
once, which is the minimum; the K-FAC column sums ride along on whichever read comes first.
A pass with both reads each row block twice; the second read is issued right after the first by
the same program, so for the moderate ``BLOCK_T`` used here it mostly hits L2.

Grouped launch. Many layers (different m, n, T, several chunks each) go into one launch: the
host builds a *segment table* (one int64 record per (layer, chunk): addresses, strides, sizes;
see ``_F_*``) and a *tile table* (int32 pairs (segment, first row)); program ``i`` reads its
tile, then its segment, and turns the stored addresses into typed pointers
(``int -> tl.pointer_type``, as Triton's grouped-GEMM tutorial does). Only what must be a
compile-time constant splits a group into separate launches: the dtypes of X and G, which
products are asked for, whether statistics are, and the padded widths of ``qd``/``qx``
(``BLOCK_KD``/``BLOCK_KX``, powers of two >= 16). A model whose layers share a rank is one
launch per pass.

Reduction over row blocks. ``px``, ``pd``, ``sx`` and ``sg`` are zeroed by the launcher (one
``torch.zeros`` for all layers of a launch) and every tile adds its partial sums with
``tl.atomic_add(..., sem="relaxed")``. On a GPU each add is an atomic read-modify-write in L2,
so no partial sum is lost however the programs interleave; the relaxed order is enough because
nothing reads the outputs before the kernel has finished (the next kernel on the stream sees
all writes). The price is that the order of the float32 additions, hence the last bits of the
result, may change from run to run (the torch backend's sums are deterministic). Each output
element receives ``ceil(T / BLOCK_T)`` adds per pass -- 32 at T = 4096, BLOCK_T = 128 --
negligible against the ``T`` rows' reads that produced them. The interpreter runs programs one
at a time and so cannot exhibit a race; the argument above is why the kernel needs none.

Precision. Rows are loaded in their own dtype (bf16/fp16/fp32), converted to float32 in
registers and multiplied with the float32 right-hand sides by ``tl.dot`` with
``input_precision`` (default ``"tf32x3"`` on a GPU: three TF32 tensor-core products, about
float32 accuracy; bf16/fp16 rows are exact in TF32, so only the right-hand side's rounding
matters; ``"ieee"`` is exact float32 FMA, slower). Accumulation is float32. Float64 rows are
not handled here (``ValueError``): ``oplora.backends.triton_ops`` sends float64 jobs to the reference.

Alignment. When every row pointer of a launch is 16-byte aligned and every row stride a
multiple of 16 bytes, the launch is compiled with ``ALIGNED`` and tells the compiler so
(``tl.multiple_of``), which lets it issue 16-byte vector loads; otherwise the same kernel runs
without the hints.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._plan import (  # noqa: F401  (the kernel reads the record fields; the launcher the rest)
    _ELEMENT_SIZE, _F_G, _F_GS, _F_KD, _F_KX, _F_LQD, _F_LQX, _F_M, _F_N, _F_PD, _F_PX, _F_QD, _F_QX, _F_SG, _F_SX,
    _F_T, _F_X, _F_XS, _FIELDS, MAX_K, ROW_DTYPES, Job, Launch, Result, _check_job, plan_launches)

__all__ = ["row_pass", "plan_launches", "Launch", "ROW_DTYPES", "MAX_K", "default_precision", "interpreting"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def default_precision(device: torch.device) -> str:
    """``tl.dot`` input precision for the float32 products on ``device``: ``"tf32x3"`` on an
    NVIDIA GPU with TF32 (compute capability >= 8.0: three TF32 tensor-core products, about
    float32 accuracy); ``"ieee"`` elsewhere (older NVIDIA GPUs, ROCm, which accept no tf32x3)
    and under the interpreter (which computes exact float32 products whatever it is told, and
    accepts only tf32/tf32x3/ieee)."""
    if interpreting() or device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_tile(base, stride, offs_t, row_ok, cols, ncols):
    """The tile's rows restricted to ``cols`` (BLOCK_T x BLOCK_C), float32, zeros outside."""
    ptrs = base + offs_t[:, None].to(tl.int64) * stride + cols[None, :]
    mask = row_ok[:, None] & (cols < ncols)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _thin_tile(q, ld, cols, ncols, k, BLOCK_K: tl.constexpr):
    """Rows ``cols`` of a row-major float32 matrix (leading dimension ``ld``), its first ``k``
    columns, padded to BLOCK_K (BLOCK_C x BLOCK_K)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask = (cols < ncols)[:, None] & (offs_k < k)[None, :]
    return tl.load(q + cols[:, None].to(tl.int64) * ld + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _project_slice(acc, c0, base, stride, offs_t, row_ok, ncols, q, ld, k, sq, DO_SQ: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    tile = _rows_tile(base, stride, offs_t, row_ok, cols, ncols)
    acc = tl.dot(tile, _thin_tile(q, ld, cols, ncols, k, BLOCK_K), acc, input_precision=PRECISION)
    if DO_SQ:
        tl.atomic_add(sq + cols, tl.sum(tile * tile, axis=0), mask=cols < ncols, sem="relaxed")
    return acc


@triton.jit
def _project(base, stride, offs_t, row_ok, ncols, q, ld, k, sq, DO_SQ: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOPS: tl.constexpr):
    """``rows @ q`` (BLOCK_T x BLOCK_K, float32) over all ``ncols`` columns; with DO_SQ also
    adds the column sums of squares of the rows to ``sq``."""
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    if WHILE_LOOPS:
        c0 = 0
        while c0 < ncols:
            acc = _project_slice(acc, c0, base, stride, offs_t, row_ok, ncols, q, ld, k, sq, DO_SQ, BLOCK_C,
                                 BLOCK_K, PRECISION)
            c0 += BLOCK_C
    else:
        for c0 in range(0, ncols, BLOCK_C):
            acc = _project_slice(acc, c0, base, stride, offs_t, row_ok, ncols, q, ld, k, sq, DO_SQ, BLOCK_C,
                                 BLOCK_K, PRECISION)
    return acc


@triton.jit
def _scatter_slice(c0, base, stride, offs_t, row_ok, ncols, w, out, ld, k, sq, DO_SQ: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < ncols
    tile = _rows_tile(base, stride, offs_t, row_ok, cols, ncols)
    if BLOCK_K > 0:
        offs_k = tl.arange(0, BLOCK_K)
        part = tl.dot(tl.trans(tile), w, input_precision=PRECISION)
        ptrs = out + cols[:, None].to(tl.int64) * ld + offs_k[None, :]
        tl.atomic_add(ptrs, part, mask=col_ok[:, None] & (offs_k < k)[None, :], sem="relaxed")
    if DO_SQ:
        tl.atomic_add(sq + cols, tl.sum(tile * tile, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _scatter(base, stride, offs_t, row_ok, ncols, w, out, ld, k, sq, DO_SQ: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOPS: tl.constexpr):
    """``out[:ncols, :k] += rows^T @ w`` (atomic, float32), unless BLOCK_K is 0 (then ``w``,
    ``out``, ``ld``, ``k`` are unused); with DO_SQ also the column sums of squares of the rows
    into ``sq``."""
    if WHILE_LOOPS:
        c0 = 0
        while c0 < ncols:
            _scatter_slice(c0, base, stride, offs_t, row_ok, ncols, w, out, ld, k, sq, DO_SQ, BLOCK_C, BLOCK_K,
                           PRECISION)
            c0 += BLOCK_C
    else:
        for c0 in range(0, ncols, BLOCK_C):
            _scatter_slice(c0, base, stride, offs_t, row_ok, ncols, w, out, ld, k, sq, DO_SQ, BLOCK_C, BLOCK_K,
                           PRECISION)


@triton.jit
def _thin_record(rec, ADDR: tl.constexpr, LD: tl.constexpr, K: tl.constexpr):
    """A right-hand side from a segment record: float32 pointer, leading dimension, columns."""
    return tl.load(rec + ADDR).to(tl.pointer_type(tl.float32)), tl.load(rec + LD), tl.load(rec + K)


@triton.jit
def _row_pass_kernel(seg_table, tile_table,
                     X_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     HAS_QD: tl.constexpr, HAS_QX: tl.constexpr, STATS: tl.constexpr,
                     ALIGNED: tl.constexpr, X_VEC: tl.constexpr, G_VEC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_KX: tl.constexpr,
                     PRECISION: tl.constexpr, WHILE_LOOPS: tl.constexpr, FIELDS: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(tile_table + 2 * pid)
    row0 = tl.load(tile_table + 2 * pid + 1)
    rec = seg_table + seg.to(tl.int64) * FIELDS
    n_rows = tl.load(rec + _F_T)
    x_stride = tl.load(rec + _F_XS)
    g_stride = tl.load(rec + _F_GS)
    n = tl.load(rec + _F_N)
    m = tl.load(rec + _F_M)
    x_ptr = tl.load(rec + _F_X).to(tl.pointer_type(X_DTYPE))
    g_ptr = tl.load(rec + _F_G).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:
        # The launcher checked: 16-byte aligned rows, strides a multiple of 16 bytes.
        x_ptr = tl.multiple_of(x_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        x_stride = tl.multiple_of(x_stride, X_VEC)
        g_stride = tl.multiple_of(g_stride, G_VEC)
    x_base = x_ptr + row0.to(tl.int64) * x_stride
    g_base = g_ptr + row0.to(tl.int64) * g_stride
    offs_t = tl.arange(0, BLOCK_T)
    row_ok = (row0 + offs_t) < n_rows
    sx = tl.load(rec + _F_SX).to(tl.pointer_type(tl.float32))
    sg = tl.load(rec + _F_SG).to(tl.pointer_type(tl.float32))

    # Stage 1: the BLOCK_T x K intermediates, reading G for qd and X for qx.
    if HAS_QD:
        qd, ldqd, kd = _thin_record(rec, _F_QD, _F_LQD, _F_KD)
        u = _project(g_base, g_stride, offs_t, row_ok, m, qd, ldqd, kd, sg, STATS, BLOCK_T, BLOCK_C, BLOCK_KD,
                     PRECISION, WHILE_LOOPS)
    if HAS_QX:
        qx, ldqx, kx = _thin_record(rec, _F_QX, _F_LQX, _F_KX)
        v = _project(x_base, x_stride, offs_t, row_ok, n, qx, ldqx, kx, sx, STATS, BLOCK_T, BLOCK_C, BLOCK_KX,
                     PRECISION, WHILE_LOOPS)
    # Stage 2: the products, reading X for px and G for pd; statistics of a tensor not read yet.
    if HAS_QD:
        px = tl.load(rec + _F_PX).to(tl.pointer_type(tl.float32))
        _scatter(x_base, x_stride, offs_t, row_ok, n, u, px, ldqd, kd, sx, STATS and not HAS_QX, BLOCK_C, BLOCK_KD,
                 PRECISION, WHILE_LOOPS)
    if HAS_QX:
        pd = tl.load(rec + _F_PD).to(tl.pointer_type(tl.float32))
        _scatter(g_base, g_stride, offs_t, row_ok, m, v, pd, ldqx, kx, sg, STATS and not HAS_QD, BLOCK_C, BLOCK_KX,
                 PRECISION, WHILE_LOOPS)
    if STATS and not HAS_QD and not HAS_QX:
        # Statistics only: BLOCK_K = 0 skips the product (sx, 0 stand in for the unused operands).
        _scatter(x_base, x_stride, offs_t, row_ok, n, sx, sx, 0, 0, sx, True, BLOCK_C, 0, PRECISION, WHILE_LOOPS)
        _scatter(g_base, g_stride, offs_t, row_ok, m, sg, sg, 0, 0, sg, True, BLOCK_C, 0, PRECISION, WHILE_LOOPS)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def row_pass(jobs: Sequence[Job], *, block_t: int = 128, block_c: int = 64, precision: Optional[str] = None,
             num_warps: int = 8, num_stages: int = 2) -> List[Result]:
    """Grouped fused row pass: ``oplora.reference.row_pass`` for every job, in a handful of
    kernel launches (one per compile-time key, see :func:`plan_launches`).

    ``jobs``: ``(xs, gs, qd, qx, stats)`` per layer -- ``xs`` the chunks ``X_j`` (T_j x n) and
    ``gs`` the ``G_j`` (T_j x m), float16/bfloat16/float32 (X and G may differ), unit column
    stride, any row stride; ``qd`` (m x Kd) and ``qx`` (n x Kx) contiguous float32 or None;
    ``stats`` whether to return the column sums of squares. All tensors of all jobs on one
    device: a CUDA device, or the CPU under ``TRITON_INTERPRET=1``.

    Returns per job ``(px, pd, sx, sg)``: ``px = sum_j X_j^T (G_j qd)`` (n x Kd),
    ``pd = sum_j G_j^T (X_j qx)`` (m x Kx), ``sx = sum_j colsum(X_j^2)`` (n),
    ``sg = sum_j colsum(G_j^2)`` (m), float32 (None for what was not asked), new tensors (views
    of one buffer per call). Nothing is modified.

    ``block_t`` rows per program (>= 16, power of two), ``block_c`` columns per slice (>= 16,
    power of two), ``precision`` the ``tl.dot`` input precision for the float32 products
    (default :func:`default_precision`), ``num_warps``/``num_stages`` Triton's launch options
    (ignored by the interpreter). Raises ``ValueError`` on shapes that do not chain,
    unsupported dtypes (float64 included), mixed devices, CPU tensors outside the interpreter
    or GPU tensors inside it.
    """
    for name, b in (("block_t", block_t), ("block_c", block_c)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"row_pass: {name} must be a power of two >= 16, got {b}")
    if not jobs:
        return []
    sizes = [_check_job(i, job) for i, job in enumerate(jobs)]
    device = jobs[0][0][0].device
    for i, job in enumerate(jobs):
        if job[0][0].device != device:
            raise ValueError(f"row_pass: job {i} is on {job[0][0].device}, job 0 on {device}: one device per call")
    if device.type == "cpu" and not interpreting():
        raise ValueError("row_pass: CPU tensors run only through the Triton interpreter (TRITON_INTERPRET=1); "
                         "use a CUDA device, or the torch/C++ backend on the CPU")
    if device.type != "cpu" and interpreting():
        # The interpreter copies a kernel's tensor arguments to the host, but not the tensors the
        # segment table points to: it would read device addresses on the host.
        raise ValueError(f"row_pass: {device.type} tensors cannot run through the Triton interpreter "
                         "(TRITON_INTERPRET=1); unset it to run the compiled kernel")
    precision = precision or default_precision(device)

    # One zeroed float32 buffer for every output of the call.
    layout = []
    total = 0
    for (m, n), (_, _, qd, qx, stats) in zip(sizes, jobs):
        parts = []
        for rows, cols, want in ((n, qd.shape[1] if qd is not None else 0, qd is not None),
                                 (m, qx.shape[1] if qx is not None else 0, qx is not None),
                                 (n, 1, stats), (m, 1, stats)):
            parts.append((total, rows, cols) if want else None)
            total += rows * cols if want else 0
        layout.append(parts)
    buf = torch.zeros(total, dtype=torch.float32, device=device)
    outputs: List[Result] = []
    for parts in layout:
        views = [None if p is None else buf[p[0]:p[0] + p[1] * p[2]].view(p[1], p[2]) for p in parts]
        px, pd, sx, sg = views
        outputs.append((px, pd, None if sx is None else sx.view(-1), None if sg is None else sg.view(-1)))

    # Triton launches on the current CUDA device: make it the tensors' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for launch in plan_launches(jobs, outputs, block_t):
            _launch(launch, device, block_t, block_c, precision, num_warps, num_stages)
    return outputs


def _launch(launch: Launch, device: torch.device, block_t: int, block_c: int, precision: str, num_warps: int,
            num_stages: int) -> None:
    """One kernel launch: the work tables to the device, then one program per tile."""
    seg_table = torch.tensor(launch.segments, dtype=torch.int64).to(device)
    tile_table = torch.tensor(launch.tiles, dtype=torch.int32).to(device)
    _row_pass_kernel[(len(launch.tiles),)](
        seg_table, tile_table,
        X_DTYPE=_TL_DTYPE[launch.x_dtype], G_DTYPE=_TL_DTYPE[launch.g_dtype],
        HAS_QD=launch.has_qd, HAS_QX=launch.has_qx, STATS=launch.stats, ALIGNED=launch.aligned,
        X_VEC=16 // _ELEMENT_SIZE[launch.x_dtype], G_VEC=16 // _ELEMENT_SIZE[launch.g_dtype],
        BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_KD=launch.block_kd, BLOCK_KX=launch.block_kx,
        PRECISION=precision, WHILE_LOOPS=interpreting(), FIELDS=_FIELDS, num_warps=num_warps,
        num_stages=num_stages)
