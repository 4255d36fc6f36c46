"""The host side of the grouped row pass (:mod:`oplora_kernels.row_pass`): what a launch reads
(the segment record's fields, the row dtypes, the widest thin matrix), the checks of a job, and
how jobs are split into launches by compile-time key and into tiles of rows (:func:`plan_launches`)."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ROW_DTYPES", "MAX_K", "Job", "Result", "Launch", "plan_launches"]

#: Row dtypes the kernel reads directly (accumulating in float32).
ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Widest ``qd``/``qx`` (columns) one program holds in registers; wider ones are split into
#: column groups that re-read the rows (each group is its own set of tiles).
MAX_K = 128

_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}

# Segment record: one per (layer, chunk[, column group]), int64 fields at these positions.
# tl.constexpr so that the kernel reads the same names (host code uses ``.value``).
_F_X, _F_G, _F_T, _F_XS, _F_GS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
_F_N, _F_M = tl.constexpr(5), tl.constexpr(6)  # columns of X, of G
_F_QD, _F_LQD, _F_KD = tl.constexpr(7), tl.constexpr(8), tl.constexpr(9)  # qd address, leading dim, columns
_F_QX, _F_LQX, _F_KX = tl.constexpr(10), tl.constexpr(11), tl.constexpr(12)
_F_PX, _F_PD, _F_SX, _F_SG = tl.constexpr(13), tl.constexpr(14), tl.constexpr(15), tl.constexpr(16)
_FIELDS = 17

Job = Tuple[Sequence[Tensor], Sequence[Tensor], Optional[Tensor], Optional[Tensor], bool]
Result = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k)) if k > 0 else 16


def _check_job(i: int, job: Job) -> Tuple[int, int]:
    """Validate job ``i``; returns (m, n)."""
    if len(job) != 5:
        raise ValueError(f"row_pass: job {i} must be (xs, gs, qd, qx, stats), got {len(job)} items")
    xs, gs, qd, qx, _ = job
    if len(xs) != len(gs) or not xs:
        raise ValueError(f"row_pass: job {i} needs as many X chunks as G chunks (at least one), "
                         f"got {len(xs)} and {len(gs)}")
    n, m = xs[0].shape[-1], gs[0].shape[-1]
    device = xs[0].device
    for j, (x, g) in enumerate(zip(xs, gs)):
        for name, t, width in (("X", x, n), ("G", g, m)):
            if t.dim() != 2 or t.shape[1] != width:
                raise ValueError(f"row_pass: job {i} chunk {j}: {name} must be 2-D with {width} columns, "
                                 f"got shape {tuple(t.shape)}")
            if t.dtype not in ROW_DTYPES:
                raise ValueError(f"row_pass: job {i} chunk {j}: {name} has dtype {t.dtype}; the kernel reads "
                                 f"{', '.join(str(d) for d in ROW_DTYPES)} (float64 goes to the reference)")
            if t.numel() and t.stride(1) != 1:
                raise ValueError(f"row_pass: job {i} chunk {j}: {name} must have unit column stride, "
                                 f"got strides {t.stride()}")
            if t.device != device:
                raise ValueError(f"row_pass: job {i} chunk {j}: {name} is on {t.device}, not {device}")
        if x.shape[0] != g.shape[0]:
            raise ValueError(f"row_pass: job {i} chunk {j}: X has {x.shape[0]} rows but G has {g.shape[0]}")
    for name, q, rows in (("qd", qd, m), ("qx", qx, n)):
        if q is None:
            continue
        if q.dim() != 2 or q.shape[0] != rows:
            raise ValueError(f"row_pass: job {i}: {name} must be 2-D with {rows} rows, got {tuple(q.shape)}")
        if q.dtype != torch.float32 or not q.is_contiguous() or q.device != device:
            raise ValueError(f"row_pass: job {i}: {name} must be a contiguous float32 tensor on {device}, "
                             f"got {q.dtype} on {q.device} (contiguous: {q.is_contiguous()})")
    return m, n


class Launch(NamedTuple):
    """One kernel launch of a grouped row pass: its compile-time key and its work."""

    x_dtype: torch.dtype
    g_dtype: torch.dtype
    has_qd: bool
    has_qx: bool
    stats: bool
    block_kd: int
    block_kx: int
    aligned: bool
    segments: List[List[int]]  # one int64 record per segment (see _F_*)
    tiles: List[Tuple[int, int]]  # (segment, first row) per program


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or (t.stride(0) * size) % 16 == 0)


def plan_launches(jobs: Sequence[Job], outputs: Sequence[Result], block_t: int) -> List[Launch]:
    """The launches a grouped row pass makes: jobs split by compile-time key, one segment per
    (job, chunk, column group of at most MAX_K columns), one tile per ``block_t`` rows.

    ``outputs[i]`` holds job ``i``'s preallocated (px, pd, sx, sg) (float32, zeroed). Column
    groups beyond the first carry no statistics, so each row's squares are counted once.
    """
    launches: Dict[tuple, Launch] = {}
    for (xs, gs, qd, qx, stats), (px, pd, sx, sg) in zip(jobs, outputs):
        kd_total = qd.shape[1] if qd is not None else 0
        kx_total = qx.shape[1] if qx is not None else 0
        groups = max(1, -(-kd_total // MAX_K), -(-kx_total // MAX_K))
        for grp in range(groups):
            c0 = grp * MAX_K
            kd = max(0, min(MAX_K, kd_total - c0))
            kx = max(0, min(MAX_K, kx_total - c0))
            do_stats = bool(stats) and grp == 0
            if not (kd or kx or do_stats):
                continue
            for x, g in zip(xs, gs):
                rows = x.shape[0]
                if rows == 0:
                    continue
                key = (x.dtype, g.dtype, kd > 0, kx > 0, do_stats, _block_k(kd) if kd else 16,
                       _block_k(kx) if kx else 16, _aligned(x) and _aligned(g))
                launch = launches.get(key)
                if launch is None:
                    launch = launches[key] = Launch(*key, segments=[], tiles=[])
                rec = [0] * _FIELDS
                rec[_F_X.value], rec[_F_G.value], rec[_F_T.value] = x.data_ptr(), g.data_ptr(), rows
                rec[_F_XS.value], rec[_F_GS.value] = x.stride(0), g.stride(0)
                rec[_F_N.value], rec[_F_M.value] = x.shape[1], g.shape[1]
                if kd:
                    rec[_F_QD.value], rec[_F_LQD.value], rec[_F_KD.value] = qd.data_ptr() + 4 * c0, kd_total, kd
                    rec[_F_PX.value] = px.data_ptr() + 4 * c0
                if kx:
                    rec[_F_QX.value], rec[_F_LQX.value], rec[_F_KX.value] = qx.data_ptr() + 4 * c0, kx_total, kx
                    rec[_F_PD.value] = pd.data_ptr() + 4 * c0
                if do_stats:
                    rec[_F_SX.value], rec[_F_SG.value] = sx.data_ptr(), sg.data_ptr()
                seg = len(launch.segments)
                launch.segments.append(rec)
                launch.tiles.extend((seg, r0) for r0 in range(0, rows, block_t))
    return list(launches.values())
