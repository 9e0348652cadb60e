"""The CPU assignment solver's AVX row scans against their generic versions, bit for bit, in C++
(tests/native/lsa_scan_kernels.cpp: ~2M random rows of every width, ties, ±inf, NaN, -0.0). The pytest
suites reach the scans only through whole solves; this compares each scan on its own."""

import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the AVX scans are x86 only")
def test_avx_row_scans_equal_the_generic_ones(tmp_path):
    exe = tmp_path / "lsa_scans"
    built = subprocess.run([CXX, "-O2", "-std=c++17", "-w", f"-I{ROOT}/csrc",
                            f"{ROOT}/tests/native/lsa_scan_kernels.cpp", "-o", str(exe), "-lpthread"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    cases, failures = int(last.split()[0]), int(last.split(",")[1].split()[0])
    assert cases > 1_000_000 and failures == 0, last
