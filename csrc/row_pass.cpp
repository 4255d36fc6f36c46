// Fused row pass (see row_pass.h for what it computes and why it is laid out this way).
#include "row_pass.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

namespace oplora {
namespace {

// Explicit vectors (GCC/Clang vector extensions, no intrinsics): 512-bit where the target has
// AVX-512 (16 floats or 8 doubles), 256-bit otherwise (AVX2, or two SSE registers each).
// The panels keep their R x NV accumulators in registers; loads are unaligned (memcpy).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
template <class T>
struct Vec;
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(kVecBytes)));
};
template <class T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
// Column panel width: two vectors (16 floats, 8 doubles); right-hand sides are padded to a
// multiple of one vector (half a panel).
template <class T>
constexpr int kPanel = 2 * kLanes<T>;
constexpr int kRows = 6;  // rows (or features) per register block: 6 x 2 accumulators + 3 of 16 registers

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Software prefetch of the next work item's rows, spread over the current item's panels. A panel
// reads kRows rows of a block at once, each only a few KiB long: too short for the hardware
// prefetchers to get ahead of, so on its own a pass waits on memory at a fraction of the bandwidth
// (measured: 37 -> 29 ms for a pass over SmolLM2's 120 attention layers at 512 rows, 2 threads).
struct Ahead {
    static constexpr int kStreams = 8;  // X and up to 7 G's; a unit's further G's are not prefetched
    const char* p[kStreams] = {};
    const char* end[kStreams] = {};
    int64_t step[kStreams] = {};  // bytes per call
    int count = 0;
    void add(const void* from, int64_t bytes, int64_t calls) {
        if (count == kStreams || bytes <= 0) return;
        p[count] = static_cast<const char*>(from);
        end[count] = p[count] + bytes;
        step[count] = round_up(bytes / std::max<int64_t>(calls, 1) + 1, 64);
        ++count;
    }
    void next() {
        for (int s = 0; s < count; ++s)
            for (int64_t k = 0; k < step[s] && p[s] < end[s]; k += 64, p[s] += 64) __builtin_prefetch(p[s], 0, 3);
    }
};

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
// row_step = 1, depth_step = lda for X_b^T (G_b qd) (columns of A). Q and C are row-major with row
// strides ldq and ldc; ACC adds to C instead of overwriting it.
template <class T, int R, int NV, bool ACC>
inline void panel(const T* __restrict a, int64_t row_step, int64_t depth_step, int64_t depth,
                  const T* __restrict q, int64_t ldq, int64_t k0, T* __restrict c, int64_t ldc) {
    using V = typename Vec<T>::type;
    constexpr int L = kLanes<T>;
    V acc[R][NV];
    zero(acc);
    for (int64_t i = 0; i < depth; ++i) {
        const T* qi = q + i * ldq + k0;
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
    flush<T, V, R, NV, ACC>(acc, c + k0, ldc);
}

// C (tb x kp, row stride ldc) = A (tb x p) @ Q (p x kp). The depth p is cut into chunks of kDepth
// so that the slice of one column panel of Q (kDepth x 2 vectors, 16 KiB) stays in L1 across the
// row groups.
template <class T>
void block_a(const T* a, int64_t tb, int64_t p, const T* q, int64_t kp, T* c, int64_t ldc, Ahead& ahead) {
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
                ahead.next();
                const T* at = a + t * p + i0;
                T* ct = c + t * ldc;
                if (half) first ? panel<T, kRows, 1, false>(at, p, 1, len, qi, kp, k0, ct, ldc)
                                : panel<T, kRows, 1, true>(at, p, 1, len, qi, kp, k0, ct, ldc);
                else first ? panel<T, kRows, NV, false>(at, p, 1, len, qi, kp, k0, ct, ldc)
                           : panel<T, kRows, NV, true>(at, p, 1, len, qi, kp, k0, ct, ldc);
            }
            for (; t < tb; ++t) {
                const T* at = a + t * p + i0;
                T* ct = c + t * ldc;
                if (half) first ? panel<T, 1, 1, false>(at, p, 1, len, qi, kp, k0, ct, ldc)
                                : panel<T, 1, 1, true>(at, p, 1, len, qi, kp, k0, ct, ldc);
                else first ? panel<T, 1, NV, false>(at, p, 1, len, qi, kp, k0, ct, ldc)
                           : panel<T, 1, NV, true>(at, p, 1, len, qi, kp, k0, ct, ldc);
            }
        }
    }
}

// out (p x kp) += A (tb x p)^T @ P (tb x kp, row stride ldp). The block's columns are first packed
// by groups of kRows features (pack: tb x p), so that the panels read them sequentially: straight
// down a column of A, rows p * sizeof(T) apart (8 KiB for p = 2048), every line would fall into one
// L1 set.
template <class T>
void block_b(const T* a, int64_t tb, int64_t p, const T* pm, int64_t ldp, int64_t kp, T* out, T* pack,
             Ahead& ahead) {
    constexpr int KC = kPanel<T>, NV = 2;
    const int64_t groups = p / kRows;
    for (int64_t t = 0; t < tb; ++t) {
        const T* at = a + t * p;
        for (int64_t g = 0; g < groups; ++g)
            for (int r = 0; r < kRows; ++r) pack[(g * tb + t) * kRows + r] = at[g * kRows + r];
    }
    for (int64_t g = 0; g < groups; ++g) {
        ahead.next();
        const T* pg = pack + g * tb * kRows;
        T* og = out + g * kRows * kp;
        int64_t k0 = 0;
        for (; k0 + KC <= kp; k0 += KC) panel<T, kRows, NV, true>(pg, 1, kRows, tb, pm, ldp, k0, og, kp);
        if (k0 < kp) panel<T, kRows, 1, true>(pg, 1, kRows, tb, pm, ldp, k0, og, kp);
    }
    for (int64_t i0 = groups * kRows; i0 < p; ++i0) {
        int64_t k0 = 0;
        for (; k0 + KC <= kp; k0 += KC) panel<T, 1, NV, true>(a + i0, 1, p, tb, pm, ldp, k0, out + i0 * kp, kp);
        if (k0 < kp) panel<T, 1, 1, true>(a + i0, 1, p, tb, pm, ldp, k0, out + i0 * kp, kp);
    }
}

template <class T>
void sum_squares(const T* a, int64_t tb, int64_t p, T* sq) {
    for (int64_t t = 0; t < tb; ++t) {
        const T* at = a + t * p;
        for (int64_t i = 0; i < p; ++i) sq[i] += at[i] * at[i];
    }
}

// A right-hand side (p x k) as a p x kp buffer (kp a multiple of half a panel): q itself when k is
// one already, else a zero-padded copy kept in `copy`.
template <class T>
const T* padded(const T* q, int64_t p, int64_t k, int64_t kp, std::vector<T>& copy) {
    if (kp == k) return q;
    copy.assign(static_cast<size_t>(p * kp), T(0));
    for (int64_t i = 0; i < p; ++i) std::memcpy(copy.data() + i * kp, q + i * k, sizeof(T) * k);
    return copy.data();
}

// The layers that read one X: a *unit* of the pass. Layers fed the same input (q, k and v of an
// attention block, gate and up of a gated MLP) hold the same captured rows, and the pass reads them
// once for all: the A sides' intermediates G_l qd_l sit side by side in one tb x kd buffer that X_b^T
// multiplies at once, and X_b times every B side's qx_l (concatenated) is one product. A layer with
// its own X is a unit of one.
template <class T>
struct Unit {
    const RowPassArgs<T>* x = nullptr;  // the first member's job: X's chunks, rows and n
    std::vector<size_t> members;        // job indices, in job order
    // A side (members with qd): their padded qd, widths, and columns in the tb x kd intermediate.
    std::vector<size_t> d_members;
    std::vector<const T*> qd;
    std::vector<int64_t> d_kp, d_off;
    int64_t kd = 0;
    // B side (members with qx): every qx side by side (n x kx), each one's columns, and where its
    // m x kxp accumulator starts in the unit's pd block.
    std::vector<size_t> x_members;
    std::vector<int64_t> x_kp, x_off, pd_off;
    int64_t kx = 0, pd_size = 0;
    const T* qx = nullptr;
    // Statistics: X's squares once (sx, n) for every member that asks; each one's G squares.
    std::vector<size_t> s_members;
    std::vector<int64_t> sg_off;
    int64_t sg_size = 0;
    std::vector<std::vector<T>> copies;  // padded or concatenated right-hand sides
    int64_t block_rows = 0, wide = 0;

    bool busy() const { return kd > 0 || kx > 0 || !s_members.empty(); }
    // The arithmetic of `rows` of its rows (products and reads; the unit of the thread heuristic
    // and of the split between threads).
    double flops(const RowPassArgs<T>* jobs, int64_t rows) const {
        double row = static_cast<double>(x->n) * (2.0 * static_cast<double>(kd + kx) + 1.0);
        for (size_t l : members) row += static_cast<double>(jobs[l].m);
        for (size_t j = 0; j < d_members.size(); ++j) row += 2.0 * jobs[d_members[j]].m * d_kp[j];
        for (size_t j = 0; j < x_members.size(); ++j) row += 2.0 * jobs[x_members[j]].m * x_kp[j];
        return static_cast<double>(rows) * row;
    }
    // Its accumulators: px (n x kd), sx (n), every pd, every sg.
    int64_t acc_size() const { return x->n * kd + (s_members.empty() ? 0 : x->n) + pd_size + sg_size; }
};

// Whether two jobs read the same X: the same chunks (rows, and pointers where there are rows: an
// empty buffer's pointer means nothing) of the same width.
template <class T>
bool same_x(const RowPassArgs<T>& a, const RowPassArgs<T>& b) {
    if (a.n != b.n || a.rows != b.rows) return false;
    for (size_t j = 0; j < a.rows.size(); ++j)
        if (a.rows[j] > 0 && a.xs[j] != b.xs[j]) return false;
    return true;
}

constexpr size_t kNone = static_cast<size_t>(-1);

// Where a job sits in the pass: its unit, and its index among that unit's A-side, B-side and
// statistics members (kNone where it is not one).
struct Place {
    size_t unit = 0, d = kNone, x = kNone, s = kNone;
};

// The units of the jobs, in order of their first member, and where each job sits (places[l]).
template <class T>
std::vector<Unit<T>> make_units(const RowPassArgs<T>* jobs, size_t count, std::vector<Place>& places) {
    std::vector<Unit<T>> units;
    places.assign(count, Place());
    for (size_t l = 0; l < count; ++l) {
        size_t u = 0;
        while (u < units.size() && !same_x(*units[u].x, jobs[l])) ++u;
        if (u == units.size()) {
            units.emplace_back();
            units.back().x = &jobs[l];
        }
        units[u].members.push_back(l);
        places[l].unit = u;
    }
    for (Unit<T>& u : units) {
        const int64_t n = u.x->n;
        u.wide = n;
        std::vector<std::pair<const T*, int64_t>> qxs;  // (qx, k) of the B-side members
        for (size_t l : u.members) {
            const RowPassArgs<T>& a = jobs[l];
            u.wide = std::max(u.wide, a.m);
            if (a.qd != nullptr && a.kd > 0) {
                const int64_t kp = round_up(a.kd, kPanel<T> / 2);
                places[l].d = u.d_members.size();
                u.copies.emplace_back();
                u.d_members.push_back(l);
                u.qd.push_back(padded(a.qd, a.m, a.kd, kp, u.copies.back()));
                u.d_kp.push_back(kp);
                u.d_off.push_back(u.kd);
                u.kd += kp;
            }
            if (a.qx != nullptr && a.kx > 0) {
                const int64_t kp = round_up(a.kx, kPanel<T> / 2);
                places[l].x = u.x_members.size();
                u.x_members.push_back(l);
                u.x_kp.push_back(kp);
                u.x_off.push_back(u.kx);
                u.pd_off.push_back(u.pd_size);
                u.kx += kp;
                u.pd_size += a.m * kp;
                qxs.emplace_back(a.qx, a.kx);
            }
            if (a.stats) {
                places[l].s = u.s_members.size();
                u.s_members.push_back(l);
                u.sg_off.push_back(u.sg_size);
                u.sg_size += a.m;
            }
        }
        if (qxs.size() == 1) {
            u.copies.emplace_back();
            u.qx = padded(qxs[0].first, n, qxs[0].second, u.kx, u.copies.back());
        } else if (!qxs.empty()) {
            u.copies.emplace_back(static_cast<size_t>(n * u.kx), T(0));
            T* cat = u.copies.back().data();
            for (size_t j = 0; j < qxs.size(); ++j) {
                const auto& [q, k] = qxs[j];
                for (int64_t i = 0; i < n; ++i) std::memcpy(cat + i * u.kx + u.x_off[j], q + i * k, sizeof(T) * k);
            }
            u.qx = cat;
        }
        // Rows per block: the block of X and of each G stays in a core's L2 between its two uses.
        const int64_t budget = (192 * 1024) / (static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(u.wide, 1));
        u.block_rows = std::max<int64_t>(kRows, std::min<int64_t>(128, budget / kRows * kRows));
    }
    return units;
}

// One work item: a block of rows of one chunk of one unit; `start` is the arithmetic of the pass
// before it.
struct Item {
    size_t unit;
    int chunk;
    int64_t row0, rows;
    double start, flops;
};

// Where one segment of the pass accumulates one unit (private buffers, set to zero): px (n x kd),
// sx (n), the members' pd blocks and sg vectors (at the unit's pd_off / sg_off).
template <class T>
struct Acc {
    T *px = nullptr, *sx = nullptr, *pd = nullptr, *sg = nullptr;
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

// The accumulators of the units the segment `range` touches (acc[u]), in the buffer returned, zeroed.
template <class T>
std::unique_ptr<T[]> accumulators(const std::vector<Unit<T>>& units, const std::vector<Item>& items,
                                  std::pair<size_t, size_t> range, Acc<T>* acc) {
    if (range.first == range.second) return nullptr;
    const size_t u0 = items[range.first].unit, u1 = items[range.second - 1].unit + 1;
    int64_t size = 0;
    for (size_t u = u0; u < u1; ++u) size += units[u].acc_size();
    std::unique_ptr<T[]> own(new T[static_cast<size_t>(size)]());
    T* next = own.get();
    for (size_t u = u0; u < u1; ++u) {
        const Unit<T>& unit = units[u];
        const int64_t n = unit.x->n;
        auto take = [&](int64_t len) { T* at = next; next += len; return at; };
        acc[u].px = take(n * unit.kd);
        acc[u].sx = take(unit.s_members.empty() ? 0 : n);
        acc[u].pd = take(unit.pd_size);
        acc[u].sg = take(unit.sg_size);
    }
    return own;
}

// One block of a unit's rows: every A-side member's G_b qd (and G's squares) from one read of its
// G_b, X_b times every B side's qx (and X's squares) from one read of X_b, then the products back
// through the rows just read: X_b^T times all A-side intermediates at once, each G_b^T times its own
// part of X_b qx. `next` (or nullptr) is prefetched meanwhile.
template <class T>
void run_block(const RowPassArgs<T>* jobs, const Unit<T>& unit, const Item& it, const Acc<T>& acc, T* tmp_d,
               T* tmp_x, T* pack, const Unit<T>* next_unit, const Item* next) {
    const int64_t n = unit.x->n, tb = it.rows;
    const T* x = unit.x->xs[it.chunk] + it.row0 * n;
    auto rows_of = [&](size_t l, const Item& at) { return jobs[l].gs[at.chunk] + at.row0 * jobs[l].m; };
    Ahead ahead;
    if (next != nullptr) {
        const int64_t calls = (tb / kRows) * (static_cast<int64_t>(unit.d_members.size()) + (unit.kx > 0)) +
                              (unit.kd > 0 ? n / kRows : 0) + [&] {
                                  int64_t c = 0;
                                  for (size_t l : unit.x_members) c += jobs[l].m / kRows;
                                  return c;
                              }();
        const int64_t bytes = static_cast<int64_t>(sizeof(T)) * next->rows;
        ahead.add(next_unit->x->xs[next->chunk] + next->row0 * next_unit->x->n, bytes * next_unit->x->n, calls);
        for (size_t l : next_unit->members) ahead.add(rows_of(l, *next), bytes * jobs[l].m, calls);
    }
    for (size_t j = 0; j < unit.d_members.size(); ++j) {
        const size_t l = unit.d_members[j];
        block_a(rows_of(l, it), tb, jobs[l].m, unit.qd[j], unit.d_kp[j], tmp_d + unit.d_off[j], unit.kd, ahead);
    }
    for (size_t j = 0; j < unit.s_members.size(); ++j) {
        const size_t l = unit.s_members[j];
        sum_squares(rows_of(l, it), tb, jobs[l].m, acc.sg + unit.sg_off[j]);
    }
    if (unit.kx > 0) block_a(x, tb, n, unit.qx, unit.kx, tmp_x, unit.kx, ahead);
    if (!unit.s_members.empty()) sum_squares(x, tb, n, acc.sx);
    if (unit.kd > 0) block_b(x, tb, n, tmp_d, unit.kd, unit.kd, acc.px, pack, ahead);
    for (size_t j = 0; j < unit.x_members.size(); ++j) {
        const size_t l = unit.x_members[j];
        block_b(rows_of(l, it), tb, jobs[l].m, tmp_x + unit.x_off[j], unit.kx, unit.x_kp[j], acc.pd + unit.pd_off[j],
                pack, ahead);
    }
}

// out (rows x k) = the sum, in segment order, of the segments' parts (rows x ld each, from column
// `col`; nullptr: the segment had none of the unit); zeros when there is none.
template <class T>
void reduce(const std::vector<const T*>& from, int64_t rows, int64_t k, int64_t ld, int64_t col, T* out) {
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < k; ++c) {
            T s = 0;
            for (const T* p : from) s += p[i * ld + col + c];
            out[i * k + c] = s;
        }
}

}  // namespace

template <class T>
void row_pass_many(const RowPassArgs<T>* jobs, size_t count, int threads) {
    std::vector<Place> places;
    std::vector<Unit<T>> units = make_units(jobs, count, places);
    std::vector<Item> items;
    double total = 0;
    for (size_t u = 0; u < units.size(); ++u) {
        const Unit<T>& unit = units[u];
        if (unit.busy())
            for (size_t j = 0; j < unit.x->rows.size(); ++j)
                for (int64_t r0 = 0; r0 < unit.x->rows[j]; r0 += unit.block_rows) {
                    const int64_t rows = std::min(unit.block_rows, unit.x->rows[j] - r0);
                    items.push_back({u, static_cast<int>(j), r0, rows, total, unit.flops(jobs, rows)});
                    total += items.back().flops;
                }
    }

    // Threads only where they pay: starting and joining a team costs microseconds (far more on a
    // loaded machine), so each thread gets at least ~2 MFLOP of the pass, and at least one item.
    threads = std::max(1, threads);
    threads = static_cast<int>(std::min<double>(threads, std::max(1.0, total / 2e6)));
    threads = static_cast<int>(std::min<size_t>(threads, std::max<size_t>(items.size(), 1)));
    // One segment per thread, and scratch for the widest unit.
    const size_t segments = static_cast<size_t>(threads);
    int64_t tmp_d_size = 0, tmp_x_size = 0, pack_size = 0;
    for (const Unit<T>& unit : units) {
        tmp_d_size = std::max(tmp_d_size, unit.block_rows * unit.kd);
        tmp_x_size = std::max(tmp_x_size, unit.block_rows * unit.kx);
        pack_size = std::max(pack_size, unit.block_rows * unit.wide);
    }
    // parts[s * units + u]: where segment s accumulated unit u (all nullptr: it had none of it);
    // own[s]: its buffer.
    const size_t nu = units.size();
    std::vector<Acc<T>> parts(segments * nu);
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
            Acc<T>* acc = parts.data() + s * nu;
            own[s] = accumulators(units, items, range, acc);
            for (size_t i = range.first; i < range.second; ++i) {
                const bool more = i + 1 < range.second;
                run_block(jobs, units[items[i].unit], items[i], acc[items[i].unit], tmp_d.data(), tmp_x.data(),
                          pack.data(), more ? &units[items[i + 1].unit] : nullptr, more ? &items[i + 1] : nullptr);
            }
        }
        // Every layer's outputs: the sum of its unit's parts in segment order (its columns, unpadded).
#pragma omp for schedule(static)
        for (size_t l = 0; l < count; ++l) {
            const RowPassArgs<T>& a = jobs[l];
            const Place& at = places[l];
            const Unit<T>& unit = units[at.unit];
            auto from = [&](T* Acc<T>::*field, int64_t offset) {
                std::vector<const T*> ptrs;
                for (size_t s = 0; s < segments; ++s) {
                    const Acc<T>& part = parts[s * nu + at.unit];
                    if (part.*field != nullptr) ptrs.push_back(part.*field + offset);
                }
                return ptrs;
            };
            if (at.d != kNone) reduce(from(&Acc<T>::px, 0), a.n, a.kd, unit.kd, unit.d_off[at.d], a.px);
            if (at.x != kNone) reduce(from(&Acc<T>::pd, unit.pd_off[at.x]), a.m, a.kx, unit.x_kp[at.x], 0, a.pd);
            if (at.s != kNone) {
                reduce(from(&Acc<T>::sx, 0), a.n, 1, 1, 0, a.sx);
                reduce(from(&Acc<T>::sg, unit.sg_off[at.s]), a.m, 1, 1, 0, a.sg);
            }
        }
    }
}

template <class T>
void live_rows(const T* g, int64_t rows, int64_t cols, uint8_t* live) {
    for (int64_t t = 0; t < rows; ++t) {
        const T* row = g + t * cols;
        int64_t i = 0;
        while (i < cols && !(row[i] != T(0))) ++i;  // NaN != 0: live
        live[t] = i < cols;
    }
}

template void row_pass_many<float>(const RowPassArgs<float>*, size_t, int);
template void row_pass_many<double>(const RowPassArgs<double>*, size_t, int);
template void live_rows<float>(const float*, int64_t, int64_t, uint8_t*);
template void live_rows<double>(const double*, int64_t, int64_t, uint8_t*);

}  // namespace oplora
