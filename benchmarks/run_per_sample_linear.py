"""Per-sample merged linear side by side: each strategy vs the per-sample loop merge tools use today.

    python benchmarks/run_per_sample_linear.py [--device cpu|cuda] [--quick] [--ks 4,8] [--batches 1,16,128]
    python benchmarks/run_per_sample_linear.py --conv [--device cpu|cuda]   (per-sample Conv2d instead)

Shapes: ViT-B-like MLP up-projection, in 768 → out 3072, with bias, K task vectors, B samples of T tokens
(T = 1: one feature vector per sample; T = 197: a ViT-B/16 sequence). fp32 on CPU, bf16 on CUDA.
Providers, timed in the same process (median of repeats after a warm-up):
  ref       the torch reference (per_sample_linear_torch, the tests' oracle): materialize the B merged weights
            with one einsum (in float32 or wider), apply them with another
  loop      FusionBench-style: per sample, build the merged parameters and torch.func.functional_call
  naive     torch "stacked" as one would write it: concatenate [W0, τ_1..τ_K] per call, one GEMM
  plain     one F.linear with the base weights (not a merge: the floor any strategy is read against)
  build     building the B merged weight matrices alone, into a preallocated buffer (what materializing must pay)
  ours:*    merging_kernels.per_sample_linear with strategy auto / stacked / materialize, and lowrank r=16
Ratios: x ref (ref/ours), loop/ours and naive/ours for the auto strategy; at T = 197 also ours / (plain + build).
On CUDA the stacked Triton kernel's TFLOP/s for its (K+1)-fold work is compared with cuBLAS running the
same-size GEMM ([B·T, (K+1)·in] x [(K+1)·in, out]) in the same run.

--conv: per_sample_conv2d on ResNet-20-like 3x3 convs (C -> C channels, padding 1) with one row of α per
sample: loop (per sample, merge the filters and run F.conv2d), plain (one conv with the base filters, the
floor), and ours with strategy banks / stacked / auto (the pick of choose_conv_strategy); then SE-Merging's
ResNet-20 forward with its convs as banks vs auto, beside the base model's forward.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import merging_kernels  # noqa: F401
except ImportError:  # not installed: run from a source checkout
    sys.path.insert(1, os.path.dirname(HERE))
from common import commit_line, device_name, measure  # noqa: E402

from merging_kernels.ops.per_sample_linear import (  # noqa: E402
    choose_conv_strategy,
    choose_strategy,
    lowrank_factors,
    pack_weights,
    per_sample_conv2d,
    per_sample_linear,
    per_sample_linear_torch,
    per_sample_lowrank_linear,
)

IN, OUT = 768, 3072


def loop_functional_call(module, base_params, task_vectors, x, alpha):
    """Per sample: θ0 + Σ_k α_k τ_k for every parameter, then a functional call (what merge tools do)."""
    outs = []
    for b in range(x.shape[0]):
        params = {n: p + sum(alpha[b, k] * task_vectors[n][k] for k in range(alpha.shape[1]))
                  for n, p in base_params.items()}
        outs.append(torch.func.functional_call(module, params, (x[b:b + 1],)))
    return torch.cat(outs)


def naive_stacked(w0, tw, b0, tb, x, alpha):
    """Concatenate the weights per call and run one GEMM on the scaled input."""
    a1 = torch.cat([alpha.new_ones(alpha.shape[0], 1), alpha], 1).to(x.dtype)
    wcat = torch.cat([w0, *tw], dim=1)  # (out, (K+1)·in), rebuilt every call
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    scaled = (x3.unsqueeze(2) * a1[:, None, :, None]).flatten(2)
    return F.linear(scaled, wcat) + (b0 + alpha.to(x.dtype) @ tb).unsqueeze(1)


def build_weights(packed, alpha, out):
    """The B merged weight matrices into a preallocated buffer: the arithmetic and traffic of building
    them, without allocation or page faults (the strictest reading of "the unavoidable cost")."""
    a1 = torch.cat([alpha.new_ones(alpha.shape[0], 1), alpha], 1).to(packed.dtype)
    return torch.matmul(a1, packed, out=out)


def run_case(device, dtype, k, batch, tokens, args, lines):
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(device, dtype)
    tw = (0.01 * torch.randn(k, OUT, IN, generator=g)).to(device, dtype)
    b0 = torch.randn(OUT, generator=g).to(device, dtype)
    tb = (0.01 * torch.randn(k, OUT, generator=g)).to(device, dtype)
    x = torch.randn((batch, tokens, IN) if tokens > 1 else (batch, IN), generator=g).to(device, dtype)
    alpha = torch.rand(batch, k, generator=g).to(device)
    packed, packed_bias = pack_weights(w0, tw, b0, tb)
    up, down = lowrank_factors(tw, 16)
    module = torch.nn.Linear(IN, OUT, device=device, dtype=dtype)
    base_params = {"weight": w0, "bias": b0}
    tvs = {"weight": tw, "bias": tb}
    budget = 4.0 if args.quick else 15.0
    rep = dict(device=device, repeats=3 if args.quick else 7, budget_s=budget)
    t = {}
    with torch.inference_mode():
        t["plain"] = measure(lambda: F.linear(x, w0, b0), **rep).median_s
        if tokens > 1:
            built = torch.empty(OUT, batch, IN, device=device, dtype=dtype)
            t["build"] = measure(lambda: build_weights(packed, alpha, built), **rep).median_s
            del built
        else:
            t["build"] = None
        slow = batch * tokens >= 128 * 197 and args.quick
        t["loop"] = None if slow else measure(lambda: loop_functional_call(module, base_params, tvs, x, alpha),
                                              warmup=1, repeats=3, min_repeats=1, device=device,
                                              budget_s=budget).median_s
        t["naive"] = None if slow else measure(lambda: naive_stacked(w0, tw, b0, tb, x, alpha), **rep).median_s
        t["ref"] = measure(lambda: per_sample_linear_torch(x, alpha, w0, tw, b0, tb), warmup=1, repeats=3,
                           min_repeats=1, device=device, budget_s=budget).median_s
        for strategy in ("auto", "stacked", "materialize"):
            s = None if strategy == "auto" else strategy
            t[strategy] = measure(lambda: per_sample_linear(x, alpha, packed, packed_bias, strategy=s),
                                  **rep).median_s
        t["lowrank16"] = measure(lambda: per_sample_lowrank_linear(x, alpha, w0, up, down, packed_bias),
                                 **rep).median_s
    auto = choose_strategy(batch, tokens, IN, OUT, k, None, torch.device(device).type)

    def ms(v):
        return "-" if v is None else f"{v * 1e3:9.2f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:6.1f}x"

    bound = ""
    if tokens > 1:
        bound = f"{t['auto'] / (t['plain'] + t['build']):5.2f}"
    lines.append(f"{k:>2} {batch:>4} {tokens:>4} | {ms(t['ref'])} {ms(t['loop'])} {ms(t['naive'])} {ms(t['plain'])} "
                 f"{ms(t['build'])} | {ms(t['auto'])} {auto[:5]:>5} {ms(t['stacked'])} {ms(t['materialize'])} "
                 f"{ms(t['lowrank16'])} | {ratio(t['ref'], t['auto']):>7} {ratio(t['loop'], t['auto']):>7} "
                 f"{ratio(t['naive'], t['auto']):>7} {bound:>6}")
    print(lines[-1], flush=True)
    return t


CONV_SHAPES = ((16, 8), (32, 4), (64, 2), (64, 16), (128, 8))  # (channels, image side)


def loop_conv(x, alpha, packed, packed_bias):
    """Per sample: merge the filters and bias, run F.conv2d on that sample (what a loop over samples does)."""
    outs = []
    for b in range(x.shape[0]):
        a1 = torch.cat([alpha.new_ones(1), alpha[b]]).to(packed.dtype)
        w = torch.tensordot(a1, packed, dims=1)
        outs.append(F.conv2d(x[b:b + 1], w, a1 @ packed_bias, 1, 1))
    return torch.cat(outs)


def run_conv_case(device, dtype, k, batch, channels, side, args, lines):
    g = torch.Generator().manual_seed(0)
    packed = (torch.randn(k + 1, channels, channels, 3, 3, generator=g) / (3 * channels**0.5)).to(device, dtype)
    packed_bias = torch.randn(k + 1, channels, generator=g).to(device, dtype)
    x = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
    alpha = torch.rand(batch, k, generator=g).to(device)
    rep = dict(device=device, repeats=3 if args.quick else 7, budget_s=4.0 if args.quick else 15.0)
    t = {}
    with torch.inference_mode():
        t["loop"] = measure(lambda: loop_conv(x, alpha, packed, packed_bias), **rep).median_s
        t["plain"] = measure(lambda: F.conv2d(x, packed[0], packed_bias[0], 1, 1), **rep).median_s
        for strategy in ("banks", "stacked", "auto"):
            t[strategy] = measure(lambda: per_sample_conv2d(x, alpha, packed, packed_bias, padding=1,
                                                            strategy=strategy), **rep).median_s
    pick = choose_conv_strategy(1, k, channels, channels, side * side, torch.device(device).type)
    lines.append(f"{k:>2} {batch:>4} {channels:>4} {side:>3}x{side:<3}| {t['loop'] * 1e3:9.2f} {t['plain'] * 1e3:9.2f} | "
                 f"{t['banks'] * 1e3:9.2f} {t['stacked'] * 1e3:9.2f} {t['auto'] * 1e3:9.2f} {pick:>7} | "
                 f"{t['loop'] / t['auto']:7.1f}x {t['banks'] / t['auto']:7.2f}x {t['auto'] / t['plain']:6.1f}")
    print(lines[-1], flush=True)


def se_merging_resnet(device, dtype, args, lines):
    """SE-Merging on ResNet-20 (width 1, 8x8 inputs, K = 3 experts): a forward with given α, its per-sample convs
    with the strategy auto picks vs banks for all of them, beside the base model's plain forward."""
    import copy

    from merging_kernels import se_merge
    from merging_kernels.layers import PerSampleConv2d
    from merging_kernels.models import ResNet20

    torch.manual_seed(0)
    base = ResNet20(1.0, 10, 1).to(device, dtype).eval()
    experts = []
    for _ in range(3):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for m in expert.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    for p in m.parameters():
                        p.add_(0.01 * torch.randn_like(p))
        experts.append(expert)
    model = se_merge(base, experts)
    convs = [m for m in model.modules() if isinstance(m, PerSampleConv2d)]
    rep = dict(device=device, repeats=3 if args.quick else 7, budget_s=4.0 if args.quick else 15.0)
    lines.append("# SE-Merging, ResNet-20 (16/32/64 channels, 8x8 inputs), K = 3, forward with given α, ms (median)")
    for batch in map(int, args.batches.split(",")):
        x = torch.randn(batch, 1, 8, 8, device=device, dtype=dtype)
        alpha = model.static_alpha(batch)
        t = {}
        with torch.inference_mode():
            t["plain"] = measure(lambda: base(x), **rep).median_s
            for strategy in ("banks", None):
                for conv in convs:
                    conv.strategy = strategy
                t[strategy or "auto"] = measure(lambda: model(x, alpha=alpha), **rep).median_s
        lines.append(f"   B {batch:>4}: base model {t['plain'] * 1e3:8.2f}   per-sample, convs as banks "
                     f"{t['banks'] * 1e3:8.2f}   per-sample, auto {t['auto'] * 1e3:8.2f}   banks/auto "
                     f"{t['banks'] / t['auto']:5.2f}x")
        print(lines[-1], flush=True)


def gpu_throughput(k, batch, tokens, dtype, lines):
    """Stacked Triton kernel vs cuBLAS on a GEMM of the same (K+1)-fold size."""
    g = torch.Generator().manual_seed(0)
    m = batch * tokens
    x = torch.randn(batch, tokens, IN, generator=g).to("cuda", dtype)
    alpha = torch.rand(batch, k, generator=g).cuda()
    packed, pb = pack_weights((torch.randn(OUT, IN, generator=g) / IN**0.5).cuda().to(dtype),
                              (0.01 * torch.randn(k, OUT, IN, generator=g)).cuda().to(dtype))
    a = torch.randn(m, (k + 1) * IN, device="cuda", dtype=dtype)
    b = torch.randn((k + 1) * IN, OUT, device="cuda", dtype=dtype)
    flops = 2.0 * m * (k + 1) * IN * OUT
    ours = measure(lambda: per_sample_linear(x, alpha, packed, pb, strategy="stacked", backend="triton"),
                   device="cuda", repeats=20).median_s
    cublas = measure(lambda: a @ b, device="cuda", repeats=20).median_s
    lines.append(f"{k:>2} {batch:>4} {tokens:>4} | stacked triton {flops / ours / 1e12:7.1f} TFLOP/s   cuBLAS same GEMM "
                 f"{flops / cublas / 1e12:7.1f} TFLOP/s   ratio {cublas / ours:5.2f}")
    print(lines[-1], flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats; skip the loop at B·T ≥ 128·197")
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--batches", default=None, help="default 1,16,128 (--conv: 16,128)")
    parser.add_argument("--tokens", default="1,197")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--conv", action="store_true", help="per-sample Conv2d (ResNet-20-like shapes) instead")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = "16,128" if args.conv else "1,16,128"
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    lines = [f"# python benchmarks/run_per_sample_linear.py {' '.join(sys.argv[1:])}",
             f"# {datetime.date.today()}  device: {device_name(args.device)}  dtype: {dtype}  torch threads "
             f"{torch.get_num_threads()}" + ("" if args.conv else f"  in {IN} out {OUT}"),
             f"# versions: torch {torch.__version__}; merging_kernels at "
             f"{commit_line(['merging_kernels/ops/per_sample_linear.py'])}"]
    if args.conv:
        lines += ["# per_sample_conv2d, 3x3 conv C -> C, padding 1, one row of α per sample; times in ms (median); "
                  "loop = merge filters and conv per sample; plain = one conv with the base filters (the floor); "
                  "x loop = loop/auto, x banks = banks/auto, / plain = auto/plain",
                  " K    B    C   HxW  |      loop     plain |     banks   stacked      auto    pick |  x loop "
                  " x banks / plain"]
    else:
        lines += ["# times in ms (median); ref = the torch reference per_sample_linear_torch (materializes the B "
                  "weights); loop = per-sample functional_call, naive = concat+GEMM per call; "
                  "auto = the strategy the cost model picks; x ref = ref/auto; bound = auto / (plain + build) at T > 1",
                  " K    B    T |       ref      loop     naive     plain     build |      auto  pick   stacked "
                  "materializ  lowrank16 |   x ref loop/us naive/us  bound"]
    print("\n".join(lines), flush=True)
    for k in map(int, args.ks.split(",")):
        if args.conv:
            for batch in map(int, args.batches.split(",")):
                for channels, side in CONV_SHAPES:
                    run_conv_case(args.device, dtype, k, batch, channels, side, args, lines)
            continue
        for tokens in map(int, args.tokens.split(",")):
            for batch in map(int, args.batches.split(",")):
                run_case(args.device, dtype, k, batch, tokens, args, lines)
    if args.conv:
        se_merging_resnet(args.device, dtype, args, lines)
    if args.device == "cuda" and not args.conv:
        lines.append("# stacked Triton kernel vs cuBLAS at the same (K+1)-fold GEMM size")
        for k in map(int, args.ks.split(",")):
            for batch, tokens in ((16, 1), (128, 1), (16, 197), (128, 197)):
                gpu_throughput(k, batch, tokens, dtype, lines)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
