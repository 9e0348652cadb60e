"""Batched task-vector rescaling: task arithmetic, TIES and DARE in fused passes.

One op family merges T tensors (a whole state dict) from a base θ0 and K
experts θk in as few passes over memory as the method allows. For every
element, with d_k = θk − θ0 computed in float32 (float64 for float64 inputs),
and d_k = 0 where θk equals θ0 (so an entry that is the same ±inf in both, such
as a -inf attention mask, is kept as it is instead of becoming inf − inf = NaN):

1. DARE (``drop_rate`` p > 0): d_k ← 0 where the Philox draw keyed on
   (seed, tensor_key, element, k) says drop (see :mod:`.philox`), else
   d_k / (1 − p).
2. Trim (``density`` ρ < 1): per segment (one tensor, or the whole model)
   and per task, t_k is the m-th largest |d_k| with m = max(1, ⌊ρ·n⌋);
   entries with |d_k| ≥ t_k and d_k ≠ 0 are kept. Ties at the threshold are
   all kept (FusionBench's rule; mergekit's argsort breaks them arbitrarily).
3. Combine with weights w_k (per task, optionally per tensor):
   - plain (task arithmetic): m = Σ_k w_k d_k[kept];
   - ``elect_sign`` (TIES): s = sign(Σ_k w_k d_k[kept]) with 0 counted as +;
     agree_k = kept_k ∧ sign(d_k) = s; m = Σ w_k d_k[agree] / Σ w_k[agree]
     (``normalize``, the disjoint mean; 0 where nothing agrees) or the sum.
4. θ = θ0 + scale · m, written in the output dtype (the base's by default).

Layout of this module: the torch reference (the oracle), the threshold
selection (radix select over histograms, shared by the fast backends), the
Triton kernels, the native call, then the public functions.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._cuda import host_to_device, launch_device
from .._dispatch import OpBackends, resolve_backend
from ..errors import MergeOverflowError
from .._validation import (
    check_bool,
    check_choice,
    check_float32_range,
    check_float_dtype,
    check_float_tensor,
    check_has_data,
    check_int,
    check_real,
    may_overlap,
    real_numbers,
)
from .philox import dare_keep_mask_torch, drop_threshold

TASK_VECTORS = OpBackends("task_vectors", cpu=("native",), cuda=("triton",))
TRIM_SCOPES = ("tensor", "model")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MergeSpec:
    """The per-call settings every backend receives (validated)."""

    scale: float = 1.0
    density: float | None = None  # None or 1.0: no selection (given thresholds still trim at 1.0)
    trim_scope: str = "tensor"
    drop_rate: float = 0.0
    seed: int = 0
    elect_sign: bool = False
    normalize: bool = True

    @property
    def trims(self) -> bool:
        return self.density is not None and self.density < 1.0

    @property
    def drop_threshold(self) -> int:
        return drop_threshold(self.drop_rate)

    @property
    def drop_scale(self) -> float:
        return 1.0 / (1.0 - self.drop_rate)


def keep_count(density: float, numel: int) -> int:
    """How many entries a trim keeps at least: max(1, ⌊density·numel⌋) (0 for empty)."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


def segments_of(numels: Sequence[int], trim_scope: str) -> tuple[list[int], list[int]]:
    """Segment id per tensor and element count per segment for a trim scope."""
    if trim_scope == "model":
        return [0] * len(numels), [int(sum(numels))]
    return list(range(len(numels))), [int(n) for n in numels]


# --------------------------------------------------------------------------- reference


# the smallest float32 magnitude that rounds to inf in each output dtype of the fast kernels (round to
# nearest even: halfway from the largest finite value up to the next power of two); see _output_overflow
_INF_THRESHOLD = {torch.float32: float("inf"), torch.float16: 65520.0,
                  torch.bfloat16: struct.unpack("<f", struct.pack("<I", 0x7F7F8000))[0]}


def _acc_dtype(base: torch.Tensor) -> torch.dtype:
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def task_vector_torch(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """θk − θ0 flattened, in the accumulation dtype, and 0 where the expert kept the base's value: the same
    ±inf in both is an unchanged entry, not inf − inf = NaN (a finite equal pair gives +0 either way; NaN is
    never equal, so it stays NaN)."""
    acc = _acc_dtype(base)
    e, b = expert.reshape(-1).to(acc), base.reshape(-1).to(acc)
    return torch.where(e == b, torch.zeros((), dtype=acc, device=b.device), e - b)


def _deltas_torch(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: MergeSpec, key: int) -> torch.Tensor:
    """(K, n) task vectors of one tensor after DARE, in the accumulation dtype."""
    b = base.reshape(-1).to(_acc_dtype(base))
    deltas = torch.stack([task_vector_torch(e, base) for e in experts]) if experts else b.new_zeros((0, b.numel()))
    if spec.drop_rate > 0:
        for k in range(deltas.shape[0]):
            keep = dare_keep_mask_torch(b.numel(), seed=spec.seed, tensor_key=key, task=k, p=spec.drop_rate,
                                        device=b.device)
            deltas[k] = torch.where(keep, deltas[k] * spec.drop_scale, torch.zeros_like(deltas[k]))
    return deltas


def merge_task_vectors_torch(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    weights: torch.Tensor,
    spec: MergeSpec,
    tensor_keys: Sequence[int],
    out_dtypes: Sequence[torch.dtype],
    thresholds: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference: plain torch, one tensor at a time, selection by ``kthvalue``.

    ``experts[k][t]``; ``weights`` is (T, K); ``thresholds`` (S, K), if given,
    replaces the selection (streamed merges compute it beforehand). Returns the merged tensors and
    (T, 2) int64 counts per tensor: [t, 0] the (element, task) pairs whose θk − θ0 is not finite, [t, 1]
    the merged entries that are not finite in the output dtype where the base entry is (see
    :func:`_output_overflow`).
    """
    num_tasks = len(experts)
    # counted on the task vectors as computed (float32, or float64 for float64 inputs), so a
    # difference that overflows counts too; the counts stay on the device (read back once by the caller)
    counts = [sum((~torch.isfinite(task_vector_torch(experts[k][t], b))).sum() for k in range(num_tasks))
              for t, b in enumerate(bases)]
    deltas = [_deltas_torch(b, [experts[k][t] for k in range(num_tasks)], spec, tensor_keys[t])
              for t, b in enumerate(bases)]
    kept = [d != 0 for d in deltas]
    if spec.trims or thresholds is not None:
        if thresholds is None:
            thresholds = _kth_thresholds_torch(deltas, spec, num_tasks)
        seg_of, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
        for s, n in enumerate(seg_numel):
            members = [t for t in range(len(bases)) if seg_of[t] == s]
            if n == 0:
                continue
            threshold = thresholds[s][:, None]  # in the task vectors' dtype (see _check_thresholds)
            for t in members:
                kept[t] &= deltas[t].abs() >= threshold
    outs = []
    for t, base in enumerate(bases):
        d, keep = deltas[t], kept[t]
        w = weights[t].to(d.dtype).to(d.device)[:, None]  # (K, 1)
        contribution = torch.where(keep, w * d, torch.zeros_like(d))
        if spec.elect_sign:
            positive = contribution.sum(0) >= 0
            agree = keep & ((d > 0) == positive)
            numerator = torch.where(agree, w * d, torch.zeros_like(d)).sum(0)
            if spec.normalize:
                denominator = torch.where(agree, w.expand_as(d), torch.zeros_like(d)).sum(0)
                safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
                merged = torch.where(denominator != 0, numerator / safe, torch.zeros_like(numerator))
            else:
                merged = numerator
        else:
            merged = contribution.sum(0)
        b = base.reshape(-1).to(d.dtype)
        result = (b + spec.scale * merged).to(out_dtypes[t])
        overflow = _output_overflow(b, result)
        counts[t] = torch.stack([torch.as_tensor(counts[t], device=overflow.device), overflow])
        outs.append(result.reshape(base.shape))
    nonfinite = torch.stack(counts) if counts else torch.zeros((0, 2), dtype=torch.int64)
    return outs, nonfinite


def _output_overflow(base: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """How many merged entries are NaN/±inf in ``result``'s dtype and are not the same infinity as the base
    entry rounded to that dtype: the combination overflowed, or the merge is beyond a 16-bit output's range.
    Not counted: the base's own infinities, and an entry whose base that dtype holds as the same infinity (a
    -1e9 mask that a float16 output makes -inf). Counted: NaN, or the opposite infinity, where the base rounds
    to ±inf (a mask the merge moved to +1e9, a combination that overflowed to NaN there), and a NaN base's
    NaN (its task vectors are NaN too, reported first). The fast kernels count the same with comparisons
    against the magnitude that rounds to inf."""
    converted = base.to(result.dtype)
    return (~torch.isfinite(result) & ~(torch.isinf(converted) & (result == converted))).sum()


def _kth_thresholds_torch(deltas: Sequence[torch.Tensor], spec: MergeSpec, num_tasks: int) -> torch.Tensor:
    """(S, K) trim thresholds by ``kthvalue`` on the (K, n_t) task vectors as computed (float32, or float64 for
    float64 inputs): the reference's selection, and the float64 path of :func:`magnitude_thresholds`.
    +inf for an empty segment."""
    seg_of, seg_numel = segments_of([d.shape[1] for d in deltas], spec.trim_scope)
    dtype = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32  # kthvalue's, exact
    device = deltas[0].device if deltas else None
    out = torch.full((len(seg_numel), num_tasks), torch.inf, dtype=dtype, device=device)
    for s, n in enumerate(seg_numel):
        if n == 0 or num_tasks == 0:
            continue
        magnitudes = torch.cat([deltas[t].abs() for t in range(len(deltas)) if seg_of[t] == s], dim=1)  # (K, n)
        # the m-th largest = the (n − m + 1)-th smallest
        out[s] = magnitudes.kthvalue(n - keep_count(spec.density, n) + 1, dim=1).values
    return out


# --------------------------------------------------------------------------- threshold selection
#
# The fast backends find t_k by radix select on the float32 bit pattern of |d|
# (monotone in the value for non-negative floats): a few histogram passes over
# digits of those bits, each counting only entries whose higher bits match the
# prefix found so far. (Non-finite task vectors are caught by the apply pass.)

# (shift, bits) per pass, most significant first. On CPU, per-thread histograms make wide digits
# cheap, so three passes over memory win. On GPU, tl.histogram's cost grows with the number of bins
# (warp ballots per bin), so four 256-bin passes should keep each pass memory-bound (not yet
# measured on a GPU).
RADIX_LEVELS = ((20, 11), (10, 10), (0, 10))
RADIX_LEVELS_NARROW = ((24, 8), (16, 8), (8, 8), (0, 8))


def radix_levels(backend: str) -> tuple[tuple[int, int], ...]:
    return RADIX_LEVELS_NARROW if backend == "triton" else RADIX_LEVELS


def magnitude_histogram_torch(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    spec: MergeSpec,
    tensor_keys: Sequence[int],
    segment_ids: Sequence[int],
    num_segments: int,
    shift: int,
    bits: int,
    prefix: torch.Tensor,
) -> torch.Tensor:
    """Reference histogram pass: (S, K, 2**bits) int64 counts of digit (key >> shift) & (2**bits − 1)
    over entries whose key >> (shift + bits) equals prefix[s, k] >> (shift + bits)."""
    num_tasks = len(experts)
    counts = torch.zeros((num_segments, num_tasks, 1 << bits), dtype=torch.int64, device=prefix.device)
    for t, base in enumerate(bases):
        s = segment_ids[t]
        d = _deltas_torch(base, [experts[k][t] for k in range(num_tasks)], spec, tensor_keys[t])
        keys = d.abs().to(torch.float32).view(torch.int32).to(torch.int64)
        high = shift + bits
        for k in range(num_tasks):
            match = (keys[k] >> high) == (prefix[s, k] >> high)
            digits = (keys[k][match] >> shift) & ((1 << bits) - 1)
            counts[s, k] += torch.bincount(digits, minlength=1 << bits)
    return counts


def radix_step(counts: torch.Tensor, prefix: torch.Tensor, remaining: torch.Tensor, shift: int) -> None:
    """Fix one digit of every (segment, task) threshold, in place, without a host sync.

    ``remaining`` is the rank (1 = largest) of the wanted entry among those
    matching ``prefix``; the digit is the largest bin whose count of entries
    at or above it reaches that rank.
    """
    at_or_above = counts.flip(-1).cumsum(-1).flip(-1)  # [..., b] = entries with digit >= b
    digit = (at_or_above >= remaining[..., None]).sum(-1) - 1
    digit = digit.clamp(min=0)  # empty segments (remaining > total) end at digit 0
    above = torch.gather(torch.nn.functional.pad(at_or_above, (0, 1)), -1, (digit + 1)[..., None])[..., 0]
    remaining -= above
    prefix |= digit << shift


def select_thresholds(histogram, keep: torch.Tensor, num_tasks: int, levels=RADIX_LEVELS) -> torch.Tensor:
    """Run the radix passes of ``levels`` with ``histogram(shift, bits, prefix) -> counts``.

    ``keep`` is (S,) int64: the rank m per segment. Returns the (S, K) float32
    thresholds (+inf for empty segments).
    """
    num_segments = keep.shape[0]
    prefix = torch.zeros((num_segments, num_tasks), dtype=torch.int64, device=keep.device)
    remaining = keep[:, None].expand(num_segments, num_tasks).clone()
    for shift, bits in levels:
        radix_step(histogram(shift, bits, prefix), prefix, remaining, shift)
    thresholds = prefix.to(torch.int32).view(torch.float32)
    return torch.where(keep[:, None] > 0, thresholds, torch.full_like(thresholds, float("inf")))


# --------------------------------------------------------------------------- triton kernels
# Contract (same as the native functions below):
#   _magnitude_histogram_triton(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix)
#       -> (S, K, 2**bits) int64 counts on the device (same meaning as magnitude_histogram_torch)
#   _merge_apply_triton(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds)
#       writes outs; returns (T, 2) int64 counts: [t, 0] (element, task) pairs with non-finite θk − θ0,
#       [t, 1] outputs not finite in their dtype that are not the base's own infinity (see _output_overflow)
# Inputs are contiguous, of FAST_DTYPES, on one device; weights (T, K) float32 on the device;
# thresholds (S, K) float32 on the device or None (no trim).
#
# Multi-tensor design: each pass is ONE launch per group of tensors sharing (input dtype, output
# dtype, 16-byte alignment) - pointer element types are compile-time, so a group is the unit -
# never a launch per tensor. The host packs, per group, one int64 device table: a row per tensor
# (_ROW_* fields: data pointers, numel, segment, RNG key, index in the call, first block) followed
# by the K expert pointers of every row ([row * K + k]). A program -> row map (repeat_interleave on
# the device, no host sync) lets program `pid` find its tensor in O(1). An apply program does one
# BLOCK of one tensor, a histogram program CHUNK blocks (to amortise its atomics); both loop over
# the K experts at run time (K is not specialised: no recompile per K). Element indices are int64
# (a state dict can exceed 2**31 elements).

try:  # triton is optional: `import merging_kernels` must work without it
    import triton
    import triton.language as tl

    from .philox import philox4x32_10_triton
except ImportError:
    triton = None

_APPLY_BLOCK, _APPLY_WARPS = 1024, 4  # 8 elements per thread: 16-byte vector loads, modest registers
_HIST_BLOCK, _HIST_WARPS, _HIST_CHUNK = 1024, 4, 16  # a program: 16 blocks of one tensor
_ROW_WIDTH = 8  # int64 fields per table row, in this order:
_ROW_BASE, _ROW_OUT, _ROW_NUMEL, _ROW_SEGMENT, _ROW_KEY, _ROW_TENSOR, _ROW_FIRST_BLOCK, _ROW_NUM_BLOCKS = range(8)

if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    # jit functions may only read constexpr globals
    _K_WIDTH, _K_BASE, _K_OUT, _K_NUMEL = (tl.constexpr(v) for v in (_ROW_WIDTH, _ROW_BASE, _ROW_OUT, _ROW_NUMEL))
    _K_SEGMENT, _K_KEY, _K_TENSOR, _K_FIRST = (tl.constexpr(v) for v in (_ROW_SEGMENT, _ROW_KEY, _ROW_TENSOR,
                                                                         _ROW_FIRST_BLOCK))
    _K_INF = tl.constexpr(float("inf"))

    @triton.jit
    def _tv_locate(block_row_ptr, table_ptr, BLOCK: tl.constexpr):
        """This program's table row, that row's address, the tensor's numel and the block's first element."""
        pid = tl.program_id(0)
        row = tl.load(block_row_ptr + pid).to(tl.int64)
        meta = table_ptr + row * _K_WIDTH
        start = (pid - tl.load(meta + _K_FIRST)) * BLOCK  # int64
        return row, meta, tl.load(meta + _K_NUMEL), start

    @triton.jit
    def _tv_load(address, start, idx, inb, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, EVEN: tl.constexpr,
                 EVICT: tl.constexpr):
        """Load DTYPE elements [start + idx] of the tensor at int64 ``address`` as float32.

        A pointer loaded from a table has unknown alignment; the hint (checked on the host) is what
        lets the compiler emit 16-byte vector loads. Full blocks (EVEN) load without a mask, since a
        mask against a run-time numel would also block vectorisation.
        """
        ptr = address.to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        ptr += start  # the int64 block offset once, then int32 per element (cheaper addresses)
        if EVEN:
            x = tl.load(ptr + idx, eviction_policy=EVICT)
        else:
            x = tl.load(ptr + idx, mask=inb, other=0.0, eviction_policy=EVICT)
        return x.to(tl.float32)

    @triton.jit
    def _tv_delta(expert_address, b, start, idx, inb, key, k, drop_threshold, drop_scale, seed_lo, seed_hi,
                  DTYPE: tl.constexpr, ALIGNED: tl.constexpr, EVEN: tl.constexpr, HAS_DARE: tl.constexpr):
        """Task vector k of a block after DARE, and before it (for the finiteness count)."""
        e = _tv_load(expert_address, start, idx, inb, DTYPE, ALIGNED, EVEN, "evict_first")  # read once
        raw = tl.where(e == b, 0.0, e - b)  # as task_vector_torch: an unchanged ±inf is 0, not NaN
        d = raw
        if HAS_DARE:  # tl.cast, not .to: the interpreter passes the loop index k as a Python int
            # counter = (element lo, element hi, tensor key, task), key = seed: see philox.py. Blocks
            # start at multiples of BLOCK, which divides 2**32, so the high word is one per block.
            element_lo = tl.cast(start, tl.uint32) + idx.to(tl.uint32)
            word, _w1, _w2, _w3 = philox4x32_10_triton(element_lo, tl.cast(start >> 32, tl.uint32), key,
                                                       tl.cast(k, tl.uint32), tl.cast(seed_lo, tl.uint32),
                                                       tl.cast(seed_hi, tl.uint32))
            d = tl.where((word >> 8) < tl.cast(drop_threshold, tl.uint32), 0.0, d * drop_scale)
        return d, raw

    @triton.jit
    def _tv_histogram_block(base_address, expert_address, numel, start, key, k, prefix, drop_threshold, drop_scale,
                            seed_lo, seed_hi, IN_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, HAS_DARE: tl.constexpr,
                            SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        """Histogram of the digits of task vector k over one block's entries that match the prefix."""
        idx = tl.arange(0, BLOCK)
        inb = idx < numel - start
        b = _tv_load(base_address, start, idx, inb, IN_DTYPE, ALIGNED, EVEN, "")  # read again per task: keep
        d, _raw = _tv_delta(expert_address, b, start, idx, inb, key, k, drop_threshold, drop_scale, seed_lo, seed_hi,
                          IN_DTYPE, ALIGNED, EVEN, HAS_DARE)
        # float32 bits of |d|: non-negative, so int32 and its shifts order like the magnitudes
        mag = tl.abs(d).to(tl.int32, bitcast=True)
        match = inb
        if SHIFT + BITS < 32:  # only entries whose higher digits equal the prefix found so far
            match = match & ((mag >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        digit = (mag >> SHIFT) & ((1 << BITS) - 1)
        # the last pass matches few entries: skip the block histogram (its cost grows with the bins) if none do
        if tl.max(match.to(tl.int32), axis=0) > 0:
            hist = tl.histogram(digit, 1 << BITS, mask=match)
        else:
            hist = tl.zeros([1 << BITS], dtype=tl.int32)
        return hist

    @triton.jit(do_not_specialize=["num_tasks", "drop_threshold", "seed_lo", "seed_hi"])
    def _tv_histogram_kernel(block_row_ptr, table_ptr, expert_table_ptr, prefix_ptr, counts_ptr, num_tasks,
                             drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE: tl.constexpr,
                             ALIGNED: tl.constexpr, HAS_DARE: tl.constexpr, SHIFT: tl.constexpr,
                             BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """counts[segment, k, digit] += entries with that digit in this program's CHUNK blocks of one tensor
        (see magnitude_histogram_torch)."""
        row, meta, numel, start = _tv_locate(block_row_ptr, table_ptr, BLOCK * CHUNK)
        base_address = tl.load(meta + _K_BASE)
        segment = tl.load(meta + _K_SEGMENT)
        key = tl.load(meta + _K_KEY).to(tl.uint32)
        bins = tl.arange(0, 1 << BITS)
        # Tasks outermost: one register histogram per task, flushed once per chunk, since the global
        # atomics are what a chunk amortises; the chunk's base, re-read per task, is small enough to
        # come from L2.
        for k in range(num_tasks):
            expert_address = tl.load(expert_table_ptr + row * num_tasks + k)
            prefix = tl.load(prefix_ptr + segment * num_tasks + k).to(tl.int32)
            hist = tl.zeros([1 << BITS], dtype=tl.int32)
            for j in range(CHUNK):
                sub = start + j * BLOCK
                if sub + BLOCK <= numel:
                    hist += _tv_histogram_block(base_address, expert_address, numel, sub, key, k, prefix,
                                                drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE, ALIGNED,
                                                HAS_DARE, SHIFT, BITS, BLOCK, True)
                elif sub < numel:
                    hist += _tv_histogram_block(base_address, expert_address, numel, sub, key, k, prefix,
                                                drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE, ALIGNED,
                                                HAS_DARE, SHIFT, BITS, BLOCK, False)
            # only the occupied bins go to global memory (task vectors fill few exponent bins)
            tl.atomic_add(counts_ptr + (segment * num_tasks + k) * (1 << BITS) + bins, hist.to(tl.int64),
                          mask=hist > 0, sem="relaxed")

    @triton.jit
    def _tv_to_bfloat16(x):
        """float32 -> bfloat16 rounded to nearest even, as torch does, written out because the
        interpreter's cast truncates (on a GPU this equals the cvt.rn it replaces)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _tv_apply_block(meta, row, numel, start, expert_table_ptr, weights_ptr, thresholds_ptr, nonfinite_ptr,
                        num_tasks, scale, drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE: tl.constexpr,
                        OUT_DTYPE: tl.constexpr, OUT_LIMIT: tl.constexpr, ALIGNED: tl.constexpr,
                        HAS_DARE: tl.constexpr, HAS_TRIM: tl.constexpr, ELECT_SIGN: tl.constexpr,
                        NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        inb = idx < numel - start
        b = _tv_load(tl.load(meta + _K_BASE), start, idx, inb, IN_DTYPE, ALIGNED, EVEN, "evict_first")
        segment = tl.load(meta + _K_SEGMENT)
        tensor = tl.load(meta + _K_TENSOR)
        key = tl.load(meta + _K_KEY).to(tl.uint32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        # one pass over the experts: the sign election needs Σ over all k before choosing, so the
        # agreeing sums are kept for both signs and picked afterwards (unused ones are eliminated)
        total = tl.zeros([BLOCK], dtype=tl.float32)  # Σ w d [kept], in task order like the reference
        pos_num = tl.zeros([BLOCK], dtype=tl.float32)
        pos_den = tl.zeros([BLOCK], dtype=tl.float32)
        neg_num = tl.zeros([BLOCK], dtype=tl.float32)
        neg_den = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(num_tasks):
            d, raw = _tv_delta(tl.load(expert_table_ptr + row * num_tasks + k), b, start, idx, inb, key, k,
                               drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE, ALIGNED, EVEN, HAS_DARE)
            # the float32 task vector before DARE, so an overflowing difference counts; masked lanes load 0
            bad += (~(tl.abs(raw) < _K_INF)).to(tl.int32)
            kept = d != 0.0
            if HAS_TRIM:
                kept = kept & (tl.abs(d) >= tl.load(thresholds_ptr + segment * num_tasks + k))
            w = tl.load(weights_ptr + tensor * num_tasks + k)
            wd = tl.where(kept, w * d, 0.0)
            total += wd
            if ELECT_SIGN:
                pos = kept & (d > 0.0)
                neg = kept & ~(d > 0.0)  # as the reference: "not positive" (NaN included)
                pos_num += tl.where(pos, wd, 0.0)
                pos_den += tl.where(pos, w, 0.0)
                neg_num += tl.where(neg, wd, 0.0)
                neg_den += tl.where(neg, w, 0.0)
        if ELECT_SIGN:
            positive = total >= 0.0  # a zero sum elects +
            merged = tl.where(positive, pos_num, neg_num)
            if NORMALIZE:
                den = tl.where(positive, pos_den, neg_den)
                # div_rn: correctly rounded like torch (a plain fp32 "/" compiles to div.full, up to 2 ulp off)
                merged = tl.where(den != 0.0, tl.div_rn(merged, tl.where(den != 0.0, den, 1.0)), 0.0)
        else:
            merged = total
        result = b + scale * merged
        # not finite in the output dtype (OUT_LIMIT: the magnitude that rounds to inf there; |x| < OUT_LIMIT is
        # false for NaN) and not the same infinity as the base there: the base is finite there, or the result is
        # NaN or has the other sign (see _output_overflow); masked lanes load b = 0 and give 0
        other = (result != result) | ((result < 0.0) != (b < 0.0))
        overflow = (~(tl.abs(result) < OUT_LIMIT)) & ((tl.abs(b) < OUT_LIMIT) | other)
        if OUT_DTYPE == tl.bfloat16:
            result = _tv_to_bfloat16(result)
        else:
            result = result.to(OUT_DTYPE)
        out = tl.load(meta + _K_OUT).to(tl.pointer_type(OUT_DTYPE))
        if ALIGNED:
            out = tl.multiple_of(out, 16)
        out += start
        if EVEN:
            tl.store(out + idx, result, eviction_policy="evict_first")
        else:
            tl.store(out + idx, result, mask=inb, eviction_policy="evict_first")
        num_bad = tl.sum(bad, axis=0)
        tl.atomic_add(nonfinite_ptr + 2 * tensor, num_bad.to(tl.int64), mask=num_bad > 0, sem="relaxed")
        num_over = tl.sum(overflow.to(tl.int32), axis=0)
        tl.atomic_add(nonfinite_ptr + 2 * tensor + 1, num_over.to(tl.int64), mask=num_over > 0, sem="relaxed")

    @triton.jit(do_not_specialize=["num_tasks", "drop_threshold", "seed_lo", "seed_hi"])
    def _tv_apply_kernel(block_row_ptr, table_ptr, expert_table_ptr, weights_ptr, thresholds_ptr, nonfinite_ptr,
                         num_tasks, scale, drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE: tl.constexpr,
                         OUT_DTYPE: tl.constexpr, OUT_LIMIT: tl.constexpr, ALIGNED: tl.constexpr,
                         HAS_DARE: tl.constexpr, HAS_TRIM: tl.constexpr, ELECT_SIGN: tl.constexpr,
                         NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
        """out = θ0 + scale · combine_k(w d_k) for one block of one tensor (see merge_task_vectors_torch)."""
        row, meta, numel, start = _tv_locate(block_row_ptr, table_ptr, BLOCK)
        if start + BLOCK <= numel:
            _tv_apply_block(meta, row, numel, start, expert_table_ptr, weights_ptr, thresholds_ptr, nonfinite_ptr,
                            num_tasks, scale, drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE, OUT_DTYPE,
                            OUT_LIMIT, ALIGNED, HAS_DARE, HAS_TRIM, ELECT_SIGN, NORMALIZE, BLOCK, True)
        else:
            _tv_apply_block(meta, row, numel, start, expert_table_ptr, weights_ptr, thresholds_ptr, nonfinite_ptr,
                            num_tasks, scale, drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE, OUT_DTYPE,
                            OUT_LIMIT, ALIGNED, HAS_DARE, HAS_TRIM, ELECT_SIGN, NORMALIZE, BLOCK, False)


def _triton_groups(bases, experts, outs):
    """Non-empty tensors grouped by (input dtype, output dtype, all pointers 16-byte aligned)."""
    groups: dict[tuple, list[int]] = {}
    for t, base in enumerate(bases):
        if base.numel() == 0:
            continue
        tensors = [base] + [task[t] for task in experts] + ([outs[t]] if outs is not None else [])
        aligned = all(x.data_ptr() % 16 == 0 for x in tensors)
        groups.setdefault((base.dtype, outs[t].dtype if outs is not None else None, aligned), []).append(t)
    return groups


def _triton_tables(members, bases, experts, outs, tensor_keys, segment_ids, block):
    """Device tables of one group: (block -> row map, row table, expert pointer table, number of blocks)."""
    num_tasks = len(experts)
    rows, expert_ptrs, first = [], [], 0
    for t in members:
        num_blocks = -(-bases[t].numel() // block)
        rows.append([bases[t].data_ptr(), outs[t].data_ptr() if outs is not None else 0, bases[t].numel(),
                     segment_ids[t], tensor_keys[t], t, first, num_blocks])
        expert_ptrs.extend(experts[k][t].data_ptr() for k in range(num_tasks))
        first += num_blocks
    if first >= 2**31:
        raise ValueError("too many elements for one triton launch")  # > 4e12 elements
    device = bases[members[0]].device
    # one queued host -> device copy for the whole group (rebuilt each pass: streamed chunks change)
    packed = host_to_device([v for r in rows for v in r] + expert_ptrs, torch.int64, device)
    table, expert_table = packed[:len(rows) * _ROW_WIDTH], packed[len(rows) * _ROW_WIDTH:]
    block_row = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32, device=device),
                                        table.view(-1, _ROW_WIDTH)[:, _ROW_NUM_BLOCKS], output_size=first)
    return block_row, table, expert_table, first


def _dare_args(spec):
    return spec.drop_threshold, spec.drop_scale, spec.seed & 0xFFFFFFFF, spec.seed >> 32


def _magnitude_histogram_triton(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix):
    num_tasks = len(experts)
    device = prefix.device
    counts = torch.zeros((num_segments, num_tasks, 1 << bits), dtype=torch.int64, device=device)
    prefix = prefix.to(torch.int64).contiguous()
    for (dtype, _, aligned), members in _triton_groups(bases, experts, None).items():
        block_row, table, expert_table, num_blocks = _triton_tables(members, bases, experts, None, tensor_keys,
                                                                    segment_ids, _HIST_BLOCK * _HIST_CHUNK)
        with launch_device(counts):  # triton launches on the current device, not the tensors'
            _tv_histogram_kernel[(num_blocks,)](
                block_row, table, expert_table, prefix, counts, num_tasks, *_dare_args(spec),
                IN_DTYPE=_TL_DTYPES[dtype], ALIGNED=aligned, HAS_DARE=spec.drop_threshold > 0, SHIFT=shift,
                BITS=bits, BLOCK=_HIST_BLOCK, CHUNK=_HIST_CHUNK, num_warps=_HIST_WARPS)
    return counts


def _merge_apply_triton(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds):
    num_tasks = len(experts)
    device = weights.device
    nonfinite = torch.zeros((len(bases), 2), dtype=torch.int64, device=device)
    weights = weights.to(torch.float32).contiguous()
    has_trim = thresholds is not None
    thresholds = thresholds.to(torch.float32).contiguous() if has_trim else weights  # placeholder when unused
    drop_threshold, drop_scale, seed_lo, seed_hi = _dare_args(spec)
    for (in_dtype, out_dtype, aligned), members in _triton_groups(bases, experts, outs).items():
        block_row, table, expert_table, num_blocks = _triton_tables(members, bases, experts, outs, tensor_keys,
                                                                    segment_ids, _APPLY_BLOCK)
        with launch_device(nonfinite):  # triton launches on the current device, not the tensors'
            _tv_apply_kernel[(num_blocks,)](
                block_row, table, expert_table, weights, thresholds, nonfinite, num_tasks, float(spec.scale),
                drop_threshold, drop_scale, seed_lo, seed_hi, IN_DTYPE=_TL_DTYPES[in_dtype],
                OUT_DTYPE=_TL_DTYPES[out_dtype], OUT_LIMIT=_INF_THRESHOLD[out_dtype], ALIGNED=aligned,
                HAS_DARE=drop_threshold > 0, HAS_TRIM=has_trim,
                ELECT_SIGN=spec.elect_sign, NORMALIZE=spec.normalize, BLOCK=_APPLY_BLOCK, num_warps=_APPLY_WARPS,
                enable_fp_fusion=False)  # no FMA contraction: round like the torch reference
    return nonfinite


# --------------------------------------------------------------------------- native (C++/OpenMP)
# csrc/cpu/task_vectors.cpp; the binding takes raw addresses of contiguous CPU
# tensors (validated above), so _C needs no torch headers and builds against
# any torch version.

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _native_tensor_lists(bases, experts):
    num_tasks = len(experts)
    return (
        [b.data_ptr() for b in bases],
        [experts[k][t].data_ptr() for t in range(len(bases)) for k in range(num_tasks)],
        [b.numel() for b in bases],
        [_DTYPE_CODES[b.dtype] for b in bases],
    )


def _magnitude_histogram_native(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix):
    from .._native import native_module

    base_ptrs, expert_ptrs, numels, dtypes = _native_tensor_lists(bases, experts)
    prefix = prefix.contiguous()
    counts = torch.zeros((num_segments, len(experts), 1 << bits), dtype=torch.int64)
    native_module("cpu").task_vectors_histogram(
        base_ptrs, expert_ptrs, numels, dtypes, list(tensor_keys), list(segment_ids), num_segments, len(experts),
        shift, bits, prefix.data_ptr(), counts.data_ptr(), spec.drop_threshold, spec.drop_scale, spec.seed)
    return counts


def _merge_apply_native(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds):
    from .._native import native_module

    base_ptrs, expert_ptrs, numels, dtypes = _native_tensor_lists(bases, experts)
    nonfinite = torch.zeros((len(bases), 2), dtype=torch.int64)
    weights = weights.contiguous()
    thresholds = thresholds.contiguous() if thresholds is not None else None
    native_module("cpu").task_vectors_apply(
        base_ptrs, expert_ptrs, [o.data_ptr() for o in outs], numels, dtypes, [_DTYPE_CODES[o.dtype] for o in outs],
        list(tensor_keys), list(segment_ids), len(experts), weights.data_ptr(), spec.scale,
        thresholds.data_ptr() if thresholds is not None else 0, spec.elect_sign, spec.normalize,
        spec.drop_threshold, spec.drop_scale, spec.seed, nonfinite.data_ptr())
    return nonfinite


# --------------------------------------------------------------------------- public functions

_HISTOGRAM = {"torch": magnitude_histogram_torch, "triton": _magnitude_histogram_triton,
              "native": _magnitude_histogram_native}
_APPLY = {"triton": _merge_apply_triton, "native": _merge_apply_native}


def make_spec(*, scale=1.0, density=None, trim_scope="tensor", drop_rate=0.0, seed=0, elect_sign=False,
              normalize=True) -> MergeSpec:
    """Validate the scalar settings of a merge."""
    if density is not None:
        density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    return MergeSpec(
        scale=check_real(scale, "scale"),
        density=density,
        trim_scope=check_choice(trim_scope, "trim_scope", TRIM_SCOPES),
        drop_rate=check_real(drop_rate, "drop_rate", low=0.0, high=1.0, high_open=True),
        seed=check_int(seed, "seed", low=0, high=2**64 - 1),
        elect_sign=check_bool(elect_sign, "elect_sign"),
        normalize=check_bool(normalize, "normalize"),
    )


def _check_inputs(bases, experts, names):
    if isinstance(bases, torch.Tensor) or not isinstance(bases, Sequence):
        raise TypeError("bases must be a sequence of tensors")
    if isinstance(experts, torch.Tensor) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise TypeError("experts must be a non-empty sequence (one entry per task) of sequences of tensors")
    num_tensors = len(bases)
    names = _ordered(names, num_tensors, "names", "tensor names (one per base tensor, e.g. a state dict's keys())") \
        if names is not None else [f"bases[{t}]" for t in range(num_tensors)]
    for t, base in enumerate(bases):
        check_has_data(check_float_tensor(base, f"base tensor {names[t]!r}"), f"base tensor {names[t]!r}")
    device = bases[0].device if num_tensors else torch.device("cpu")
    for k, task in enumerate(experts):
        if isinstance(task, torch.Tensor) or not isinstance(task, Sequence) or len(task) != num_tensors:
            raise ValueError(f"experts[{k}] must be a sequence of {num_tensors} tensors (one per base tensor)")
        for t, (base, tensor) in enumerate(zip(bases, task)):
            label = f"expert {k} tensor {names[t]!r}"
            check_float_tensor(tensor, label)
            if tensor.shape != base.shape:
                raise ValueError(f"{label} has shape {tuple(tensor.shape)}, base has {tuple(base.shape)}")
            if tensor.dtype != base.dtype:
                raise TypeError(f"{label} has dtype {tensor.dtype}, base has {base.dtype}")
    for t, base in enumerate(bases):
        if base.device != device:
            raise ValueError(f"base tensor {names[t]!r} is on {base.device}, others on {device}")
        for k in range(len(experts)):
            if experts[k][t].device != device:
                raise ValueError(f"expert {k} tensor {names[t]!r} is on {experts[k][t].device}, base on {device}")
    return names, device


def _weights_matrix(weights, num_tensors: int, num_tasks: int) -> torch.Tensor:
    """Weights as a (T, K) float64 CPU tensor from (K,) or (T, K)."""
    w = real_numbers(weights, "weights must be real numbers of shape (K,) or (T, K)")
    if w.ndim == 1 and w.shape[0] == num_tasks:
        w = w.expand(num_tensors, num_tasks)
    if w.shape != (num_tensors, num_tasks):
        raise ValueError(f"weights must have shape ({num_tasks},) or ({num_tensors}, {num_tasks}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")
    return w.contiguous()


def merge_task_vectors(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    weights,
    *,
    scale: float = 1.0,
    density: float | None = None,
    trim_scope: str = "tensor",
    drop_rate: float = 0.0,
    seed: int = 0,
    elect_sign: bool = False,
    normalize: bool = True,
    tensor_keys: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    thresholds: torch.Tensor | None = None,
    out: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Merge T tensors from a base and K experts in fused passes (see the module docstring).

    Args:
        bases: T tensors θ0 (float32/float16/bfloat16; float64 runs on the torch backend).
        experts: K sequences of T tensors, ``experts[k][t]`` matching ``bases[t]`` in
            shape, dtype and device.
        weights: coefficients w, shape (K,) or (T, K).
        scale: multiplier of the combined task vector (TIES' λ).
        density: fraction ρ ∈ (0, 1] of entries kept by magnitude per task; None: no trim.
        trim_scope: ``"tensor"`` (per tensor, mergekit) or ``"model"`` (over all T
            tensors per task, FusionBench).
        drop_rate: DARE's p ∈ [0, 1); kept entries are rescaled by 1/(1 − p).
        seed: DARE seed, 0 ≤ seed < 2**64.
        elect_sign: TIES sign election and disjoint combination.
        normalize: with ``elect_sign``, divide by the sum of agreeing weights (disjoint mean).
        tensor_keys: 32-bit RNG id per tensor (default: the index); see :func:`.philox.tensor_key`.
        names: tensor names for error messages.
        thresholds: precomputed (S, K) trim thresholds (from :func:`magnitude_thresholds`),
            e.g. when the model is streamed; S = T (tensor scope) or 1 (model scope); magnitudes
            ≥ 0 or +inf (NaN and negative values are refused). They need a ``density`` (refused with
            None, which asks for no trim) and are always used as given, at ``density=1.0`` too: those
            of ``magnitude_thresholds(density=1.0)`` keep every non-zero entry, the same merge as
            no thresholds, and any others trim as they say (never silently dropped).
        out: T tensors to write into (shapes of the bases, no overlapping memory); returned.
            They may be the bases themselves (an in-place merge; tied tensors are handled). The
            fast backends write most ``out`` tensors directly, so when ``check_finite`` raises they
            (the bases, in an in-place merge) may already hold the merge, NaN/inf included; the
            torch backend writes ``out`` only after the check passes.
        out_dtype: dtype of new outputs (default: each base's dtype); with ``out``, it must
            equal the out tensors' dtype.
        check_finite: raise ValueError naming the tensor when any θk − θ0, as computed in
            float32 (float64 for float64 inputs; 0 where θk equals θ0, the same ±inf included),
            is NaN/±inf — overflow included; and :class:`~merging_kernels.MergeOverflowError` (a
            ValueError) when a merged entry is NaN/±inf in its output dtype where the base entry,
            rounded to that dtype, is finite: values beyond a 16-bit output's range, or a
            combination that overflowed (it sums w_k·d_k before any division, so task vectors
            within ~2× of float32's maximum can sum to ±inf where the disjoint mean would be
            finite). The base's own infinities, and a -1e9 mask that a float16 output
            turns into -inf, are kept where the merge gives that same infinity; NaN or the other
            infinity there is refused (a mask moved to +1e9). Every backend counts both in its
            one pass.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (fastest available).

    Returns:
        T merged tensors with the bases' shapes, dtype ``out_dtype`` or else each base's (``out``
        if given: its tensors, in their own dtypes), detached from autograd on every backend.
        Inputs are never modified, except those passed as ``out``.
    """
    names, device = _check_inputs(bases, experts, names)
    spec = make_spec(scale=scale, density=density, trim_scope=trim_scope, drop_rate=drop_rate, seed=seed,
                     elect_sign=elect_sign, normalize=normalize)
    check_finite = check_bool(check_finite, "check_finite")
    num_tensors, num_tasks = len(bases), len(experts)
    w = _weights_matrix(weights, num_tensors, num_tasks)
    keys = _tensor_keys(tensor_keys, num_tensors)
    out_dtypes = _out_dtypes(bases, out, out_dtype, names)
    chosen = _choose_backend(backend, device, bases, out_dtypes)
    narrow = [t for t, b in enumerate(bases) if b.dtype != torch.float64]  # combined in float32: beyond its
    if narrow:  # range a coefficient is ±inf (float64 tensors combine in float64)
        why = "the precision the merge combines in for these tensors"
        check_float32_range(w[narrow], "weights", why)
        check_float32_range(torch.tensor(spec.scale, dtype=torch.float64), "scale", why)
    seg_of, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
    if thresholds is not None:
        if spec.density is None:
            raise ValueError("thresholds apply only to a trimming merge (density in (0, 1]); got density="
                             f"{spec.density}")
        wide = any(b.dtype == torch.float64 for b in bases)  # float64 deltas: thresholds kept in float64
        thresholds = _check_thresholds(thresholds, len(seg_numel), num_tasks, device,
                                       torch.float64 if wide else torch.float32)
    # a merge is not differentiable: every backend returns detached tensors (the fast ones write raw memory)
    with torch.no_grad():
        return _merge_checked(bases, experts, w, spec, keys, names, out, out_dtypes, chosen, device, seg_of,
                              seg_numel, thresholds, check_finite)


def _merge_checked(bases, experts, w, spec, keys, names, out, out_dtypes, chosen, device, seg_of, seg_numel,
                   thresholds, check_finite) -> list[torch.Tensor]:
    """merge_task_vectors after validation."""
    if chosen == "torch":
        results, nonfinite = merge_task_vectors_torch(bases, experts, w, spec, keys, out_dtypes, thresholds)
    else:
        bases_c = [b.contiguous() for b in bases]
        experts_c = [[e.contiguous() for e in task] for task in experts]
        if spec.trims and thresholds is None:
            thresholds = _select_in_memory(chosen, bases_c, experts_c, spec, keys, seg_numel, device)
        # contiguous out= tensors are written directly (the kernels are elementwise, so out may be the base),
        # unless they share memory in any other way with what the kernels still read
        scratch = _outs_sharing_memory(bases_c, experts_c, out) if out is not None else set()
        results = [out[t] if out is not None and out[t].is_contiguous() and t not in scratch
                   else torch.empty(b.shape, dtype=dt, device=device) for t, (b, dt) in enumerate(zip(bases, out_dtypes))]
        nonfinite = _APPLY[chosen](bases_c, experts_c, results, host_to_device(w, torch.float32, device), spec,
                                   keys, seg_of, thresholds)
    if check_finite:
        _raise_on_nonfinite(nonfinite, names, [r.dtype for r in results])
    if out is None:
        return results
    for dst, src in zip(out, results):
        if dst is not src:
            dst.copy_(src)
    return list(out)


def _outs_sharing_memory(bases, experts, out) -> set[int]:
    """Indices t of contiguous ``out`` tensors the kernels must not write directly: memory shared with another
    out tensor, or with an input other than ``bases[t]`` / ``experts[k][t]`` aliased element for element
    (tied weights: out[0] is bases[1]; a view shifted along its own base). Written while the kernels still
    read those inputs, they would feed merged values back into the merge; the torch path never does.

    Inputs are the contiguous tensors the kernels read (non-contiguous ones were copied). A sweep over
    byte ranges sorted by start: O(N log N) in the number of tensors, milliseconds for a large model.
    """
    spans = []  # (start, end, t, is_out, element size)
    for t, dst in enumerate(out):
        if dst.is_contiguous() and dst.numel():
            spans.append((dst.data_ptr(), dst.data_ptr() + dst.numel() * dst.element_size(), t, True,
                          dst.element_size()))
    if not spans:
        return set()
    for tensors in (bases, *experts):
        for t, src in enumerate(tensors):
            if src.numel():
                spans.append((src.data_ptr(), src.data_ptr() + src.numel() * src.element_size(), t, False,
                              src.element_size()))
    spans.sort(key=lambda span: span[0])
    shared: set[int] = set()
    active: list[tuple] = []
    for span in spans:
        active = [a for a in active if a[1] > span[0]]
        for a in active:  # a overlaps span
            for x, y in ((a, span), (span, a)):
                if x[3] and not (not y[3] and y[2] == x[2] and y[:2] == x[:2] and y[4] == x[4]):
                    shared.add(x[2])
        active.append(span)
    return shared


def magnitude_thresholds(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    *,
    density: float,
    trim_scope: str = "tensor",
    drop_rate: float = 0.0,
    seed: int = 0,
    tensor_keys: Sequence[int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The (S, K) trim thresholds t_k of :func:`merge_task_vectors` (S = T or 1).

    Found by radix select (histogram passes over the bits of |d|), never by sorting; float64 inputs
    (torch backend only, like the merges) by ``kthvalue`` on float64 magnitudes, returned in float64.

    Args:
        bases: T tensors θ0 (float32/float16/bfloat16; float64 on the torch backend), on one device.
        experts: K sequences of T tensors, ``experts[k][t]`` matching ``bases[t]`` in shape, dtype, device.
        density: ρ ∈ (0, 1], required: per segment and task the threshold is the m-th largest
            |θk − θ0| with m = max(1, ⌊ρ·n⌋).
        trim_scope: ``"tensor"`` (S = T segments, one per tensor) or ``"model"`` (S = 1).
        drop_rate, seed, tensor_keys: DARE applied before selecting, as in :func:`merge_task_vectors`.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (fastest available).

    Returns:
        (S, K) float32 (float64 for float64 inputs) tensor on the inputs' device, ``thresholds[s, k]``
        = t_k of segment s (+inf for an empty segment); pass it as ``thresholds=`` to
        :func:`merge_task_vectors`.
    """
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)  # None (no trim): no thresholds
    names, device = _check_inputs(bases, experts, None)
    spec = make_spec(density=density, trim_scope=trim_scope, drop_rate=drop_rate, seed=seed)
    keys = _tensor_keys(tensor_keys, len(bases))
    chosen = _choose_backend(backend, device, bases, [b.dtype for b in bases])
    if any(b.dtype == torch.float64 for b in bases):  # the radix select works on float32 bits: select in float64
        deltas = [_deltas_torch(b, [task[t] for task in experts], spec, keys[t]) for t, b in enumerate(bases)]
        return _kth_thresholds_torch(deltas, spec, len(experts))
    _, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
    return _select_in_memory(chosen, [b.contiguous() for b in bases],
                             [[e.contiguous() for e in task] for task in experts], spec, keys, seg_numel, device)


def _select_in_memory(backend, bases, experts, spec, keys, seg_numel, device) -> torch.Tensor:
    """Trim thresholds of tensors held in memory, by radix select on ``backend``'s histograms."""
    seg_of, _ = segments_of([b.numel() for b in bases], spec.trim_scope)
    keep = host_to_device([keep_count(spec.density, n) for n in seg_numel], torch.int64, device)
    return select_thresholds(
        lambda shift, bits, prefix: _HISTOGRAM[backend](bases, experts, spec, keys, seg_of, len(seg_numel), shift,
                                                        bits, prefix),
        keep, len(experts), radix_levels(backend))


def _ordered(value, count: int, name: str, what: str) -> list:
    """An ordered iterable (list, tuple, generator, dict keys, 1-D array) as a list, read at most count + 1
    items deep (an endless iterator is not drained); sets are refused, their order being arbitrary."""
    if isinstance(value, (str, bytes, set, frozenset)) or not isinstance(value, Iterable):  # (dict keys are ordered)
        raise TypeError(f"{name} must be an ordered iterable of {what}, got {type(value).__name__}")
    items = list(itertools.islice(value, count + 1))
    if len(items) != count:
        got = f"more than {count}" if len(items) > count else str(len(items))
        raise ValueError(f"{name} has {got} entries for {count} tensors")
    return items


def _tensor_keys(tensor_keys, num_tensors: int) -> list[int]:
    if tensor_keys is None:
        return list(range(num_tensors))
    if isinstance(tensor_keys, (torch.Tensor, np.ndarray)) and tensor_keys.ndim == 1:
        tensor_keys = tensor_keys.tolist()
    if isinstance(tensor_keys, (torch.Tensor, np.ndarray)):
        raise TypeError(f"tensor_keys must be 1-D, got shape {tuple(tensor_keys.shape)}")
    tensor_keys = _ordered(tensor_keys, num_tensors, "tensor_keys", f"{num_tensors} integers")
    return [check_int(k, f"tensor_keys[{i}]", low=0, high=2**32 - 1) for i, k in enumerate(tensor_keys)]


def _out_dtypes(bases, out, out_dtype, names) -> list[torch.dtype]:
    if out_dtype is not None:
        out_dtype = check_float_dtype(out_dtype, "out_dtype")
    if out is not None:
        if isinstance(out, torch.Tensor) or not isinstance(out, Sequence) or len(out) != len(bases):
            raise ValueError(f"out must be a sequence of {len(bases)} tensors")
        for t, (dst, base) in enumerate(zip(out, bases)):
            check_float_tensor(dst, f"out tensor {names[t]!r}")
            if dst.shape != base.shape or dst.device != base.device:
                raise ValueError(f"out tensor {names[t]!r} must have shape {tuple(base.shape)} on {base.device}, "
                                 f"got {tuple(dst.shape)} on {dst.device}")
            if may_overlap(dst):
                raise ValueError(f"out tensor {names[t]!r} has overlapping memory (strides {dst.stride()}, e.g. an "
                                 "expanded view): pass a tensor whose elements are distinct, e.g. a contiguous one")
            if out_dtype is not None and dst.dtype != out_dtype:
                raise ValueError(f"out tensor {names[t]!r} is {dst.dtype} but out_dtype is {out_dtype}: the "
                                 "output dtype of out= is its own; drop out_dtype or match it")
        return [dst.dtype for dst in out]
    if out_dtype is not None:
        return [out_dtype] * len(bases)
    return [b.dtype for b in bases]


def _choose_backend(backend, device, bases, out_dtypes) -> str:
    wide = any(b.dtype == torch.float64 for b in bases) or torch.float64 in out_dtypes
    if wide and backend is None:
        return "torch"  # the fast kernels compute in float32; float64 stays on the reference
    if wide and backend != "torch":
        raise TypeError(f"backend {backend!r} supports float32/float16/bfloat16; float64 needs backend='torch'")
    return resolve_backend(TASK_VECTORS, backend, device)


def _check_thresholds(thresholds, num_segments, num_tasks, device, dtype) -> torch.Tensor:
    """Validated (S, K) thresholds in ``dtype``: the task vectors' (float32, float64 for float64 inputs)."""
    thresholds = check_has_data(check_float_tensor(thresholds, "thresholds"), "thresholds")
    if thresholds.shape != (num_segments, num_tasks):
        raise ValueError(f"thresholds must have shape (S, K) = ({num_segments}, {num_tasks}) (S = the number of "
                         f"tensors, or 1 with trim_scope='model'), got {tuple(thresholds.shape)}")
    thresholds = thresholds.detach().to(device=device, dtype=dtype).contiguous()
    # magnitudes: +inf (keep nothing, as for an empty segment) is valid, NaN and negative values are not
    bad = torch.isnan(thresholds) | (thresholds < 0)
    if bool(bad.any()):
        s, k = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"thresholds must be magnitudes >= 0 (or +inf), got {thresholds[s, k].item()} at "
                         f"[{s}, {k}]")
    return thresholds


def _raise_on_nonfinite(counts: torch.Tensor, names: Sequence[str], out_dtypes: Sequence[torch.dtype]) -> None:
    """Raise on the (T, 2) counts of the apply pass: non-finite task vectors first (an overflowing output
    follows from them), then outputs that overflowed their dtype. One device-to-host read."""
    counts = counts.cpu()

    def listed(ts):
        return ", ".join(repr(names[t]) for t in ts[:5]) + (" ..." if len(ts) > 5 else "")

    bad = torch.nonzero(counts[:, 0]).flatten().tolist()
    if bad:
        raise ValueError(f"non-finite task vectors (NaN or inf in θk − θ0) in tensor(s) {listed(bad)}; "
                         "pass check_finite=False to merge them anyway")
    over = torch.nonzero(counts[:, 1]).flatten().tolist()
    if over:
        dtypes = sorted({str(out_dtypes[t]).removeprefix("torch.") for t in over})
        raise MergeOverflowError(
            f"the merge overflows {'/'.join(dtypes)} in tensor(s) {listed(over)} ({int(counts[over, 1].sum())} "
            "entries are NaN or inf where the base, in that dtype, is finite or the other infinity); use a wider "
            "out_dtype or smaller weights/scale, or pass check_finite=False to keep them")


def streamed_magnitude_thresholds(
    chunks,
    *,
    num_tasks: int,
    total_numel: int,
    density: float,
    drop_rate: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Model-scope trim thresholds (1, K) for a model too large to hold at once.

    ``chunks()`` must return a fresh iterable of ``(bases, experts, tensor_keys)``
    covering the model's tensors (``experts[k][t]``); it is called once per radix
    pass (three on CPU, four with the triton backend). Equals :func:`magnitude_thresholds` with
    ``trim_scope="model"`` on the whole model.

    Args:
        chunks: a callable taking no argument; each call returns an iterable (a generator
            function fits) of ``(bases, experts, tensor_keys)``: T_c base tensors
            (float32/float16/bfloat16, on ``device``), K sequences of T_c matching expert tensors
            and T_c tensor keys (as in :func:`merge_task_vectors`: the keys of these tensors in the
            whole model, e.g. their indices there; None, a chunk's own 0..T_c−1, is refused with
            ``drop_rate`` > 0, where the keys pick the DARE masks). Every call must yield the same
            tensors in the same order.
        num_tasks: K ≥ 1, the number of experts in every chunk.
        total_numel: the number of elements of all base tensors over all chunks; each pass is
            checked against it.
        density: ρ ∈ (0, 1], required (see :func:`magnitude_thresholds`).
        drop_rate, seed: DARE applied before selecting, as in :func:`merge_task_vectors`.
        device: where the chunks' tensors are and the histograms are kept.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (fastest available on ``device``).

    Returns:
        (1, K) float32 thresholds on ``device`` (+inf when ``total_numel`` is 0); pass them as
        ``thresholds=`` with ``trim_scope="model"``.

    Raises:
        ValueError: when a pass sees a number of elements other than ``total_numel`` (e.g.
            ``chunks`` returned a one-shot iterator that a second pass finds exhausted) or a chunk
            has other than ``num_tasks`` experts or lies on another device.
        TypeError: when a chunk is not a ``(bases, experts, tensor_keys)`` triple, holds float64
            tensors, or has ``tensor_keys`` None while ``drop_rate`` > 0.
    """
    if not callable(chunks):
        raise TypeError(f"chunks must be a callable returning a fresh iterable per pass, got {type(chunks).__name__}")
    num_tasks = check_int(num_tasks, "num_tasks", low=1)
    total_numel = check_int(total_numel, "total_numel", low=0)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)  # None (no trim): no thresholds
    spec = make_spec(density=density, trim_scope="model", drop_rate=drop_rate, seed=seed)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():  # the current device
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = resolve_backend(TASK_VECTORS, backend, device)
    keep = host_to_device([keep_count(spec.density, total_numel)], torch.int64, device)
    passes = [0]

    def histogram(shift, bits, prefix):
        passes[0] += 1
        counts = torch.zeros((1, num_tasks, 1 << bits), dtype=torch.int64, device=device)
        seen = 0
        pieces = chunks()
        if not isinstance(pieces, Iterable):
            raise TypeError(f"chunks() must return an iterable of (bases, experts, tensor_keys) triples, got "
                            f"{type(pieces).__name__}")
        for c, chunk in enumerate(pieces):
            try:
                bases, experts, keys = chunk
            except (TypeError, ValueError):
                raise TypeError(f"chunks() item {c} must be a (bases, experts, tensor_keys) triple, got "
                                f"{type(chunk).__name__}") from None
            _, chunk_device = _check_inputs(bases, experts, [f"chunk {c} bases[{t}]" for t in range(len(bases))]
                                                if isinstance(bases, Sequence) else None)
            if len(experts) != num_tasks:
                raise ValueError(f"num_tasks is {num_tasks} but chunk {c} has {len(experts)} experts")
            if bases and chunk_device != device:
                raise ValueError(f"chunk {c} is on {chunk_device} but device is {device}")
            if any(b.dtype == torch.float64 for b in bases):
                raise TypeError(f"chunk {c} holds float64 tensors; thresholds are selected on float32 magnitudes")
            if keys is None and spec.drop_rate > 0:
                # a chunk's default keys would restart at 0 in every chunk: other DARE masks than the merge's
                raise TypeError(f"chunks() item {c} has tensor_keys None, but with drop_rate > 0 the DARE mask of "
                                "a tensor depends on its key: yield each tensor's key in the whole model (its "
                                "index there, or philox.tensor_key(name) as the state-dict merges use)")
            keys = _tensor_keys(keys, len(bases))  # without DARE the keys are unused: None is harmless
            seen += sum(b.numel() for b in bases)
            bases_c = [b.contiguous() for b in bases]
            experts_c = [[e.contiguous() for e in task] for task in experts]
            counts += _HISTOGRAM[chosen](bases_c, experts_c, spec, keys, [0] * len(bases), 1, shift, bits, prefix)
        if seen != total_numel:
            hint = (" (chunks must return a fresh iterable on every call, not a one-shot iterator)"
                    if passes[0] > 1 else "")
            raise ValueError(f"total_numel is {total_numel} but pass {passes[0]} over chunks() saw {seen} "
                             f"elements{hint}")
        return counts

    with torch.no_grad():
        return select_thresholds(histogram, keep, num_tasks, radix_levels(chosen))
