// Schemas of the compiled pixcon ops (namespace `pixcon`, a fragment: the Python layer registers
// further ops in the same namespace with torch.library.custom_op).
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

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
int64_t tiled_threads(int64_t work, int64_t items);   // cpu/tiled.cpp
}  // namespace pixcon

TORCH_LIBRARY_FRAGMENT(pixcon, m) {
  // Philox4x32-10 (pixcon.reference.rng.philox4x32): counter (c, stream, 0, 0), key = (seed low
  // 32 bits, seed high 32 bits). counters: int64 tensor of values in [0, 2^32). Returns
  // counters.shape + (4,) int64 values in [0, 2^32).
  m.def("philox4x32(Tensor counters, int seed, int stream=0) -> Tensor");
  // Exact Euclidean distance transform of (..., H, W) labels: 0 where labels == background,
  // else the distance to the nearest pixel with a different label (+inf if none); squared
  // distances are exact integers (as float32).
  m.def("distance_transform(Tensor labels, int background, bool squared) -> Tensor");
  // The most threads the compiled CPU kernels use (0: torch's intra-op setting).
  m.def("set_num_threads(int n) -> ()", &pixcon::set_num_threads);
  m.def("get_num_threads() -> int", &pixcon::get_num_threads);
  // How many threads a pass of the tiled contrast's CPU kernel uses for `work` multiply-adds in
  // `items` work items (its one rule: one thread below 2^27; pixcon.ops.tiled documents it).
  // The op pixcon::tiled_contrast itself is defined in pixcon/ops/_library.py (a schema, this
  // CPU kernel, the Triton CUDA kernel, one fake, one autograd).
  m.def("tiled_threads(int work, int items) -> int", &pixcon::tiled_threads);
  // The compiled CPU kernels of the fused primitives (backend "native"; pixcon.ops.primitives
  // documents each; the same samples as the reference and Triton for the same seed).
  m.def("class_sums_native(Tensor x, Tensor labels, int num_classes) -> (Tensor, Tensor)");
  m.def("sample_in_groups_native(Tensor order, Tensor offsets, Tensor counts, Tensor row_group, "
        "int per_row, int seed, int stream) -> Tensor");
  m.def("sample_negatives_native(Tensor row_class, Tensor cdf, Tensor order, Tensor offsets, "
        "Tensor counts, int per_row, int seed, int stream) -> Tensor");
  m.def("infonce_fwd_native(Tensor pool, Tensor pos_pool, Tensor q_idx, Tensor pos_idx, "
        "Tensor neg_idx, float temperature, bool key_grad, float eps, Tensor? keys=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("infonce_bwd_native(Tensor grad, Tensor pool, Tensor pos_pool, Tensor q_idx, "
        "Tensor pos_idx, Tensor neg_idx, Tensor lse, float temperature, bool key_grad, "
        "float eps, Tensor? keys=None) -> (Tensor, Tensor, Tensor)");
}
