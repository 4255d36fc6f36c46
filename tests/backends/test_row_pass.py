"""``row_pass`` on every backend against ``oplora.reference.row_pass``.

Each backend gets the rows as the step engine hands them over (``ops.rows``: the torch and C++
backends upcast float16/bfloat16 rows to float32, the Triton kernel reads them as they are); the
reference gets them widened to the compute dtype, so the only difference is the order of the
sums (bounds: tests/tolerances.py). Cases: odd shapes, ragged last tiles, several and empty
chunks, every combination of products and statistics, mixed row dtypes, strided views, many
layers of every kind (and float32 beside float64) in one call, NaN. On the CPU the Triton kernel
runs through the interpreter, on small blocks (several row tiles and column slices per call); the
``cuda`` test (``test_row_pass_triton``) runs it compiled.

Backend-specific cases: the C++ binding's checks of its buffers and its thread count, and its
grouped call (``row_pass_many``: one OpenMP team for every layer of a pass) against its per-layer
one, on one and two threads, with its checks naming the job; the Triton launcher's plan and
refusals: ``test_row_pass_triton``.
"""

import itertools

import numpy as np
import pytest
import torch
from backend_cases import cpu_backends
from tolerances import assert_close

from oplora import backends as _backend, reference

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


def ragged_jobs():
    """Layers of many shapes in one pass: 1-3 chunks, empty chunks, a layer with no rows, padded and
    unpadded right-hand sides, with and without qd/qx/statistics each."""
    cases = [(37, 53, [45, 0, 20], 6, None, True), (64, 25, [0], 11, 3, True), (29, 91, [7, 7, 7], 16, None, False),
             (5, 7, [3], None, 2, True), (23, 37, [11, 4], 9, 17, False), (48, 64, [130], 16, 32, True),
             (40, 40, [0, 0], None, None, True), (17, 70, [200, 1], 8, 8, False), (70, 17, [64], None, 16, False)]
    return [make_job(*case, seed=i) for i, case in enumerate(cases)]


def dtypes_jobs():
    """float32 and float64 layers in one pass (the C++ adapter makes one call per dtype)."""
    return [make_job(20, 30, [18], 5, None, True, seed=1), make_job(22, 31, [19], 4, 3, True, dtype=torch.float64, seed=2),
            make_job(23, 17, [21], None, 6, False, seed=3), make_job(9, 12, [0, 5], 2, None, True, dtype=torch.float64,
                                                                      seed=4)]


def shared_x_jobs(dtype=torch.float32):
    """Layers that read one X, as q, k and v of an attention block (and gate and up of an MLP) hold
    the same captured rows: the C++ pass reads such an X once for all of them. Three layers of
    different widths on one X of chunks [45, 0, 20] (A side only, B side only with statistics, both),
    two on another X (one with nothing asked), and a layer whose X holds the same values in another
    tensor (read on its own)."""
    gen = torch.Generator().manual_seed(7)
    x1 = [torch.randn(t, 53, generator=gen).to(dtype) for t in (45, 0, 20)]
    x2 = [torch.randn(70, 30, generator=gen).to(dtype)]
    thin = torch.float64 if dtype == torch.float64 else torch.float32

    def layer(xs, m, kd, kx, stats):
        gs = [torch.randn(x.shape[0], m, generator=gen).to(dtype) for x in xs]
        qd = torch.randn(m, kd, generator=gen).to(thin) if kd else None
        qx = torch.randn(xs[0].shape[1], kx, generator=gen).to(thin) if kx else None
        return list(xs), gs, qd, qx, stats

    return [layer(x1, 37, 6, None, False), layer(x2, 19, 16, 8, True), layer(x1, 12, None, 5, True),
            layer(x1, 64, 16, 3, False), layer([x.clone() for x in x1], 9, 4, 4, True), layer(x2, 40, None, None, False)]


JOB_SETS = {"layers": layers_of_several_shapes, "mixed": mixed_jobs, "strided": strided_jobs, "ragged": ragged_jobs,
            "dtypes": dtypes_jobs, "shared_x": shared_x_jobs}


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


def _jobs(change, at=1):
    """Two good jobs (as _good) for the grouped call, `change` applied to jobs[at]."""
    return [tuple({**_good(), **(change if i == at else {})}.values()) for i in range(2)]


# (a change to a good job, what the error says: {j} where the grouped call names the job, jobs[1]).
BAD_BUFFERS = [
    (dict(xs=[np.ones((4, 3), np.float16)]), r"{j}xs\[0\] must be float32"),
    (dict(gs=[np.ones((4, 2), np.float64)]), r"{j}gs\[0\] must be float32 \(like the other operands\)"),
    (dict(xs=[np.ones((6, 3), np.float32)[::2]]), r"{j}xs\[0\] must be C-contiguous"),
    (dict(gs=[np.ones((5, 2), np.float32)]), r"{j}gs\[0\] has shape \(5, 2\) but dimension 0 must be 4"),
    (dict(qd=np.ones((3, 5), np.float32)), r"{j}qd has shape \(3, 5\) but dimension 0 must be 2"),
    (dict(px=np.empty((3, 4), np.float32)), r"{j}px has shape \(3, 4\) but dimension 1 must be 5"),
    (dict(px=None), r"{j}qd is given, so {j}px \(n x Kd\) must be too"),
    (dict(qx=np.ones((3, 2), np.float32)), r"{j}qx is given, so {j}pd \(m x Kx\) must be too"),
    (dict(qx=np.ones((3, 2), np.float32), pd=np.empty((2, 3), np.float32)),
     r"{j}pd has shape \(2, 3\) but dimension 1 must be 2"),
    (dict(xs=[np.ones(4, np.float32)]), r"{j}xs\[0\] must be 2-D, got shape \(4,\)"),
    (dict(gs=[]), r"{j}xs and {j}gs must be non-empty lists of the same length"),
    (dict(sx=np.empty(3, np.float32)), r"give both {j}sx \(n\) and {j}sg \(m\), or neither"),
    (dict(sx=np.empty(4, np.float32), sg=np.empty(2, np.float32)), r"{j}sx has shape \(4,\) but dimension 0 must be 3"),
]


@pytest.mark.parametrize("grouped", [False, True], ids=["row_pass", "row_pass_many"])
@pytest.mark.parametrize("change,message", BAD_BUFFERS)
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_rejects_bad_buffers(backend, change, message, grouped):
    """Every check names the argument, and in the grouped call the job."""
    with pytest.raises(ValueError, match=message.format(j=r"jobs\[1\]\." if grouped else "")):
        if grouped:
            _cpu().row_pass_many(_jobs(change))
        else:
            _cpu().row_pass(**{**_good(), **change})


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


def grouped_pass(dtype):
    """Layers for one grouped C++ call on two threads: enough arithmetic for both (the heuristic
    wants ~2 MFLOP a thread), a large layer in the middle that the split between the threads cuts,
    and around it small ones of every kind (accumulated in place or privately, padded widths,
    empty chunks, a layer without rows, with and without qd/qx/statistics)."""
    cases = [(37, 53, [45, 0, 20], 6, None, True), (64, 25, [0], 11, 3, True), (29, 91, [7, 7, 7], 16, None, False),
             (150, 130, [300, 90], 16, 5, True),  # ~70% of the pass: the threads' boundary falls inside it
             (5, 7, [3], None, 2, True), (23, 37, [11, 4], 9, 17, False), (48, 64, [130], 16, 32, True),
             (40, 40, [0, 0], None, None, True), (17, 70, [200, 1], 8, 8, False)]
    return [make_job(*case, dtype=dtype, seed=i) for i, case in enumerate(cases)]


def _cpp_call(job):
    """One job as the C++ binding takes it: (xs, gs, qd, qx, px, pd, sx, sg) as NumPy arrays, the
    outputs filled with NaN (every entry must be written)."""
    xs, gs, qd, qx, stats = job
    n, m, dt = xs[0].shape[1], gs[0].shape[1], xs[0].numpy().dtype
    px = np.full((n, qd.shape[1]), np.nan, dt) if qd is not None else None
    pd = np.full((m, qx.shape[1]), np.nan, dt) if qx is not None else None
    sx, sg = (np.full(n, np.nan, dt), np.full(m, np.nan, dt)) if stats else (None, None)
    return ([x.numpy() for x in xs], [g.numpy() for g in gs], None if qd is None else qd.numpy(),
            None if qx is None else qx.numpy(), px, pd, sx, sg)


def check_grouped(jobs, dtype, threads, bitwise):
    """``row_pass_many`` of ``jobs`` against ``row_pass`` of each job alone (bit for bit where
    ``bitwise``) and the reference, and the same twice on ``threads`` threads; every output entry
    is written (they start as NaN)."""
    grouped, again = [_cpp_call(job) for job in jobs], [_cpp_call(job) for job in jobs]
    _cpu().row_pass_many(grouped, threads=threads)
    _cpu().row_pass_many(again, threads=threads)
    for job, call, second in zip(jobs, grouped, again):
        alone = _cpp_call(job)
        _cpu().row_pass(*alone, threads=threads)
        for name, got, twice, single, want in zip(("px", "pd", "sx", "sg"), call[4:], second[4:], alone[4:],
                                                  expected(job)):
            assert (got is None) == (want is None), name
            if want is None:
                continue
            assert np.array_equal(got, twice), name
            if bitwise:
                assert np.array_equal(got, single), name
            assert_close(torch.from_numpy(got), torch.from_numpy(single), "row_pass", dtype, what=name)
            assert_close(torch.from_numpy(got), want, "row_pass", dtype, what=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_grouped_call_equals_the_per_layer_calls(backend, dtype, threads):
    """row_pass_many = row_pass per layer (bit for bit on one thread, where the order of the sums is
    the same) = the reference, and the same twice on a given thread count."""
    check_grouped(grouped_pass(dtype), dtype, threads, bitwise=threads == 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_layers_sharing_x_read_it_once_and_match_each_layer(backend, dtype, threads):
    """Jobs whose X is the same buffers (shared_x_jobs, each X shared by six, then four layers) are
    one unit of the grouped pass: each gets the reference's products and statistics and what a call
    of its own gives (to rounding: a unit's row blocks are sized for its widest member)."""
    check_grouped(shared_x_jobs(dtype) * 2, dtype, threads, bitwise=False)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_grouped_call_of_no_jobs_does_nothing(backend):
    _cpu().row_pass_many([], threads=2)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cpp_grouped_rejects_bad_jobs_and_threads(backend):
    row_pass_many = _cpu().row_pass_many
    with pytest.raises(ValueError, match=r"jobs\[0\]\.xs\[0\] must be float32 or float64"):
        row_pass_many(_jobs(dict(xs=[np.ones((4, 3), np.float16)]), at=0))
    with pytest.raises(ValueError, match=r"jobs\[0\]\.xs and jobs\[0\]\.gs must be non-empty"):
        row_pass_many(_jobs(dict(xs=[]), at=0))
    wide = tuple(v if v is None else [a.astype(np.float64) for a in v] if isinstance(v, list) else v.astype(np.float64)
                 for v in _good().values())
    with pytest.raises(ValueError, match=r"jobs\[1\]\.xs\[0\] must be float64 \(like the other operands\)"):
        row_pass_many([wide, _jobs({})[0]])  # one dtype per call: the first job's
    with pytest.raises(ValueError, match=r"jobs\[1\]\.qd must be a buffer \(a NumPy array\) or None"):
        row_pass_many(_jobs(dict(qd=[[1.0] * 5] * 2)))
    with pytest.raises(ValueError, match=r"jobs\[1\]\.xs must be a list of buffers"):
        row_pass_many(_jobs(dict(xs=[[[1.0] * 3] * 4])))
    with pytest.raises(ValueError, match=r"jobs\[1\] must be a tuple \(xs, gs, qd, qx, px, pd, sx, sg\)"):
        row_pass_many([_jobs({})[0], _jobs({})[1][:7]])
    jobs = _jobs({})
    jobs[1][4].setflags(write=False)
    with pytest.raises(ValueError, match=r"jobs\[1\]\.px must be writable"):
        row_pass_many(jobs)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        row_pass_many(_jobs({}), threads=0)
