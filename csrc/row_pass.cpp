// Fused row pass (see row_pass.h for what it computes and why it is laid out this way).
#include "row_pass.h"

#include <algorithm>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace oplora {
namespace {

// Explicit 256-bit vectors (GCC/Clang vector extensions, no intrinsics): 8 floats or 4 doubles.
// The panels keep their R x NV accumulators in registers; loads are unaligned (memcpy).
template <class T>
struct Vec;
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(32)));
};
template <class T>
constexpr int kLanes = 32 / static_cast<int>(sizeof(T));
// Column panel width: two vectors (16 floats, 8 doubles); right-hand sides are padded to a
// multiple of one vector (half a panel).
template <class T>
constexpr int kPanel = 2 * kLanes<T>;
constexpr int kRows = 6;  // rows (or features) per register block: 6 x 2 accumulators + 3 of 16 registers

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

template <class V, class T>
inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}

template <class V, class T>
inline void store(T* p, const V& v) {
    std::memcpy(p, &v, sizeof(V));
}

// R x NV accumulators set to zero, and added to (or written over) R rows of a row-major output.
template <class V, int R, int NV>
inline void zero(V (&acc)[R][NV]) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
}

template <class T, class V, int R, int NV, bool ACC>
inline void flush(const V (&acc)[R][NV], T* out, int64_t ld) {
    constexpr int L = kLanes<T>;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            T* o = out + r * ld + v * L;
            store(o, ACC ? load<V>(o) + acc[r][v] : acc[r][v]);
        }
}

// C[0:R, k0:k0+NV*lanes] (+)= A @ Q[0:depth, k0:...] where A is R x depth with element (r, i) at
// a[r * row_step + i * depth_step]: row_step = lda, depth_step = 1 for G_b qd (rows of A), and
// row_step = 1, depth_step = lda for X_b^T (G_b qd) (columns of A). Q and C are row-major, width kp;
// ACC adds to C instead of overwriting it.
template <class T, int R, int NV, bool ACC>
inline void panel(const T* __restrict a, int64_t row_step, int64_t depth_step, int64_t depth,
                  const T* __restrict q, int64_t kp, int64_t k0, T* __restrict c) {
    using V = typename Vec<T>::type;
    constexpr int L = kLanes<T>;
    V acc[R][NV];
    zero(acc);
    for (int64_t i = 0; i < depth; ++i) {
        const T* qi = q + i * kp + k0;
        const T* ai = a + i * depth_step;
        V qv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) qv[v] = load<V>(qi + v * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const T x = ai[r * row_step];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += x * qv[v];
        }
    }
    flush<T, V, R, NV, ACC>(acc, c + k0, kp);
}

// C (tb x kp) = A (tb x p) @ Q (p x kp). The depth p is cut into chunks of kDepth so that the
// slice of one column panel of Q (kDepth x 2 vectors, 16 KiB) stays in L1 across the row groups.
template <class T>
void block_a(const T* a, int64_t tb, int64_t p, const T* q, int64_t kp, T* c) {
    constexpr int KC = kPanel<T>, NV = 2;
    constexpr int64_t kDepth = 16384 / (KC * static_cast<int64_t>(sizeof(T)));
    for (int64_t i0 = 0; i0 < p; i0 += kDepth) {
        const int64_t len = std::min(kDepth, p - i0);
        const T* qi = q + i0 * kp;
        const bool first = i0 == 0;
        for (int64_t k0 = 0; k0 < kp; k0 += KC) {
            const bool half = k0 + KC > kp;  // kp is a multiple of one vector: one half panel at the end
            int64_t t = 0;
            for (; t + kRows <= tb; t += kRows) {
                const T* at = a + t * p + i0;
                T* ct = c + t * kp;
                if (half) first ? panel<T, kRows, 1, false>(at, p, 1, len, qi, kp, k0, ct)
                                : panel<T, kRows, 1, true>(at, p, 1, len, qi, kp, k0, ct);
                else first ? panel<T, kRows, NV, false>(at, p, 1, len, qi, kp, k0, ct)
                           : panel<T, kRows, NV, true>(at, p, 1, len, qi, kp, k0, ct);
            }
            for (; t < tb; ++t) {
                const T* at = a + t * p + i0;
                T* ct = c + t * kp;
                if (half) first ? panel<T, 1, 1, false>(at, p, 1, len, qi, kp, k0, ct)
                                : panel<T, 1, 1, true>(at, p, 1, len, qi, kp, k0, ct);
                else first ? panel<T, 1, NV, false>(at, p, 1, len, qi, kp, k0, ct)
                           : panel<T, 1, NV, true>(at, p, 1, len, qi, kp, k0, ct);
            }
        }
    }
}

// out (p x kp) += A (tb x p)^T @ P (tb x kp). The block's columns are first packed by groups of
// kRows features (pack: tb x p), so that the panels read them sequentially: straight down a column
// of A, rows p * sizeof(T) apart (8 KiB for p = 2048), every line would fall into one L1 set.
template <class T>
void block_b(const T* a, int64_t tb, int64_t p, const T* pm, int64_t kp, T* out, T* pack) {
    constexpr int KC = kPanel<T>, NV = 2;
    const int64_t groups = p / kRows;
    for (int64_t t = 0; t < tb; ++t) {
        const T* at = a + t * p;
        for (int64_t g = 0; g < groups; ++g)
            for (int r = 0; r < kRows; ++r) pack[(g * tb + t) * kRows + r] = at[g * kRows + r];
    }
    for (int64_t g = 0; g < groups; ++g) {
        const T* pg = pack + g * tb * kRows;
        int64_t k0 = 0;
        for (; k0 + KC <= kp; k0 += KC) panel<T, kRows, NV, true>(pg, 1, kRows, tb, pm, kp, k0, out + g * kRows * kp);
        if (k0 < kp) panel<T, kRows, 1, true>(pg, 1, kRows, tb, pm, kp, k0, out + g * kRows * kp);
    }
    for (int64_t i0 = groups * kRows; i0 < p; ++i0) {
        int64_t k0 = 0;
        for (; k0 + KC <= kp; k0 += KC) panel<T, 1, NV, true>(a + i0, 1, p, tb, pm, kp, k0, out + i0 * kp);
        if (k0 < kp) panel<T, 1, 1, true>(a + i0, 1, p, tb, pm, kp, k0, out + i0 * kp);
    }
}

template <class T>
void sum_squares(const T* a, int64_t tb, int64_t p, T* sq) {
    for (int64_t t = 0; t < tb; ++t) {
        const T* at = a + t * p;
        for (int64_t i = 0; i < p; ++i) sq[i] += at[i] * at[i];
    }
}

// A right-hand side (p x k) copied into a zero-padded p x kp buffer (kp a multiple of half a panel).
template <class T>
std::vector<T> padded(const T* q, int64_t p, int64_t k, int64_t kp) {
    std::vector<T> out(static_cast<size_t>(p * kp), T(0));
    for (int64_t i = 0; i < p; ++i) std::memcpy(out.data() + i * kp, q + i * k, sizeof(T) * k);
    return out;
}

struct Block {
    int chunk;
    int64_t row0, rows;
};

}  // namespace

template <class T>
void row_pass(const RowPassArgs<T>& args) {
    const int64_t n = args.n, m = args.m;
    const bool want_d = args.qd != nullptr && args.kd > 0;
    const bool want_x = args.qx != nullptr && args.kx > 0;
    const int64_t kdp = want_d ? round_up(args.kd, kPanel<T> / 2) : 0;
    const int64_t kxp = want_x ? round_up(args.kx, kPanel<T> / 2) : 0;
    const std::vector<T> qd = want_d ? padded(args.qd, m, args.kd, kdp) : std::vector<T>();
    const std::vector<T> qx = want_x ? padded(args.qx, n, args.kx, kxp) : std::vector<T>();

    // Rows per block: the block of X and of G stays in a core's L2 between its two uses.
    const int64_t wide = std::max<int64_t>(std::max(n, m), 1);
    const int64_t budget = (192 * 1024) / (static_cast<int64_t>(sizeof(T)) * wide);
    const int64_t block_rows = std::max<int64_t>(kRows, std::min<int64_t>(128, budget / kRows * kRows));
    std::vector<Block> blocks;
    for (size_t j = 0; j < args.rows.size(); ++j)
        for (int64_t r0 = 0; r0 < args.rows[j]; r0 += block_rows)
            blocks.push_back({static_cast<int>(j), r0, std::min(block_rows, args.rows[j] - r0)});

    // Threads only where they pay: starting and joining a team costs microseconds (far more on a
    // loaded machine), so each thread gets at least ~2 MFLOP, and at least one row block.
    int64_t total_rows = 0;
    for (int64_t t : args.rows) total_rows += t;
    const double flops = 2.0 * static_cast<double>(total_rows) * static_cast<double>(n + m) *
                         static_cast<double>(kdp + kxp) + static_cast<double>(total_rows) * (n + m);
    int threads = std::max(1, args.threads);
    threads = static_cast<int>(std::min<double>(threads, std::max(1.0, flops / 2e6)));
    threads = static_cast<int>(std::min<int64_t>(threads, std::max<size_t>(blocks.size(), 1)));
    // Per-thread accumulators: px, pd (padded widths), sx, sg, laid out back to back.
    const int64_t acc_size = n * kdp + m * kxp + (args.stats ? n + m : 0);
    std::vector<std::vector<T>> acc(threads);

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
        const int nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        std::vector<T>& mine = acc[tid];
        mine.assign(static_cast<size_t>(acc_size), T(0));
        T* px = mine.data();
        T* pd = px + n * kdp;
        T* sx = pd + m * kxp;
        T* sg = sx + n;
        std::vector<T> tmp_d(static_cast<size_t>(block_rows * kdp));
        std::vector<T> tmp_x(static_cast<size_t>(block_rows * kxp));
        std::vector<T> pack(static_cast<size_t>(block_rows * std::max(n, m)));
        const size_t lo = blocks.size() * tid / nth, hi = blocks.size() * (tid + 1) / nth;
        for (size_t b = lo; b < hi; ++b) {
            const Block& blk = blocks[b];
            const T* x = args.xs[blk.chunk] + blk.row0 * n;
            const T* g = args.gs[blk.chunk] + blk.row0 * m;
            // Read G once: G_b qd (and its squares), then X once: X_b qx (and its squares);
            // then the products back through the rows just read.
            if (want_d) block_a(g, blk.rows, m, qd.data(), kdp, tmp_d.data());
            if (args.stats) sum_squares(g, blk.rows, m, sg);
            if (want_x) block_a(x, blk.rows, n, qx.data(), kxp, tmp_x.data());
            if (args.stats) sum_squares(x, blk.rows, n, sx);
            if (want_d) block_b(x, blk.rows, n, tmp_d.data(), kdp, px, pack.data());
            if (want_x) block_b(g, blk.rows, m, tmp_x.data(), kxp, pd, pack.data());
        }
    }

    // Sum the per-thread accumulators into the outputs (unpadding the widths).
    auto total = [&](int64_t offset, int64_t i) {
        T s = 0;
        for (int t = 0; t < threads; ++t) s += acc[t][offset + i];
        return s;
    };
    if (want_d)
        for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < args.kd; ++k) args.px[i * args.kd + k] = total(0, i * kdp + k);
    if (want_x)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < args.kx; ++k) args.pd[i * args.kx + k] = total(n * kdp, i * kxp + k);
    if (args.stats) {
        for (int64_t i = 0; i < n; ++i) args.sx[i] = total(n * kdp + m * kxp, i);
        for (int64_t i = 0; i < m; ++i) args.sg[i] = total(n * kdp + m * kxp + n, i);
    }
}

template void row_pass<float>(const RowPassArgs<float>&);
template void row_pass<double>(const RowPassArgs<double>&);

}  // namespace oplora
