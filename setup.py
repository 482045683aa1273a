"""Builds pixcon._C: the C++ (CPU, OpenMP) ops always, the CUDA ops only where torch is a CUDA build
and nvcc is found. Metadata lives in pyproject.toml. Install with
`pip install -e . --no-build-isolation` (torch must already be installed)."""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def with_cuda() -> bool:
    flag = os.environ.get("PIXCON_WITH_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    ok = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on") and not ok:
        raise RuntimeError(
            f"PIXCON_WITH_CUDA=1 but torch {torch.__version__} is a CPU build or CUDA_HOME is unset")
    return ok


WITH_CUDA = with_cuda()
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: without it at::parallel_for silently runs on one thread. -g0: setuptools adds -g, which
# doubles compile time and makes the .so ~50x larger.
extra = {"cxx": ["-O3", "-g0", "-fopenmp"]}
macros = []
Ext = CppExtension
if WITH_CUDA:
    Ext = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    macros.append(("WITH_CUDA", None))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

setup(
    ext_modules=[Ext("pixcon._C", sources, extra_compile_args=extra,
                     extra_link_args=["-fopenmp"], define_macros=macros)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
