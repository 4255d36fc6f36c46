"""``row_pass``, continued (``test_row_pass``): the Triton launcher's plan (launches per call,
column groups, alignment) and its refusals, the backend adapter's float64 path and ``rows``, and
the kernel compiled on a GPU against the reference."""

import pytest
import torch
from backend_cases import compiled, interpreted
from backend_cases import kernels as rp
from test_row_pass import CASES, assert_matches, expected, layers_of_several_shapes, make_job, mixed_jobs, run, strided_jobs

from oplora import reference


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
    from oplora_kernels import _plan

    monkeypatch.setattr(rp, "MAX_K", 16)
    monkeypatch.setattr(_plan, "MAX_K", 16)  # where plan_launches reads it
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
    from oplora.backends import triton_ops as _triton_ops

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
