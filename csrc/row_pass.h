// One pass over a LoRA layer's captured rows: the thin products of its implicit gradient and its
// diagonal K-FAC statistics (the C++ form of oplora.reference.row_pass).
//
// A layer's rows come in chunks j (one per captured forward/backward pair): X_j (T_j x n) and
// G_j = s D_j (T_j x m), row-major. The implicit gradient is G = sum_j G_j^T X_j (m x n); it is
// never formed. One call computes, reading every row of X and G once:
//
//   px = G^T qd = sum_j X_j^T (G_j qd)   (n x Kd)   the A-side half-steps of every problem
//   pd = G qx   = sum_j G_j^T (X_j qx)   (m x Kx)   the B-side half-steps
//   sx = sum_j colsum(X_j^2)             (n)        diagonal K-FAC statistics
//   sg = sum_j colsum(G_j^2)             (m)
//
// How: rows are cut into blocks of up to 128 rows (fewer for wide layers: a block of X and G stays
// in L2). For a block, the T_b x K intermediates (G_b qd, X_b qx) are computed into a small buffer
// and immediately multiplied back by the same rows, which are still in cache, so X and G stream
// from memory once per pass; the squares ride along the first read. Inner loops are
// register-blocked panels written for the compiler's vectoriser (GCC/Clang vector types: 512-bit
// where the target has AVX-512, 256-bit otherwise; no intrinsics), and the next block's rows are
// prefetched while a block is computed.
//
// A pass over a whole model (row_pass_many) runs every layer's row blocks as one list of work items
// under one OpenMP team: a model has 100-200 LoRA layers of a few blocks each, and a team per layer
// cost more than the layer's arithmetic. Layers whose X is the same buffers (q, k and v of an
// attention block read one input, as do gate and up of a gated MLP) form one *unit* whose X is read
// once per block for all of them: the pass is bound by the bytes it reads, and X is half of them.
// Each thread takes a contiguous range of (unit, block) items of about equal arithmetic and
// accumulates into private per-unit buffers, which are then summed in thread order into every
// layer's outputs, so the result is deterministic for a given thread count. row_pass (one layer) is
// the same code on a list of one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace oplora {

template <class T>
struct RowPassArgs {
    std::vector<const T*> xs;  // X_j, T_j x n, row-major contiguous
    std::vector<const T*> gs;  // G_j, T_j x m
    std::vector<int64_t> rows; // T_j
    int64_t n = 0, m = 0;
    const T* qd = nullptr; int64_t kd = 0;  // m x kd (nullptr or kd == 0: not asked)
    const T* qx = nullptr; int64_t kx = 0;  // n x kx
    // Outputs: accumulated while the rows are read, so they must not overlap any input.
    T* px = nullptr;  // n x kd (written when qd is given)
    T* pd = nullptr;  // m x kx
    T* sx = nullptr;  // n   (written when stats)
    T* sg = nullptr;  // m
    bool stats = false;
    int threads = 1;  // row_pass only; row_pass_many takes one count for the whole pass
};

// Every layer of a pass in one call: jobs[0..count) (their `threads` fields are ignored) on up to
// `threads` threads -- fewer where the whole pass has too little arithmetic to pay for them.
template <class T>
void row_pass_many(const RowPassArgs<T>* jobs, size_t count, int threads);

// One layer: row_pass_many of one job on args.threads threads.
template <class T>
void row_pass(const RowPassArgs<T>& args) {
    row_pass_many(&args, 1, args.threads);
}

// The rows of G (rows x cols, row-major) that carry gradient: live[t] = 1 where row t holds a
// nonzero (NaN counts as one; -0.0 does not), else 0. Each row is read only until its first
// nonzero -- for a row with gradient that is its first element -- so a whole layer's mask costs
// about one cache line per row instead of a pass over G (rows without gradient, padding, are read
// whole).
template <class T>
void live_rows(const T* g, int64_t rows, int64_t cols, uint8_t* live);

extern template void row_pass_many<float>(const RowPassArgs<float>*, size_t, int);
extern template void row_pass_many<double>(const RowPassArgs<double>*, size_t, int);
extern template void live_rows<float>(const float*, int64_t, int64_t, uint8_t*);
extern template void live_rows<double>(const double*, int64_t, int64_t, uint8_t*);

}  // namespace oplora
