"""Per-sample merged linear: each sample runs through its own mix of task vectors.

For x of shape (B, in) or (B, T, in), per-sample coefficients α (B, K) and
K task vectors (τ_k, δ_k) on top of a base layer (W0, b0)::

    y[b] = x[b] · (W0 + Σ_k α[b,k] τ_k)ᵀ + (b0 + Σ_k α[b,k] δ_k)

(α is shared by a sample's T tokens). This is the inner op of dynamic merging
(SE-Merging): every sample of a batch has its own merged weights, and the
batch must still run as a few large kernels, with no Python loop over samples
and no host synchronisation.

Strategies (all exact up to float rounding; :func:`choose_strategy` picks one
from the shapes with the cost model below, ``strategy=`` overrides it):

- ``"stacked"``: y = Σ_{t=0..K} (α_t ⊙ x) W_tᵀ with α_0 = 1, one GEMM over the
  (K+1)-fold reduction dimension: (K+1)·B·T·in·out MACs, every weight read
  once per batch whatever B is. On CUDA a Triton kernel accumulates x W_tᵀ per
  task in float32 and adds it to the output tile scaled by each row's α_t, so
  nothing is rounded or overflows on the way (x tiles are re-read per task,
  from L2); on CPU the scaled input [x, α_1 x, …, α_K x] (B·T, (K+1)·in) meets
  the packed weights in one BLAS GEMM (float16 instead computes the K+1
  products and mixes them in float32, since α·x could overflow float16).
- ``"materialize"``: W_b = W0 + Σ_k α_bk τ_k for every sample (one GEMM over K),
  then a batched GEMM: K·B·in·out + B·T·in·out MACs, best when T ≫ K.
  Output rows are processed in blocks so the per-sample weights stay within
  ``MATERIALIZE_CHUNK_BYTES`` (64 MB on CPU, 1 GB on CUDA; at least 16 rows).
- ``"lowrank"``: with τ_k ≈ U_k V_k (rank r, :func:`lowrank_factors`),
  y = x W0ᵀ + Σ_k α_bk (x V_kᵀ) U_kᵀ as three GEMMs over all K at once (the
  multi-adapter LoRA pattern): B·T·(in·out + K·r·(in+out)) MACs. Approximate
  by construction (the truncation); its error is the factors' error.

Weights are passed *packed* (:func:`pack_weights`): ``packed_weight`` of shape
(out, K+1, in) with slot 0 the base, so that the CPU GEMM sees the (out,
(K+1)·in) matrix without a copy and the Triton kernel and the materialize
GEMM read the same storage through strides; ``packed_bias`` (K+1, out).

Backends: ``torch`` runs the strategies with torch ops (on CPU BLAS is the
fastest path we measured, see benchmarks/run_per_sample_linear.py); ``triton``
(CUDA) runs the stacked strategy as one fused kernel and the other two as
cuBLAS GEMMs. The oracle of the tests is :func:`per_sample_linear_torch`, which
materializes every sample's weights in float64-capable plain torch.

The op is declared with ``torch.library`` (``merging_kernels::per_sample_linear``
and ``merging_kernels::per_sample_lowrank_linear``) with fake implementations,
so models that call it work under ``torch.compile``; the Triton kernel is
compiled once per (dtype, tile config, layer shape) and never per batch size or
sequence length (Triton specializes integers that are 1 or multiples of 16, so a
new K may add a variant, compiled once). The ops are
for inference: they have no autograd formula (backward raises; forward-mode AD such
as ``torch.func.jvp`` gets zero tangents, torch's rule for ops without one, so do not
differentiate through them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence, Set as AbstractSet

import torch
import torch.nn.functional as F

from .._cuda import launch_device
from .._dispatch import OpBackends, compiling, resolve_backend, triton_interpreting
from .._validation import check_choice, check_float_dtype, check_float_tensor, check_int

PER_SAMPLE_LINEAR = OpBackends("per_sample_linear", cpu=(), cuda=("triton",))
STRATEGIES = ("stacked", "materialize", "lowrank")
# Per-sample weights are built this many bytes at a time (materialize strategy), per device type: on CPU
# a cache-friendly piece kept as a per-thread workspace; on CUDA enough for many samples of large layers.
MATERIALIZE_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
# MACs one element of memory traffic is worth (the machine balance), per device type: a strategy's
# cost is max(MACs / balance, elements moved). Rough, but the strategies differ by integer factors.
MACHINE_BALANCE = {"cpu": 10.0, "cuda": 200.0}


# --------------------------------------------------------------------------- reference


def per_sample_linear_torch(
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    task_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    task_biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: materialize each sample's weights and apply them (plain, readable, slow).

    Args:
        x: (B, in) or (B, T, in).
        alpha: (B, K) per-sample coefficients.
        weight: (out, in) base weight W0; task_weights: (K, out, in) task vectors τ_k.
        bias: (out,) or None; task_biases: (K, out) or None (zero when only ``bias`` is given).

    Returns:
        (B, out) or (B, T, out), computed in the wider of float32 and x's dtype, returned in x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    a = alpha.to(acc)
    w = weight.to(acc) + torch.einsum("bk,koi->boi", a, task_weights.to(acc))  # (B, out, in)
    xs = x.to(acc)
    y = torch.einsum("bti,boi->bto", xs if xs.dim() == 3 else xs.unsqueeze(1), w)
    if bias is not None:
        b = bias.to(acc).expand(a.shape[0], -1)
        if task_biases is not None:
            b = b + a @ task_biases.to(acc)
        y = y + b.unsqueeze(1)
    elif task_biases is not None:
        y = y + (a @ task_biases.to(acc)).unsqueeze(1)
    return (y if x.dim() == 3 else y.squeeze(1)).to(x.dtype)


# --------------------------------------------------------------------------- packing and cost model


def pack_weights(
    weight: torch.Tensor,
    task_weights: torch.Tensor | Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    task_biases: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pack a base layer and K task vectors for :func:`per_sample_linear` (done once, off the hot path).

    Args:
        weight: (out, in) base weight W0, a floating tensor.
        task_weights: (K, out, in) task vectors τ_k, or an ordered iterable (list, tuple, generator,
            nn.ParameterList) of K (out, in) tensors (K may be 0).
        bias: (out,) base bias b0, or None.
        task_biases: (K, out) bias task vectors δ_k, an ordered iterable of K (out,) tensors, or None
            (zero when only ``bias`` is given; ``bias`` is zero when only ``task_biases`` is).
        dtype: float32, float16, bfloat16 or float64 (a torch.dtype); None: W0's dtype. Pack in the
            dtype of the x that :func:`per_sample_linear` will see.

    Returns:
        ``packed_weight`` (out, K+1, in) with ``[:, 0]`` = W0 and ``[:, k]`` = τ_k, and
        ``packed_bias`` (K+1, out) (None when neither bias is given), contiguous, in ``dtype``, on
        W0's device and detached from autograd (the op is for inference).
    """
    weight = check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    dtype = weight.dtype if dtype is None else check_float_dtype(dtype, "dtype")
    task_weights = stack_task_tensors(task_weights, "task_weights", tuple(weight.shape), weight)
    if task_weights.dim() != 3 or task_weights.shape[1:] != weight.shape:
        raise ValueError(f"task_weights must be (K, {weight.shape[0]}, {weight.shape[1]}), "
                         f"got shape {tuple(task_weights.shape)}")
    num_tasks, out_features = task_weights.shape[0], weight.shape[0]
    with torch.no_grad():
        packed = torch.cat([weight.unsqueeze(0), task_weights.to(weight.device)]).to(dtype).transpose(0, 1)
        packed = packed.contiguous()
    packed_bias = None
    if bias is not None or task_biases is not None:
        if bias is None:
            bias = weight.new_zeros(out_features)
        bias = check_float_tensor(bias, "bias")
        if bias.shape != (out_features,):
            raise ValueError(f"bias must be ({out_features},), got shape {tuple(bias.shape)}")
        if task_biases is None:
            task_biases = bias.new_zeros((num_tasks, out_features))
        task_biases = stack_task_tensors(task_biases, "task_biases", (out_features,), bias)
        if task_biases.shape != (num_tasks, out_features):
            raise ValueError(f"task_biases must be ({num_tasks}, {out_features}), got shape {tuple(task_biases.shape)}")
        with torch.no_grad():
            packed_bias = torch.cat([bias.unsqueeze(0), task_biases.to(bias.device)]).to(dtype).contiguous()
    return packed, packed_bias


def stack_task_tensors(value, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A (K, *shape) float tensor from a tensor or an ordered iterable (list, tuple, generator,
    nn.ParameterList) of K tensors of ``shape``."""
    if isinstance(value, torch.Tensor):
        return check_float_tensor(value, name)
    # unordered or keyed containers would silently fix an arbitrary task order (a dict iterates its keys)
    if isinstance(value, (str, bytes, Mapping, AbstractSet)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a tensor or an ordered sequence of tensors, got {type(value).__name__}")
    value = list(value)  # generators and other one-pass iterables are read once
    for k, item in enumerate(value):
        check_float_tensor(item, f"{name}[{k}]")
        if tuple(item.shape) != shape:
            raise ValueError(f"{name}[{k}] must have shape {shape}, got {tuple(item.shape)}")
    with torch.no_grad():
        return torch.stack([item.to(like.device) for item in value]) if len(value) else \
            like.new_empty((0, *shape))


def lowrank_factors(task_weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of each task vector, τ_k ≈ U_k V_k, packed for the ``lowrank`` strategy.

    Args:
        task_weights: (K, out, in); rank: r ≥ 1 (clipped to min(out, in)).

    Returns:
        ``up`` (out, K·r) = [U_1 S_1, …, U_K S_K] and ``down`` (K·r, in) = [V_1; …; V_K], in
        task_weights' dtype (the SVD runs in float32/float64).
    """
    task_weights = check_float_tensor(task_weights, "task_weights")
    if task_weights.dim() != 3:
        raise ValueError(f"task_weights must be (K, out, in), got shape {tuple(task_weights.shape)}")
    rank = min(check_int(rank, "rank", low=1), min(task_weights.shape[1:]))
    work = task_weights.to(torch.promote_types(task_weights.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    up = (u[:, :, :rank] * s[:, None, :rank]).permute(1, 0, 2).reshape(task_weights.shape[1], -1)
    down = vh[:, :rank, :].reshape(-1, task_weights.shape[2])
    return up.to(task_weights.dtype).contiguous(), down.to(task_weights.dtype).contiguous()


def strategy_costs(batch: int, tokens: int, in_features: int, out_features: int, num_tasks: int,
                   rank: int | None = None, device_type: str = "cpu") -> dict[str, float]:
    """Modelled cost of each strategy (in units of one element moved): max(MACs / balance, elements)."""
    balance = MACHINE_BALANCE.get(device_type, MACHINE_BALANCE["cuda"])
    rows, io, k = batch * tokens, in_features * out_features, num_tasks

    def gemm(macs, elements):
        return max(macs / balance, elements)

    costs = {
        "stacked": gemm((k + 1) * rows * io, (k + 1) * io + rows * (k + 1) * in_features),
        "materialize": gemm(k * batch * io, k * io + batch * io) + gemm(rows * io, batch * io),
    }
    if rank is not None:
        kr = k * rank
        costs["lowrank"] = gemm(rows * io, io) + gemm(rows * kr * (in_features + out_features),
                                                      kr * (in_features + out_features))
    return costs


def choose_strategy(batch: int, tokens: int, in_features: int, out_features: int, num_tasks: int,
                    rank: int | None = None, device_type: str = "cpu") -> str:
    """The cheapest strategy by :func:`strategy_costs` (ties go to ``stacked``, which needs no workspace).

    ``lowrank`` is only a candidate when factors exist (``rank`` given), since it changes the result.
    """
    costs = strategy_costs(batch, tokens, in_features, out_features, num_tasks, rank, device_type)
    best = "stacked"  # a plain loop rather than min(key=...), which torch.compile cannot trace
    for name in STRATEGIES[1:]:
        if costs.get(name, math.inf) < costs[best]:
            best = name
    return best


# --------------------------------------------------------------------------- torch strategies


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs, the input's dtype otherwise (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _alpha1(alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, α] (B, K+1): slot 0 is the base layer's coefficient."""
    return torch.cat([alpha.new_ones((alpha.shape[0], 1)), alpha], dim=1).to(dtype)


def _bias_mix(alpha1: torch.Tensor, packed_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if packed_bias is None:
        return None
    acc = _acc_dtype(packed_bias.dtype)
    return (alpha1.to(acc) @ packed_bias.to(acc)).to(dtype)  # (B, out)


def _stacked_torch(x3, alpha, packed_weight, packed_bias):
    b, t, i = x3.shape
    out, kp1, _ = packed_weight.shape
    a1 = _alpha1(alpha, _acc_dtype(x3.dtype))
    if x3.dtype == torch.float16:  # α·x may overflow float16: the K+1 products, mixed in float32
        z = F.linear(x3.reshape(b * t, i), packed_weight.view(out * kp1, i)).view(b, t, out, kp1)
        y = torch.einsum("btok,bk->bto", z.float(), a1).to(x3.dtype)
    else:
        scaled = (x3.unsqueeze(2) * a1.to(x3.dtype)[:, None, :, None]).reshape(b * t, kp1 * i)  # [x, α_1 x, …]
        y = F.linear(scaled, packed_weight.view(out, kp1 * i)).view(b, t, out)
    mix = _bias_mix(a1, packed_bias, x3.dtype)
    return y if mix is None else y.add_(mix.unsqueeze(1))


_workspaces = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor kept per thread on CPU (freshly allocated per call on other devices).

    A block of per-sample weights is tens of MB; on CPU a fresh allocation of that size is
    returned to the OS after each call and page-faulted in again on the next, which cost more than
    building the weights (16 × 768 × 3072 fp32: 140 ms per call with fresh buffers, 103 ms with this
    one; plain linear 88 ms). CUDA's caching allocator already reuses memory. Released by
    :func:`release_workspaces`.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    cache = getattr(_workspaces, "tensors", None)
    if cache is None:
        cache = _workspaces.tensors = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = cache[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def release_workspaces() -> None:
    """Free this thread's CPU scratch memory of the materialize strategy (one block of per-sample weights
    per dtype: ``MATERIALIZE_CHUNK_BYTES``, or 16 output rows for every sample if that is larger)."""
    _workspaces.tensors = {}


def _materialize_torch(x3, alpha, packed_weight, packed_bias):
    b, t, i = x3.shape
    out, kp1, _ = packed_weight.shape
    a1 = _alpha1(alpha, packed_weight.dtype)
    budget = MATERIALIZE_CHUNK_BYTES.get(x3.device.type, MATERIALIZE_CHUNK_BYTES["cuda"])
    # Blocks of output rows, every sample at once: the packed weights are read once per call (blocks
    # of samples would re-read all of them per block: 20% slower at B = 128 on CPU), and no loop
    # ever runs over samples. At least 16 rows per block, so very large batches may exceed the budget.
    rows = max(1, budget // max(b * i * packed_weight.element_size(), 1))
    rows = out if rows >= out else min(out, max(16, rows // 16 * 16))
    scratch = _workspace(rows * b * i, packed_weight.dtype, x3.device)
    if rows >= out:
        w = scratch.view(out, b, i)  # contiguous, for matmul's out=
        torch.matmul(a1, packed_weight, out=w)  # Σ_t α_t W_t for every sample: (out, B, in)
        y = torch.bmm(x3, w.permute(1, 2, 0))
    else:
        y = x3.new_empty((b, t, out))
        for start in range(0, out, rows):
            stop = min(out, start + rows)
            w = scratch[:(stop - start) * b * i].view(stop - start, b, i)
            torch.matmul(a1, packed_weight[start:stop], out=w)
            y[:, :, start:stop] = torch.bmm(x3, w.permute(1, 2, 0))
    mix = _bias_mix(a1, packed_bias, x3.dtype)
    return y if mix is None else y.add_(mix.unsqueeze(1))


def _lowrank_torch(x3, alpha, weight, up, down, packed_bias):
    b, t, i = x3.shape
    out = weight.shape[0]
    k = alpha.shape[1]
    rank = down.shape[0] // max(k, 1)
    x2 = x3.reshape(b * t, i)
    a1 = _alpha1(alpha, x3.dtype)
    mix = _bias_mix(a1, packed_bias, x3.dtype)
    y = F.linear(x2, weight).view(b, t, out)
    if k and rank:
        h = F.linear(x2, down).view(b, t, k, rank) * alpha.to(x3.dtype)[:, None, :, None]  # α_bk (x V_kᵀ)
        y = y + F.linear(h.reshape(b * t, k * rank), up).view(b, t, out)
    return y if mix is None else y.add_(mix.unsqueeze(1))


# --------------------------------------------------------------------------- triton kernel
#   _stacked_triton(x2 (M, in), alpha (B, K), tokens T, packed_weight (out, K+1, in), packed_bias) -> (M, out)

try:  # triton is optional: `import merging_kernels` must work without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is missing
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["M", "T", "num_tasks"])
    def _psl_stacked_kernel(
        x_ptr, a_ptr, w_ptr, b_ptr, y_ptr, M, N, IN, T, num_tasks,
        stride_xm, stride_xk, stride_ab, stride_ak, stride_wn, stride_wt, stride_wk,
        stride_bt, stride_bn, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """y[m] = Σ_{t=0..K} α[m // T, t] (x[m] W_tᵀ) (+ the mixed bias), α_0 = 1.

        One flat loop over (task, k-block) pairs, so the software pipeline sees a single loop and its
        shared memory does not grow with K (a run-time argument: one compiled kernel serves every K).
        x W_tᵀ is accumulated in float32 per task and added to the output tile scaled by each row's
        α_t at the task's last k-block: scaling the float32 partial product rather than x keeps x
        exact in tl.dot and cannot overflow a 16-bit input type. x tiles are re-read once per task
        (from L2); weight tiles once. Addresses are a 64-bit base per program plus 32-bit offsets
        within the tile (fewer registers than 64-bit pointers per element).
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)  # grouped order: neighbouring programs share weight tiles in L2
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m

        local_m = tl.arange(0, BLOCK_M)
        local_n = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        rows = pid_m * BLOCK_M + local_m
        cols = pid_n * BLOCK_N + local_n
        row_ok = rows < M
        col_ok = cols < N
        sample = (rows // T).to(tl.int64)
        x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
        w_base = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_wn
        x_offsets = local_m[:, None] * stride_xm + ks[None, :] * stride_xk  # int32 within the tile
        w_offsets = ks[:, None] * stride_wk + local_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        steps = tl.cdiv(IN, BLOCK_K)
        for step in range(0, (num_tasks + 1) * steps):
            t = step // steps
            k0 = (step - t * steps) * BLOCK_K
            k_ok = (k0 + ks) < IN
            x = tl.load(x_base + k0.to(tl.int64) * stride_xk + x_offsets, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_base + (t.to(tl.int64) * stride_wt + k0.to(tl.int64) * stride_wk) + w_offsets,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            part = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), part, input_precision=PRECISION)
            task = tl.zeros([BLOCK_M], dtype=tl.int32) + t  # a tensor, also in the interpreter
            last = (tl.zeros([BLOCK_M], dtype=tl.int32) + k0 + BLOCK_K) >= IN  # the task's last k-block
            a = tl.load(a_ptr + sample * stride_ab + (task - 1) * stride_ak, mask=row_ok & (task > 0) & last,
                        other=0.0)
            a = tl.where(task > 0, a.to(tl.float32), 1.0)  # slot 0 is the base layer
            acc = tl.where(last[:, None], acc + a[:, None] * part, acc)
            part = tl.where(last[:, None], 0.0, part)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            for t in range(1, num_tasks + 1):
                a_t = tl.load(a_ptr + sample * stride_ab + (t - 1) * stride_ak, mask=row_ok, other=0.0)
                b_t = tl.load(b_ptr + t * stride_bt + cols * stride_bn, mask=col_ok, other=0.0)
                acc += a_t.to(tl.float32)[:, None] * b_t.to(tl.float32)[None, :]
        y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _stacked_config(rows: int, element_size: int, tf32: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): three tile shapes by row count, per dtype.

    Tiles depend on the row bucket, the dtype and (float32) the precision, never on the exact batch
    size or K, so the kernel compiles at most three variants per dtype and precision. Chosen by
    compiling for sm_90 with triton 3.6 and reading the register and stack use: the two float32
    accumulators (output and per-task part) leave no room for 128x128 tiles; these use 10-72 KB of
    shared memory and spill no registers (fp32 ieee/tf32, bf16, fp16). Float32 without TF32 runs its
    dot on FMAs, which hold the K slice in registers: 128x64x32 needed 255 registers and 40 bytes of
    stack with a bias, 128x64x16 needs 204-208 and none. Their speed has not been measured on a GPU yet.
    """
    if element_size == 4:
        if rows <= 16:
            return 16, 64, 32, 4, 3
        if rows <= 64:
            return 64, 64, 32, 8, 3
        return (128, 64, 32, 8, 2) if tf32 else (128, 64, 16, 8, 2)
    if rows <= 16:
        return 16, 128, 64, 4, 3
    if rows <= 64:
        return 64, 128, 64, 8, 3
    return 128, 64, 64, 8, 3


def _dot_dtype(dtype: torch.dtype):
    """tl.dot's operand type: the input's (tensor cores), except bfloat16 under the CPU interpreter, whose
    dot mishandles it (float32 there; the tests' tolerance is the bfloat16 one either way)."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _matmul_allows_tf32() -> bool:
    """Whether torch's CUDA float32 matmuls may use TF32 (float32 follows that setting: IEEE unless allowed).

    torch >= 2.9 has ``fp32_precision`` ("tf32", "ieee", or "none": inherit the global setting); reading the
    legacy ``allow_tf32`` there raises once a user has set the new API, so the new one is read first.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the legacy flag refused after a mix of old and new settings
        return False


def _stacked_triton(x3, alpha, packed_weight, packed_bias):
    b, t, i = x3.shape
    out, kp1, _ = packed_weight.shape
    x2 = x3.reshape(b * t, i)
    m = x2.shape[0]
    y = torch.empty((m, out), dtype=x3.dtype, device=x3.device)
    tf32 = x3.dtype == torch.float32 and _matmul_allows_tf32()
    block_m, block_n, block_k, warps, stages = _stacked_config(m, x3.element_size(), tf32)
    bias = packed_bias if packed_bias is not None else packed_weight  # a dummy pointer when HAS_BIAS is off
    grid = (triton.cdiv(m, block_m) * triton.cdiv(out, block_n),)
    with launch_device(x3):  # triton launches on the current device, not the tensors'
        _psl_stacked_kernel[grid](
            x2, alpha, packed_weight, bias, y, m, out, i, t, kp1 - 1,
            x2.stride(0), x2.stride(1), alpha.stride(0), alpha.stride(1),
            packed_weight.stride(0), packed_weight.stride(1), packed_weight.stride(2),
            bias.stride(0) if packed_bias is not None else 0, bias.stride(1) if packed_bias is not None else 0,
            y.stride(0), y.stride(1),
            HAS_BIAS=packed_bias is not None, DOT_DTYPE=_dot_dtype(x3.dtype),
            PRECISION="tf32" if tf32 else "ieee",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages,
        )
    return y.view(b, t, out)


# --------------------------------------------------------------------------- registered ops


def _run(x: torch.Tensor, alpha: torch.Tensor, packed_weight: torch.Tensor, packed_bias: torch.Tensor | None,
         strategy: str, backend: str) -> torch.Tensor:
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    b, t, i = x3.shape
    out, kp1, _ = packed_weight.shape
    if strategy == "auto":  # decided here, on concrete shapes, so torch.compile adds no guards for it
        strategy = choose_strategy(b, t, i, out, kp1 - 1, None, x.device.type)
    if b * t * out == 0 or i == 0:  # nothing to multiply: the bias mix (or nothing)
        y = x3.new_zeros((b, t, out))
        if packed_bias is not None and y.numel():
            y += _bias_mix(_alpha1(alpha, packed_bias.dtype), packed_bias, x3.dtype).unsqueeze(1)
    elif strategy == "stacked" and backend == "triton":
        y = _stacked_triton(x3, alpha, packed_weight, packed_bias)
    elif strategy == "stacked":
        y = _stacked_torch(x3, alpha, packed_weight, packed_bias)
    else:
        y = _materialize_torch(x3, alpha, packed_weight, packed_bias)
    return y if x.dim() == 3 else y.squeeze(1)


def _run_lowrank(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 packed_bias: torch.Tensor | None) -> torch.Tensor:
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    y = _lowrank_torch(x3, alpha, weight, up, down, packed_bias)
    return y if x.dim() == 3 else y.squeeze(1)


def _fake(x, alpha, packed_weight, *rest) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


if hasattr(torch.library, "custom_op"):  # torch >= 2.4: declared ops, traceable by torch.compile
    _run_op = torch.library.custom_op("merging_kernels::per_sample_linear", mutates_args=())(_run)
    _run_op.register_fake(_fake)

    def _lowrank_fake(x, alpha, weight, up, down, packed_bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    _run_lowrank_op = torch.library.custom_op("merging_kernels::per_sample_lowrank_linear",
                                              mutates_args=())(_run_lowrank)
    _run_lowrank_op.register_fake(_lowrank_fake)

    def _no_backward(ctx, *grads):
        raise RuntimeError("per_sample_linear is inference-only (it has no backward): run the forward under "
                           "torch.no_grad() or torch.inference_mode(); per_sample_linear_torch is the differentiable "
                           "reference")

    if hasattr(_run_op, "register_autograd"):  # torch >= 2.4: name the op's limit instead of torch's generic error
        _run_op.register_autograd(_no_backward)
        _run_lowrank_op.register_autograd(_no_backward)
else:  # pragma: no cover - torch 2.3
    _run_op, _run_lowrank_op = _run, _run_lowrank


def _dispatch(op, fn, *args) -> torch.Tensor:
    """``op(*args)``, the declared op, where it matters: under torch.compile / export, for tensor subclasses
    (fake, functional), under torch.jit.trace or a dispatch mode (make_fx), and when autograd records (its
    backward names the op as inference-only). Otherwise, in
    eager inference, ``fn(*args)`` directly: the same function without custom_op's dispatch, ~15 µs a call."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if (compiling() or torch.jit.is_tracing() or _dispatch_mode_active()
            or any(type(a) is not torch.Tensor for a in tensors)
            or (torch.is_grad_enabled() and any(a.requires_grad for a in tensors))):
        return op(*args)
    return fn(*args)


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode (make_fx, a profiler of ops) records the op: it must see the declared one."""
    current = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", None)
    return current is not None and current() is not None


# --------------------------------------------------------------------------- public functions


def _check_x_alpha(x, alpha, in_features: int, num_tasks: int, dtype: torch.dtype) -> None:
    check_float_tensor(x, "x")
    check_float_tensor(alpha, "alpha")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, in) or (B, T, in), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but the weights expect {in_features}")
    if alpha.dim() != 2 or alpha.shape != (x.shape[0], num_tasks):
        raise ValueError(f"alpha must be (B, K) = ({x.shape[0]}, {num_tasks}), got shape {tuple(alpha.shape)}")
    if dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the packed weights are {dtype}: pack them in x's dtype")
    if alpha.device != x.device:
        raise ValueError(f"alpha is on {alpha.device} but x is on {x.device}")


def per_sample_linear(
    x: torch.Tensor,
    alpha: torch.Tensor,
    packed_weight: torch.Tensor,
    packed_bias: torch.Tensor | None = None,
    *,
    strategy: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y[b] = x[b] (W0 + Σ_k α[b,k] τ_k)ᵀ + (b0 + Σ_k α[b,k] δ_k), without a Python loop over samples.

    Args:
        x: (B, in) or (B, T, in), float32 / float16 / bfloat16 (float64 runs too, on the torch backend).
        alpha: (B, K) per-sample coefficients, any float dtype, on x's device. They are not checked
            for NaN (that would cost a host sync); NaN propagates to the sample's outputs as in F.linear.
        packed_weight: (out, K+1, in) from :func:`pack_weights`, in x's dtype and on its device.
        packed_bias: (K+1, out) from :func:`pack_weights`, or None.
        strategy: ``"stacked"``, ``"materialize"``, or None / ``"auto"`` (:func:`choose_strategy`, decided
            inside the op). The ``lowrank`` strategy takes factors instead: :func:`per_sample_lowrank_linear`.
        backend: ``"triton"`` (CUDA), ``"torch"`` or None (fastest available).

    Returns:
        (B, out) or (B, T, out) in x's dtype.
    """
    packed_weight = check_float_tensor(packed_weight, "packed_weight")
    if packed_weight.dim() != 3:
        raise ValueError(f"packed_weight must be (out, K+1, in) from pack_weights, got shape "
                         f"{tuple(packed_weight.shape)}")
    out, kp1, in_features = packed_weight.shape
    _check_x_alpha(x, alpha, in_features, kp1 - 1, packed_weight.dtype)
    if packed_weight.device != x.device:
        raise ValueError(f"packed_weight is on {packed_weight.device} but x is on {x.device}")
    if packed_bias is not None:
        check_float_tensor(packed_bias, "packed_bias")
        if packed_bias.shape != (kp1, out):
            raise ValueError(f"packed_bias must be ({kp1}, {out}), got shape {tuple(packed_bias.shape)}")
        if packed_bias.device != x.device:
            raise ValueError(f"packed_bias is on {packed_bias.device} but x is on {x.device}")
    if strategy is None:
        strategy = "auto"
    check_choice(strategy, "strategy", ("auto", "stacked", "materialize"))
    chosen = resolve_backend(PER_SAMPLE_LINEAR, backend, x.device)
    if x.dtype == torch.float64 and chosen == "triton":
        chosen = "torch"  # tl.dot has no float64 tensor-core path worth having; cuBLAS does it
    if not packed_weight.is_contiguous():  # the CPU GEMM views it as (out, (K+1)·in): costs a copy per call
        packed_weight = packed_weight.contiguous()
    acc = _acc_dtype(x.dtype)
    if alpha.dtype != acc:
        alpha = alpha.to(acc)
    return _dispatch(_run_op, _run, x, alpha, packed_weight, packed_bias, strategy, chosen)


def per_sample_lowrank_linear(
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    packed_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``lowrank`` strategy: y[b] = x[b] W0ᵀ + Σ_k α[b,k] (x[b] V_kᵀ) U_kᵀ + bias mix.

    Args:
        x: (B, in) or (B, T, in); alpha: (B, K); weight: (out, in) base W0 in x's dtype;
        up: (out, K·r), down: (K·r, in) from :func:`lowrank_factors`; packed_bias: (K+1, out) or None.
    """
    weight = check_float_tensor(weight, "weight")
    up = check_float_tensor(up, "up")
    down = check_float_tensor(down, "down")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    out, in_features = weight.shape
    num_tasks = alpha.shape[1] if isinstance(alpha, torch.Tensor) and alpha.dim() == 2 else -1
    _check_x_alpha(x, alpha, in_features, num_tasks, weight.dtype)
    kr = down.shape[0] if down.dim() == 2 else -1
    if down.dim() != 2 or down.shape[1] != in_features or (num_tasks and kr % num_tasks):
        raise ValueError(f"down must be (K·r, {in_features}), got shape {tuple(down.shape)}")
    if up.shape != (out, kr):
        raise ValueError(f"up must be ({out}, {kr}), got shape {tuple(up.shape)}")
    if up.dtype != x.dtype or down.dtype != x.dtype:
        raise TypeError(f"up/down must be {x.dtype} like x, got {up.dtype}/{down.dtype}")
    if packed_bias is not None:
        check_float_tensor(packed_bias, "packed_bias")
        if packed_bias.shape != (num_tasks + 1, out):
            raise ValueError(f"packed_bias must be ({num_tasks + 1}, {out}), got shape {tuple(packed_bias.shape)}")
    for name, t in (("weight", weight), ("up", up), ("down", down), ("packed_bias", packed_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return _dispatch(_run_lowrank_op, _run_lowrank, x, alpha.to(x.dtype), weight, up, down, packed_bias)


# --------------------------------------------------------------------------- other per-sample layers
# LayerNorm and Conv2d mix their (small) parameters per sample and reuse torch's kernels: the mix is
# one (B, K+1) x (K+1, P) GEMM; a conv with per-sample filters is one grouped conv or one conv with all K+1
# filter sets (per_sample_conv2d picks by shape).


def per_sample_layer_norm(
    x: torch.Tensor,
    alpha: torch.Tensor,
    packed_weight: torch.Tensor | None,
    packed_bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dim with per-sample affine parameters Σ_t α_t γ_t, Σ_t α_t β_t (α_0 = 1).

    Args:
        x: (B, ..., D); alpha: (B, K); packed_weight / packed_bias: (K+1, D) or None (no affine term).
    """
    check_float_tensor(x, "x")
    check_float_tensor(alpha, "alpha")
    if x.dim() < 2:
        raise ValueError(f"x must be (B, ..., D), got shape {tuple(x.shape)}")
    if alpha.dim() != 2:
        raise ValueError(f"alpha must be (B, K), got shape {tuple(alpha.shape)}")
    d = x.shape[-1]
    for name, p in (("packed_weight", packed_weight), ("packed_bias", packed_bias)):
        if p is not None and (p.dim() != 2 or p.shape != (alpha.shape[1] + 1, d)):
            raise ValueError(f"{name} must be ({alpha.shape[1] + 1}, {d}), got shape {tuple(p.shape)}")
    if alpha.dim() != 2 or alpha.shape[0] != x.shape[0]:
        raise ValueError(f"alpha must be (B, K) with B = {x.shape[0]}, got shape {tuple(alpha.shape)}")
    y = F.layer_norm(x, (d,), None, None, eps)
    acc = _acc_dtype(x.dtype)
    a1 = _alpha1(alpha, _acc_dtype(x.dtype))
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (d,)
    if packed_weight is not None:
        y = y * (a1 @ packed_weight.to(acc)).to(x.dtype).view(view)
    if packed_bias is not None:
        y = y + (a1 @ packed_bias.to(acc)).to(x.dtype).view(view)
    return y


CONV_STRATEGIES = ("banks", "stacked")


def choose_conv_strategy(samples_per_row: int, num_tasks: int, in_per_group: int, out_channels: int,
                         out_pixels: int, device_type: str = "cpu") -> str:
    """``stacked`` where a filter bank per row of α makes the grouped conv slow, else ``banks``.

    ``banks`` reads one filter bank per row of α for only its samples' output pixels: on CPU (oneDNN) such a
    grouped conv runs below a plain conv's rate by a factor that grows with the filter's size over the pixels
    it serves, ~1 + 0.45·sqrt(C_in/groups · C_out / (samples per row · H'·W')), fitted on 2 cores to 3x3 convs
    of 16-128 channels at 2x2-16x16, B = 16/128 (benchmarks/results/cpu-per-sample-conv2d-2026-12-04.txt:
    banks / plain conv at B = 128 is 1.8-1.9x at 16 channels 8x8, 5.0-6.5x at 128 channels 8x8, ~21x at 64
    channels 2x2). ``stacked`` costs K+1 plain convs. CUDA keeps ``banks`` until measured there.
    """
    if device_type != "cpu" or out_pixels <= 0:
        return "banks"
    slowdown = 1 + 0.45 * math.sqrt(in_per_group * out_channels / (samples_per_row * out_pixels))
    return "stacked" if num_tasks + 1 <= slowdown else "banks"


def _pair(value) -> tuple[int, int]:
    """A conv setting as (height, width): an int or a 1-element sequence applies to both, like F.conv2d's."""
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return value * 2 if len(value) == 1 else value


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def per_sample_conv2d(
    x: torch.Tensor,
    alpha: torch.Tensor,
    packed_weight: torch.Tensor,
    packed_bias: torch.Tensor | None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    strategy: str | None = None,
) -> torch.Tensor:
    """Conv2d with per-sample filters W0 + Σ_k α_k τ_k, without a Python loop over samples.

    Args:
        x: (B, C_in, H, W); alpha: (R, K) with R dividing B: row r gives the filters of the block of B/R
            consecutive samples r·B/R … (r+1)·B/R − 1 (R = B: one row per sample);
        packed_weight: (K+1, C_out, C_in / groups, kh, kw); packed_bias: (K+1, C_out) or None.
        Padding modes other than zeros are not supported.
        strategy: ``"banks"`` (mix one filter bank per row of α, then one grouped conv with a group per
            row), ``"stacked"`` (one conv with all K+1 filter sets, outputs mixed per sample: K+1 times
            the FLOPs at a plain conv's rate), or None / ``"auto"`` (:func:`choose_conv_strategy`).

    Returns:
        (B, C_out, H', W') in x's dtype.
    """
    check_float_tensor(x, "x")
    check_float_tensor(alpha, "alpha")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if packed_weight.dim() != 5 or packed_weight.shape[2] * groups != x.shape[1]:
        raise ValueError(f"packed_weight must be (K+1, C_out, C_in / groups, kh, kw) with C_in = {x.shape[1]}, "
                         f"groups = {groups}; got shape {tuple(packed_weight.shape)}")
    b = x.shape[0]
    if (alpha.dim() != 2 or packed_weight.shape[0] != alpha.shape[1] + 1
            or (b % alpha.shape[0] if alpha.shape[0] else b) or (b and not alpha.shape[0])):
        raise ValueError(f"alpha must be (R, K) with R dividing B = {b} and K + 1 = {packed_weight.shape[0]}, "
                         f"got shape {tuple(alpha.shape)}")
    if strategy is None:
        strategy = "auto"
    check_choice(strategy, "strategy", ("auto",) + CONV_STRATEGIES)
    kp1, c_out = packed_weight.shape[:2]
    if b == 0:  # a grouped conv cannot have 0 groups: the base filters give the empty output
        return F.conv2d(x, packed_weight[0], None if packed_bias is None else packed_bias[0], stride, padding,
                        dilation, groups)
    rows = alpha.shape[0]
    n = b // rows  # samples per row of α
    if strategy == "auto":
        if isinstance(padding, str):  # F.conv2d's "same" / "valid"; it names any other string itself, via banks
            out_pixels = math.prod(x.shape[2:]) if padding == "same" else 0
            if padding == "valid":
                out_pixels = math.prod(_conv_out_size(size, k, s, 0, d) for size, k, s, d in zip(
                    x.shape[2:], packed_weight.shape[3:], _pair(stride), _pair(dilation)))
        else:
            out_pixels = math.prod(_conv_out_size(size, k, s, p, d) for size, k, s, p, d in zip(
                x.shape[2:], packed_weight.shape[3:], _pair(stride), _pair(padding), _pair(dilation)))
        strategy = choose_conv_strategy(n, kp1 - 1, packed_weight.shape[2], c_out, out_pixels, x.device.type)
    acc = _acc_dtype(x.dtype)
    a1 = _alpha1(alpha, acc)
    if strategy == "stacked":
        # filters ordered (group, task, channel) so that each conv group holds its K+1 filter sets
        g_out = c_out // groups
        w = packed_weight.to(x.dtype).view(kp1, groups, g_out, *packed_weight.shape[2:]).transpose(0, 1)
        y = F.conv2d(x, w.reshape(kp1 * c_out, *packed_weight.shape[2:]), None, stride, padding, dilation, groups)
        out_dtype = y.dtype  # x's, or autocast's: what banks' conv returns too
        y = y.view(rows, n, groups, kp1, g_out, *y.shape[2:])
        mixed = torch.einsum("rt,rngtchw->rngchw", a1, y.to(acc)).reshape(b, c_out, *y.shape[-2:])
        if packed_bias is not None:
            mixed = mixed + (a1 @ packed_bias.to(acc)).repeat_interleave(n, dim=0)[:, :, None, None]
        return mixed.to(out_dtype)
    w = (a1 @ packed_weight.reshape(kp1, -1).to(acc)).to(x.dtype).view(rows * c_out, *packed_weight.shape[2:])
    bias = None if packed_bias is None else (a1 @ packed_bias.to(acc)).to(x.dtype).reshape(rows * c_out)
    # one filter bank per row of α (not per sample): the block's samples are the conv's batch, the R banks
    # its groups; (R, n, C) -> (n, R·C) puts block r's channels in group r
    xg = x.view(rows, n, *x.shape[1:]).transpose(0, 1).reshape(n, rows * x.shape[1], *x.shape[2:])
    y = F.conv2d(xg, w, bias, stride, padding, dilation, groups * rows)
    return y.view(n, rows, c_out, *y.shape[2:]).transpose(0, 1).reshape(b, c_out, *y.shape[2:])


__all__ = [
    "CONV_STRATEGIES",
    "PER_SAMPLE_LINEAR",
    "STRATEGIES",
    "choose_conv_strategy",
    "choose_strategy",
    "lowrank_factors",
    "pack_weights",
    "per_sample_conv2d",
    "per_sample_layer_norm",
    "per_sample_linear",
    "per_sample_linear_torch",
    "per_sample_lowrank_linear",
    "release_workspaces",
    "strategy_costs",
]
