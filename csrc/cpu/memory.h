// Large outputs on 2 MiB pages. A fresh embedding-sized gradient is memory the C library maps
// anew for every step (glibc maps blocks above 32 MiB on their own and unmaps them when freed),
// and first touching it on 4 KiB pages costs about as much as writing it twice over: 50 ms for
// 268 MiB on this project's 2-core machine, 12 ms with 2 MiB pages. Where the kernel's
// transparent huge pages are "madvise" (the common default), asking for them on the block
// (madvise MADV_HUGEPAGE, before the first write) takes that cost away; where they are "never"
// the call changes nothing. PIXCON_HUGE_PAGES=0 turns it off.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pixcon {

inline bool huge_pages_on() {
  static const bool on = [] {
    const char* v = std::getenv("PIXCON_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// t, a fresh tensor not yet written, with the 2 MiB-aligned interior of its block marked for
// huge pages when it holds 8 MiB or more.
inline at::Tensor on_huge_pages(at::Tensor t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t bytes = t.nbytes();
  if (huge_pages_on() && bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);   // advice only
  }
#endif
  return t;
}

// Zero a dense tensor's bytes, in 4 MiB pieces over the intra-op threads above 32 MiB (the page
// faults of a fresh block are taken by the thread that first writes a page: both cores share
// them; 268 MiB took 38 ms on one thread).
inline void zero_fill(at::Tensor& t) {
  char* p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size(), piece = int64_t{4} << 20;
  const int64_t n = (bytes + piece - 1) / piece;
  at::parallel_for(0, n, bytes > 8 * piece ? 1 : n, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      std::memset(p + i * piece, 0, std::min(piece, bytes - i * piece));
  });
}

// at::empty on huge pages (see above)
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return on_huge_pages(at::empty(sizes, opt));
}

}  // namespace pixcon
