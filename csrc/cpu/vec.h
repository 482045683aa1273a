// Row arithmetic in 64-byte lanes (GCC vector extensions: one AVX-512 register, two AVX2 ones,
// four SSE ones; the ISA is the caller's, so call these from a target_clones function). Lane j
// sums elements j, j + L, j + 2L, ... and the lanes are added in order at the end: a fixed order,
// the same bits on any thread count; independent lanes instead of one dependent chain per
// element (a 256-float dot on one SSE chain waited 64 add latencies per gathered row).
#pragma once
#include <cstdint>
#include <cstring>

namespace pixcon {

// sum_i a[i] b[i]
template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  V acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V u, v;
    std::memcpy(&u, a + i, sizeof(V));
    std::memcpy(&v, b + i, sizeof(V));
    acc += u * v;
  }
  T r = 0;
  for (int64_t j = 0; j < L; ++j) r += acc[j];
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// y[i] = y[i] * s + c * x[i]
template <typename T>
inline __attribute__((always_inline)) void scale_add(T* __restrict__ y, T s, T c,
                                                     const T* __restrict__ x, int64_t n) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V u, v;
    std::memcpy(&u, y + i, sizeof(V));
    std::memcpy(&v, x + i, sizeof(V));
    u = u * s + c * v;
    std::memcpy(y + i, &u, sizeof(V));
  }
  for (; i < n; ++i) y[i] = y[i] * s + c * x[i];
}

}  // namespace pixcon
