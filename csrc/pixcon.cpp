// Schemas of the compiled pixcon ops (namespace `pixcon`, a fragment: the Python layer registers
// further ops in the same namespace with torch.library.custom_op).
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/items.h"
#include "cpu/memory.h"
#include "cpu/parallel.h"

// A bare Python module: `import pixcon._C` loads the library and runs the registrations below
// (no pybind11, which would triple the compile time).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

namespace pixcon {
void set_num_threads(int64_t n) { thread_cap().store(std::max<int64_t>(n, 0)); }
int64_t get_num_threads() { return thread_cap().load(); }
void set_anchor_tile(int64_t n) { anchor_tile().store(std::max<int64_t>(n, 0)); }
int64_t block_cache_bytes() { return BlockCache::get().held(); }
void zero_fill_op(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "zero_fill_: a contiguous CPU tensor");
  at::Tensor x = t;
  zero_fill(x);
}
}  // namespace pixcon

TORCH_LIBRARY_FRAGMENT(pixcon, m) {
  // Every fused primitive is one op, defined once in pixcon/ops/_library.py (its schema, its
  // Triton kernel for CUDA, one fake, one autograd); the files in cpu/ register each one's CPU
  // kernel (TORCH_LIBRARY_IMPL(pixcon, CPU)), which may come before the Python definition.
  // Here only the extension's own settings:
  // The most threads the compiled CPU kernels use (0: torch's intra-op setting).
  m.def("set_num_threads(int n) -> ()", &pixcon::set_num_threads);
  m.def("get_num_threads() -> int", &pixcon::get_num_threads);
  // Pixels per tile of Contextrast's CPU kernels (0: their own choice): the tests split images.
  m.def("set_anchor_tile(int n) -> ()", &pixcon::set_anchor_tile);
  // How many threads a pass of the tiled contrast's CPU kernel uses for `work` multiply-adds in
  // `items` work items (its one rule: one thread below 2^27; pixcon.ops.tiled documents it).
  m.def("tiled_threads(int work, int items) -> int", &pixcon::tiled_threads);
  // The zeroing of the CPU kernels' embedding-sized outputs (cpu/memory.h), for its tests: above
  // 32 MiB it discards the block's whole pages and memsets the partial ones at its ends.
  m.def("zero_fill_(Tensor(a!) self) -> ()", &pixcon::zero_fill_op);
  // Bytes of freed large output blocks the kernels keep for reuse (cpu/memory.h's BlockCache).
  m.def("block_cache_bytes() -> int", &pixcon::block_cache_bytes);
}
