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
// How: rows are cut into blocks of kRowBlock rows. For a block, the T_b x K intermediates
// (G_b qd, X_b qx) are computed into a small buffer and immediately multiplied back by the same
// rows, which are still in cache, so X and G stream from memory once per pass; the squares ride
// along the first read. Threads (OpenMP) take whole row blocks and accumulate into private
// outputs, summed at the end (deterministic for a given thread count). Inner loops are
// register-blocked panels written for the compiler's vectoriser (no intrinsics).
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
    T* px = nullptr;  // n x kd (written when qd is given)
    T* pd = nullptr;  // m x kx
    T* sx = nullptr;  // n   (written when stats)
    T* sg = nullptr;  // m
    bool stats = false;
    int threads = 1;
};

template <class T>
void row_pass(const RowPassArgs<T>& args);

extern template void row_pass<float>(const RowPassArgs<float>&);
extern template void row_pass<double>(const RowPassArgs<double>&);

}  // namespace oplora
