"""Installing never fails because a compiler does (setup.py), and never degrades silently.

These run setup.py's build into a temporary directory with a compiler that is broken on
purpose, then import the package from there in a fresh interpreter.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import merging_kernels as mk

ROOT = Path(__file__).resolve().parents[1]
NOTE = "_build_failure.txt"

def _build(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """setup.py build_py + build_ext into tmp_path/lib; returns the process and the package dir."""
    lib, temp = tmp_path / "lib", tmp_path / "temp"
    pytest.importorskip("setuptools")
    pytest.importorskip("pybind11")
    environment = {**os.environ, "MAX_JOBS": "2", **env}
    for name in ("MERGING_KERNELS_NO_CUDA", "MERGING_KERNELS_REQUIRE_NATIVE"):
        if name not in env:
            environment.pop(name, None)
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib),
               "build_ext", "--build-lib", str(lib), "--build-temp", str(temp)]
    run = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    return run, lib / "merging_kernels"


_PROBE = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    # the checkout's editable install would otherwise supply the _C this build lacks
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import merging_kernels as mk
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = mk.linear_sum_assignment(cost)
    try:
        mk.linear_sum_assignment(cost, backend="native")
        native = "ran"
    except mk.BackendUnavailableError as exc:
        native = str(exc)
    print(json.dumps({
        "file": mk.__file__,
        "info": mk.build_info(),
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "total": float(cost[rows, cols].sum()),
        "native": native,
    }))
""")


def _import_from(lib: Path, tmp_path: Path) -> dict:
    """Import the package built into ``lib`` in a fresh interpreter (cwd away from the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(lib.parent)}
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).parent == lib, "imported the checkout, not the build under test"
    return report


def test_no_compiler_installs_without_native_and_says_so(tmp_path):
    # cmake's own compiler check fails at once: both the CUDA and the CPU-only attempt fail
    run, package = _build(tmp_path, CXX="/nonexistent/c++")
    assert run.returncode == 0, run.stderr
    assert not list(package.glob("_C*")), "no _C can have been built"
    note = (package / NOTE).read_text()
    assert note.startswith("_C did not compile, so the native backend is unavailable")
    assert "nonexistent" in note  # the compiler's own words are kept
    assert "_C did not compile" in run.stderr  # and the build says so

    report = _import_from(package, tmp_path)
    assert report["info"]["available"] is False
    assert report["info"]["build_failure"] == note.strip()
    assert [w[0] for w in report["warnings"]] == ["NativeBuildWarning"]
    assert "partial build: _C did not compile" in report["warnings"][0][1]
    assert report["total"] == 5.0  # the default backend falls back to the torch reference: optimal
    assert "at install time _C did not compile" in report["native"]


def test_require_native_turns_a_failed_build_into_a_failed_install(tmp_path):
    run, package = _build(tmp_path, CXX="/nonexistent/c++", MERGING_KERNELS_REQUIRE_NATIVE="1")
    assert run.returncode != 0
    assert "build failed" in run.stderr and "nonexistent" in run.stderr
    assert not (package / NOTE).exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_broken_cuda_toolkit_falls_back_to_the_cpu_kernels(tmp_path):
    # nvcc is there but cannot compile (no host compiler it accepts): CMake must not quietly drop
    # CUDA, and setup.py must still give the CPU kernels, with the reason recorded
    run, package = _build(tmp_path, CUDAHOSTCXX="/nonexistent/c++")
    assert run.returncode == 0, run.stderr
    assert list(package.glob("_C*")), run.stdout[-3000:]
    note = (package / NOTE).read_text()
    assert note.startswith("the CUDA kernels did not compile, so _C has the CPU kernels only")
    assert "the CUDA + CPU build failed" in note and "the CPU-only build failed" not in note

    report = _import_from(package, tmp_path)
    assert report["info"]["available"] is True and report["info"]["cuda"] is False
    assert report["native"] == "ran" and report["total"] == 5.0
    assert [w[0] for w in report["warnings"]] == ["NativeBuildWarning"]
    assert "CUDA kernels did not compile" in report["warnings"][0][1]


def test_this_install_built_every_part_it_was_asked_for():
    # a partial install warns on import; here it fails a test too, so it cannot pass unnoticed
    assert mk.build_info()["build_failure"] is None, mk.build_info()["build_failure"]


def test_ci_compiles_cuda_where_nvcc_exists():
    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI")
    if shutil.which("nvcc") is None or os.environ.get("MERGING_KERNELS_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("no nvcc on the PATH")
    assert mk.build_info().get("cuda") is True, mk.build_info()


def test_sdist_carries_everything_the_build_needs(tmp_path):
    # without them an install from the sdist would have no _C (and, before the fallback, fail)
    pytest.importorskip("setuptools")
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked sources")
    tracked = subprocess.run([git, "ls-files", "CMakeLists.txt", "setup.py", "pyproject.toml", "csrc", "python"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    run = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                          "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    import tarfile

    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert tracked and not set(tracked) - shipped, sorted(set(tracked) - shipped)
