// Householder thin QR and the SVD-based proximal solve of a LoRSum half-step (see small_solve.h).
#include "small_solve.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace oplora {
namespace {

// Dot product of contiguous vectors with four independent partial sums (4 x 4 doubles): the
// compiler may not reassociate a plain sum (no -ffast-math), so the split is written out.
double dot(const double* __restrict a, const double* __restrict b, int64_t len) {
    typedef double V __attribute__((vector_size(32)));
    V acc[4] = {V{}, V{}, V{}, V{}};
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        for (int u = 0; u < 4; ++u) {
            V x, y;
            std::memcpy(&x, a + i + 4 * u, sizeof(V));
            std::memcpy(&y, b + i + 4 * u, sizeof(V));
            acc[u] += x * y;
        }
    }
    V sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    double out = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    for (; i < len; ++i) out += a[i] * b[i];
    return out;
}

}  // namespace

void thin_qr(const double* z, int64_t p, int64_t r, double* q, double* rmat) {
    const int64_t k = std::min(p, r);
    // Column-major copy (column c at a[c * p]): every reflector touches whole contiguous columns.
    std::vector<double> a(static_cast<size_t>(p * r));
    for (int64_t i = 0; i < p; ++i)
        for (int64_t c = 0; c < r; ++c) a[c * p + i] = z[i * r + c];
    std::vector<double> vs(static_cast<size_t>(p * k), 0.0);  // reflector j: vs[j * p + j .. j * p + p)
    std::vector<double> taus(static_cast<size_t>(k), 0.0);
    for (int64_t j = 0; j < k; ++j) {
        double* col = a.data() + j * p;
        const double norm = std::sqrt(dot(col + j, col + j, p - j));
        if (norm == 0.0) continue;  // nothing to annihilate: H_j = I
        const double head = col[j];
        const double alpha = head >= 0.0 ? -norm : norm;  // the sign that avoids cancellation
        double* v = vs.data() + j * p;
        std::copy(col + j, col + p, v + j);
        v[j] = head - alpha;
        const double vnorm2 = dot(v + j, v + j, p - j);
        if (vnorm2 == 0.0) continue;
        const double tau = 2.0 / vnorm2;
        taus[j] = tau;
        for (int64_t c = j; c < r; ++c) {
            double* ac = a.data() + c * p;
            const double w = tau * dot(v + j, ac + j, p - j);
            for (int64_t i = j; i < p; ++i) ac[i] -= w * v[i];
        }
    }
    for (int64_t i = 0; i < k; ++i)
        for (int64_t c = 0; c < r; ++c) rmat[i * r + c] = c >= i ? a[c * p + i] : 0.0;
    // Q = H_0 ... H_{k-1} [I_k; 0], applied from the last reflector back (column-major, then out).
    std::vector<double> qc(static_cast<size_t>(p * k), 0.0);
    for (int64_t c = 0; c < k; ++c) qc[c * p + c] = 1.0;
    for (int64_t j = k - 1; j >= 0; --j) {
        if (taus[j] == 0.0) continue;
        const double* v = vs.data() + j * p;
        for (int64_t c = 0; c < k; ++c) {
            double* qcol = qc.data() + c * p;
            const double w = taus[j] * dot(v + j, qcol + j, p - j);
            for (int64_t i = j; i < p; ++i) qcol[i] -= w * v[i];
        }
    }
    for (int64_t i = 0; i < p; ++i)
        for (int64_t c = 0; c < k; ++c) q[i * k + c] = qc[c * p + i];
}

namespace {

// One-sided (Hestenes) Jacobi on the columns of A (rows x cols, row-major, modified in place):
// rotations from the right until the columns are orthogonal, accumulated in V (cols x cols).
// Afterwards A = U diag(s) with s_j = ||A[:, j]||, and the input equals U diag(s) V^T.
void jacobi_columns(std::vector<double>& a, int64_t rows, int64_t cols, std::vector<double>& v) {
    v.assign(static_cast<size_t>(cols * cols), 0.0);
    for (int64_t i = 0; i < cols; ++i) v[i * cols + i] = 1.0;
    const double eps = std::numeric_limits<double>::epsilon();
    for (int sweep = 0; sweep < 80; ++sweep) {
        bool rotated = false;
        for (int64_t i = 0; i < cols - 1; ++i) {
            for (int64_t j = i + 1; j < cols; ++j) {
                double alpha = 0.0, beta = 0.0, gamma = 0.0;
                for (int64_t t = 0; t < rows; ++t) {
                    const double ai = a[t * cols + i], aj = a[t * cols + j];
                    alpha += ai * ai;
                    beta += aj * aj;
                    gamma += ai * aj;
                }
                if (gamma == 0.0 || std::abs(gamma) <= eps * std::sqrt(alpha * beta)) continue;
                rotated = true;
                const double zeta = (beta - alpha) / (2.0 * gamma);
                const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
                const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
                for (int64_t row = 0; row < rows; ++row) {
                    const double ai = a[row * cols + i], aj = a[row * cols + j];
                    a[row * cols + i] = c * ai - s * aj;
                    a[row * cols + j] = s * ai + c * aj;
                }
                for (int64_t row = 0; row < cols; ++row) {
                    const double vi = v[row * cols + i], vj = v[row * cols + j];
                    v[row * cols + i] = c * vi - s * vj;
                    v[row * cols + j] = s * vi + c * vj;
                }
            }
        }
        if (!rotated) break;
    }
}

}  // namespace

void prox_solve(const double* rmat, int64_t k, int64_t r, const double* y, int64_t q, const double* x0, double lam,
                int64_t p, double* x) {
    // SVD of R (k x r) through one-sided Jacobi on R^T (r x k): R^T W = U' diag(s), so
    // R = W diag(s) U'^T, i.e. left vectors W (k x k), right vectors U' (r x k).
    std::vector<double> a(static_cast<size_t>(r * k));
    for (int64_t i = 0; i < k; ++i)
        for (int64_t c = 0; c < r; ++c) a[c * k + i] = rmat[i * r + c];
    std::vector<double> w;
    jacobi_columns(a, r, k, w);
    std::vector<double> s(static_cast<size_t>(k));
    double smax = 0.0;
    for (int64_t j = 0; j < k; ++j) {
        double n2 = 0.0;
        for (int64_t t = 0; t < r; ++t) n2 += a[t * k + j] * a[t * k + j];
        s[j] = std::sqrt(n2);
        smax = std::max(smax, s[j]);
    }
    const double tiny = smax * std::numeric_limits<double>::epsilon() * static_cast<double>(p + r);
    // x = X0 + sum over kept j of v_j (gain_j (w_j^T Y) - pull_j (v_j^T X0)), v_j = a[:, j] / s_j.
    std::copy(x0, x0 + r * q, x);
    std::vector<double> coef(static_cast<size_t>(q));
    for (int64_t j = 0; j < k; ++j) {
        if (!(s[j] > tiny)) continue;  // an exact zero: this direction keeps X0
        const double s2 = s[j] * s[j], denom = s2 + lam;
        const double gain = s[j] / denom, pull = s2 / denom, inv = 1.0 / s[j];
        std::fill(coef.begin(), coef.end(), 0.0);
        for (int64_t i = 0; i < k; ++i) {
            const double wij = w[i * k + j] * gain;
            if (wij == 0.0) continue;
            for (int64_t c = 0; c < q; ++c) coef[c] += wij * y[i * q + c];
        }
        for (int64_t t = 0; t < r; ++t) {
            const double vt = a[t * k + j] * inv * pull;
            if (vt == 0.0) continue;
            for (int64_t c = 0; c < q; ++c) coef[c] -= vt * x0[t * q + c];
        }
        for (int64_t t = 0; t < r; ++t) {
            const double vt = a[t * k + j] * inv;
            for (int64_t c = 0; c < q; ++c) x[t * q + c] += vt * coef[c];
        }
    }
}

}  // namespace oplora
