"""Builds pixcon._C: the C++ CPU kernels of the pixcon:: ops (csrc/; the GPU kernels are Triton,
compiled at run time). Metadata lives in pyproject.toml. Install with
`pip install -e . --no-build-isolation` (torch must already be installed)."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: without it at::parallel_for silently runs on one thread. -g0: setuptools adds -g, which
# doubles compile time and makes the .so ~50x larger.
setup(
    ext_modules=[CppExtension("pixcon._C", sources, extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp"]},
                              extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
