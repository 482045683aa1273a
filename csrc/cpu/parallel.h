// How finely the CPU kernels split their work over ATen's intra-op pool (at::parallel_for), and
// the cap on how many threads they use (pixcon.set_num_threads / PIXCON_NUM_THREADS).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

namespace pixcon {

// A task should hold at least this much work (about element operations: tens of microseconds).
// Below it, waking a second thread costs more than it saves, and on a loaded machine a wake-up
// can stall for a scheduler tick (milliseconds): a tiny batch ran 1000x slower on 2 threads
// than on 1 while another process kept a core busy. at::parallel_for runs inline when the
// range is below one grain.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// The most threads pixcon's kernels use (0: torch's intra-op setting). One instance for the
// whole library (an inline function's static).
inline std::atomic<int64_t>& thread_cap() {
  static std::atomic<int64_t> cap{0};
  return cap;
}

// Pixels per tile of Contextrast's CPU kernels (anchor.cpp; 0: their own choice). The tests set
// it small to split images into many tiles.
inline std::atomic<int64_t>& anchor_tile() {
  static std::atomic<int64_t> n{0};
  return n;
}

// The grain for `range` items costing about work_per_item units each: at least at_least items
// and kMinTaskWork units per task, and at most thread_cap() tasks.
inline int64_t grain_for(int64_t range, int64_t work_per_item, int64_t at_least = 1) {
  int64_t g = std::max(at_least, kMinTaskWork / std::max<int64_t>(work_per_item, 1));
  const int64_t cap = thread_cap().load(std::memory_order_relaxed);
  if (cap > 0) g = std::max(g, (range + cap - 1) / cap);
  return std::max<int64_t>(g, 1);
}

}  // namespace pixcon
