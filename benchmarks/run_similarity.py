"""Similarity ops side by side: merging_kernels vs its float64 torch reference, the way MuDSC/ZipIt code does it
and numpy, in one run.

    python benchmarks/run_similarity.py [--device cpu|cuda] [--quick]

Sections:
  1. Streaming activation statistics (two models, C features each, batches of 256 rows): ours
     (ActivationStats: shifted moments, upper-triangle fp32 GEMMs flushed into float64) vs the
     ZipIt/MuDSC-reference style (per batch: sum += z, outer += zᵀz in fp32 torch; at the end
     cov = outer/N − μμᵀ, corr = cov/σσᵀ) vs numpy np.corrcoef on all activations at once (not
     streaming: it must keep every row). A second case adds a mean of 300 to every feature (post-
     activation features with large offsets) to show what the fp32 textbook formula loses.
  2. Weight-space correlation between rows (correlation_matrix): self (y None) and cross, vs
     "torch naive" (normalize in fp32, one matmul) and np.corrcoef; the fp32 matmul of the same
     shape is listed as the limit (its GFLOP/s is the machine's GEMM throughput).
  3. group_similarity, 12 heads of 64 (144 assignment problems 64×64 in one batched solve) vs a
     scipy loop over the 144 blocks.
  4. greedy_zip (MuDSC's and ZipIt's zip of 2n units into n) on the correlation of 2n units: ours
     (native C++, row maxima kept up to date) and the numpy version of the same algorithm (the default
     where _C is not built) vs the ZipIt-style loop (a full argmax of the matrix per merge, in torch).
Every case also times the torch reference the tests use as the oracle ("torch (reference)": float64
throughout): activation_correlation_torch on all rows at once (one-shot, not streaming),
correlation_matrix_torch, and group_similarity_torch (one torch-reference assignment solve per block);
"x ref" is its time / the row's time.
--device cuda instead: sections 1 and 2 on the GPU (8 batches of 4096 rows, C up to 2048; n up to 4096,
d up to 8192),
ours (Triton) vs the float64 torch reference on the GPU and the same fp32 work in plain torch, with the fp32
GEMM of the same shape as the limit ("% of matmul"); wall-clock medians between device synchronizes.
Every provider runs on --threads threads (default 1). GFLOP/s counts the useful work of a full product (2·rows·cols·depth), so a path that computes only
half of a symmetric result can exceed the GEMM limit. "max |Δ|" is against the float64 reference
computed on the same data. Ratios are peer time / ours from medians taken in this run.
"""

from __future__ import annotations

import argparse
import datetime
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
from common import measure as measure_wall  # noqa: E402
from mudsc_reference import reference_greedy_zip  # noqa: E402
from peers import group_similarity_scipy_loop  # noqa: E402

from merging_kernels.ops import similarity as sim  # noqa: E402
from merging_kernels.ops import zip_matching as zm  # noqa: E402

# --------------------------------------------------------------------------- data


def activations(n_rows: int, channels: int, models: int, *, mean: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """Features of `models` models on the same inputs: a shared low-rank signal plus noise, ReLU'd, plus `mean`."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_rows, 32, generator=g)
    out = []
    for _ in range(models):
        f = latent @ torch.randn(32, channels, generator=g) / 32 ** 0.5 + torch.randn(n_rows, channels, generator=g)
        out.append(torch.relu(f) + mean)
    return out


def weight_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.02 * (torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) / 4 + torch.randn(n, d, generator=g))


# --------------------------------------------------------------------------- peers


def zipit_style_correlation(batches) -> torch.Tensor:
    """The ZipIt / MuDSC-reference style: fp32 running sums of z and zᵀz, cov = E[zzᵀ] − μμᵀ at the end."""
    total = outer = None
    count = 0
    for feats in batches:
        z = torch.cat(feats, dim=1).float()
        if total is None:
            total = z.new_zeros(z.shape[1])
            outer = z.new_zeros(z.shape[1], z.shape[1])
        total += z.sum(0)
        outer += z.T @ z
        count += z.shape[0]
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    std = cov.diagonal().clamp(min=0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (cov / torch.outer(std, std)).clamp(-1, 1)


def ours_streaming(batches, dims, device="cpu", backend="torch") -> torch.Tensor:
    stats = mk.ActivationStats(dims, device=device, backend=backend)
    for feats in batches:
        stats.update(*feats)
    return stats.correlation()


def numpy_corrcoef_all(features) -> np.ndarray:
    z = np.concatenate([f.numpy() for f in features], axis=1)
    return np.corrcoef(z, rowvar=False)


def torch_naive_corr(x, y=None):
    def norm(a):
        a = a - a.mean(1, keepdim=True)
        return a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)

    xn = norm(x)
    return xn @ (xn if y is None else norm(y)).T


def numpy_corr(x, y=None):
    if y is None:
        return np.corrcoef(x.numpy())
    n = x.shape[0]
    return np.corrcoef(x.numpy(), y.numpy())[:n, n:]


# --------------------------------------------------------------------------- timer


def measure(fn, *, repeats=7, budget_s=20.0):
    """Medians of wall clock and process CPU time after a warm-up call (fewer repeats, at least 3, once
    the budget is spent). With one thread the CPU time excludes time spent descheduled by other jobs."""
    return measure_cpu(fn, repeats=repeats, min_repeats=3, budget_s=budget_s, warmup=1, collect_each=True)


def measure_ref(fn, first_s):
    """The torch reference (up to seconds per call): 3 repeats, 2 once 5 s are spent; its first, checked call
    (first_s seconds) is the warm-up when it took over a second."""
    return measure_cpu(fn, repeats=3, min_repeats=2, budget_s=5.0, warmup=0 if first_s > 1.0 else 1,
                       collect_each=True)


REF = "torch (reference)"


def run_providers(providers, want, quick, budget):
    """{name: (timing, max |Δ| vs want)} for (name, fn) pairs; the reference with measure_ref."""
    results = {}
    for name, fn in providers:
        t0 = time.perf_counter()
        err = err_vs(fn(), want)
        first = time.perf_counter() - t0
        timing = measure_ref(fn, first) if name.startswith(REF) else measure(fn, repeats=5 if quick else 7,
                                                                             budget_s=budget)
        results[name] = (timing, err)
    return results


# --------------------------------------------------------------------------- table


def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def fmt_x(x):
    return "-" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def table(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    left = {0, 1, 2}
    lines = ["  ".join(h.ljust(w) if i in left else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
             "  ".join("-" * w for w in widths)]
    previous = None
    for r in rows:
        if previous is not None and (r[0], r[1]) != previous:
            lines.append("")
        previous = (r[0], r[1])
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


HEADER = ["op", "case", "provider", "cpu ms", "wall ms", "GFLOP/s", "x ref", "peer1/ours", "peer2/ours", "reps",
          "max |Δ| vs fp64"]


def add_rows(rows, op, case, results, flops, peers, targets):
    """results: {provider: (Timing, max_err)}; the first provider is ours; peers: the two names for the ratio columns."""
    ours = next(iter(results))
    t_ours = results[ours][0].cpu
    ref = next((name for name in results if name.startswith(REF)), None)
    for name, (timing, err) in results.items():
        x_ref = "-" if ref is None or name.startswith("limit") else fmt_x(results[ref][0].cpu / timing.cpu)
        ratios = []
        for p in (list(peers) + [None, None])[:2]:
            if name == ours and p in results:
                ratios.append(fmt_x(results[p][0].cpu / t_ours))
            else:
                ratios.append("-")
        gflops = f"{flops / timing.cpu / 1e9:.1f}" if flops else "-"
        rows.append([op, case, name, fmt_ms(timing.cpu), fmt_ms(timing.wall), gflops, x_ref, *ratios, str(timing.repeats),
                     "-" if err is None else f"{err:.1e}"])
        print(f"  {op:<18} {case:<28} {name:<26} cpu {fmt_ms(timing.cpu):>9} ms  wall {fmt_ms(timing.wall):>9} ms",
              flush=True)
    for p in peers:
        if p in results:
            targets.append((f"{op} {case}: ours no slower than {p}", results[p][0].cpu >= t_ours,
                            fmt_x(results[p][0].cpu / t_ours) + " (CPU time)"))


def err_vs(got, want) -> float:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    return float((got.cpu().double() - want.cpu().double()).abs().max())


# --------------------------------------------------------------------------- sections


def section_streaming(quick, rows, targets, budget):
    channels = [512] if quick else [512, 1024]
    batches_n = 8 if quick else 16
    batch = 256
    for c in channels:
        for mean in (0.0, 300.0):
            feats = activations(batch * batches_n, c, 2, mean=mean, seed=c)
            batches = [[f[i * batch:(i + 1) * batch] for f in feats] for i in range(batches_n)]
            want = sim.activation_correlation_torch(*feats)
            case = f"M=2 C={c} {batches_n}x{batch} rows" + (f" mean+{mean:g}" if mean else "")
            results = run_providers((("ours (ActivationStats)", lambda: ours_streaming(batches, [c, c])),
                                     (f"{REF} fp64 all rows", lambda: sim.activation_correlation_torch(*feats)),
                                     ("zipit-style fp32 torch", lambda: zipit_style_correlation(batches)),
                                     ("numpy corrcoef (all rows)", lambda: numpy_corrcoef_all(feats))),
                                    want, quick, budget)
            D = 2 * c
            add_rows(rows, "activation corr", case, results, 2.0 * batch * batches_n * D * D,
                     ["zipit-style fp32 torch", "numpy corrcoef (all rows)"], targets)
            if mean:
                ok = results["ours (ActivationStats)"][1] <= 1e-5
                targets.append((f"activation corr {case}: ours within 1e-5 of float64", ok,
                                f"{results['ours (ActivationStats)'][1]:.1e}; zipit-style "
                                f"{results['zipit-style fp32 torch'][1]:.1e}"))


def section_weights(quick, rows, targets, budget):
    shapes = [(1024, 2048)] if quick else [(1024, 2048), (2048, 4096)]
    for n, d in shapes:
        x = weight_rows(n, d, seed=1)
        y = weight_rows(n, d, seed=2)
        for label, other in (("self", None), ("cross", y)):
            want = sim.correlation_matrix_torch(x, other)
            case = f"{label} n={n} d={d}"
            yy = x if other is None else other
            results = run_providers((("ours (correlation_matrix)", lambda: mk.correlation_matrix(x, other, backend="torch")),
                                     (f"{REF} fp64", lambda: sim.correlation_matrix_torch(x, other)),
                                     ("torch naive fp32", lambda: torch_naive_corr(x, other)),
                                     ("numpy corrcoef", lambda: numpy_corr(x, other))),
                                    want, quick, budget)
            results["limit: fp32 matmul x@yT"] = (measure(lambda: x @ yy.T, repeats=5 if quick else 7, budget_s=budget),
                                                  None)
            add_rows(rows, "weight corr", case, results, 2.0 * n * n * d, ["torch naive fp32", "numpy corrcoef"],
                     targets)


def section_groups(quick, rows, targets, budget):
    cases = [(12, 64)] if quick else [(12, 64), (16, 64), (32, 32)]
    for g, s in cases:
        n = g * s
        x = weight_rows(n, 256, seed=3)
        y = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))] + 0.01 * torch.randn(n, 256)
        s_cross = sim.correlation_matrix_torch(x, y)  # float64
        s_np = s_cross.numpy()

        def scipy_loop(s_np=s_np, s=s):
            return group_similarity_scipy_loop(s_np, s)

        want = torch.from_numpy(scipy_loop())
        results = run_providers((("ours (group_similarity)", lambda: mk.group_similarity(s_cross, s)[0]),
                                 (REF, lambda: sim.group_similarity_torch(s_cross, s)[0]),
                                 ("scipy loop", scipy_loop)),
                                want, quick, budget)
        add_rows(rows, "group similarity", f"{g} heads x {s} ({g * g} problems)", results, 0, ["scipy loop"], targets)


def zip_numpy_path(s):
    """greedy_zip as it runs without _C: the checks, the numpy pairs, the matrices."""
    zm._check(s, 0.5, 0.5)
    return zm._matrices(zm._greedy_zip_numpy(s, 0.5), s.shape[0], 0.5, s.device)


def section_zip(quick, rows, targets, budget):
    for m in ([512] if quick else [512, 2048]):
        s = torch.corrcoef(weight_rows(m, 256, seed=m))  # float32, symmetric, 1 on the diagonal
        # each provider returns its unmerge matrix (0/1): any difference in the pairs shows as an error of 1
        providers = [("ours (native)", lambda: zm.greedy_zip(s, backend="native")[1]),
                     ("ours, numpy path (no _C)", lambda: zip_numpy_path(s)[1]),
                     (REF, lambda: zm.greedy_zip_torch(s)[1]),
                     ("zipit-style torch", lambda: reference_greedy_zip(s)[1])]
        if not mk.build_info()["available"]:
            providers = providers[1:]
        results = run_providers(providers, zm.greedy_zip_torch(s)[1], quick, budget)
        add_rows(rows, "greedy zip", f"2n={m}", results, 0, ["zipit-style torch", "ours, numpy path (no _C)"],
                 targets)


def section_gpu(quick, targets, device="cuda", backend="triton"):
    """GPU: ours (Triton) vs the float64 torch reference on the GPU and the same work in plain fp32 torch, read
    against the fp32 GEMM of the same shape (the matmul limit: the Gram products are the whole of the work).
    Returns the table's rows."""
    header = ["op", "case", "provider", "ms", "TFLOP/s", "% of matmul", "x ref", "max |Δ| vs fp64"]
    rows = []

    def add(op, case, flops, results, peer):
        limit = results["limit: fp32 matmul"][0]
        t_ref = results[REF][0]
        for name, (t, err) in results.items():
            rows.append([op, case, name, f"{t * 1e3:.3f}", f"{flops / t / 1e12:.2f}", f"{100 * limit / t:.0f}%",
                         "-" if name.startswith("limit") else fmt_x(t_ref / t), "-" if err is None else f"{err:.1e}"])
            print(f"  {op:<16} {case:<30} {name:<28} {t * 1e3:9.3f} ms", flush=True)
        ours, other = next(iter(results.values()))[0], results[peer][0]
        targets.append((f"{op} {case}: ours no slower than {peer}", ours <= other, fmt_x(other / ours)))

    # sizes keep the float64 CPU references (the error column) to seconds
    batch, batches_n = 4096, (4 if quick else 8)
    for c in ([512] if quick else [1024, 2048]):
        feats = activations(batch * batches_n, c, 2, seed=c)
        want = sim.activation_correlation_torch(*feats)  # float64 on the CPU
        feats = [f.to(device) for f in feats]
        batches = [[f[i * batch:(i + 1) * batch] for f in feats] for i in range(batches_n)]
        zs = [torch.cat(b, 1) for b in batches]
        case = f"M=2 C={c} {batches_n}x{batch} rows"
        results = {}
        for name, fn in (("ours (ActivationStats)", lambda: ours_streaming(batches, [c, c], device, backend)),
                         (REF, lambda: sim.activation_correlation_torch(*feats)),  # float64, on the GPU
                         ("zipit-style fp32 torch", lambda: zipit_style_correlation(batches)),
                         ("limit: fp32 matmul", lambda: [z.T @ z for z in zs])):
            err = None if name.startswith("limit") else err_vs(fn(), want)
            results[name] = (measure_wall(fn, device=device, repeats=5 if quick else 20).median_s, err)
        add("activation corr", case, 2.0 * batch * batches_n * (2 * c) ** 2, results, "zipit-style fp32 torch")
    for n, d in ([(1024, 2048)] if quick else [(2048, 4096), (4096, 8192)]):
        x, y = weight_rows(n, d, seed=1), weight_rows(n, d, seed=2)
        for label, other in (("self", None), ("cross", y)):
            want = sim.correlation_matrix_torch(x, other)
            xd, od = x.to(device), None if other is None else other.to(device)
            yy = xd if od is None else od
            results = {}
            for name, fn in (("ours (correlation_matrix)", lambda: mk.correlation_matrix(xd, od, backend=backend)),
                             (REF, lambda: sim.correlation_matrix_torch(xd, od)),  # float64, on the GPU
                             ("torch naive fp32", lambda: torch_naive_corr(xd, od)),
                             ("limit: fp32 matmul", lambda: xd @ yy.T)):
                err = None if name.startswith("limit") else err_vs(fn(), want)
                results[name] = (measure_wall(fn, device=device, repeats=5 if quick else 20).median_s, err)
            add("weight corr", f"{label} n={n} d={d}", 2.0 * n * n * d, results, "torch naive fp32")
    return table(header, rows)


# --------------------------------------------------------------------------- main


SIMILARITY_SOURCES = ["merging_kernels/ops/similarity.py", "merging_kernels/ops/zip_matching.py"]  # uncommitted changes to it mark the commit line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="one size per section, fewer repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch, numpy's BLAS and _C's OpenMP (default 1: every provider on one "
                             "core, ratios immune to other jobs on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads)
    except ImportError:  # numpy's BLAS then uses its default thread count
        print("# threadpoolctl is not installed: numpy's BLAS threads are not limited")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"# merging_kernels similarity, {datetime.date.today().isoformat()}")
    print(f"# command: python benchmarks/run_similarity.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# machine: {machine_line(args.device)}")
    print(f"# versions: torch {torch.__version__}, numpy {np.__version__}, scipy {package_version('scipy')}; "
          f"merging_kernels at {commit_line(SIMILARITY_SOURCES)}")
    print(f"# times: medians of process CPU time and of wall clock after a warm-up call; {args.threads} thread(s)")
    print("# for torch, numpy's BLAS and _C's OpenMP. Ratios and GFLOP/s use CPU time (with one thread it")
    print("# excludes time spent descheduled on a shared machine).")
    rows: list[list[str]] = []
    targets: list[tuple[str, bool, str]] = []
    if args.device == "cuda":  # the GPU section alone (group similarity's batched solves: the assignment runner's)
        print(f"\n== GPU: {torch.cuda.get_device_name()}; wall-clock medians between device synchronizes ==", flush=True)
        print(section_gpu(args.quick, targets))
        print_targets(targets, args.device)
        return 0
    budget = 5.0 if args.quick else 20.0
    print("\n== streaming activation statistics ==", flush=True)
    section_streaming(args.quick, rows, targets, budget)
    print("\n== weight-space correlation ==", flush=True)
    section_weights(args.quick, rows, targets, budget)
    print("\n== group similarity ==", flush=True)
    section_groups(args.quick, rows, targets, budget)
    print("\n== greedy zip ==", flush=True)
    section_zip(args.quick, rows, targets, budget)
    print("\n## results (x ref: the float64 torch reference's time / this row's; peer1/peer2: the ratio of each")
    print("## peer's time to ours; for activation corr peer1 = zipit-style,")
    print("## peer2 = numpy; weight corr: peer1 = torch naive, peer2 = numpy; groups: peer1 = scipy loop;")
    print("## greedy zip: peer1 = zipit-style, peer2 = our numpy path)")
    print(table(HEADER, rows))
    print_targets(targets, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
