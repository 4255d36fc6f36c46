"""``ops.live_rows`` on every CPU backend: the rows of a captured sD that carry gradient, as the
capture takes them in backward (``oplora.capture.capture``), against ``g.ne(0).any(1)``: NaN and
Inf count, -0.0 and zero rows do not, a lone nonzero anywhere in a row (first, last, a denormal)
makes it live. The C++ scan (``_cpu.live_rows``: each row read up to its first nonzero) takes
float32/float64 contiguous rows; bf16 and strided rows go to torch; its binding checks its buffers.
"""

import numpy as np
import pytest
import torch
from backend_cases import cpu_backends

from oplora import backends as _backend


def rows_of_every_kind(dtype):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, 37, generator=gen).to(dtype)
    g[1] = 0.0
    g[2] = -0.0
    g[3] = 0.0
    g[3, -1] = 1.0  # only the last entry
    g[4] = 0.0
    g[4, 0] = float("nan")
    g[5] = 0.0
    g[5, 17] = float("-inf")
    g[6] = 0.0
    g[6, 9] = torch.finfo(dtype).tiny / 4 if dtype in (torch.float32, torch.float64) else 1e-3  # a denormal
    g[11] = 0.0
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_live_rows_are_the_rows_with_a_nonzero(backend, dtype):
    ops = _backend.load(backend)
    g = rows_of_every_kind(dtype)
    want = g.ne(0).any(1)
    assert want.tolist() == [True, False, False, True, True, True, True, True, True, True, True, False]
    for rows in (g, g[:, 1:], g[::2], g[:0]):  # contiguous, strided columns, strided rows, no rows
        got = ops.live_rows(rows)
        assert got.dtype == torch.bool and got.shape == (rows.shape[0],)
        assert torch.equal(got, rows.ne(0).any(1))


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_live_rows_rejects_bad_buffers(backend):
    from oplora import _cpu

    g = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="live must be a contiguous uint8 vector of 4 entries"):
        _cpu.live_rows(g, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="live must be a contiguous uint8 vector"):
        _cpu.live_rows(g, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="float32 or float64"):
        _cpu.live_rows(np.ones((4, 3), np.float16), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        _cpu.live_rows(np.ones((4, 6), np.float32)[:, ::2], np.zeros(4, np.uint8))
