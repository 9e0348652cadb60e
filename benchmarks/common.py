"""Shared pieces of the benchmarks: records, a timer, the device name, bytes models, test models, a table.

A :class:`Record` is one measured case in the torchao style: the bytes the op
must move are part of the record, so every time is also read as GB/s against
the measured copy bandwidth of the same machine, and speed-ups against the
torch reference and against the peer a user would otherwise run are computed
from medians taken in the same process (Liger-style rows: op, provider,
case, time, device).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

# --------------------------------------------------------------------------- device


def device_name(device: str | torch.device = "cpu") -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model from /proc/cpuinfo and the thread count on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"


def machine_line(device: str | torch.device = "cpu") -> str:
    """The CPU (and GPU) and the load average, for the header and footer of a benchmark run."""
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.device(device).type == "cuda" else ""
    return f"{device_name('cpu')}{gpu}; {load}"


def print_targets(targets: Sequence[tuple[str, bool, str]], device: str | torch.device = "cpu") -> None:
    """A runner's closing lines: PASS/FAIL per target (what, ok, detail), then the machine's state."""
    print("\n## targets")
    for what, ok, detail in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {what}  ({detail})")
    print(f"\n# machine at the end: {machine_line(device)}")


def package_version(name: str) -> str:
    """The installed distribution's version, or "?" when it is not installed as one."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def commit_line(watched: Sequence[str] = ()) -> str:
    """Short HEAD commit of this checkout, "+ uncommitted changes" when a ``watched`` path (relative to the
    repository root) differs from it; "unknown commit" outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *watched], cwd=root, capture_output=True,
                                text=True).stdout.splitlines() if watched else []
        # saved results (the file this run may be writing) are outputs, not code
        dirty = [line for line in status if not line[3:].startswith("benchmarks/results/")]
        return out + (" (+ uncommitted changes)" if dirty else "")
    except Exception:
        return "unknown commit"


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timer


@dataclass
class Timing:
    median_s: float
    times_s: list[float]

    @property
    def spread(self) -> float:
        """(max − min) / median of the repeats: how noisy this median is."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.median_s > 0 else 0.0


def measure(fn: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 7,
            min_repeats: int = 3, budget_s: float = 30.0) -> Timing:
    """Median wall time of ``fn()`` after ``warmup`` calls.

    Runs ``repeats`` timed calls, or fewer (never below ``min_repeats``) once
    the timed calls have used ``budget_s`` seconds, so slow peers (seconds per
    call) still get a median of three without dominating the run. Each call is
    bracketed by a device synchronize; the garbage collector is run before
    and disabled during each call. Results are dropped between calls so the
    allocator sees the same state every time.
    """
    for _ in range(warmup):
        fn()
        synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < min_repeats or spent < budget_s):
        gc.collect()
        gc.disable()
        try:
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        del result
        times.append(elapsed)
        spent += elapsed
    return Timing(statistics.median(times), times)


@dataclass
class CpuTiming:
    wall: float  # median wall-clock seconds
    cpu: float  # median CPU seconds of the process (all threads)
    repeats: int


def measure_cpu(fn: Callable[[], object], *, repeats: int = 7, min_repeats: int = 3, budget_s: float = 20.0,
                warmup: int = 1, collect_each: bool = True,
                prior: tuple[float, float] | None = None) -> CpuTiming:
    """Medians of wall-clock and process CPU time of ``fn()`` after ``warmup`` calls.

    On a machine shared with other jobs the wall clock of a single-threaded call includes time the
    thread spent descheduled; its CPU time does not. ``repeats`` timed calls, fewer (never below
    ``min_repeats``) once ``budget_s`` is spent. The garbage collector is off during each call and
    run before each one (``collect_each``) or once before the first (a collection between repeats
    leaves caches cold, which some callers do not want to time). ``prior`` is the (wall, CPU) time of a
    call already made, e.g. a checked first call of a slow function: it counts as one of the repeats.
    """
    for _ in range(warmup):
        fn()
    walls: list[float] = [prior[0]] if prior else []
    cpus: list[float] = [prior[1]] if prior else []
    spent = prior[0] if prior else 0.0
    if not collect_each:
        gc.collect()
    while len(walls) < repeats and (len(walls) < min_repeats or spent < budget_s):
        if collect_each:
            gc.collect()
        gc.disable()
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
        finally:
            gc.enable()
        walls.append(t1 - t0)
        cpus.append(c1 - c0)
        spent += t1 - t0
    return CpuTiming(statistics.median(walls), statistics.median(cpus), len(walls))


# --------------------------------------------------------------------------- bytes models


def bytes_task_arithmetic(numel: int, num_tasks: int, itemsize: int) -> int:
    """Exact minimum for θ0 + Σ λ_k (θk − θ0) (also DARE): read θ0 and K experts once, write θ once."""
    return (num_tasks + 1) * numel * itemsize + numel * itemsize


def bytes_ties_lower_bound(numel: int, num_tasks: int, itemsize: int) -> int:
    """Lower bound for TIES: the trim threshold needs one full read of θ0 and the K experts before the
    apply pass can read them again, then θ is written once: 2·(K+1)·n read + n written."""
    return 2 * (num_tasks + 1) * numel * itemsize + numel * itemsize


BYTES_RULES = {
    "exact": "exact: (K+1)·n read + n written",
    "lower bound": "lower bound: 2·(K+1)·n read (select, then apply) + n written",
    "copy": "exact: n read + n written",
}


# --------------------------------------------------------------------------- records


@dataclass
class Record:
    """One measured case (a row of the table)."""

    op: str  # e.g. "task_arithmetic", "ties[tensor]"
    provider: str  # "native", "triton", "torch (reference)", or a peer's name
    case: str  # sizes and settings, e.g. "K=4 n=16.8M T=18 float32"
    device: str
    seconds: float  # median
    bytes_moved: int  # what the op must move at least (see bytes_rule)
    bytes_rule: str  # "exact" or "lower bound" (keys of BYTES_RULES)
    role: str = "fast"  # "fast", "reference", "peer", "limit"
    times_s: list[float] = field(default_factory=list)
    speedup_vs_reference: float | None = None
    speedup_vs_peer: float | None = None
    copy_fraction: float | None = None  # GB/s as a fraction of the measured copy bandwidth
    check: str = ""  # how the output compares (max |Δ| vs the reference, elements that differ)

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d


def fill_ratios(records: Sequence[Record], copy_gbps: float | None) -> None:
    """Speed-ups vs the reference and the peer of the same (op, case), and the fraction of copy bandwidth."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.op, r.case), []).append(r)
    for group in groups.values():
        ref = next((r for r in group if r.role == "reference"), None)
        peer = next((r for r in group if r.role == "peer"), None)
        for r in group:
            if ref is not None and r.role != "limit":
                r.speedup_vs_reference = ref.seconds / r.seconds
            if peer is not None and r.role != "limit":
                r.speedup_vs_peer = peer.seconds / r.seconds
            if copy_gbps:
                r.copy_fraction = r.gbps / copy_gbps


# --------------------------------------------------------------------------- printing


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def format_table(records: Sequence[Record]) -> str:
    """A fixed-width table: op, provider, case, median ms, GB/s, % of copy, speed-ups, output check."""
    header = ["op", "provider", "case", "ms (median)", "GB/s", "% copy", "x ref", "x peer", "reps", "output check"]
    rows = []
    for r in records:
        rows.append([
            r.op,
            r.provider,
            r.case,
            f"{r.seconds * 1e3:.1f}" if r.seconds * 1e3 >= 10 else f"{r.seconds * 1e3:.2f}",
            f"{r.gbps:.1f}" + ("" if r.bytes_rule == "exact" or r.role == "limit" else "*"),
            f"{100 * r.copy_fraction:.0f}%" if r.copy_fraction is not None else "-",
            _fmt_ratio(r.speedup_vs_reference),
            _fmt_ratio(r.speedup_vs_peer),
            str(len(r.times_s)),
            r.check,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous_op = None
    for r, row in zip(records, rows):
        if previous_op is not None and r.op != previous_op:
            out.append("")
        previous_op = r.op
        out.append(line(row))
    return "\n".join(out)


# --------------------------------------------------------------------------- test models


def transformer_like_shapes(width: int, vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an embedding plus one transformer block of hidden size ``width`` (MLP 4×width).

    width 1024 (vocab 4096): 16.8M parameters in 17 tensors, from 1024×4096 matrices down to
    1024-element norms and biases; width 256: 1.05M.
    """
    vocab = 4 * width if vocab is None else vocab
    ff = 4 * width
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, width)}
    p = "layers.0."
    shapes[p + "input_norm.weight"] = (width,)
    shapes[p + "input_norm.bias"] = (width,)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[p + f"attn.{proj}.weight"] = (width, width)
        shapes[p + f"attn.{proj}.bias"] = (width,)
    shapes[p + "post_attn_norm.weight"] = (width,)
    shapes[p + "post_attn_norm.bias"] = (width,)
    shapes[p + "mlp.up_proj.weight"] = (ff, width)
    shapes[p + "mlp.up_proj.bias"] = (ff,)
    shapes[p + "mlp.down_proj.weight"] = (width, ff)
    shapes[p + "mlp.down_proj.bias"] = (width,)
    return shapes


def make_models(shapes: dict[str, tuple[int, ...]], num_tasks: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0, base_std: float = 0.02,
                delta_std: float = 0.002) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base state dict (N(0, base_std²)) and K fine-tuned experts (base + N(0, delta_std²)), made in
    float32 on the CPU from a fixed seed, then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    base32 = {name: base_std * torch.randn(shape, generator=g) for name, shape in shapes.items()}
    experts = []
    for _ in range(num_tasks):
        experts.append({name: (b + delta_std * torch.randn(b.shape, generator=g)).to(dtype=dtype, device=device)
                        for name, b in base32.items()})
    base = {name: b.to(dtype=dtype, device=device) for name, b in base32.items()}
    return base, experts


def numel_of(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state_dict.values())


def human_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- comparing outputs


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()), default=0.0)


def differing(a: torch.Tensor, b: torch.Tensor, ulps: float = 16.0) -> torch.Tensor:
    """Elements that differ by more than fp32 rounding: |a − b| > ulps · eps · max|b| (per tensor).

    Summation order and fused multiply-adds move a merged value by a few ulps of
    the tensor's largest value; a different keep/drop decision moves it by about
    a task vector entry (here ~1e-3, orders of magnitude more).
    """
    eps = torch.finfo(b.dtype if b.dtype in (torch.float16, torch.bfloat16) else torch.float32).eps
    a, b = a.float(), b.float()
    tol = ulps * eps * float(b.abs().max()) if b.numel() else 0.0
    return (a - b).abs() > tol
