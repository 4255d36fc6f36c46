"""The fused grouped row pass (``oplora_kernels.row_pass``) against ``oplora.reference.row_pass``.

On the CPU the kernel runs through the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest): small odd shapes, several chunks, every combination of products and statistics,
many layers in one launch. The same checks run on a GPU when there is one (``cuda`` marker).
The reference gets the rows upcast to float32, as the torch backend does; the kernel reads them
in their own dtype, so the only difference is the order of the float32 sums.
"""

import pytest
import torch
from oplora import _triton_ops, reference

from oplora_kernels import row_pass as rp

# Largest |kernel - reference| / max |reference| per output, by row dtype. The rows are exact in
# both paths (float16/bfloat16 widen exactly to float32), so every dtype is held to float32
# summation-order error; on a GPU the tf32x3 products add about 1e-6.
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
SMALL_BLOCKS = dict(block_t=16, block_c=16)  # several row tiles and column slices at small sizes

# Kernel launches on CPU tensors need the interpreter (conftest sets it); the GPU tests need the
# compiled kernels: TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_triton_*.py
interpreted = pytest.mark.skipif(not rp.interpreting(), reason="CPU tensors run the kernels through the Triton "
                                 "interpreter: needs TRITON_INTERPRET=1")
compiled = pytest.mark.skipif(rp.interpreting(), reason="GPU kernels are tested compiled: run with TRITON_INTERPRET=0")


def make_job(m, n, rows, kd, kx, stats, dtype=torch.float32, g_dtype=None, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    xs = [(randn(t, n) * torch.logspace(-1, 1, n)).to(device=device, dtype=dtype) for t in rows]
    gs = [randn(t, m).to(device=device, dtype=g_dtype or dtype) for t in rows]
    qd = randn(m, kd).to(device) if kd is not None else None
    qx = randn(n, kx).to(device) if kx is not None else None
    return xs, gs, qd, qx, stats


def expected(job):
    xs, gs, qd, qx, stats = job
    return reference.row_pass([x.float() for x in xs], [g.float() for g in gs], qd, qx, stats)


def assert_matches(got, want, tol):
    for name, a, b in zip(("px", "pd", "sx", "sg"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        scale = b.abs().max().clamp_min(1e-30)
        err = float((a - b).abs().max() / scale)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (m, n, chunk rows, Kd, Kx, stats): odd sizes, ragged last tiles, one product or both or none.
CASES = [
    (37, 53, [45, 20], 5, None, True),
    (70, 33, [17], None, 3, True),
    (19, 40, [50, 1, 9], 7, 9, False),
    (21, 22, [30], None, None, True),
    (16, 16, [16], 16, 16, True),
    (5, 3, [2], 1, 2, False),
]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-T{'+'.join(map(str, c[2]))}-kd{c[3]}-kx{c[4]}"
                                                      f"-{'stats' if c[5] else 'nostats'}")
def test_matches_reference(case, dtype):
    job = make_job(*case, dtype=dtype)
    (got,) = rp.row_pass([job], **SMALL_BLOCKS)
    assert_matches(got, expected(job), TOL[dtype])


@interpreted
def test_many_layers_in_one_launch_match_each_layer():
    jobs = [make_job(37, 53, [45, 20], 6, None, True, seed=1),
            make_job(64, 25, [33], 11, None, True, seed=2),
            make_job(29, 91, [7, 7, 7], 16, None, True, seed=3)]
    outputs = rp.row_pass(jobs, **SMALL_BLOCKS)
    for job, got in zip(jobs, outputs):
        assert_matches(got, expected(job), TOL[torch.float32])
    # Same dtypes, flags, alignment (none) and padded Kd: one launch; a tile per 16-row block.
    launches = rp.plan_launches(jobs, [(torch.empty(0),) * 4] * len(jobs), block_t=16)
    assert len(launches) == 1
    assert len(launches[0].segments) == 2 + 1 + 3
    assert len(launches[0].tiles) == (3 + 2) + 3 + 3 * 1


@interpreted
def test_mixed_jobs_split_by_compile_time_key_only():
    jobs = [make_job(20, 30, [18], 5, None, True, seed=1),
            make_job(22, 31, [19], 4, None, True, dtype=torch.bfloat16, seed=2),
            make_job(23, 17, [21], None, 6, False, seed=3),
            make_job(24, 18, [22], 40, None, False, seed=4),  # Kd 40 pads to 64, not 16
            make_job(25, 19, [23], 3, None, True, dtype=torch.float32, g_dtype=torch.float16, seed=5)]
    outputs = rp.row_pass(jobs, **SMALL_BLOCKS)
    for job, got in zip(jobs, outputs):
        assert_matches(got, expected(job), TOL[torch.float32])
    launches = rp.plan_launches(jobs, [(torch.empty(0),) * 4] * len(jobs), block_t=16)
    assert len(launches) == 5


@interpreted
def test_wide_right_hand_sides_split_into_column_groups(monkeypatch):
    monkeypatch.setattr(rp, "MAX_K", 16)
    job = make_job(30, 26, [20, 13], 40, 17, True)
    launches = rp.plan_launches([job], [(torch.empty(0),) * 4], block_t=16)
    # Column groups 0..2 for Kd = 40, 0..1 for Kx = 17; statistics only in group 0.
    assert sorted((L.has_qd, L.has_qx, L.stats) for L in launches) == [(True, False, False), (True, True, False),
                                                                       (True, True, True)]
    (got,) = rp.row_pass([job], **SMALL_BLOCKS)
    assert_matches(got, expected(job), TOL[torch.float32])


@interpreted
def test_strided_and_offset_rows():
    gen = torch.Generator().manual_seed(4)
    big_x = torch.randn(40, 48, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    big_g = torch.randn(40, 40, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    aligned = ([big_x[:, :32]], [big_g[:, :24]], torch.randn(24, 5), torch.randn(32, 3), True)
    offset = ([big_x[3:, 1:33]], [big_g[3:, 5:29]], torch.randn(24, 5), torch.randn(32, 3), True)
    launches = rp.plan_launches([aligned, offset], [(torch.empty(0),) * 4] * 2, block_t=16)
    assert sorted(L.aligned for L in launches) == [False, True]
    for job, got in zip([aligned, offset], rp.row_pass([aligned, offset], **SMALL_BLOCKS)):
        assert_matches(got, expected(job), TOL[torch.bfloat16])


@interpreted
def test_default_blocks_and_empty_chunks():
    job = make_job(33, 45, [0, 150, 0], 4, 4, True)
    (got,) = rp.row_pass([job])
    assert_matches(got, expected(job), TOL[torch.float32])
    assert rp.row_pass([]) == []
    empty = make_job(6, 7, [0], 2, None, True)
    (px, pd, sx, sg) = rp.row_pass([empty])[0]
    assert pd is None and float(px.abs().sum() + sx.abs().sum() + sg.abs().sum()) == 0.0
    assert px.shape == (7, 2) and sx.shape == (7,) and sg.shape == (6,)


def test_rejects_what_it_cannot_read(monkeypatch):
    good = make_job(8, 9, [10], 2, None, False)
    xs, gs, qd, qx, st = good
    with pytest.raises(ValueError, match="float64"):
        rp.row_pass([([xs[0].double()], [gs[0].double()], qd, qx, st)])
    with pytest.raises(ValueError, match="qd must be 2-D with 8 rows"):
        rp.row_pass([(xs, gs, torch.randn(9, 2), qx, st)])
    with pytest.raises(ValueError, match="contiguous float32"):
        rp.row_pass([(xs, gs, qd.double(), qx, st)])
    with pytest.raises(ValueError, match="unit column stride"):
        rp.row_pass([([xs[0].mT.contiguous().mT], gs, qd, qx, st)])
    with pytest.raises(ValueError, match="rows but G has"):
        rp.row_pass([(xs, [gs[0][:5]], qd, qx, st)])
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        rp.row_pass([good], block_t=24)
    monkeypatch.setattr(rp, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CPU tensors run only through the Triton interpreter"):
        rp.row_pass([good])
    monkeypatch.setattr(rp, "interpreting", lambda: True)
    meta = ([xs[0].to("meta")], [gs[0].to("meta")], qd.to("meta"), None, False)
    with pytest.raises(ValueError, match="cannot run through the Triton interpreter"):
        rp.row_pass([meta])


@interpreted
def test_backend_adapter_sends_float64_to_the_reference_and_keeps_low_precision_rows():
    low = make_job(12, 14, [20], 3, None, True, dtype=torch.bfloat16)
    wide = make_job(12, 14, [20], None, 2, True, dtype=torch.float64)
    wide = (wide[0], wide[1], None, wide[3].double(), True)
    got_low, got_wide = _triton_ops.row_pass([low, wide])
    assert_matches(got_low, expected(low), TOL[torch.bfloat16])
    for a, b in zip(got_wide, reference.row_pass(*wide)):
        assert (a is None and b is None) or (a.dtype == torch.float64 and torch.equal(a, b))
    x = low[0][0]
    assert _triton_ops.rows(x, torch.float32) is x
    assert _triton_ops.rows(x, torch.float64).dtype == torch.float64
    assert _triton_ops.rows(x.mT, torch.float32).is_contiguous()


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    jobs = [make_job(*case, dtype=dtype, device="cuda", seed=i) for i, case in enumerate(CASES)]
    jobs.append(make_job(4096, 1024, [1000, 24], 32, None, True, dtype=dtype, device="cuda", seed=9))
    jobs.append(make_job(1024, 4096, [777], None, 32, False, dtype=dtype, device="cuda", seed=10))
    for job, got in zip(jobs, rp.row_pass(jobs)):
        assert_matches(got, expected(job), TOL[dtype])
    for job, got in zip(jobs, rp.row_pass(jobs, precision="ieee", block_t=64, block_c=32)):
        assert_matches(got, expected(job), TOL[dtype])
