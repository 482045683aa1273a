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
#include <mutex>
#include <utility>
#include <vector>

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

// Large outputs that a training loop asks for again every step (an embedding's gradient, the
// EDT's maps) keep their blocks: freed, a block goes back to this cache, and the next output of
// the same size takes it with its pages already mapped. Even on 2 MiB pages, mapping a fresh
// block costs the kernel's zeroing of every page: on this project's 2-core VMs 16-18% of a
// Contextrast step (356 MB of gradients, 60-120 ms a step), more than its own write of them.
// The cache holds blocks no one uses up to PIXCON_BLOCK_CACHE_MB (default 1024; 0: off) and
// frees the rest, like a GPU framework's caching allocator; its blocks count as the tensors'
// own bytes while in use, and as the process's resident memory between steps.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* c = new BlockCache();    // never destroyed: tensors may outlive exit
    return *c;
  }
  int64_t cap() const { return cap_; }
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].second == bytes) {
        void* p = free_[i].first;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        held_ -= static_cast<int64_t>(bytes);
        return p;
      }
    return nullptr;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + static_cast<int64_t>(bytes) <= cap_) {
        free_.emplace_back(p, bytes);
        held_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

 private:
  BlockCache() {
    const char* v = std::getenv("PIXCON_BLOCK_CACHE_MB");
    cap_ = (v ? std::max<int64_t>(std::atoll(v), 0) : 1024) << 20;
  }
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  int64_t held_ = 0, cap_ = 0;
};

// at::empty on huge pages (see above), from the block cache above 8 MiB
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  constexpr size_t kHuge = size_t{1} << 21;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  BlockCache& cache = BlockCache::get();
  if (bytes < 4 * kHuge || cache.cap() == 0) return on_huge_pages(at::empty(sizes, opt));
  void* p = cache.take(bytes);
  if (p == nullptr) {
    p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
    TORCH_CHECK(p != nullptr, "pixcon: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
    if (huge_pages_on()) madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(p, sizes, [bytes](void* q) { BlockCache::get().give(q, bytes); }, opt);
}

}  // namespace pixcon
