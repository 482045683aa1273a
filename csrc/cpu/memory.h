// Large outputs on 2 MiB pages. A fresh embedding-sized gradient is memory the C library maps
// anew for every step (glibc maps blocks above 32 MiB on their own and unmaps them when freed),
// and first touching it on 4 KiB pages costs about as much as writing it twice over: 50 ms for
// 268 MiB on this project's 2-core machine, 12 ms with 2 MiB pages. Where the kernel's
// transparent huge pages are "madvise" (the common default), asking for them on the block
// (madvise MADV_HUGEPAGE, before the first write) takes that cost away; where they are "never"
// the call changes nothing. PIXCON_HUGE_PAGES=0 turns it off.
#pragma once
#include <ATen/ATen.h>
#include <sys/mman.h>

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

// at::empty, with the 2 MiB-aligned interior of a block of 8 MiB or more marked for huge pages.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt);
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

}  // namespace pixcon
