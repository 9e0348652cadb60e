"""Build of merging_kernels._C through CMake (see CMakeLists.txt).

Environment switches:
  MERGING_KERNELS_NO_CUDA=1        never compile the CUDA sources, even where nvcc exists
  MERGING_KERNELS_CUDA_ARCHS="80;90"  CUDA architectures to compile for (default 80;90)
  MERGING_KERNELS_BUILD_TYPE=Debug  CMake build type (default Release)
  MAX_JOBS=N                       parallel compile jobs
Nothing here looks at the GPU: whether CUDA is compiled depends only on the toolkit.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("MERGING_KERNELS_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMK_PYTHON_EXT_SUFFIX={_ext_suffix()}",
        ]
        if os.environ.get("MERGING_KERNELS_NO_CUDA", "0") not in ("", "0"):
            args.append("-DMK_WITH_CUDA=OFF")
        archs = os.environ.get("MERGING_KERNELS_CUDA_ARCHS")
        if archs:
            args.append(f"-DMK_CUDA_ARCHS={archs}")
        if _have_ninja():
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--config", build_type, "-j", jobs], cwd=build_dir, check=True)


def _ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX")


def _have_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(ext_modules=[CMakeExtension("merging_kernels._C")], cmdclass={"build_ext": CMakeBuild})
