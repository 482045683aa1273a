// The small products of gemm.h. mm: blocks of up to 6 rows x 64 columns held in 24 AVX-512
// registers while k runs (a broadcast of A and four loads of B per six times four
// multiply-adds). nt: blocks of up to 4 x 6 dot products of two contiguous rows, 16 lanes each,
// reduced once at the end. Row blocks are split as evenly as possible (19 rows: 4, 5, 5, 5),
// column tails are masked. class_dots / class_row: a class table's row held in two registers,
// each pixel's entry picked by one permute per 16 pixels.
#include "gemm.h"

#include <immintrin.h>

#include <cstdint>

namespace pixcon {
namespace gemm {

bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

namespace {

constexpr int kNV = 4;           // nn: vectors of 16 columns per block
constexpr int kMaxMR = 6;        // nn: rows per block

inline __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : rem > 0 ? __mmask16((1u << rem) - 1) : __mmask16(0);
}

// c[m0 .. m0 + MR, n0 .. n0 + 64) = A B over the block's rows and columns (masked tails)
template <int MR>
inline void nn_block(int64_t m0, int64_t n0, const __mmask16* mk, int64_t K, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[MR][kNV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* ap = a + m0 * lda;
  const float* bp = b + n0;
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[kNV];
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) bv[j] = _mm512_maskz_loadu_ps(mk[j], bp + k * ldb + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j)
      _mm512_mask_storeu_ps(c + (m0 + i) * ldc + n0 + 16 * j, mk[j], acc[i][j]);
}

constexpr int kMaxTM = 4, kMaxTN = 6;    // nt: rows of a and of b per block

template <int MR, int NR>
inline void nt_block(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail_mask(K - k);
    __m512 av[MR], bv[NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) av[i] = _mm512_maskz_loadu_ps(mk, a + i * lda + k);
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_maskz_loadu_ps(mk, b + j * ldb + k);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR>
inline void nt_row(int64_t nr, int64_t K, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float* c, int64_t ldc) {
  switch (nr) {
    case 1: nt_block<MR, 1>(K, a, lda, b, ldb, c, ldc); break;
    case 2: nt_block<MR, 2>(K, a, lda, b, ldb, c, ldc); break;
    case 3: nt_block<MR, 3>(K, a, lda, b, ldb, c, ldc); break;
    case 4: nt_block<MR, 4>(K, a, lda, b, ldb, c, ldc); break;
    case 5: nt_block<MR, 5>(K, a, lda, b, ldb, c, ldc); break;
    default: nt_block<MR, 6>(K, a, lda, b, ldb, c, ldc); break;
  }
}

}  // namespace

void mm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc) {
  const int64_t nb = (M + kMaxMR - 1) / kMaxMR;
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    __mmask16 mk[kNV];
    for (int j = 0; j < kNV; ++j) mk[j] = tail_mask(N - n0 - 16 * j);
    for (int64_t ib = 0; ib < nb; ++ib) {
      const int64_t m0 = ib * M / nb, rows = (ib + 1) * M / nb - m0;
      switch (rows) {
        case 1: nn_block<1>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
        case 2: nn_block<2>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
        case 3: nn_block<3>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
        case 4: nn_block<4>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
        case 5: nn_block<5>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
        default: nn_block<6>(m0, n0, mk, K, a, lda, b, ldb, c, ldc); break;
      }
    }
  }
}

void nt(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc) {
  // b's rows outer: a block of them stays in L1 while every block of a's rows passes
  const int64_t mb = (M + kMaxTM - 1) / kMaxTM, nbk = (N + kMaxTN - 1) / kMaxTN;
  for (int64_t jb = 0; jb < nbk; ++jb) {
    const int64_t n0 = jb * N / nbk, nr = (jb + 1) * N / nbk - n0;
    for (int64_t ib = 0; ib < mb; ++ib) {
      const int64_t m0 = ib * M / mb, mr = (ib + 1) * M / mb - m0;
      const float* ap = a + m0 * lda;
      const float* bp = b + n0 * ldb;
      float* cp = c + m0 * ldc + n0;
      switch (mr) {
        case 1: nt_row<1>(nr, K, ap, lda, bp, ldb, cp, ldc); break;
        case 2: nt_row<2>(nr, K, ap, lda, bp, ldb, cp, ldc); break;
        case 3: nt_row<3>(nr, K, ap, lda, bp, ldb, cp, ldc); break;
        default: nt_row<4>(nr, K, ap, lda, bp, ldb, cp, ldc); break;
      }
    }
  }
}

void class_dots(int64_t D, int64_t len, const float* x, int64_t ldx, const int32_t* gi,
                const float* T, int64_t Cp, float* u) {
  const __mmask16 lo_m = tail_mask(Cp), hi_m = tail_mask(Cp - 16);
  for (int64_t p = 0; p < len; ++p) u[p] = 0;
  for (int64_t d = 0; d < D; ++d) {
    const float *tr = T + d * Cp, *xr = x + d * ldx;
    const __m512 lo = _mm512_maskz_loadu_ps(lo_m, tr), hi = _mm512_maskz_loadu_ps(hi_m, tr + 16);
    for (int64_t p = 0; p < len; p += 16) {
      const __mmask16 mk = tail_mask(len - p);
      const __m512 v = _mm512_permutex2var_ps(lo, _mm512_maskz_loadu_epi32(mk, gi + p), hi);
      _mm512_mask_storeu_ps(u + p, mk, _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mk, xr + p),
                                                       _mm512_maskz_loadu_ps(mk, u + p)));
    }
  }
}

void class_row(int64_t len, const float* A, const float* B, const float* w, const float* s,
               const int32_t* gi, int64_t Cp, float* row) {
  const __mmask16 lo_m = tail_mask(Cp), hi_m = tail_mask(Cp - 16);
  const __m512 alo = _mm512_maskz_loadu_ps(lo_m, A), ahi = _mm512_maskz_loadu_ps(hi_m, A + 16);
  const __m512 blo = _mm512_maskz_loadu_ps(lo_m, B), bhi = _mm512_maskz_loadu_ps(hi_m, B + 16);
  for (int64_t p = 0; p < len; p += 16) {
    const __mmask16 mk = tail_mask(len - p);
    const __m512i idx = _mm512_maskz_loadu_epi32(mk, gi + p);
    const __m512 r = _mm512_fmadd_ps(_mm512_permutex2var_ps(alo, idx, ahi),
                                     _mm512_maskz_loadu_ps(mk, w + p),
                                     _mm512_mul_ps(_mm512_permutex2var_ps(blo, idx, bhi),
                                                   _mm512_maskz_loadu_ps(mk, s + p)));
    _mm512_mask_storeu_ps(row + p, mk, r);
  }
}

void class_sums(int64_t D, int64_t len, const float* x, int64_t ldx, const int32_t* gi,
                const float* w, int64_t Cp, float* out, int64_t ldo) {
  __m512 acc[kMaxTable];
  for (int64_t c = 0; c < Cp; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* xr = x + d * ldx;
    uint32_t touched = 0;
    // a run of vectors of one class adds into two registers in turn (no chain through memory),
    // moved into its class's accumulator when the class changes
    __m512 run0 = _mm512_setzero_ps(), run1 = _mm512_setzero_ps();
    int32_t rc = -1;
    bool odd = false;
    auto flush = [&]() {
      if (rc >= 0) acc[rc] = _mm512_add_ps(acc[rc], _mm512_add_ps(run0, run1));
      run0 = run1 = _mm512_setzero_ps();
      rc = -1;
    };
    for (int64_t p = 0; p < len; p += 16) {
      const __mmask16 mk = tail_mask(len - p);
      const __m512i g = _mm512_maskz_loadu_epi32(mk, gi + p);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, w + p),
                                     _mm512_maskz_loadu_ps(mk, xr + p));
      const int32_t c0 = gi[p];
      if (_mm512_mask_cmpneq_epi32_mask(mk, g, _mm512_set1_epi32(c0)) == 0) {   // one class
        if (c0 != rc) {
          flush();
          rc = c0;
          touched |= uint32_t{1} << c0;
        }
        if (odd) run1 = _mm512_add_ps(run1, v);
        else run0 = _mm512_add_ps(run0, v);
        odd = !odd;
        continue;
      }
      flush();
      for (__mmask16 rem = mk; rem;) {
        const int32_t c = gi[p + __builtin_ctz(rem)];
        const __mmask16 m = _mm512_mask_cmpeq_epi32_mask(rem, g, _mm512_set1_epi32(c));
        acc[c] = _mm512_mask_add_ps(acc[c], m, acc[c], v);
        touched |= uint32_t{1} << c;
        rem &= static_cast<__mmask16>(~m);
      }
    }
    flush();
    for (; touched; touched &= touched - 1) {
      const int c = __builtin_ctz(touched);
      if (c < Cp - 1) out[c * ldo + d] += _mm512_reduce_add_ps(acc[c]);
      acc[c] = _mm512_setzero_ps();
    }
  }
}

#pragma GCC pop_options

}  // namespace gemm
}  // namespace pixcon
