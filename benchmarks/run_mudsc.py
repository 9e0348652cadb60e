"""MuDSC on real data (scikit-learn's 8x8 digits, offline): accuracy of every method, and speed vs a reference.

    nice python benchmarks/run_mudsc.py [--archs mlp,resnet20,vit] [--pairs 3] [--no-speed] [--speed-only]
                                        [--alpha-curve] [--alignment-quality] [--device cuda]
                                        [--workdir DIR] [--out FILE]

Part 1, accuracy. For each architecture (MLP 64-64-64, ResNet-20 at width x0.5, ViT dim 32 / depth 2 /
4 heads) and each seed pair (A, B trained from different random initializations):
  (a) "full":  both models on all 10 digits; the whole model is merged (10-way heads merged too);
  (b) "split": A on digits 0-4, B on 5-9, each with its own 5-way head (ZipIt's disjoint-task setting):
      the body is merged (``exclude=`` the heads: they take no part in the similarity), the two heads
      are kept and read the merged features (B's head through B's alignment / unmerge matrix). Joint accuracy: argmax over both heads' 10 logits on all test digits;
      task accuracy: each head on its own 5 digits.
Methods: each model alone, the ensemble of both (2x the parameters, an upper reference), plain averaging,
weight matching (Git Re-Basin: w=1 from the identity, data-free), activation matching (permute, w=0),
ZipIt (zip, w=0; residual streams zipped too), MuDSC-permute and MuDSC-zip for w in {0, .25, .5, .75, 1} (w=0 rows are activation
matching and ZipIt; every MuDSC row starts from the activation-only matching, as the paper does, so its
w=1 row -- weight-space refinement from that start -- differs from Git Re-Basin's identity start), and "w* (val)": per seed pair, the w with the best validation accuracy (the test
split is never used for a choice). BatchNorm statistics are re-estimated after every merge of the CNN
(including plain averaging); the MLP and ViT merges are REPAIRed (mudsc_merge's default for models
without BatchNorm; plain averaging is not), and two rows show MuDSC-zip w=0.5 without REPAIR and with
the residual stream permuted instead of zipped. Calibration: 512 training images of all 10 digits. Every figure is
mean +- std over the seed pairs; the verdict lines call a difference smaller than the larger std "no
difference".

Part 1b (--alpha-curve, instead of parts 1 and 2): MLP and ViT, full task, validation accuracy of
MuDSC-permute w=0.5 at alpha in {.05 ... .95}, without and with REPAIR: the barrier along the aligned
path.

Part 1c (--alignment-quality, instead of parts 1 and 2): per permutation group, the mean activation
correlation of the cross-model unit pairs that linear assignment matches, each unit's best correlation
with a unit of the other model, and its best with another unit of its own model: whether the two models
learned alike features at all (compare the last two: both are unconstrained maxima).

Part 2, speed. A wide MLP (64-1024-1024-1024-10) pair, a ResNet-20 x2 pair and a ViT (dim 128, depth 4)
pair trained on the full task:
the whole merge (MuDSC-zip and MuDSC-permute, w=0.5) with merging_kernels vs the straightforward
implementation of benchmarks/mudsc_reference.py (scipy in a Python loop, numpy corrcoef, fp32 outer
products accumulated in torch, Python greedy zip), same inputs and decisions, per-stage breakdown, and
the merged models' test accuracy side by side. Ratios use process CPU time (one thread each, so it is
immune to time spent descheduled on a shared machine); wall time is listed beside it. For the CNN and
the ViT the forward passes over the calibration set (the same model code in both) are timed alone too,
and the ratio of the rest is printed: they bound the end-to-end ratio (Amdahl).

Part 2 with --device cuda (instead of parts 1 and 2): the same merges with models and calibration on
the GPU, wall time per stage, beside our CPU merge and the reference on the CPU.

One CPU thread (torch.set_num_threads(1)); trained checkpoints are cached in --workdir (default:
a folder in the system temp dir) so a second run only merges.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread for numpy/scipy too,
    os.environ.setdefault(_var, "1")  # as for torch: CPU-time ratios compare single-threaded work

import argparse
import contextlib
import copy
import datetime
import io
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import merging_kernels  # noqa: F401
except ImportError:  # a source checkout
    sys.path.insert(1, os.path.dirname(HERE))

from common import commit_line  # noqa: E402
from merging_kernels.methods.mudsc import average_merge, mudsc_merge  # noqa: E402
from merging_kernels.models import MLP, ResNet20, ViT  # noqa: E402
from merging_kernels.permutation_spec import spec_for  # noqa: E402

ARCHS = {
    "mlp": dict(make=lambda out: MLP(64, [64, 64, 64], out), epochs=60, lr=1e-3, head=("layers.3.weight", "layers.3.bias")),
    "resnet20": dict(make=lambda out: ResNet20(0.5, out, 1), epochs=12, lr=3e-3, head=("fc.weight", "fc.bias")),
    "vit": dict(make=lambda out: ViT(8, 2, 32, 2, 4, 64, out), epochs=40, lr=2e-3, head=("head.weight", "head.bias")),
}
SEED_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
WS = (0.0, 0.25, 0.5, 0.75, 1.0)
BATCH = 64
CALIB = 512


class Digits:
    def __init__(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
        y = torch.tensor(y)
        idx = np.arange(len(y))
        rest, test = train_test_split(idx, test_size=0.25, stratify=y, random_state=0)
        train, val = train_test_split(rest, test_size=0.2, stratify=y[rest], random_state=0)
        self.split = {k: (x[v], y[v]) for k, v in (("train", train), ("val", val), ("test", test))}
        xtr = self.split["train"][0]
        g = torch.Generator().manual_seed(0)
        self.calibration = list(xtr[torch.randperm(len(xtr), generator=g)[:CALIB]].split(128))

    def task(self, split, task):
        """task None: all digits; 0: digits 0-4 (labels 0-4); 1: digits 5-9 (labels 0-4)."""
        x, y = self.split[split]
        if task is None:
            return x, y
        keep = (y // 5) == task
        return x[keep], y[keep] - 5 * task


def train(arch, data, task, seed):
    cfg = ARCHS[arch]
    torch.manual_seed(seed)
    model = cfg["make"](10 if task is None else 5)
    x, y = data.task("train", task)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            b = order[i:i + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_or_train(workdir, arch, data, task, seed):
    path = os.path.join(workdir, f"{arch}-{'full' if task is None else f'task{task}'}-seed{seed}.pt")
    model = ARCHS[arch]["make"](10 if task is None else 5)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval(), 0.0
    start = time.perf_counter()
    model = train(arch, data, task, seed)
    torch.save(model.state_dict(), path)
    return model, time.perf_counter() - start


@torch.no_grad()
def acc(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def eval_full(model, data, split):
    x, y = data.split[split]
    return {"acc": acc(model.eval()(x), y)}


@torch.no_grad()
def eval_split(body_a, body_b, data, split):
    """body_a / body_b: models with A's / B's 5-way head (the same merged body, or two separate models)."""
    x, y = data.split[split]
    la, lb = body_a.eval()(x), body_b.eval()(x)
    out = {"joint": acc(torch.cat([la, lb], 1), y)}
    for t, logits in ((0, la), (1, lb)):
        keep = (y // 5) == t
        out[f"task{'AB'[t]}"] = acc(logits[keep], y[keep] - 5 * t)
    return out


def with_head(model, head_state):
    import copy

    m = copy.deepcopy(model)
    sd = m.state_dict()
    sd.update(head_state)
    m.load_state_dict(sd)
    return m.eval()


def w_label(mode, w):
    label = f"MuDSC-{mode} w={w:g}"
    if w == 0:
        label += " (= activation matching)" if mode == "permute" else " (= ZipIt)"
    return label


def w_labels(mode):
    return {w: w_label(mode, w) for w in WS}


def method_list():
    rows = [("average", None)]
    rows.append(("weight matching (w=1, identity init)", dict(mode="permute", w=1.0, init="identity")))
    for mode in ("permute", "zip"):
        for w in WS:
            rows.append((w_label(mode, w), dict(mode=mode, w=w, init="activation")))
    rows.append(("MuDSC-zip w=0.5 without REPAIR", dict(mode="zip", w=0.5, init="activation", repair=False)))
    rows.append(("MuDSC-zip w=0.5 residual stream permuted", dict(mode="zip", w=0.5, init="activation",
                                                                  zip_residual=False)))
    return rows


def run_pair(arch, setting, model_a, model_b, data):
    """{method: {"val": metrics, "test": metrics, "time": s}} for one seed pair."""
    spec = spec_for(model_a)
    head = ARCHS[arch]["head"]
    out = {}
    calib = data.calibration

    def evaluate(merged, result=None, split_heads=None):
        res = {}
        for sp in ("val", "test"):
            if setting == "full":
                res[sp] = eval_full(merged, data, sp)
            else:
                ha, hb = split_heads
                res[sp] = eval_split(with_head(merged, ha), with_head(merged, hb), data, sp)
        return res

    # each model alone and the ensemble
    for label, models in (("model A alone", (model_a,)), ("model B alone", (model_b,))):
        res = {}
        for sp in ("val", "test"):
            if setting == "full":
                res[sp] = eval_full(models[0], data, sp)
            else:
                t = 0 if label.startswith("model A") else 1
                x, y = data.task(sp, t)
                res[sp] = {f"task{'AB'[t]}": acc(models[0](x), y)}
        out[label] = dict(res, time=0.0)
    res = {}
    for sp in ("val", "test"):
        if setting == "full":
            x, y = data.split[sp]
            with torch.no_grad():
                res[sp] = {"acc": acc(model_a(x).softmax(1) + model_b(x).softmax(1), y)}
        else:
            res[sp] = eval_split(model_a, model_b, data, sp)
    out["ensemble (both models, 2x params)"] = dict(res, time=0.0)

    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    for label, options in method_list():
        start = time.perf_counter()
        if options is None:
            merged = average_merge(model_a, model_b, calib)
            heads = ({k: sd_a[k] for k in head}, {k: sd_b[k] for k in head})
        else:
            result = mudsc_merge(model_a, model_b, spec, calib, progress=False, return_result=True,
                                 exclude=head if setting == "split" else (), **options)
            merged = result.model
            heads = (result.project("a", head), result.project("b", head)) if setting == "split" else None
        elapsed = time.perf_counter() - start
        out[label] = dict(evaluate(merged, split_heads=heads if setting == "split" else None), time=elapsed)
    # w chosen on validation
    key = "acc" if setting == "full" else "joint"
    for mode in ("permute", "zip"):
        labels = w_labels(mode)
        best_w = max(WS, key=lambda w: out[labels[w]]["val"][key])
        out[f"MuDSC-{mode} w* (val; chosen w per pair)"] = dict(out[labels[best_w]], chosen_w=best_w)
    return out


def fmt(values):
    if not values:
        return "      -      "
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def accuracy_part(args, data, log):
    for arch in args.archs:
        for setting in ("full", "split"):
            pairs = SEED_PAIRS[:args.pairs]
            results, train_time = [], 0.0
            for sa, sb in pairs:
                ta, tb = (None, None) if setting == "full" else (0, 1)
                ma, t1 = load_or_train(args.workdir, arch, data, ta, sa)
                mb, t2 = load_or_train(args.workdir, arch, data, tb, sb)
                train_time += t1 + t2
                results.append(run_pair(arch, setting, ma, mb, data))
            cols = ["acc"] if setting == "full" else ["joint", "taskA", "taskB"]
            log(f"\n== {arch}, {setting}: "
                + ("both models on digits 0-9, whole model merged" if setting == "full"
                   else "A on 0-4, B on 5-9, per-task 5-way heads kept, body merged")
                + f"; {len(pairs)} seed pairs {pairs}; test accuracy mean ± std"
                + (f"; training {train_time:.0f} s" if train_time else "; cached checkpoints") + " ==")
            head = f"  {'method':<46}" + "".join(f"{c:>15}" for c in cols) + f"{'val ' + cols[0]:>15}{'merge s':>9}"
            log(head)
            for label in results[0]:
                line = f"  {label:<46}"
                for c in cols:
                    line += f"{fmt([r[label]['test'][c] for r in results if c in r[label]['test']]):>15}"
                line += f"{fmt([r[label]['val'][cols[0]] for r in results if cols[0] in r[label]['val']]):>15}"
                line += f"{statistics.mean(r[label]['time'] for r in results):9.2f}"
                if "chosen_w" in results[0][label]:
                    line += "  w*=" + ",".join(f"{r[label]['chosen_w']:g}" for r in results)
                log(line)
            verdicts(results, cols[0], log)


def verdicts(results, key, log):
    """Each dual w (0.25, 0.5, 0.75) against both single spaces (w=0, w=1), on test: a difference smaller
    than the larger std of the two is "no difference". No w is picked on test here."""

    def vals(label):
        return [r[label]["test"][key] for r in results]

    def sd(v):
        return statistics.stdev(v) if len(v) > 1 else 0.0

    for mode in ("permute", "zip"):
        labels = w_labels(mode)
        parts, beats = [], []
        for w in (0.25, 0.5, 0.75):
            dual = vals(labels[w])
            cmp = []
            for other in (0.0, 1.0):
                single = vals(labels[other])
                d = statistics.mean(dual) - statistics.mean(single)
                spread = max(sd(dual), sd(single))
                paired = [a - b for a, b in zip(dual, single)]
                word = "better" if d > spread else "worse" if d < -spread else "no difference"
                cmp.append(word)
                parts.append(f"w={w:g} vs w={other:g}: {d:+.3f} (spread {spread:.3f}; paired {statistics.mean(paired):+.3f}"
                             f" ± {sd(paired):.3f}, better in {sum(p > 0 for p in paired)}/{len(paired)}) {word}")
            beats.append(cmp == ["better", "better"])
        log(f"  verdict {mode}: dual space beats both single spaces: "
            + ("YES for w=" + ",".join(f"{w:g}" for w, b in zip((0.25, 0.5, 0.75), beats) if b) if any(beats) else "no")
            + f"; vs plain averaging {statistics.mean(vals('average')):.3f}")
        for line in parts:
            log(f"      {line}")


# --------------------------------------------------------------------------- part 2: speed


SPEED_MODELS = {
    "mlp-wide": dict(make=lambda out: MLP(64, [1024, 1024, 1024], out), epochs=10, lr=1e-3,
                     head=("layers.3.weight", "layers.3.bias"), label="MLP 64-1024-1024-1024-10"),
    "resnet20x2": dict(make=lambda out: ResNet20(2.0, out, 1), epochs=4, lr=3e-3, head=("fc.weight", "fc.bias"),
                       label="ResNet-20 x2 (32/64/128 channels)"),
    "vit-wide": dict(make=lambda out: ViT(8, 2, 128, 4, 8, 256, out), epochs=20, lr=2e-3,
                     head=("head.weight", "head.bias"), label="ViT dim 128, depth 4, 8 heads, MLP 256 (33 tokens)"),
}


def forward_pass_cpu(model_a, model_b, calib, repeats):
    """CPU s of the forward passes any implementation runs: A and B in eval mode, then, for a model with
    BatchNorm, one model in train mode (the BatchNorm reset); best of ``repeats``."""
    best = None
    probe = copy.deepcopy(model_a)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in probe.modules())
    for _ in range(repeats):
        cpu0 = time.process_time()
        with torch.no_grad():
            for x in calib:
                model_a.eval()(x)
                model_b.eval()(x)
            probe.train()
            for x in (calib if has_bn else ()):
                probe(x)
        cpu = time.process_time() - cpu0
        best = cpu if best is None else min(best, cpu)
    return best


SPEED_STAGES = ("statistics", "similarity", "assignment", "rewrite", "bn_reset")  # no REPAIR in speed rows


def speed_pairs(args, data):
    """(key, config, model A, model B, spec) for each chosen speed model: the seed-0/1 pair, full task."""
    for key, cfg in SPEED_MODELS.items():
        if key in args.speed_models:
            ARCHS[key] = cfg
            ma, _ = load_or_train(args.workdir, key, data, None, 0)
            mb, _ = load_or_train(args.workdir, key, data, None, 1)
            yield key, cfg, ma, mb, spec_for(ma)


def speed_part(args, data, log):
    import mudsc_reference as ref

    stages = SPEED_STAGES
    calib = list(data.split["train"][0].split(128))  # the whole training split
    for key, cfg, ma, mb, spec in speed_pairs(args, data):
        log(f"\n== speed: {cfg['label']} pair (full task, seeds 0/1), calibration {sum(len(c) for c in calib)} "
            f"images in batches of 128, CPU, 1 thread; best of {args.repeats} by CPU time; stage columns are wall s ==")
        log(f"  alone: A {eval_full(ma, data, 'test')['acc']:.3f}, B {eval_full(mb, data, 'test')['acc']:.3f}; "
            f"groups: {len(spec)}, units per group {min(g.size for g in spec)}..{max(g.size for g in spec)}")
        log(f"  {'variant':<40}{'cpu s':>8}{'wall s':>8}" + "".join(f"{s:>11}" for s in stages)
            + f"{'sweeps':>7}{'test acc':>9}")
        forward_cpu = forward_pass_cpu(ma, mb, calib, args.repeats) if not key.startswith("mlp") else 0.0
        for mode in ("zip", "permute"):
            runs = {}
            for impl in ("merging_kernels", "reference"):
                best = None
                for _ in range(args.repeats):
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    if impl == "merging_kernels":
                        r = mudsc_merge(ma, mb, spec, calib, mode=mode, w=0.5, progress=False, return_result=True,
                                        repair=False)  # the reference has no REPAIR: the same algorithm on both
                        model, timings, sweeps = r.model, r.timings, r.sweeps
                    else:
                        model, timings, sweeps = ref.reference_mudsc_merge(ma, mb, spec, calib, mode=mode, w=0.5)
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                    if best is None or cpu < best[0]:
                        best = (cpu, wall, timings, sweeps, model)
                runs[impl] = best
                cpu, wall, timings, sweeps, model = best
                log(f"  {f'MuDSC-{mode} w=0.5 {impl}':<40}{cpu:8.2f}{wall:8.2f}"
                    + "".join(f"{timings.get(s, 0.0):11.3f}" for s in stages)
                    + f"{sweeps:7d}{eval_full(model, data, 'test')['acc']:9.3f}")
            ratio = runs["reference"][0] / runs["merging_kernels"][0]
            if forward_cpu:  # Amdahl: the forward passes are the same model code in both implementations
                rest = (runs["reference"][0] - forward_cpu) / max(runs["merging_kernels"][0] - forward_cpu, 1e-9)
                passes = "statistics pass of A and B" + (", BN-reset pass of the merged model" if key.startswith(
                    "resnet") else "")
                log(f"  MuDSC-{mode}: forward passes both run ({passes}) take {forward_cpu:.2f} s CPU alone; the rest "
                    f"of the merge is {rest:.1f}x faster")
            per = "  ".join(f"{s} {runs['reference'][2].get(s, 0) / max(runs['merging_kernels'][2].get(s, 0), 1e-9):.1f}x"
                            for s in stages[:4])
            log(f"  MuDSC-{mode}: end to end {ratio:.1f}x faster by CPU time "
                f"({runs['reference'][1] / runs['merging_kernels'][1]:.1f}x wall; per stage {per}) -> "
                f"{'PASS' if ratio >= 10 else 'FAIL'} (target >= 10x)")


def speed_part_cuda(args, data, log):
    """The same merges with models and calibration on the GPU: wall s per stage (the timer synchronizes),
    against the reference with its models on the GPU (statistics, rewrite and BN reset there; similarity
    and assignment in numpy/scipy on the CPU, as the reference code runs), our CPU merge and the CPU
    reference (one thread each, as in the CPU table)."""
    import mudsc_reference as ref

    stages = SPEED_STAGES
    calib = list(data.split["train"][0].split(128))
    calib_gpu = [x.cuda() for x in calib]
    log(f"\n== speed on {torch.cuda.get_device_name()}: wall s, median of {max(args.repeats, 3)} after a warm-up "
        f"merge (Triton compiles); CPU rows one thread ==")
    log(f"  {'variant':<50}{'wall s':>8}" + "".join(f"{s:>11}" for s in stages) + f"{'test acc':>9}")
    for key, cfg, ma, mb, spec in speed_pairs(args, data):
        ga, gb = copy.deepcopy(ma).cuda(), copy.deepcopy(mb).cuda()
        for mode in ("zip", "permute"):
            rows = {}
            for impl in ("gpu", "cpu", "reference gpu", "reference cpu"):
                on_gpu = impl.endswith("gpu")
                a, b, c = (ga, gb, calib_gpu) if on_gpu else (ma, mb, calib)

                def merge():
                    if impl.startswith("reference"):
                        model, timings, _ = ref.reference_mudsc_merge(a, b, spec, c, mode=mode, w=0.5)
                        return model, timings
                    r = mudsc_merge(a, b, spec, c, mode=mode, w=0.5, progress=False, return_result=True, repair=False)
                    return r.model, r.timings
                if on_gpu:
                    merge()  # warm-up: Triton compiles, cuBLAS handles, the caching allocator fills
                runs = []
                for _ in range(max(args.repeats, 3) if on_gpu else args.repeats):
                    wall0 = time.perf_counter()
                    model, timings = merge()
                    if on_gpu:
                        torch.cuda.synchronize()
                    runs.append((time.perf_counter() - wall0, timings, model))
                wall, timings, model = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
                rows[impl] = wall
                log(f"  {f'{key} MuDSC-{mode} w=0.5 {impl}':<50}{wall:8.3f}"
                    + "".join(f"{timings.get(s, 0.0):11.3f}" for s in stages)
                    + f"{eval_full(model.cpu(), data, 'test')['acc']:9.3f}")
            log(f"  {key} MuDSC-{mode}: on the GPU {rows['reference gpu'] / rows['gpu']:.1f}x the reference "
                f"(its statistics and rewrite on the GPU, numpy/scipy on the CPU); "
                f"{rows['cpu'] / rows['gpu']:.1f}x our CPU merge, {rows['reference cpu'] / rows['gpu']:.1f}x the "
                f"CPU reference (wall)")


ALPHAS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def alpha_curve_part(args, data, log):
    """Validation accuracy along the aligned path (MuDSC-permute w=0.5, model A's weight alpha), without and
    with REPAIR: how high the barrier between the two aligned models is, and how much REPAIR removes."""
    for arch in args.archs:
        if arch == "resnet20":
            continue  # BatchNorm models are renormalized by the BN reset, not by REPAIR
        pairs = SEED_PAIRS[:args.pairs]
        log(f"\n== {arch}, full task: validation accuracy along the aligned path (MuDSC-permute w=0.5), "
            f"{len(pairs)} seed pairs, mean ± std ==")
        log(f"  {'alpha':>6}{'no REPAIR':>16}{'REPAIR':>16}")
        acc_at = {}
        for sa, sb in pairs:
            ma, _ = load_or_train(args.workdir, arch, data, None, sa)
            mb, _ = load_or_train(args.workdir, arch, data, None, sb)
            spec = spec_for(ma)
            for alpha in ALPHAS:
                for rep in (False, True):
                    merged = mudsc_merge(ma, mb, spec, data.calibration, w=0.5, alpha=alpha, repair=rep,
                                         progress=False)
                    acc_at.setdefault((alpha, rep), []).append(eval_full(merged, data, "val")["acc"])
        for alpha in ALPHAS:
            log(f"  {alpha:>6g}{fmt(acc_at[(alpha, False)]):>16}{fmt(acc_at[(alpha, True)]):>16}")


def alignment_quality_part(args, data, log):
    """How alike the two models' units are: per permutation group, the mean activation correlation of
    cross-model pairs matched by linear assignment (activation matching's objective), each unit's best
    correlation with a unit of the other model, and its best with another unit of its own model. The last
    two are like for like (maxima without the one-to-one constraint, which alone lowers the matched mean):
    low cross-model maxima next to high within-model ones mean the two models learned different features."""
    from merging_kernels import linear_sum_assignment
    from merging_kernels.ops.similarity import ActivationStats, activation_stats_hooks

    for arch in args.archs:
        pairs = SEED_PAIRS[:args.pairs]
        log(f"\n== {arch}, full task: matched cross-model correlation / best cross-model / best within-model "
            f"correlation per unit, means per group, {len(pairs)} seed pairs, calibration set (no head constraint: "
            f"an upper bound for q/k groups) ==")
        scores: dict[str, list] = {}
        for sa, sb in pairs:
            ma, _ = load_or_train(args.workdir, arch, data, None, sa)
            mb, _ = load_or_train(args.workdir, arch, data, None, sb)
            spec = spec_for(ma)
            mods = (dict(ma.named_modules()), dict(mb.named_modules()))
            stats = {g.name: [ActivationStats([g.size, g.size]) for _ in g.activations] for g in spec}
            with contextlib.ExitStack() as hooks, torch.no_grad():  # one calibration pass feeds every group
                for g in spec:
                    for point, st in zip(g.activations, stats[g.name]):
                        hooks.enter_context(activation_stats_hooks(
                            (mods[0][point.module], mods[1][point.module]), st, input=point.input,
                            channel_dim=point.channel_dim))
                for x in data.calibration:
                    ma(x)
                    mb(x)
            for g in spec:
                corr = sum(st.correlation() for st in stats[g.name]) / len(stats[g.name])
                n = g.size
                cross = corr[:n, n:]
                rows, cols = linear_sum_assignment(cross, maximize=True)
                within = corr[:n, :n] - 3 * torch.eye(n)  # a unit's correlation with itself does not count
                scores.setdefault(g.name, []).append((cross[rows, cols].mean().item(),
                                                      cross.max(1).values.mean().item(),
                                                      within.max(1).values.mean().item()))
        for name, vals in scores.items():
            log(f"  {name:<20}" + "".join(f"{fmt([v[i] for v in vals]):>16}" for i in range(3)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="mlp,resnet20,vit")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--alpha-curve", action="store_true",
                        help="only the accuracy along the aligned path vs alpha, with and without REPAIR")
    parser.add_argument("--alignment-quality", action="store_true",
                        help="only the matched cross-model vs within-model unit correlations per group")
    parser.add_argument("--speed-models", default="mlp-wide,resnet20x2,vit-wide")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the speed part (only) with models and calibration on the GPU")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "merging_kernels_mudsc_digits"))
    parser.add_argument("--out", default=None, help="also write the output to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    args.archs = [a for a in args.archs.split(",") if a]
    args.speed_models = [a for a in args.speed_models.split(",") if a]
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)
    buf = io.StringIO()

    def log(line=""):
        print(line, flush=True)
        buf.write(line + "\n")

    commit = commit_line(["merging_kernels", "benchmarks"])
    log(f"# MuDSC on sklearn digits, {datetime.date.today().isoformat()}")
    log("# command: nice python benchmarks/run_mudsc.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    log(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch threads 1, "
        f"OMP/OpenBLAS/MKL threads {os.environ.get('OPENBLAS_NUM_THREADS')}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}; commit {commit}")
    start = time.perf_counter()
    data = Digits()
    if args.alpha_curve:
        alpha_curve_part(args, data, log)
    elif args.alignment_quality:
        alignment_quality_part(args, data, log)
    elif not args.speed_only and args.device == "cpu":
        accuracy_part(args, data, log)
    if args.device == "cuda":
        speed_part_cuda(args, data, log)
    elif not (args.no_speed or args.alpha_curve or args.alignment_quality):
        speed_part(args, data, log)
    log(f"\n# total {time.perf_counter() - start:.0f} s; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
