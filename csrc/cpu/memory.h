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

// Zero a dense tensor's bytes over the intra-op threads, in 4 MiB pieces above 32 MiB. A
// fresh block's first write takes a page fault in which the kernel zeroes the page: memset then
// writes every byte a second time (268 MiB: 17.5 ms at 2 threads, against 8.5 ms for the faults
// alone). So above 32 MiB the whole pages inside the block are discarded instead (madvise
// MADV_DONTNEED: private anonymous memory, as every CPU allocator hands out, reads back as
// zeros) and each 4 KiB page is faulted in by one write, pieces split over the threads as
// before; the partial pages at either end are memset. Where madvise refuses, memset throughout.
inline void zero_fill(at::Tensor& t) {
  char* p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size(), piece = int64_t{4} << 20;
  constexpr uintptr_t kPage = 4096;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  char* lo = reinterpret_cast<char*>((a + kPage - 1) & ~(kPage - 1));
  char* hi = reinterpret_cast<char*>((a + bytes) & ~(kPage - 1));
  const bool discard = bytes > 8 * piece && hi > lo && madvise(lo, hi - lo, MADV_DONTNEED) == 0;
  if (discard) {
    std::memset(p, 0, lo - p);
    std::memset(hi, 0, p + bytes - hi);
  }
  const int64_t n = (bytes + piece - 1) / piece;
  at::parallel_for(0, n, bytes > 8 * piece ? 1 : n, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      char* b = p + i * piece;
      char* e = p + std::min(bytes, (i + 1) * piece);
      if (!discard) {
        std::memset(b, 0, e - b);
        continue;
      }
      // one write per page of the discarded range: the fault maps a zeroed page
      for (char* q = std::max(b, lo); q < std::min(e, hi); q += kPage)
        *reinterpret_cast<volatile char*>(q) = 0;
    }
  });
}

// at::empty on huge pages (see above)
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return on_huge_pages(at::empty(sizes, opt));
}

}  // namespace pixcon
