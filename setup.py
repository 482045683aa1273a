"""Builds pixcon._C: the C++ CPU kernels of the pixcon:: ops (csrc/; the GPU kernels are Triton,
compiled at run time), against the torch that is installed. Metadata lives in pyproject.toml.

    pip install --no-build-isolation .      (or -e .) builds the kernels against your torch

pyproject.toml asks for no torch, so pip never downloads one. A plain ``pip install .`` builds in
an isolated environment without torch: it installs pixcon without the kernels (and says so), with
their sources in pixcon/_csrc for ``python -m pixcon.build``. A failed compile (no C++
compiler) does the same instead of failing the install."""
import glob
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))


def say(msg):
    print(f"pixcon setup: {msg}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (pixcon/_csrc) for ``python -m pixcon.build``."""

    def run(self):
        super().run()
        if not self.dry_run:
            dst = Path(self.build_lib) / "pixcon" / "_csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(HERE / "csrc", dst)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    say("torch is not importable here (pip's isolated build environment): installing pixcon "
        "WITHOUT its compiled CPU kernels. Build them against your torch with "
        "`python -m pixcon.build`, or install with `pip install --no-build-isolation .`")
else:
    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """The kernels when they compile; a clear message and a pure-Python install when not."""

        def run(self):
            say(f"building the compiled CPU kernels pixcon._C against torch {torch.__version__} "
                f"(a few minutes on 2 cores)")
            try:
                super().run()
            except Exception as e:                      # noqa: BLE001 - any compiler failure
                say(f"the CPU kernels did not compile ({type(e).__name__}: {e}); installing "
                    f"without them: CPU tensors run the reference path. Fix the compiler and "
                    f"run `python -m pixcon.build`")

    # -fopenmp: without it at::parallel_for silently runs on one thread. -g0: setuptools adds
    # -g, which doubles compile time and makes the .so ~50x larger. -fno-math-errno: no kernel
    # reads errno, and with it set GCC keeps every sqrt scalar (pixcon/_build.py: the same flags).
    ext_modules = [CppExtension("pixcon._C", sources,
                                extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp",
                                                            "-fno-math-errno"]},
                                extra_link_args=["-fopenmp"])]
    cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
