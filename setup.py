"""Build of merging_kernels._C through CMake (see CMakeLists.txt).

Installing never fails because a compiler does: when the CUDA kernels do not compile, the
CPU kernels are built alone; when those fail too, the package installs without ``_C`` (the
torch and Triton backends still work). Either way the reason is written beside the package
as ``_build_failure.txt``; ``merging_kernels`` warns with it on import and
``merging_kernels.build_info()`` reports it.

Environment switches:
  MERGING_KERNELS_REQUIRE_NATIVE=1  fail the install when any part that was asked for fails
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
FAILURE_NOTE = "_build_failure.txt"  # read by merging_kernels/_native.py
LOG_TAIL_LINES = 40


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        note = target.parent / FAILURE_NOTE
        note.unlink(missing_ok=True)
        with_cuda = not _env_flag("MERGING_KERNELS_NO_CUDA")
        require = _env_flag("MERGING_KERNELS_REQUIRE_NATIVE")
        # A CUDA toolkit that does not work with this host compiler is common; the CPU
        # kernels are still worth having, so try once more without CUDA.
        attempts = [("CUDA + CPU", True), ("CPU-only", False)] if with_cuda else [("CPU-only", False)]
        build_root = Path(self.build_temp).resolve()
        failures = []
        for i, (label, cuda) in enumerate(attempts):
            build_dir = build_root / (ext.name if i == 0 else f"{ext.name}-fallback")
            log = self._cmake_build(target.parent, build_dir, cuda)
            if log is None:
                break
            failures.append(f"the {label} build failed:\n{log}")
            if require:
                raise RuntimeError(f"merging_kernels: {failures[-1]}")
        else:
            target.unlink(missing_ok=True)  # never leave a stale _C from older sources behind
        if failures:
            summary = ("the CUDA kernels did not compile, so _C has the CPU kernels only "
                       "(MERGING_KERNELS_NO_CUDA=1 skips them on purpose)"
                       if len(failures) < len(attempts) else
                       "_C did not compile, so the native backend is unavailable")
            note.write_text(f"{summary}\n\n" + "\n\n".join(failures) + "\n")
            sys.stderr.write(f"WARNING: merging_kernels: {summary} (details in {note})\n")

    def _cmake_build(self, out_dir: Path, build_dir: Path, cuda: bool) -> str | None:
        """Configure and build ``_C`` into ``out_dir``; the tail of the log on failure, else None."""
        try:
            import pybind11
        except ImportError as exc:  # only under --no-build-isolation: it is a build requirement
            return f"pybind11 is not installed ({exc})"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("MERGING_KERNELS_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMK_PYTHON_EXT_SUFFIX={_ext_suffix()}",
            f"-DMK_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        archs = os.environ.get("MERGING_KERNELS_CUDA_ARCHS")
        if archs:
            args.append(f"-DMK_CUDA_ARCHS={archs}")
        if _have_ninja():
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        log = []
        for command in (["cmake", str(ROOT), *args], ["cmake", "--build", ".", "--config", build_type, "-j", jobs]):
            try:
                run = subprocess.run(command, cwd=build_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            except OSError as exc:  # no cmake at all
                return f"{' '.join(command[:2])}: {exc}"
            sys.stdout.write(run.stdout)  # shown by `pip install -v`
            log += run.stdout.splitlines()
            if run.returncode != 0:
                return "\n".join(log[-LOG_TAIL_LINES:])
        return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


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
