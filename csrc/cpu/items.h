// Work items claimed from a shared counter: the CPU kernels' one way to run a pass in parallel
// (tiled.cpp documents why: a thread that the OS deschedules delays a pass by at most the item in
// its hands, where a static split waits for it). Items write their own slots, merged in a fixed
// order by the caller, so results do not depend on the thread count or the schedule.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

// MKL's per-thread thread count. libtorch_cpu exports MKL's; the weak reference is null where
// torch was built with another BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));   // mkl_service.h: the C entry

namespace pixcon {

// BLAS single-threaded on this thread while in scope. MKL chooses its sgemm kernel by its thread
// setting: a 38 x 512 x 32 product gave other last bits at a setting of 2 than of 1, even run on
// one thread inside a parallel region, so a pass's bits followed torch.set_num_threads. Every
// item runs under it.
struct SerialBlas {
  int prev = 0;
  SerialBlas() { if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1); }
  ~SerialBlas() { if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev); }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};

// Threads for a pass of `work` multiply-adds split into `items` items: one below 2^27 (a
// parallel region costs a wake-up, on a loaded machine a scheduler tick), else torch's intra-op
// count capped by pixcon.set_num_threads and the items (tiled.cpp; pixcon.ops.tiled documents it).
int64_t tiled_threads(int64_t work, int64_t items);

// Run fn(item, scratch) for item in [0, n) on tiled_threads(work, n) threads, items claimed one
// at a time from a shared counter; scratch is the thread's own buffer of `buf` elements of T.
template <typename T, typename F>
void for_items(int64_t n, int64_t work, int64_t buf, const F& fn) {
  if (n <= 0) return;
  const int64_t nt = tiled_threads(work, n);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    // pool threads do not inherit the caller's dispatch state: stay below autograd there too
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    SerialBlas serial_blas;
    at::Tensor scratch = at::empty({buf}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    for (int64_t it = next.fetch_add(1); it < n; it = next.fetch_add(1)) fn(it, scratch);
  };
  if (nt == 1) worker(0, 1);
  else at::parallel_for(0, nt, 1, worker);
}

}  // namespace pixcon
