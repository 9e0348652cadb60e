"""Linear assignment side by side: merging_kernels (native) vs its torch reference, scipy, lap and lapjv, in one run.

    python benchmarks/run_linear_assignment.py [--device cpu|cuda] [--quick] [--sizes 256,1024,2048,4096]
                                               [--ref-max-n 1024]

Sections:
  1. CPU, one problem, n x n, for n in --sizes and four cost kinds: uniform random; two
     correlation-derived ones (cost = -corr of two sets of features): "corr-latent" (features driven
     by a shared low-rank signal, no unit-to-unit correspondence) and "corr-perm" (the second set a
     noisy permutation of the first: units do correspond); and "mlp-digits" (-corr of the hidden
     units of two MLPs of width n trained from different seeds on sklearn's digits: MuDSC's workload).
  2. CPU, a problem solved again after a small change (cost + delta * std * noise), as MuDSC's sweeps do:
     scipy, native from scratch, and native warm-started from the first problem's duals (warm_start=).
  3. CPU, batches: 1000 x 64x64 and 64 x 256x256 uniform problems, native (OpenMP over problems, and
     one thread) vs a Python loop over each peer.
  4. GPU (--device cuda): 4096 x 64x64 and 256 x 256x256 batches, and one 4096 x 4096 problem, vs
     the scipy loop / scipy on this machine's CPU.
The torch reference (``linear_sum_assignment(..., backend="torch")``: the tests' oracle, shortest
augmenting paths written as a Python loop over torch ops, on one torch thread) is timed in sections 1
and 3 where it finishes in seconds: single problems with n <= --ref-max-n (default 1024; 0 turns it
off), each batch in full (its first, checked call plus one more: about 15 s and 7 s a call). Its
column "x ref" is torch reference time / native time. Not in section 2 (it has no warm start)
nor 4 (on a GPU the reference would synchronize on every step of every path).
Every time is a median of repeats after a warm-up call (wall clock; the native single-problem solve
is single-threaded like the peers). Each solver's total cost is checked against scipy's. Ratios are
peer time / native time from the same run; PASS/FAIL lines restate the targets.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import merging_kernels as mk
except ImportError:  # not installed: run from a source checkout
    sys.path.insert(1, os.path.dirname(HERE))
    import merging_kernels as mk

from common import commit_line, machine_line, measure_cpu, package_version, print_targets  # noqa: E402
from merging_kernels.ops import linear_assignment as la  # noqa: E402

from scipy.optimize import linear_sum_assignment as scipy_lsa  # noqa: E402

try:
    import lap
except ImportError:
    lap = None
try:
    import lapjv
except ImportError:
    lapjv = None


# --------------------------------------------------------------------------- costs


def cost_uniform(n, rng):
    return rng.random((n, n))


def _standardize(x):
    return (x - x.mean(0)) / (x.std(0) + 1e-12)


def cost_corr_latent(n, rng):
    samples, k = 2 * n, max(4, n // 8)
    z = rng.standard_normal((samples, k))
    a = z @ rng.standard_normal((k, n)) + rng.standard_normal((samples, n))
    b = z @ rng.standard_normal((k, n)) + rng.standard_normal((samples, n))
    return np.ascontiguousarray(-(_standardize(a).T @ _standardize(b)) / samples)


def cost_corr_perm(n, rng):
    samples, k = 2 * n, max(8, n // 16)
    z = rng.standard_normal((samples, k))
    a = z @ rng.standard_normal((k, n)) / np.sqrt(k) + 0.5 * rng.standard_normal((samples, n))
    b = a[:, rng.permutation(n)] + rng.standard_normal((samples, n))
    return np.ascontiguousarray(-(_standardize(a).T @ _standardize(b)) / samples)


def cost_mlp_digits(n, rng, steps=30):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    acts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, n), torch.nn.ReLU(), torch.nn.Linear(n, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            acts.append(net[1](net[0](x)).double().numpy())
    a, b = (_standardize(h) for h in acts)
    return np.ascontiguousarray(-(a.T @ b) / x.shape[0])


KINDS = {"uniform": cost_uniform, "corr-latent": cost_corr_latent, "corr-perm": cost_corr_perm,
         "mlp-digits": cost_mlp_digits}


# --------------------------------------------------------------------------- solvers (each returns a column per row)


def solve_native(c):
    return mk.linear_sum_assignment(c)[1]


def solve_scipy(c):
    return scipy_lsa(c)[1]


def solve_lap(c):
    return lap.lapjv(c)[1]


def solve_lapjv(c):
    return lapjv.lapjv(c)[0]


def solve_torch_ref(c):
    """The torch reference through the public API, on one torch thread like every other single-problem solver."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mk.linear_sum_assignment(c, backend="torch")[1]
    finally:
        torch.set_num_threads(threads)


REF = "torch ref"


def single_solvers():
    out = [("native", solve_native), ("scipy", solve_scipy)]
    if lap is not None:
        out.append(("lap", solve_lap))
    if lapjv is not None:
        out.append(("lapjv", solve_lapjv))
    return out


# --------------------------------------------------------------------------- timing


def timed(fn, quick, first_s=0.0):
    """Medians of wall-clock and process CPU time over repeats after a warm-up call (fewer for slow calls:
    no warm-up and two repeats above 5 s per call); see common.measure_cpu."""
    if first_s > 5.0:
        return measure_cpu(fn, repeats=2, min_repeats=2, budget_s=5.0 if quick else 20.0, warmup=0,
                           collect_each=False)
    return measure_cpu(fn, repeats=3 if quick else 7, min_repeats=2, budget_s=5.0 if quick else 20.0, warmup=1,
                       collect_each=False)


def first_call(fn):
    """(result, wall s, process CPU s) of one call (the checked call, which is also the warm-up)."""
    gc.collect()
    gc.disable()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        gc.enable()
    return out, t1 - t0, c1 - c0


def timed_ref(fn, first_wall, first_cpu):
    """The torch reference (up to 2 s a call for single problems, 7-15 s for a batch). As in run.py, a call of
    a second or more gets no separate warm-up: its checked first call counts as a repeat, with 2 more timed
    calls (1 more above 5 s); faster ones get 3 repeats after the checked call."""
    if first_wall >= 1.0:
        repeats = 2 if first_wall > 5.0 else 3
        return measure_cpu(fn, repeats=repeats, min_repeats=repeats, warmup=0, collect_each=False,
                           prior=(first_wall, first_cpu))
    return measure_cpu(fn, repeats=3, min_repeats=3, warmup=0, collect_each=False)


def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def fmt_x(x):
    return "-" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x")


def table(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def cpu_single(sizes, kinds, quick, targets, ref_max_n):
    """One problem per call; every solver single-threaded: ratios from CPU time (wall clock also shown).
    The torch reference only for n <= ref_max_n ("-" above)."""
    names = [name for name, _ in single_solvers()]
    header = (["kind", "n"] + [f"{name} cpu ms" for name in names] + [f"{REF} cpu ms", "x ref"]
              + [f"{p}/native" for p in names[1:]] + [f"{name} wall ms" for name in names] + [f"{REF} wall ms", "check"])
    rows = []
    for kind in kinds:
        for n in sizes:
            c = KINDS[kind](n, np.random.default_rng(n))
            ref_total = None
            times = {}
            checks = []
            solvers = single_solvers() + ([(REF, solve_torch_ref)] if n <= ref_max_n else [])
            for name, fn in solvers:
                cols, first, first_cpu = first_call(lambda: fn(c))
                total = float(c[np.arange(n), np.asarray(cols)].sum())
                if name == "scipy":
                    ref_total = total
                else:
                    checks.append((name, total))
                times[name] = (timed_ref(lambda: fn(c), first, first_cpu) if name == REF
                               else timed(lambda: fn(c), quick, first))
                print(f"  {kind:<12} n={n:<5} {name:<9} cpu {fmt_ms(times[name].cpu):>9} ms  wall "
                      f"{fmt_ms(times[name].wall):>9} ms  ({times[name].repeats} repeats)", flush=True)
            bad = [name for name, total in checks if abs(total - ref_total) > 1e-9 * max(1.0, abs(ref_total))]
            check = "totals = scipy" if not bad else "DIFFERS: " + ",".join(bad)
            ratios = [times[p].cpu / times["native"].cpu for p in names[1:]]
            has_ref = REF in times
            x_ref = times[REF].cpu / times["native"].cpu if has_ref else None
            rows.append([kind, str(n)] + [fmt_ms(times[p].cpu) for p in names]
                        + [fmt_ms(times[REF].cpu) if has_ref else "-", fmt_x(x_ref)] + [fmt_x(r) for r in ratios]
                        + [fmt_ms(times[p].wall) for p in names] + [fmt_ms(times[REF].wall) if has_ref else "-", check])
            targets.append((f"CPU {kind} n={n}: native fastest of {'/'.join(names)}", min(ratios) >= 1.0,
                            f"best peer / native = {fmt_x(min(ratios))} (CPU time), "
                            f"{fmt_x(min(times[p].wall for p in names[1:]) / times['native'].wall)} (wall)"))
            if n >= 1024:
                targets.append((f"CPU {kind} n={n}: native >= 2x scipy", ratios[0] >= 2.0,
                                f"{fmt_x(ratios[0])} (CPU time), {fmt_x(times['scipy'].wall / times['native'].wall)}"
                                " (wall)"))
            if bad:
                targets.append((f"CPU {kind} n={n}: totals equal scipy's", False, ",".join(bad)))
    return table(header, rows)


def cpu_small_calls(quick):
    """Small single problems, where a call's fixed cost (argument checks, allocations) can outweigh the solve:
    the time of one call averaged over a loop of calls on the same problem, as a scipy user's loop would make."""
    names = [name for name, _ in single_solvers()]
    header = ["n"] + [f"{p} us/call" for p in names] + [f"{p}/native" for p in names[1:]]
    rows = []
    for n in (8, 32, 64):
        c = cost_uniform(n, np.random.default_rng(n))
        calls = 200 if quick else 1000
        per_call = {}
        for name, fn in single_solvers():
            loop = lambda fn=fn: [fn(c) for _ in range(calls)]  # noqa: E731
            per_call[name] = timed(loop, quick).cpu / calls
        rows.append([str(n)] + [f"{per_call[p] * 1e6:.1f}" for p in names]
                    + [fmt_x(per_call[p] / per_call["native"]) for p in names[1:]])
    return table(header, rows)


def cpu_warm_resolves(sizes, kinds, quick):
    """A problem solved again after a small change (MuDSC's sweeps re-solve each group's similarity after its
    neighbours moved): cost C' = C + delta * std(C) * noise, solved by scipy, by the native solver from scratch,
    and by the native solver warm-started from C's column duals (``warm_start=v``). One thread, CPU time."""
    header = ["kind", "n", "delta", "scipy cpu ms", "cold cpu ms", "warm cpu ms", "cold/warm", "scipy/warm", "check"]
    rows = []
    for kind in kinds:
        for n in sizes:
            rng = np.random.default_rng(n + 7)
            c = KINDS[kind](n, np.random.default_rng(n))
            v = mk.linear_sum_assignment(c, return_duals=True)[3]
            for delta in (1e-3, 1e-2, 1e-1):
                c2 = np.ascontiguousarray(c + delta * c.std() * rng.standard_normal(c.shape))
                want = float(c2[scipy_lsa(c2)].sum())
                solvers = {"scipy": lambda: scipy_lsa(c2)[1], "cold": lambda: mk.linear_sum_assignment(c2)[1],
                           "warm": lambda: mk.linear_sum_assignment(c2, warm_start=v)[1]}
                times, bad = {}, []
                for name, fn in solvers.items():
                    got = float(c2[np.arange(n), fn()].sum())
                    if abs(got - want) > 1e-9 * max(1.0, abs(want)):
                        bad.append(name)
                    times[name] = timed(fn, quick)
                rows.append([kind, str(n), f"{delta:g}", fmt_ms(times["scipy"].cpu), fmt_ms(times["cold"].cpu),
                             fmt_ms(times["warm"].cpu), fmt_x(times["cold"].cpu / times["warm"].cpu),
                             fmt_x(times["scipy"].cpu / times["warm"].cpu),
                             "totals = scipy" if not bad else "DIFFERS: " + ",".join(bad)])
                print(f"  warm {kind:<12} n={n:<5} delta={delta:g}: " + ", ".join(
                    f"{k} cpu {fmt_ms(t.cpu)} ms" for k, t in times.items()), flush=True)
    return table(header, rows)


def cpu_batches(quick, targets, with_ref):
    """Batches: native with its OpenMP threads (wall clock) and with one thread (CPU time), vs the torch reference
    (with_ref; a loop over the problems, one torch thread) and Python loops over each peer (single-threaded: CPU
    time; wall also shown)."""
    threads = (mk.build_info().get("max_threads") or 1)
    header = ["batch", "shape", f"native {threads} thr wall ms", "native 1 thr cpu ms", f"{REF} cpu ms",
              "scipy loop cpu ms", "lap loop cpu ms", "lapjv loop cpu ms", "x ref", "scipy/native", "best peer/native",
              "scipy loop wall ms"]
    rows = []
    for batch, n in [(1000, 64), (64, 256)]:
        c = np.random.default_rng(batch).random((batch, n, n))
        native = lambda: mk.linear_sum_assignment(c)  # noqa: E731
        t = torch.from_numpy(c)
        native1 = lambda: la._solve_native_cpu(t, False, torch.float64, False, num_threads=1)  # noqa: E731
        loops = {"scipy": lambda: [scipy_lsa(x) for x in c]}
        if lap is not None:
            loops["lap"] = lambda: [lap.lapjv(x) for x in c]
        if lapjv is not None:
            loops["lapjv"] = lambda: [lapjv.lapjv(x) for x in c]
        got = mk.linear_sum_assignment(c)[1]
        want = np.stack([scipy_lsa(x)[1] for x in c])
        totals_ok = np.allclose(np.take_along_axis(c, got[:, :, None], 2).sum((1, 2)),
                                np.take_along_axis(c, want[:, :, None], 2).sum((1, 2)), rtol=1e-12, atol=0)
        times = {"native": timed(native, quick), "native1": timed(native1, quick)}
        for name, fn in loops.items():
            times[name] = timed(fn, quick)
        if with_ref:  # the torch reference: a Python loop over the problems (seconds per call)
            ref = lambda: la._solve_torch(t, False, torch.float64, True)  # noqa: E731
            saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out, first, first_cpu = first_call(ref)
                ref_cols = out[1].numpy()
                times[REF] = timed_ref(ref, first, first_cpu)
            finally:
                torch.set_num_threads(saved_threads)
            totals_ok = totals_ok and np.allclose(np.take_along_axis(c, ref_cols[:, :, None], 2).sum((1, 2)),
                                                  np.take_along_axis(c, want[:, :, None], 2).sum((1, 2)),
                                                  rtol=1e-12, atol=0)
        # the native time: the better of the threaded wall clock and the one-thread CPU time
        best_native = min(times["native"].wall, times["native1"].cpu)
        peers = [times[p].cpu for p in ("scipy", "lap", "lapjv") if p in times]
        rows.append([str(batch), f"{n}x{n}", fmt_ms(times["native"].wall), fmt_ms(times["native1"].cpu),
                     fmt_ms(times[REF].cpu) if REF in times else "-",
                     fmt_ms(times["scipy"].cpu), fmt_ms(times["lap"].cpu) if "lap" in times else "-",
                     fmt_ms(times["lapjv"].cpu) if "lapjv" in times else "-",
                     fmt_x(times[REF].cpu / best_native) if REF in times else "-",
                     fmt_x(times["scipy"].cpu / best_native), fmt_x(min(peers) / best_native),
                     fmt_ms(times["scipy"].wall)])
        print(f"  batch {batch} x {n}x{n}: " + ", ".join(f"{k} wall {fmt_ms(v.wall)} / cpu {fmt_ms(v.cpu)} ms"
                                                          for k, v in times.items()), flush=True)
        targets.append((f"CPU batch {batch} x {n}x{n}: native >= 10x the scipy loop",
                        times["scipy"].cpu >= 10 * best_native,
                        f"{fmt_x(times['scipy'].cpu / best_native)}; one thread alone: "
                        f"{fmt_x(times['scipy'].cpu / times['native1'].cpu)}"))
        if not totals_ok:
            targets.append((f"CPU batch {batch} x {n}x{n}: totals equal scipy's", False, ""))
    return table(header, rows)


def gpu_section(quick, targets):
    header = ["case", "shape", "native cuda ms", "scipy (CPU) ms", "scipy/native"]
    rows = []
    cases = [("batch", 4096, 64), ("batch", 256, 256), ("single", 1, 4096)]
    for label, batch, n in cases:
        c = np.random.default_rng(n).random((batch, n, n))
        tc = torch.from_numpy(c).cuda()
        fn = (lambda: mk.linear_sum_assignment(tc)) if batch > 1 else (lambda: mk.linear_sum_assignment(tc[0]))

        def run_gpu():
            out = fn()
            torch.cuda.synchronize()
            return out

        out = run_gpu()
        cols = out[1].cpu().numpy().reshape(batch, n)
        ref = [scipy_lsa(x)[1] for x in c]
        ok = all(abs(c[b][np.arange(n), cols[b]].sum() - c[b][np.arange(n), ref[b]].sum()) <= 1e-9 * n
                 for b in range(batch))
        t_gpu = timed(run_gpu, quick).wall
        t0 = time.perf_counter()
        for x in c:
            scipy_lsa(x)
        t_cpu = time.perf_counter() - t0
        rows.append([label, f"{batch} x {n}x{n}", fmt_ms(t_gpu), fmt_ms(t_cpu), fmt_x(t_cpu / t_gpu)])
        print(f"  {label} {batch} x {n}x{n}: cuda {fmt_ms(t_gpu)} ms, scipy {fmt_ms(t_cpu)} ms", flush=True)
        need = 50.0 if batch > 1 else 1.0
        targets.append((f"GPU {batch} x {n}x{n}: >= {need:g}x scipy on this CPU", t_cpu >= need * t_gpu,
                        fmt_x(t_cpu / t_gpu)))
        if not ok:
            targets.append((f"GPU {batch} x {n}x{n}: totals equal scipy's", False, ""))
    return table(header, rows)


# uncommitted changes to these mark the commit line
LSA_SOURCES = ["csrc/cpu/linear_assignment.cpp", "csrc/cpu/linear_assignment.h", "csrc/common/lsa_team.h", "csrc/cuda",
               "python/linear_assignment_binding.cpp", "merging_kernels/ops/linear_assignment.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="sizes 256,1024, fewer repeats")
    parser.add_argument("--sizes", default=None, help="comma-separated n for the single-problem section")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated cost kinds")
    parser.add_argument("--sections", default="single,small,warm,batches",
                        help="CPU sections to run (comma-separated): single, small, warm, batches")
    parser.add_argument("--ref-max-n", type=int, default=1024,
                        help="time the torch reference on single problems up to this n (default 1024; seconds per "
                             "call there), and on the batches unless 0")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("256,1024" if args.quick else "256,1024,2048,4096")).split(",")]
    kinds = args.kinds.split(",")
    info = mk.build_info()
    if not info.get("available"):
        print(f"merging_kernels._C is not built ({info.get('error')}); nothing to measure")
        return 1
    print(f"# merging_kernels linear assignment, {datetime.date.today().isoformat()}")
    print(f"# command: python benchmarks/run_linear_assignment.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# machine: {machine_line(args.device)}")
    print(f"# versions: torch {torch.__version__}, numpy {np.__version__}, scipy {package_version('scipy')}, "
          f"lap {package_version('lap') if lap else 'absent'}, lapjv {package_version('lapjv') if lapjv else 'absent'}; "
          f"merging_kernels at {commit_line(LSA_SOURCES)}; _C: {info}")
    print("# times: medians after a warm-up call, of wall clock and of process CPU time; single problems run on one")
    print("# thread in every solver, so their ratios use CPU time (immune to time spent descheduled on a shared")
    print("# machine); the wall clock is listed beside it")
    if args.device == "cpu":
        print(f"# torch reference (backend=\"torch\", the tests' oracle; one torch thread): single problems with "
              f"n <= {args.ref_max_n}" + (", and the batches" if args.ref_max_n > 0 else "") + "; its checked first "
              "call is the warm-up (and counts as a repeat at 1 s or more), 2-3 repeats")
    targets: list[tuple[str, bool, str]] = []
    sections = []
    chosen = set(args.sections.split(","))
    if args.device == "cpu" and chosen - {"single", "small", "warm", "batches"}:
        parser.error(f"--sections: unknown {sorted(chosen - {'single', 'small', 'warm', 'batches'})}")
    if args.device == "cpu":
        if "single" in chosen:
            print("\n== CPU, one problem ==", flush=True)
            sections.append(("CPU, one n x n problem (float64); x ref = torch reference / native (CPU time)",
                             cpu_single(sizes, kinds, args.quick, targets, args.ref_max_n)))
        if "small" in chosen:
            sections.append(("CPU, small single problems (float64, uniform): CPU time per call in a loop of calls",
                             cpu_small_calls(args.quick)))
    if args.device == "cpu" and "warm" in chosen:
        print("\n== CPU, re-solves of a changed problem (warm start) ==", flush=True)
        sections.append(("CPU, C' = C + delta * std(C) * N(0, 1) solved again (float64): scipy, native from scratch, "
                         "native with warm_start = C's column duals",
                         cpu_warm_resolves([n for n in sizes if n >= 1024][:2] or sizes[:1],
                                           [k for k in kinds if k in ("uniform", "corr-latent", "mlp-digits")]
                                           or kinds[:1],
                                           args.quick)))
    if args.device == "cpu" and "batches" in chosen:
        print("\n== CPU, batches ==", flush=True)
        sections.append(("CPU, batches of uniform problems (float64); x ref = torch reference (one thread, CPU time) / "
                         "the better native time", cpu_batches(args.quick, targets, args.ref_max_n > 0)))
    if args.device != "cpu":
        if not torch.cuda.is_available() or not info.get("cuda"):
            print("no CUDA device, or _C built without CUDA kernels")
            return 1
        print("\n== GPU ==", flush=True)
        sections.append(("GPU (native CUDA) vs scipy on this machine's CPU", gpu_section(args.quick, targets)))
    for title, text in sections:
        print(f"\n## {title}\n{text}")
    print_targets(targets, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
