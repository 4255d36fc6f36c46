// The r-sized work of a LoRSum half-step, in float64 (oplora.reference.thin_qr / prox_solve).
//
// A half-step is the tall-skinny least-squares problem min_X ||Z X - T||^2 + lam ||X - X0||^2 with
// Z = W F (p x r, the weighted fixed factor). It is solved backward-stably, never through Z^T Z:
//   1. thin_qr:    Z = Q R by Householder reflections (Q p x k orthonormal, R k x r, k = min(p, r));
//   2. the caller forms Y = Q^T W T through the thin terms (one row pass);
//   3. prox_solve: X = V diag(s / (s^2 + lam)) U^T Y + (I - V diag(s^2 / (s^2 + lam)) V^T) X0 from
//      the SVD R = U S V^T (one-sided Jacobi: accurate to the last bits for these small matrices).
//      Singular values at or below s_max * eps * (p + r) are rounding noise of an exactly
//      rank-deficient factor: their directions keep X0 (the lam -> 0+ limit; B = 0 leaves A = A0).
// All matrices are row-major float64.
#pragma once

#include <cstdint>

namespace oplora {

// Z (p x r) -> Q (p x k), R (k x r), k = min(p, r). Z is not modified.
void thin_qr(const double* z, int64_t p, int64_t r, double* q, double* rmat);

// R (k x r), Y (k x q), X0 (r x q) -> X (r x q).
void prox_solve(const double* rmat, int64_t k, int64_t r, const double* y, int64_t q, const double* x0, double lam,
                int64_t p, double* x);

}  // namespace oplora
