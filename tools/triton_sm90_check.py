"""Compile every Triton kernel variant the launchers pick, for sm_90, without a GPU.

    pip download --no-deps triton==3.6.0 -d /tmp/t36 && unzip -q -o /tmp/t36/triton-*.whl -d /tmp/t36/site
    TRITON_INTERPRET=0 PYTHONPATH=/tmp/t36/site .venv/bin/python tools/triton_sm90_check.py [FAMILY ...]

(triton 3.6 is what the GPU machine has; the wheel for this machine's Python compiles the same code.)
The CPU interpreter accepts code the compiler refuses (list comprehensions, some casts) and says
nothing about registers, so a GPU session can lose its few minutes to a kernel that does not build or
that spills. Triton's CUDA backend compiles without a device: a stand-in driver reports an sm_90
target, ``JITFunction.run`` is made to compile without launching, and each op's own launcher is called
on small CPU tensors of every dtype, layout and flag it distinguishes, so the variants are the ones a
GPU run compiles. ptxas (bundled with triton) reports registers, spills and stack per variant.

Prints one row per compiled variant and a summary; exits 1 if any variant fails to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = 90


class _Sm90Driver(DriverBase):
    """Just enough of a CUDA driver for Triton to compile: a target, a device index, a stream."""

    def __init__(self):
        pass

    @classmethod
    def is_active(cls):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return None

    def map_python_to_cpp_type(self, ty):
        return ty


driver.set_active(_Sm90Driver())
_compiled: list[tuple[str, str, object]] = []  # (kernel, case, CompiledKernel)
_case = [""]
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    _compiled.append((self.fn.__name__, _case[0], kernel))
    return kernel


JITFunction.run = _compile_only

from merging_kernels.ops import per_sample_linear as psl  # noqa: E402
from merging_kernels.ops import similarity as sim  # noqa: E402
from merging_kernels.ops import task_vectors as tv  # noqa: E402

# triton's bundled assemblers: the newer PTX versions of later tritons need ptxas-blackwell
PTXAS = [p for p in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / n for n in ("ptxas", "ptxas-blackwell"))
         if p.exists()]
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _ptxas(ptx: str) -> dict:
    """ptxas -v's resource report of one variant (the first bundled assembler that takes its PTX version)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in PTXAS:
            done = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{ARCH}a", f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
    finally:
        os.unlink(f.name)
    text = done.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
    return {"ok": done.returncode == 0, "registers": number(r"Used (\d+) registers"),
            "spill": (number(r"(\d+) bytes spill stores") or 0), "stack": (number(r"(\d+) bytes stack frame") or 0),
            "log": text}


def _unaligned(n: int, dtype: torch.dtype) -> torch.Tensor:
    """n elements starting one element past a 16-byte boundary (the launchers' unaligned variant)."""
    return torch.randn(n + 1).to(dtype)[1:]


def task_vector_cases():
    n, k = 3000, 3
    for in_dt, out_dt in ((F32, F32), (F16, F16), (BF16, BF16), (F32, BF16), (BF16, F32)):
        for aligned in (True, False):
            make = (lambda: torch.randn(n).to(in_dt)) if aligned else (lambda: _unaligned(n, in_dt))
            bases, experts = [make()], [[make()] for _ in range(k)]
            outs = [torch.empty(n, dtype=out_dt)]
            weights = torch.ones((1, k))
            for name, options in (("ta", {}), ("ties", dict(density=0.2, elect_sign=True)),
                                  ("ties-sum", dict(density=0.2, elect_sign=True, normalize=False)),
                                  ("dare", dict(drop_rate=0.5)), ("dare-ties", dict(density=0.5, drop_rate=0.3,
                                                                                   elect_sign=True))):
                spec = tv.make_spec(**options)
                thresholds = torch.full((1, k), 0.1) if spec.trims else None
                _case[0] = f"{in_dt}->{out_dt} {'aligned' if aligned else 'unaligned'} {name}"
                tv._merge_apply_triton(bases, experts, outs, weights, spec, [0], [0], thresholds)
                if spec.trims and out_dt == in_dt:  # the histograms read the inputs only
                    prefix = torch.zeros((1, k), dtype=torch.int64)
                    for shift, bits in tv.RADIX_LEVELS_NARROW:
                        _case[0] = f"{in_dt} {'aligned' if aligned else 'unaligned'} {name} bits {shift}+{bits}"
                        tv._magnitude_histogram_triton(bases, experts, spec, [0], [0], 1, shift, bits, prefix)


def similarity_cases():
    for dt in (F32, F16, BF16, F64):
        for d in (64, 70):  # 16-aligned rows or not (the launcher's BLOCK_K choice)
            x, y = torch.randn(300, d).to(dt), torch.randn(200, d).to(dt)
            for same in (True, False):
                _case[0] = f"{dt} d={d} {'self' if same else 'cross'}"
                sim._correlation_matrix_triton(x, None if same else y, 1e-8)
    for dt in (F32, F16, BF16):
        for D in (64, 70):
            for strided in (False, True):
                z = torch.randn(200, 2 * D).to(dt)[:, ::2] if strided else torch.randn(200, D).to(dt)
                _case[0] = f"{dt} D={D}{' strided' if strided else ''}"
                sim._shifted_gram_add_triton(torch.zeros((D, D), dtype=F64), z, torch.ones(D), torch.zeros(D))
    for count in (1, 1000, 2**33):
        for upper in (True, False):
            for dt in (F64, F32):
                _case[0] = f"moments {dt} count={count} upper={upper}"
                sim._correlation_from_moments_triton(torch.zeros(64, dtype=F64), torch.eye(64, dtype=dt), count,
                                                     1e-8, upper)


def per_sample_linear_cases():
    k, i, o = 4, 256, 192
    for dt in (F32, F16, BF16):
        for tf32 in ((False, True) if dt == F32 else (False,)):
            for rows in (8, 48, 256):
                for bias in (False, True):
                    x = torch.randn(rows // 2, 2, i).to(dt)
                    alpha = torch.rand(rows // 2, k).to(dt)
                    weight = torch.randn(o, k + 1, i).to(dt)
                    packed_bias = torch.randn(k + 1, o).to(dt) if bias else None
                    _case[0] = f"{dt} rows={rows}{' tf32' if tf32 else ''}{' bias' if bias else ''}"
                    old = psl._matmul_allows_tf32
                    psl._matmul_allows_tf32 = lambda: tf32  # noqa: B023 - the variant under test
                    try:
                        psl._stacked_triton(x, alpha, weight, packed_bias)
                    finally:
                        psl._matmul_allows_tf32 = old


FAMILIES = {"task_vectors": task_vector_cases, "similarity": similarity_cases,
            "per_sample_linear": per_sample_linear_cases}


def main(argv: list[str]) -> int:
    unknown = [a for a in argv if a not in FAMILIES]
    if unknown:
        print(f"unknown op families {unknown}; choose from {sorted(FAMILIES)} (default: all)")
        return 2
    if not PTXAS:
        print("triton has no bundled ptxas (backends/nvidia/bin): a CUDA-enabled triton wheel is needed")
        return 2
    print(f"triton {triton.__version__}, sm_{ARCH}, ptxas: {', '.join(p.name for p in PTXAS)}")
    failures = 0
    for cases in [FAMILIES[a] for a in argv] or FAMILIES.values():
        try:
            cases()
        except Exception:  # a kernel that does not compile: report it, check the others
            failures += 1
            print(f"FAILED in {cases.__name__}, case {_case[0]!r}:\n{traceback.format_exc(limit=3)}")
    seen, spilling = set(), 0
    print(f"\n{'kernel':28s} {'case':44s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>7s}")
    for name, case, kernel in _compiled:
        key = (name, kernel.hash if hasattr(kernel, "hash") else id(kernel))
        if key in seen:
            continue
        seen.add(key)
        info = _ptxas(kernel.asm["ptx"])
        if not info["ok"]:
            failures += 1
            print(f"{name:28s} {case:44s} ptxas FAILED\n{info['log'][-2000:]}")
            continue
        spilling += info["spill"] > 0
        print(f"{name:28s} {case:44s} {info['registers']:>5} {info['spill']:>6} {info['stack']:>6} "
              f"{kernel.metadata.shared:>7}")
    print(f"\n{len(seen)} variants compiled for sm_{ARCH}; {spilling} of them spill registers; {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
