"""Task-vector merges side by side: the fast backend, the torch reference and the peers, in one run.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--json out.json]

Measures, in one process on one machine: memory-copy bandwidth (the limit a
memory-bound merge is read against), task arithmetic, TIES with per-tensor
trim (vs a mergekit-style implementation), TIES with model-wide trim (vs a
FusionBench-style one) and DARE + task arithmetic. Prints a table (median
time, GB/s from the bytes each op must move, % of copy bandwidth, speed-ups),
the output checks and PASS/FAIL lines for the targets. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import merging_kernels as mk
except ImportError:  # not installed: run from a source checkout
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import merging_kernels as mk

from merging_kernels import BackendUnavailableError  # noqa: E402

import peers  # noqa: E402
from common import (  # noqa: E402
    BYTES_RULES,
    Record,
    bytes_task_arithmetic,
    bytes_ties_lower_bound,
    device_name,
    differing,
    fill_ratios,
    format_table,
    human_count,
    make_models,
    max_abs_diff,
    measure,
    numel_of,
    synchronize,
    transformer_like_shapes,
)

DENSITY = 0.2  # TIES keep fraction (the papers' and both peers' usual setting)
FUSIONBENCH_SCALE = 0.3  # FusionBench's default scaling factor
DROP_RATE = 0.9  # DARE's usual p
SLOW_CALL_S = 5.0  # a call at least this long: its first (checked) call counts as a repeat, no extra warm-up

TARGET_TIES_SPEEDUP = 20.0
TARGET_TA_COPY_FRACTION = 0.60


@dataclass
class Provider:
    name: str
    role: str  # "fast", "reference" or "peer"
    fn: object  # () -> state dict


@dataclass
class Suite:
    device: str
    device_label: str
    quick: bool
    records: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)  # None: not measured

    def say(self, text: str) -> None:
        print(text, flush=True)

    def timing_args(self, first_call_s: float, role: str) -> dict:
        if role == "limit":
            return dict(warmup=2, repeats=15, min_repeats=5, budget_s=10.0)
        if first_call_s >= SLOW_CALL_S:
            # seconds per call: warm-up effects (page faults, caches) are noise here; keep the run bearable
            min_repeats = 1 if first_call_s > 30 or self.quick else 2
            return dict(warmup=0, repeats=min_repeats, min_repeats=min_repeats, budget_s=0.0)
        if self.quick:
            return dict(warmup=1, repeats=5, min_repeats=3, budget_s=5.0)
        return dict(warmup=1, repeats=9, min_repeats=3, budget_s=20.0)

    def run_case(self, op: str, case: str, bytes_moved: int, bytes_rule: str, providers: list[Provider],
                 compare=None) -> dict[str, dict]:
        """Run each provider once (checked), then time it. Returns the outputs kept by ``compare``."""
        outputs: dict[str, dict] = {}
        for p in providers:
            self.say(f"  {op:<16} {p.name:<22} ...")
            try:
                synchronize(self.device)
                start = time.perf_counter()
                out = p.fn()
                synchronize(self.device)
                first = time.perf_counter() - start
            except (BackendUnavailableError, NotImplementedError) as exc:
                msg = f"{op} / {p.name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
                self.notes.append(msg)
                self.say("    " + msg)
                continue
            check = compare(p, out, outputs) if compare else ""
            outputs[p.name] = out
            del out
            args = self.timing_args(first, p.role)
            timing = measure(p.fn, device=self.device, **args)
            times = timing.times_s
            if args["warmup"] == 0:  # the checked call was a full-cost repeat
                times = [first] + times
            seconds = statistics.median(times)
            self.records.append(Record(op, p.name, case, self.device_label, seconds, bytes_moved, bytes_rule,
                                       role=p.role, times_s=times, check=check))
            self.say(f"    {seconds * 1e3:10.2f} ms  ({len(times)} repeats, spread {_spread(times):.0%})")
        return outputs


def _spread(times):
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else 0.0


# --------------------------------------------------------------------------- memory copy


def copy_bandwidth(suite: Suite, numel: int) -> float:
    """Best read+write bandwidth of a plain copy (torch ``copy_``, and numpy on CPU)."""
    case = f"n={human_count(numel)} float32"
    nbytes = 2 * numel * 4
    src = torch.randn(numel, device=suite.device)
    dst = torch.empty_like(src)
    providers = [Provider("torch copy_", "limit", lambda: dst.copy_(src))]
    if suite.device == "cpu":
        a = np.random.default_rng(0).standard_normal(numel, dtype=np.float32)
        b = np.empty_like(a)
        providers.append(Provider("numpy copyto", "limit", lambda: np.copyto(b, a)))
    suite.run_case("memory copy", case, nbytes, "copy", providers)
    best = max(r.gbps for r in suite.records if r.op == "memory copy")
    del src, dst
    return best


# --------------------------------------------------------------------------- the merges


def fast_backend(device: str) -> str:
    return "triton" if device == "cuda" else "native"


def native_status(device: str) -> str | None:
    """Why the fast backend cannot run (None if it can)."""
    if device == "cpu":
        info = mk.build_info()
        if not info.get("available"):
            return f"native backend not built ({info.get('error')})"
        return None
    from merging_kernels._dispatch import triton_available

    return None if triton_available() else "triton is not importable"


def ordered_lists(base, experts):
    names = [n for n, t in base.items() if t.is_floating_point()]
    return names, [base[n] for n in names], [[e[n] for n in names] for e in experts]


def bench_models(suite: Suite, dtype: torch.dtype, width: int, num_tasks: int) -> None:
    dev = suite.device
    fast = fast_backend(dev)
    fast_reason = native_status(dev)
    base, experts = make_models(transformer_like_shapes(width), num_tasks, dtype=dtype, device=dev)
    n, T = numel_of(base), len(base)
    itemsize = torch.empty((), dtype=dtype).element_size()
    dname = str(dtype).replace("torch.", "")
    case = f"K={num_tasks} n={human_count(n)} T={T} {dname}"
    suite.say(f"\nmodel: {case} ({n} parameters per model, {T} tensors, {n * itemsize * (num_tasks + 1) / 1e6:.0f} MB "
              "of inputs)")
    if fast_reason:
        suite.notes.append(f"{fast} rows skipped: {fast_reason}")
        suite.say(f"  {fast} rows skipped: {fast_reason}")

    def with_fast(providers):
        return [p for p in providers if not (p.role == "fast" and fast_reason)]

    bytes_ta = bytes_task_arithmetic(n, num_tasks, itemsize)
    bytes_ties = bytes_ties_lower_bound(n, num_tasks, itemsize)

    def vs_reference(p, out, outputs):
        ref = outputs.get("torch (reference)")
        if ref is None or p.role == "reference":
            return ""
        diff = sum(int(differing(out[k], ref[k]).sum()) for k in out)
        return f"max|d| vs ref {max_abs_diff(out, ref):.1e}" + (f", {diff} differ" if diff else "")

    # ---- task arithmetic
    lambdas = [0.3] * num_tasks
    suite.run_case("task_arithmetic", case, bytes_ta, "exact", with_fast([
        Provider("torch (reference)", "reference", lambda: mk.task_arithmetic(base, experts, lambdas, backend="torch")),
        Provider(fast, "fast", lambda: mk.task_arithmetic(base, experts, lambdas, backend=fast)),
        Provider("naive torch", "peer", lambda: peers.task_arithmetic_naive(base, experts, lambdas)),
    ]), compare=vs_reference)

    # ---- TIES, per-tensor trim, against mergekit-style
    w = [1.0 - 0.1 * k for k in range(num_tasks)]
    op = f"ties[tensor] density={DENSITY}"
    outs = suite.run_case(op, case, bytes_ties, "lower bound", with_fast([
        Provider("torch (reference)", "reference",
                 lambda: mk.ties_merging(base, experts, density=DENSITY, weights=w, backend="torch")),
        Provider(fast, "fast", lambda: mk.ties_merging(base, experts, density=DENSITY, weights=w, backend=fast)),
        Provider("mergekit-style", "peer", lambda: peers.ties_mergekit_style(base, experts, density=DENSITY, weights=w)),
    ]), compare=vs_reference)
    ours_name = fast if fast in outs else "torch (reference)"
    if "mergekit-style" in outs and ours_name in outs:
        suite.checks[f"ties[tensor] {dname}: {ours_name} vs mergekit-style"] = compare_with_mergekit(
            outs[ours_name], outs["mergekit-style"], base, experts, fast if ours_name == fast else "torch")
    del outs

    # ---- TIES, model-wide trim, against FusionBench-style
    op = f"ties[model] density={DENSITY}"
    fb_kth = {}

    def fusionbench():
        merged, kth = peers.ties_fusionbench_style(base, experts, density=DENSITY, scaling_factor=FUSIONBENCH_SCALE,
                                                   return_kth=True)
        fb_kth["kth"] = kth
        return merged

    outs = suite.run_case(op, case, bytes_ties, "lower bound", with_fast([
        Provider("torch (reference)", "reference",
                 lambda: mk.ties_merging(base, experts, density=DENSITY, scale=FUSIONBENCH_SCALE, trim_scope="model",
                                         backend="torch")),
        Provider(fast, "fast", lambda: mk.ties_merging(base, experts, density=DENSITY, scale=FUSIONBENCH_SCALE,
                                                       trim_scope="model", backend=fast)),
        Provider("FusionBench-style", "peer", fusionbench),
    ]), compare=vs_reference)
    ours_name = fast if fast in outs else "torch (reference)"
    if "FusionBench-style" in outs and ours_name in outs:
        suite.checks[f"ties[model] {dname}: {ours_name} vs FusionBench-style"] = compare_with_fusionbench(
            outs[ours_name], outs["FusionBench-style"], base, experts, fb_kth["kth"],
            fast if ours_name == fast else "torch")
    del outs

    # ---- DARE + task arithmetic
    op = f"dare+ta p={DROP_RATE}"
    suite.run_case(op, case, bytes_ta, "exact", with_fast([
        Provider("torch (reference)", "reference",
                 lambda: mk.dare_merging(base, experts, drop_rate=DROP_RATE, weights=lambdas, backend="torch")),
        Provider(fast, "fast", lambda: mk.dare_merging(base, experts, drop_rate=DROP_RATE, weights=lambdas,
                                                       backend=fast)),
        Provider("naive torch (bernoulli)", "peer",
                 lambda: peers.dare_linear_naive(base, experts, lambdas, drop_rate=DROP_RATE)),
    ]), compare=lambda p, out, outputs: ("other RNG: not compared" if p.role == "peer"
                                         else vs_reference(p, out, outputs)))


def _deltas(base_t, experts_t):
    return torch.stack([e.float() - base_t.float() for e in experts_t]).abs()  # (K, n) |d_k|


def compare_with_mergekit(ours, theirs, base, experts, threshold_backend) -> dict:
    """Elementwise comparison; every differing element must sit at a magnitude tie at the threshold.

    mergekit keeps exactly ⌊ρn⌋ entries by argsort, so among entries tied at the
    k-th magnitude it keeps an arbitrary subset; merging_kernels keeps them all.
    """
    names, bases, expert_lists = ordered_lists(base, experts)
    thresholds = mk.magnitude_thresholds(bases, expert_lists, density=DENSITY, trim_scope="tensor",
                                         backend=threshold_backend).cpu()
    total = at_ties = extra_tied = 0
    max_other = max_all = 0.0
    for t, name in enumerate(names):
        a, b = ours[name], theirs[name]
        mags = _deltas(bases[t].reshape(-1), [e[t].reshape(-1) for e in expert_lists]).cpu()
        thr = thresholds[t].float()[:, None]
        tied = mags == thr  # (K, n)
        extra_tied += int((tied.sum(1) - 1).clamp(min=0).sum())
        diff = differing(a, b).reshape(-1).cpu()
        err = (a.float() - b.float()).abs().reshape(-1).cpu()
        max_all = max(max_all, float(err.max()) if err.numel() else 0.0)
        explained = diff & tied.any(0)
        total += int(diff.sum())
        at_ties += int(explained.sum())
        rest = err[~explained]
        max_other = max(max_other, float(rest.max()) if rest.numel() else 0.0)
    return {
        "max_abs_diff": max_all,
        "max_abs_diff_outside_ties": max_other,
        "elements_differing": total,
        "differing_at_threshold_ties": at_ties,
        "unexplained": total - at_ties,
        "tied_entries_beyond_k": extra_tied,
        "identical": total - at_ties == 0,
    }


def compare_with_fusionbench(ours, theirs, base, experts, fb_kth, threshold_backend) -> dict:
    """Elementwise comparison; every differing element must be explained by one of the two rule differences:

    - an entry FusionBench keeps and we do not: its threshold is the (⌊ρN⌋+1)-th largest, ours the
      max(1, ⌊ρN⌋)-th;
    - a column whose kept entries sum to exactly 0 (e.g. two tasks with δ and −δ): FusionBench gives it the
      model's majority sign, we count 0 as +; the results differ where the majority sign is −.
    """
    names, bases, expert_lists = ordered_lists(base, experts)
    thresholds = mk.magnitude_thresholds(bases, expert_lists, density=DENSITY, trim_scope="model",
                                         backend=threshold_backend).cpu()[0].float()
    fb_kth = fb_kth.cpu().float()
    total = by_extra = by_zero_sum = only_fb = zero_sum_columns = 0
    sign_total = 0
    max_all = max_other = 0.0
    for t, name in enumerate(names):
        a, b = ours[name], theirs[name]
        d = torch.stack([e[t].reshape(-1).float() - bases[t].reshape(-1).float() for e in expert_lists]).cpu()
        mags = d.abs()
        kept_fb = mags >= fb_kth[:, None]
        kept_only_by_fb = kept_fb & (mags < thresholds[:, None])  # (K, n)
        column_sum = torch.where(kept_fb, d, torch.zeros_like(d)).sum(0)
        sign_total += int(torch.sign(column_sum).sum())
        zero_sum = (column_sum == 0) & (kept_fb & (d != 0)).any(0)
        only_fb += int(kept_only_by_fb.sum())
        zero_sum_columns += int(zero_sum.sum())
        diff = differing(a, b).reshape(-1).cpu()
        err = (a.float() - b.float()).abs().reshape(-1).cpu()
        max_all = max(max_all, float(err.max()) if err.numel() else 0.0)
        extra = diff & kept_only_by_fb.any(0)
        zs = diff & zero_sum & ~extra
        total += int(diff.sum())
        by_extra += int(extra.sum())
        by_zero_sum += int(zs.sum())
        rest = err[~(extra | zs)]
        max_other = max(max_other, float(rest.max()) if rest.numel() else 0.0)
    return {
        "max_abs_diff": max_all,
        "max_abs_diff_elsewhere": max_other,
        "elements_differing": total,
        "entries_kept_only_by_fusionbench": only_fb,
        "differing_at_those_entries": by_extra,
        "zero_sum_columns": zero_sum_columns,
        "majority_sign": "+" if sign_total > 0 else "-" if sign_total < 0 else "0",
        "differing_at_zero_sum_columns": by_zero_sum,
        "unexplained": total - by_extra - by_zero_sum,
    }


# --------------------------------------------------------------------------- targets


def evaluate_targets(suite: Suite, copy_gbps: float) -> None:
    fast = fast_backend(suite.device)
    f32 = [r for r in suite.records if "float32" in r.case]
    ties = next((r for r in f32 if r.op.startswith("ties[tensor]") and r.provider == fast), None)
    mk_check = next((v for k, v in suite.checks.items() if k.startswith("ties[tensor] float32") and fast in k), None)
    if ties is None or ties.speedup_vs_peer is None:
        suite.targets.append((f"{fast} TIES >= {TARGET_TIES_SPEEDUP:.0f}x mergekit-style at identical output", None,
                              f"not measured ({fast} rows skipped)"))
    else:
        identical = bool(mk_check and mk_check["identical"])
        ok = ties.speedup_vs_peer >= TARGET_TIES_SPEEDUP and identical
        detail = (f"{ties.speedup_vs_peer:.1f}x; output "
                  + (f"identical ({mk_check['differing_at_threshold_ties']} elements differ only at threshold ties, "
                     f"max|d| elsewhere {mk_check['max_abs_diff_outside_ties']:.1e})" if identical
                     else f"NOT identical ({mk_check and mk_check['unexplained']} unexplained differences)"))
        suite.targets.append((f"{fast} TIES >= {TARGET_TIES_SPEEDUP:.0f}x mergekit-style at identical output", ok,
                              detail))
    ta = next((r for r in f32 if r.op == "task_arithmetic" and r.provider == fast), None)
    name = f"{fast} task arithmetic >= {TARGET_TA_COPY_FRACTION:.0%} of copy bandwidth"
    if ta is None:
        suite.targets.append((name, None, f"not measured ({fast} rows skipped)"))
    else:
        frac = ta.gbps / copy_gbps
        suite.targets.append((name, frac >= TARGET_TA_COPY_FRACTION,
                              f"{ta.gbps:.1f} GB/s = {frac:.0%} of {copy_gbps:.1f} GB/s"))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="~1M parameters per model (quick smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the records and checks as JSON")
    parser.add_argument("--tasks", type=int, default=4, help="number of experts K (default 4)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="merging_kernels")
    torch.manual_seed(0)
    label = device_name(args.device)
    suite = Suite(args.device, label, args.quick)
    width = 256 if args.quick else 1024
    copy_numel = (8 if args.quick else 64) * 2**20

    suite.say(f"command: python {' '.join(sys.argv)}")
    suite.say(f"date:    {datetime.datetime.now().isoformat(timespec='seconds')}")
    suite.say(f"device:  {label}")
    suite.say(f"host:    {platform.node()} {platform.platform()}; python {platform.python_version()}, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    suite.say(f"merging_kernels {mk.__version__}, build_info: {mk.build_info()}")
    suite.say(f"code:    {_code_line()}")
    suite.say(f"load:    {_load_line()}")

    suite.say("\nmemory copy (the bandwidth limit)")
    copy_gbps = copy_bandwidth(suite, copy_numel)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    for dtype in dtypes:
        bench_models(suite, dtype, width, args.tasks)
    fill_ratios(suite.records, copy_gbps)
    evaluate_targets(suite, copy_gbps)

    print()
    print(format_table(suite.records))
    print()
    print(f"bytes: TA and DARE rows: {BYTES_RULES['exact']}; TIES rows (GB/s marked *): {BYTES_RULES['lower bound']}; "
          f"memory copy: {BYTES_RULES['copy']}. % copy = GB/s / {copy_gbps:.1f} GB/s (best copy above).")
    print("x ref / x peer: median time of the torch reference / the peer divided by this row's median (same run).")
    print(f"settings: TA lambda=0.3 each; TIES[tensor] density={DENSITY}, weights 1.0,0.9,..., lambda=1 (mergekit); "
          f"TIES[model] density={DENSITY}, weights 1, scale {FUSIONBENCH_SCALE} (FusionBench); DARE p={DROP_RATE}.")
    for note in suite.notes:
        print(f"note: {note}")
    print("\noutput checks:")
    for name, check in suite.checks.items():
        print(f"  {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in check.items()))
    print(f"load at the end: {_load_line()}")
    print("\ntargets:")
    for name, ok, detail in suite.targets:
        print(f"  {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {detail}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({
                "command": " ".join(sys.argv), "device": label, "torch": torch.__version__,
                "build_info": {k: str(v) for k, v in mk.build_info().items()}, "copy_gbps": copy_gbps,
                "records": [r.to_dict() for r in suite.records], "checks": suite.checks, "notes": suite.notes,
                "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in suite.targets],
            }, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _code_line() -> str:
    """The git commit of the checkout, whether the library's sources differ from it, and when _C was built."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import subprocess

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "merging_kernels", "csrc", "python"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "unknown", ""
    line = f"git {head or 'unknown'}" + (" + uncommitted changes in merging_kernels/csrc/python" if dirty else "")
    native = getattr(mk._native, "_module", None)
    path = getattr(native, "__file__", None)
    if path and os.path.exists(path):
        built = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")
        line += f"; _C built {built}"
    return line


def _load_line() -> str:
    """The 1/5/15-minute load averages against the core count: other processes share the memory bus."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    cores = os.cpu_count() or 1
    busy = " (busy machine: other processes compete for cores and memory bandwidth)" if one > cores else ""
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {cores} cores{busy}"


def _fmt(v):
    return f"{v:.2e}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
