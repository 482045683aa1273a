// Small fp32 kernels for the per-tile work of the Contextrast kernels (anchor.cpp), where one
// side of every product is class-sized (C = 19 in the papers) and BLAS runs far below its
// square-matrix rate: MKL's sgemm took 19 x 256 x 656 at 130-200 GFLOP/s on two Intel cores (a
// third of its square rate), and at 58 GFLOP/s on one AMD EPYC core, where MKL does not take its
// AVX-512 path (these kernels: 93). Also the per-pixel lookups in class tables that make a
// tile's logits and gradient sparse. Sums run in a fixed order whatever the thread count: the
// same bits on any schedule. available() is false without AVX-512 (callers then use at::mm or
// scalar loops).
#pragma once
#include <cstdint>

namespace pixcon {
namespace gemm {

bool available();

// c (M x N) = a (M x K) b (K x N), all row-major with rows lda / ldb / ldc apart.
void mm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc);

// c[m, n] += sum_k a[m * lda + k] b[n * ldb + k]: (M x K) times (N x K) transposed.
void nt(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc);

// Per-pixel lookups in a class table of at most kMaxTable columns (C + 1 <= 32: the ignored
// class's zero column included), one permute per 16 pixels: T (D x Cp) row d holds each class's
// value at d, gi each pixel's class (int32).
constexpr int64_t kMaxTable = 32;

// u[p] = sum_d T[d, gi_p] x[d, p] (x rows ldx apart)
void class_dots(int64_t D, int64_t len, const float* x, int64_t ldx, const int32_t* gi,
                const float* T, int64_t Cp, float* u);

// row[p] = w_p A[gi_p] + s_p B[gi_p] (A, B: one row of two class tables, Cp entries each)
void class_row(int64_t len, const float* A, const float* B, const float* w, const float* s,
               const int32_t* gi, int64_t Cp, float* row);

// out[c, d] += sum_{p : gi_p = c} w_p x[d, p] for c < Cp - 1 (class Cp - 1: ignored pixels),
// out rows ldo apart: per row d, each class's 16 lanes summed under a mask (a vector of one
// class, as in labels' regions, takes one masked add; a mixed one, one per class in it), the
// lanes reduced once per row and class.
void class_sums(int64_t D, int64_t len, const float* x, int64_t ldx, const int32_t* gi,
                const float* w, int64_t Cp, float* out, int64_t ldo);

}  // namespace gemm
}  // namespace pixcon
