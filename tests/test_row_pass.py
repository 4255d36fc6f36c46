"""``row_pass`` on every backend against ``oplora.reference.row_pass``.

Each backend gets the rows as the step engine hands them over (``ops.rows``: the torch and C++
backends upcast float16/bfloat16 rows to float32, the Triton kernel reads them as they are); the
reference gets them widened to the compute dtype, so the only difference is the order of the
sums (bounds: tests/tolerances.py). Cases: odd shapes, ragged last tiles, several and empty
chunks, every combination of products and statistics, mixed row dtypes, strided views, many
layers in one call, NaN. On the CPU the Triton kernel runs through the interpreter, on small
blocks (several row tiles and column slices per call); the ``cuda`` test runs it compiled.

Backend-specific cases: the C++ binding's checks of its buffers and its thread count; the Triton
launcher's plan (launches per call, column groups, alignment), its refusals, and the backend
adapter's float64 path and ``rows``.
"""

import itertools

import numpy as np
import pytest
import torch
from backends import compiled, cpu_backends, interpreted
from backends import kernels as rp
from tolerances import assert_close

from oplora import _backend, reference

SMALL_BLOCKS = dict(block_t=16, block_c=16)  # several row tiles and column slices at small sizes
ROW_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_job(m, n, rows, kd, kx, stats, dtype=torch.float32, g_dtype=None, device="cpu", seed=0):
    """One layer's job: X (T x n) with columns of different scales, G (T x m), per chunk."""
    gen = torch.Generator().manual_seed(seed)
    thin = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    xs = [(randn(t, n) * torch.logspace(-1, 1, n)).to(device=device, dtype=dtype) for t in rows]
    gs = [randn(t, m).to(device=device, dtype=g_dtype or dtype) for t in rows]
    qd = randn(m, kd).to(device=device, dtype=thin) if kd is not None else None
    qx = randn(n, kx).to(device=device, dtype=thin) if kx is not None else None
    return xs, gs, qd, qx, stats


def compute_dtype(job):
    xs, gs, qd, qx, _ = job
    return reference.compute_dtype(*xs, *gs, qd, qx)


def expected(job):
    xs, gs, qd, qx, stats = job
    dtype = compute_dtype(job)
    return reference.row_pass([x.to(dtype) for x in xs], [g.to(dtype) for g in gs], qd, qx, stats)


def run(backend, jobs, blocks=SMALL_BLOCKS):
    """``ops.row_pass`` of backend ``backend`` as the engine calls it (rows through ``ops.rows``);
    the Triton kernel on ``blocks``."""
    ops = _backend.load(backend)
    prepared = [([ops.rows(x, compute_dtype(job)) for x in job[0]], [ops.rows(g, compute_dtype(job)) for g in job[1]],
                 *job[2:]) for job in jobs]
    return ops.row_pass(prepared, **blocks) if backend == "triton" else ops.row_pass(prepared)


def assert_matches(got, want, dtype, device="cpu"):
    for name, a, b in zip(("px", "pd", "sx", "sg"), got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, "row_pass", dtype, device=device, what=name)


# (m, n, chunk rows, Kd, Kx, stats): odd sizes, ragged last tiles, one product or both or none.
CASES = [
    (37, 53, [45, 20], 5, None, True),
    (70, 33, [17], None, 3, True),
    (19, 40, [50, 1, 9], 7, 9, False),
    (21, 22, [30], None, None, True),
    (16, 16, [16], 16, 16, True),
    (5, 3, [2], 1, 2, False),
    (1, 1, [1], 1, 1, True),
    (5, 7, [3], 3, 2, True),
    (23, 37, [11, 4], 9, 17, True),
    (48, 64, [130], 16, 32, True),
    (67, 129, [1, 63, 200], 24, 8, True),
    (12, 300, [257, 7], 40, 5, True),
]


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-T{'+'.join(map(str, c[2]))}-kd{c[3]}-kx{c[4]}"
                                                      f"-{'stats' if c[5] else 'nostats'}")
@pytest.mark.parametrize("backend", cpu_backends())
def test_matches_reference(backend, case, dtype):
    job = make_job(*case, dtype=dtype)
    (got,) = run(backend, [job])
    assert_matches(got, expected(job), dtype)


@pytest.mark.parametrize("with_qd,with_qx,stats", [c for c in itertools.product([False, True], repeat=3) if any(c)])
@pytest.mark.parametrize("backend", cpu_backends())
def test_computes_only_what_is_asked(backend, with_qd, with_qx, stats):
    job = make_job(31, 45, [20, 9], 6 if with_qd else None, 10 if with_qx else None, stats)
    (got,) = run(backend, [job])
    assert_matches(got, expected(job), torch.float32)


def layers_of_several_shapes():
    return [make_job(37, 53, [45, 20], 6, None, True, seed=1), make_job(64, 25, [33], 11, None, True, seed=2),
            make_job(29, 91, [7, 7, 7], 16, None, True, seed=3), make_job(5, 7, [3], 3, 2, True, seed=4),
            make_job(23, 37, [11, 4], 9, 17, True, seed=5), make_job(48, 64, [130], 16, 32, True, seed=6)]


def mixed_jobs():
    return [make_job(20, 30, [18], 5, None, True, seed=1),
            make_job(22, 31, [19], 4, None, True, dtype=torch.bfloat16, seed=2),
            make_job(23, 17, [21], None, 6, False, seed=3),
            make_job(24, 18, [22], 40, None, False, seed=4),  # Kd 40 pads to 64, not 16
            make_job(25, 19, [23], 3, None, True, dtype=torch.float32, g_dtype=torch.float16, seed=5)]


def strided_jobs():
    """The same rows read from an aligned and from an offset view of wider bfloat16 tensors."""
    gen = torch.Generator().manual_seed(4)
    big_x = torch.randn(40, 48, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    big_g = torch.randn(40, 40, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    aligned = ([big_x[:, :32]], [big_g[:, :24]], torch.randn(24, 5), torch.randn(32, 3), True)
    offset = ([big_x[3:, 1:33]], [big_g[3:, 5:29]], torch.randn(24, 5), torch.randn(32, 3), True)
    return [aligned, offset]


JOB_SETS = {"layers": layers_of_several_shapes, "mixed": mixed_jobs, "strided": strided_jobs}


@pytest.mark.parametrize("jobs", sorted(JOB_SETS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_many_layers_in_one_call_match_each_layer(backend, jobs):
    jobs = JOB_SETS[jobs]()
    outputs = run(backend, jobs)
    assert len(outputs) == len(jobs)
    for job, got in zip(jobs, outputs):
        assert_matches(got, expected(job), job[0][0].dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_default_blocks_and_empty_chunks(backend):
    job = make_job(33, 45, [0, 150, 0], 4, 4, True)
    (got,) = run(backend, [job], blocks={})
    assert_matches(got, expected(job), torch.float32)
    assert run(backend, [], blocks={}) == []
    (px, pd, sx, sg) = run(backend, [make_job(6, 7, [0], 2, None, True)], blocks={})[0]
    assert pd is None and float(px.abs().sum() + sx.abs().sum() + sg.abs().sum()) == 0.0
    assert px.shape == (7, 2) and sx.shape == (7,) and sg.shape == (6,)


@pytest.mark.parametrize("backend", cpu_backends())
def test_propagates_nan(backend):
    job = make_job(8, 9, [5], 2, 2, True)
    job[0][0][2, 3] = float("nan")
    (px, pd, sx, sg) = run(backend, [job])[0]
    assert torch.isnan(px).any() and torch.isnan(pd).any() and torch.isnan(sx[3]) and torch.isfinite(sg).all()


# ------------------------------------------------------------------- the C++ binding (oplora._cpu)

def _cpu():
    from oplora import _cpu

    return _cpu


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_is_the_same_on_any_thread_count(backend, threads):
    xs, gs, qd, qx, _ = make_job(50, 70, [100, 33], 12, 4, True, dtype=torch.float64)
    want = reference.row_pass(xs, gs, qd, qx, True)
    out = [np.empty((70, 12)), np.empty((50, 4)), np.empty(70), np.empty(50)]
    _cpu().row_pass([x.numpy() for x in xs], [g.numpy() for g in gs], qd.numpy(), qx.numpy(), *out, threads=threads)
    for g, w in zip(out, want):
        assert_close(torch.from_numpy(g), w, "row_pass", torch.float64)


def _good():
    x, g = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    return dict(xs=[x], gs=[g], qd=np.ones((2, 5), np.float32), qx=None, px=np.empty((3, 5), np.float32), pd=None,
                sx=None, sg=None)


@pytest.mark.parametrize("change,message", [
    (dict(xs=[np.ones((4, 3), np.float16)]), r"xs\[0\] must be float32 or float64"),
    (dict(gs=[np.ones((4, 2), np.float64)]), r"gs\[0\] must be float32 \(like the other operands\)"),
    (dict(xs=[np.ones((6, 3), np.float32)[::2]]), r"xs\[0\] must be C-contiguous"),
    (dict(gs=[np.ones((5, 2), np.float32)]), r"gs\[0\] has shape \(5, 2\) but dimension 0 must be 4"),
    (dict(qd=np.ones((3, 5), np.float32)), r"qd has shape \(3, 5\) but dimension 0 must be 2"),
    (dict(px=np.empty((3, 4), np.float32)), r"px has shape \(3, 4\) but dimension 1 must be 5"),
    (dict(px=None), r"qd is given, so px \(n x Kd\) must be too"),
    (dict(xs=[np.ones(4, np.float32)]), r"xs\[0\] must be 2-D, got shape \(4,\)"),
    (dict(gs=[]), r"xs and gs must be non-empty lists of the same length"),
    (dict(sx=np.empty(3, np.float32)), r"give both sx \(n\) and sg \(m\), or neither"),
])
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_rejects_bad_buffers(backend, change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        _cpu().row_pass(**args)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_rejects_a_read_only_output(backend):
    args = _good()
    args["px"].setflags(write=False)
    with pytest.raises(ValueError, match="px"):
        _cpu().row_pass(**args)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_second_chunk_must_match_the_first(backend):
    args = _good()
    args["xs"].append(np.ones((2, 4), np.float32))
    args["gs"].append(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"xs\[1\] has shape \(2, 4\) but dimension 1 must be 3"):
        _cpu().row_pass(**args)


# ------------------------------------------------ the Triton launcher (oplora_kernels.row_pass)

def plan(jobs):
    return rp.plan_launches(jobs, [(torch.empty(0),) * 4] * len(jobs), block_t=16)


@interpreted
def test_triton_launches_once_for_many_layers():
    """Same dtypes, flags, alignment (none) and padded Kd: one launch; a tile per 16-row block."""
    launches = plan(layers_of_several_shapes()[:3])
    assert len(launches) == 1
    assert len(launches[0].segments) == 2 + 1 + 3
    assert len(launches[0].tiles) == (3 + 2) + 3 + 3 * 1


@interpreted
def test_triton_splits_mixed_jobs_by_compile_time_key_only():
    assert len(plan(mixed_jobs())) == 5
    assert sorted(L.aligned for L in plan(strided_jobs())) == [False, True]


@interpreted
def test_triton_splits_wide_right_hand_sides_into_column_groups(monkeypatch):
    monkeypatch.setattr(rp, "MAX_K", 16)
    job = make_job(30, 26, [20, 13], 40, 17, True)
    # Column groups 0..2 for Kd = 40, 0..1 for Kx = 17; statistics only in group 0.
    assert sorted((L.has_qd, L.has_qx, L.stats) for L in plan([job])) == [(True, False, False), (True, True, False),
                                                                          (True, True, True)]
    (got,) = run("triton", [job])
    assert_matches(got, expected(job), torch.float32)


@pytest.mark.skipif(rp is None, reason="the Triton backend is unavailable")
def test_triton_rejects_what_it_cannot_read(monkeypatch):
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
def test_triton_adapter_sends_float64_to_the_reference_and_keeps_low_precision_rows():
    from oplora import _triton_ops

    low = make_job(12, 14, [20], 3, None, True, dtype=torch.bfloat16)
    wide = make_job(12, 14, [20], None, 2, True, dtype=torch.float64)
    got_low, got_wide = _triton_ops.row_pass([low, wide])
    assert_matches(got_low, expected(low), torch.bfloat16)
    for a, b in zip(got_wide, reference.row_pass(*wide)):
        assert (a is None and b is None) or (a.dtype == torch.float64 and torch.equal(a, b))
    x = low[0][0]
    assert _triton_ops.rows(x, torch.float32) is x
    assert _triton_ops.rows(x, torch.float64).dtype == torch.float64
    assert _triton_ops.rows(x.mT, torch.float32).is_contiguous()


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_reference(dtype):
    jobs = [make_job(*case, dtype=dtype, device="cuda", seed=i) for i, case in enumerate(CASES)]
    jobs.append(make_job(4096, 1024, [1000, 24], 32, None, True, dtype=dtype, device="cuda", seed=9))
    jobs.append(make_job(1024, 4096, [777], None, 32, False, dtype=dtype, device="cuda", seed=10))
    for job, got in zip(jobs, rp.row_pass(jobs)):
        assert_matches(got, expected(job), dtype, device="cuda")
    for job, got in zip(jobs, rp.row_pass(jobs, precision="ieee", block_t=64, block_c=32)):
        assert_matches(got, expected(job), dtype, device="cuda")
