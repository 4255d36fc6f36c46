// Fused row pass (see row_pass.h for what it computes and why it is laid out this way).
#include "row_pass.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

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

// One layer as the pass runs it: its right-hand sides with widths padded to whole vectors (copied
// only where the width is not already a multiple), its rows cut into blocks, its work items.
template <class T>
struct Layer {
    const RowPassArgs<T>* args = nullptr;
    bool want_d = false, want_x = false;
    int64_t kdp = 0, kxp = 0;           // padded widths (0: not asked)
    const T* qd = nullptr;              // m x kdp
    const T* qx = nullptr;              // n x kxp
    std::vector<T> qd_copy, qx_copy;    // the padded copies, where needed
    int64_t block_rows = 0;
    size_t first = 0, end = 0;          // its work items [first, end)

    // The arithmetic of `rows` of its rows: the two products per row and side, and reading the row
    // (the squares, the packing); the unit of the thread heuristic and of the split between threads.
    double flops(int64_t rows) const {
        const double row = static_cast<double>(args->n + args->m);
        return static_cast<double>(rows) * row * (2.0 * static_cast<double>(kdp + kxp) + 1.0);
    }
    // Its accumulators: px, pd (padded widths), sx, sg.
    int64_t acc_size() const {
        return args->n * kdp + args->m * kxp + (args->stats ? args->n + args->m : 0);
    }
};

// A right-hand side (p x k) as a p x kp buffer (kp a multiple of half a panel): q itself when k is
// one already, else a zero-padded copy kept in `copy`.
template <class T>
const T* padded(const T* q, int64_t p, int64_t k, int64_t kp, std::vector<T>& copy) {
    if (kp == k) return q;
    copy.assign(static_cast<size_t>(p * kp), T(0));
    for (int64_t i = 0; i < p; ++i) std::memcpy(copy.data() + i * kp, q + i * k, sizeof(T) * k);
    return copy.data();
}

// One work item: a block of rows of one chunk of one layer; `start` is the arithmetic of the pass
// before it.
struct Item {
    size_t layer;
    int chunk;
    int64_t row0, rows;
    double start, flops;
};

// Where one segment of the pass accumulates one layer: px (n x kdp), pd (m x kxp), sx (n), sg (m),
// each either the layer's output itself (the segment holds the whole layer and the width is
// unpadded) or a private buffer.
template <class T>
struct Acc {
    T *px = nullptr, *pd = nullptr, *sx = nullptr, *sg = nullptr;
};

// Segment `s` of `count`: the items whose middle falls in [s, s + 1) / count of the pass's
// arithmetic -- contiguous ranges, in order, of about equal work.
std::pair<size_t, size_t> segment(const std::vector<Item>& items, double total, size_t s, size_t count) {
    auto first_of = [&](size_t k) {
        return static_cast<size_t>(std::partition_point(items.begin(), items.end(), [&](const Item& it) {
                                       return (it.start + 0.5 * it.flops) * count < total * k;
                                   }) - items.begin());
    };
    return {s == 0 ? 0 : first_of(s), s + 1 == count ? items.size() : first_of(s + 1)};
}

// Where the segment `range` accumulates each layer it touches (acc[l]): a layer wholly inside it
// in the layer's outputs themselves where the widths are unpadded, the rest in the buffer returned
// (allocated for the worst case, touched only where used); all set to zero.
template <class T>
std::unique_ptr<T[]> accumulators(const std::vector<Layer<T>>& layers, const std::vector<Item>& items,
                                  std::pair<size_t, size_t> range, Acc<T>* acc) {
    if (range.first == range.second) return nullptr;
    const size_t l0 = items[range.first].layer, l1 = items[range.second - 1].layer + 1;
    int64_t bound = 0;
    for (size_t l = l0; l < l1; ++l) bound += layers[l].acc_size();
    std::unique_ptr<T[]> own(new T[static_cast<size_t>(bound)]);
    T* next = own.get();
    for (size_t l = l0; l < l1; ++l) {
        const Layer<T>& layer = layers[l];
        const RowPassArgs<T>& a = *layer.args;
        const bool whole = layer.first >= range.first && layer.end <= range.second;
        auto place = [&](T*& slot, T* out, int64_t rows, int64_t k, int64_t kp) {
            if (whole && k == kp) {
                slot = out;
            } else {
                slot = next;
                next += rows * kp;
            }
            std::fill(slot, slot + rows * kp, T(0));
        };
        if (layer.want_d) place(acc[l].px, a.px, a.n, a.kd, layer.kdp);
        if (layer.want_x) place(acc[l].pd, a.pd, a.m, a.kx, layer.kxp);
        if (a.stats) place(acc[l].sx, a.sx, a.n, 1, 1);
        if (a.stats) place(acc[l].sg, a.sg, a.m, 1, 1);
    }
    return own;
}

// One block: G_b qd (and G's squares) from one read of G_b, X_b qx (and X's squares) from one read
// of X_b, then the products back through the rows just read.
template <class T>
void run_block(const Layer<T>& layer, const Item& it, const Acc<T>& acc, T* tmp_d, T* tmp_x, T* pack) {
    const RowPassArgs<T>& a = *layer.args;
    const T* x = a.xs[it.chunk] + it.row0 * a.n;
    const T* g = a.gs[it.chunk] + it.row0 * a.m;
    if (layer.want_d) block_a(g, it.rows, a.m, layer.qd, layer.kdp, tmp_d);
    if (a.stats) sum_squares(g, it.rows, a.m, acc.sg);
    if (layer.want_x) block_a(x, it.rows, a.n, layer.qx, layer.kxp, tmp_x);
    if (a.stats) sum_squares(x, it.rows, a.n, acc.sx);
    if (layer.want_d) block_b(x, it.rows, a.n, tmp_d, layer.kdp, acc.px, pack);
    if (layer.want_x) block_b(g, it.rows, a.m, tmp_x, layer.kxp, acc.pd, pack);
}

// out (rows x k) = the sum, in segment order, of the segments' parts of one layer: `field` of
// parts[s * stride] (rows x kp; nullptr: the segment had none of the layer). Nothing to do when the
// only part is out itself, zeros when there is none.
template <class T>
void reduce(const Acc<T>* parts, size_t stride, size_t segments, T* Acc<T>::*field, int64_t rows, int64_t k,
            int64_t kp, T* out) {
    std::vector<const T*> from;
    for (size_t s = 0; s < segments; ++s)
        if (parts[s * stride].*field != nullptr) from.push_back(parts[s * stride].*field);
    if (from.size() == 1 && from[0] == out) return;
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < k; ++c) {
            T s = 0;
            for (const T* p : from) s += p[i * kp + c];
            out[i * k + c] = s;
        }
}

}  // namespace

template <class T>
void row_pass_many(const RowPassArgs<T>* jobs, size_t count, int threads) {
    std::vector<Layer<T>> layers(count);
    std::vector<Item> items;
    double total = 0;
    for (size_t l = 0; l < count; ++l) {
        const RowPassArgs<T>& a = jobs[l];
        Layer<T>& layer = layers[l];
        layer.args = &a;
        layer.want_d = a.qd != nullptr && a.kd > 0;
        layer.want_x = a.qx != nullptr && a.kx > 0;
        if (layer.want_d) layer.kdp = round_up(a.kd, kPanel<T> / 2);
        if (layer.want_x) layer.kxp = round_up(a.kx, kPanel<T> / 2);
        if (layer.want_d) layer.qd = padded(a.qd, a.m, a.kd, layer.kdp, layer.qd_copy);
        if (layer.want_x) layer.qx = padded(a.qx, a.n, a.kx, layer.kxp, layer.qx_copy);
        // Rows per block: the block of X and of G stays in a core's L2 between its two uses.
        const int64_t wide = std::max<int64_t>(std::max(a.n, a.m), 1);
        const int64_t budget = (192 * 1024) / (static_cast<int64_t>(sizeof(T)) * wide);
        layer.block_rows = std::max<int64_t>(kRows, std::min<int64_t>(128, budget / kRows * kRows));
        layer.first = items.size();
        if (layer.want_d || layer.want_x || a.stats)
            for (size_t j = 0; j < a.rows.size(); ++j)
                for (int64_t r0 = 0; r0 < a.rows[j]; r0 += layer.block_rows) {
                    const int64_t rows = std::min(layer.block_rows, a.rows[j] - r0);
                    items.push_back({l, static_cast<int>(j), r0, rows, total, layer.flops(rows)});
                    total += items.back().flops;
                }
        layer.end = items.size();
    }

    // Threads only where they pay: starting and joining a team costs microseconds (far more on a
    // loaded machine), so each thread gets at least ~2 MFLOP of the pass, and at least one item.
    threads = std::max(1, threads);
    threads = static_cast<int>(std::min<double>(threads, std::max(1.0, total / 2e6)));
    threads = static_cast<int>(std::min<size_t>(threads, std::max<size_t>(items.size(), 1)));
    // One segment per thread, and scratch for the widest layer.
    const size_t segments = static_cast<size_t>(threads);
    int64_t tmp_d_size = 0, tmp_x_size = 0, pack_size = 0;
    for (const Layer<T>& layer : layers) {
        tmp_d_size = std::max(tmp_d_size, layer.block_rows * layer.kdp);
        tmp_x_size = std::max(tmp_x_size, layer.block_rows * layer.kxp);
        pack_size = std::max(pack_size, layer.block_rows * std::max(layer.args->n, layer.args->m));
    }
    // parts[s * count + l]: where segment s accumulated layer l (all nullptr: it had none of it);
    // own[s]: its private buffer.
    std::vector<Acc<T>> parts(segments * count);
    std::vector<std::unique_ptr<T[]>> own(segments);

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<T> tmp_d(static_cast<size_t>(tmp_d_size)), tmp_x(static_cast<size_t>(tmp_x_size));
        std::vector<T> pack(static_cast<size_t>(pack_size));
        // Segment s on thread s (where the runtime gives fewer threads than asked, some take two:
        // the result depends on the segments alone).
#pragma omp for schedule(static, 1)
        for (size_t s = 0; s < segments; ++s) {
            const std::pair<size_t, size_t> range = segment(items, total, s, segments);
            Acc<T>* acc = parts.data() + s * count;
            own[s] = accumulators(layers, items, range, acc);
            for (size_t i = range.first; i < range.second; ++i)
                run_block(layers[items[i].layer], items[i], acc[items[i].layer], tmp_d.data(), tmp_x.data(),
                          pack.data());
        }
        // Every layer's outputs: the sum of its parts in segment order (unpadding the widths).
#pragma omp for schedule(static)
        for (size_t l = 0; l < count; ++l) {
            const Layer<T>& layer = layers[l];
            const RowPassArgs<T>& a = *layer.args;
            const Acc<T>* of = parts.data() + l;  // segment s's part: of[s * count]
            if (layer.want_d) reduce(of, count, segments, &Acc<T>::px, a.n, a.kd, layer.kdp, a.px);
            if (layer.want_x) reduce(of, count, segments, &Acc<T>::pd, a.m, a.kx, layer.kxp, a.pd);
            if (a.stats) reduce(of, count, segments, &Acc<T>::sx, a.n, 1, 1, a.sx);
            if (a.stats) reduce(of, count, segments, &Acc<T>::sg, a.m, 1, 1, a.sg);
        }
    }
}

template void row_pass_many<float>(const RowPassArgs<float>*, size_t, int);
template void row_pass_many<double>(const RowPassArgs<double>*, size_t, int);

}  // namespace oplora
