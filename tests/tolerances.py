"""The one tolerance table of the op tests (``test_row_pass``, ``test_thin_qr``, ``test_prox_solve``)
and the optimizer-step tests (``test_backends_step``), for every backend.

``TOL[(op, dtype)]`` bounds the error of a backend against ``oplora.reference`` (or, for whole
optimizer runs, against the torch backend), measured by ``MEASURE[op]``:

* :func:`max_error` -- ``max |got - want| / max |want|``: the largest entry error, relative to the
  largest entry (op outputs: thin products, statistics, Q R, Q^T Q, R, solutions);
* :func:`norm_error` -- ``||got - want|| / ||want||`` (Frobenius): a whole result that many
  roundings went into (the product ``B A`` of a LoRSum, the factors after several steps).

Low precision: a backend's rows may be float16/bfloat16, but every backend accumulates in
float32 (the precision policy of ``oplora.backends``) and the reference gets the same rows
widened to float32 -- exactly -- so the low-precision bound is torch's own float32 error, the
order of the sums. Optimizer runs on bfloat16 models store the factors in bfloat16 after every
step: a sum that rounds the other way moves an entry by one bfloat16 ulp (2^-8 relative), so
their bound is a few ulps. On a GPU the row pass multiplies with tf32x3 tensor-core products
and sums with atomics, which adds about 1e-6: ``GPU_SLACK``.
"""

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def max_error(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def norm_error(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


TOL = {
    # One pass over the rows: the float32 sums of at most a few hundred rows, in any order.
    ("row_pass", F32): 2e-6, ("row_pass", F16): 2e-6, ("row_pass", BF16): 2e-6, ("row_pass", F64): 1e-13,
    # Grouped thin QR, float64 (the engine's r-sized work), scaled as noted at the call:
    # residual x max(p, r), orthogonality x k, R against Householder's (up to the signs of its rows).
    ("thin_qr.residual", F64): 1e-13, ("thin_qr.orthogonality", F64): 1e-13, ("thin_qr.r", F64): 1e-10,
    # The r x r proximal solve, float64: the same formula, batched; only rounding differs.
    ("prox_solve", F64): 1e-12,
    # The step engine's half-steps on one layer against reference.lorsum: the product B A.
    ("lorsum", F32): 2e-5, ("lorsum", F64): 1e-11,
    # Whole optimizer runs, trained factors against the torch backend's.
    ("step", F32): 1e-5, ("step", BF16): 1e-2,
}
MEASURE = {"lorsum": norm_error, "step": norm_error}
GPU_SLACK = {"row_pass": 10.0}


def assert_close(got, want, op, dtype, *, scale=1.0, device="cpu", what=""):
    """``MEASURE[op](got, want) <= TOL[(op, dtype)] * scale`` (times ``GPU_SLACK[op]`` on CUDA)."""
    bound = TOL[(op, dtype)] * scale * (GPU_SLACK.get(op, 1.0) if torch.device(device).type == "cuda" else 1.0)
    err = MEASURE.get(op, max_error)(got, want)
    assert err <= bound, f"{op} {what} {dtype}: error {err:.2e} > {bound:.1e}"
