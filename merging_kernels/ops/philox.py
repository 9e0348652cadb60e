"""Counter-based random numbers (Philox4x32-10), shared by every backend.

DARE must drop the same elements whichever backend runs it and however the
tensors are batched, so randomness is a pure function of a key and a counter:

    key     = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (element & 0xFFFFFFFF, element >> 32, tensor_key, task)
    word    = philox4x32_10(counter, key)[0]

``element`` is the flat (row-major) index inside the tensor, ``tensor_key`` a
32-bit id of the tensor (for state dicts: CRC-32 of its name, see
:func:`tensor_key`), ``task`` the index of the task vector. An element is
dropped when ``word >> 8 < drop_threshold(p)``, i.e. with probability
``drop_threshold(p) / 2**24`` (p rounded to 24 bits). The CPU kernel
(``csrc/common/philox.h``) and the Triton kernel implement exactly this.
"""

from __future__ import annotations

import zlib

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_BITS = 24  # the top 24 bits of a word make the uniform number
_MASK32 = 0xFFFFFFFF


def tensor_key(name: str) -> int:
    """The 32-bit RNG id of a named tensor: CRC-32 of its UTF-8 name.

    Keying on the name (not the position) makes a DARE mask independent of
    which other tensors are merged in the same call and of their order.
    """
    return zlib.crc32(name.encode("utf-8")) & _MASK32


def drop_threshold(p: float) -> int:
    """``p`` as the integer threshold every backend compares ``word >> 8`` with."""
    return int(round(float(p) * (1 << UNIFORM_BITS)))


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 values held in int64 tensors.

    The full product needs 64 unsigned bits, which int64 cannot hold, so ``b``
    is split into 16-bit halves.
    """
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48; the product is p_lo + p_hi * 2**16
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = low_sum & _MASK32
    hi = ((p_hi >> 16) + (low_sum >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds (Salmon et al., SC'11): the torch reference.

    Counters are int64 tensors holding uint32 values (broadcastable); the key
    is two Python ints. Returns four int64 tensors of uint32 values.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dare_keep_mask_torch(numel: int, *, seed: int, tensor_key: int, task: int, p: float, device=None) -> torch.Tensor:
    """Reference DARE mask: a bool tensor of ``numel`` elements, True where kept."""
    threshold = drop_threshold(p)
    element = torch.arange(numel, dtype=torch.int64, device=device)
    word = philox4x32_10(
        element & _MASK32,
        element >> 32,
        torch.full_like(element, tensor_key & _MASK32),
        torch.full_like(element, task & _MASK32),
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )[0]
    return (word >> (32 - UNIFORM_BITS)) >= threshold


# --------------------------------------------------------------------------- triton
# The same generator as a @triton.jit function, used inside the Triton kernels.
# Triton is optional, so everything here is defined only when it imports.

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference above works without triton
    triton = None

if triton is not None:
    _TL_M0 = tl.constexpr(PHILOX_M0)
    _TL_M1 = tl.constexpr(PHILOX_M1)
    _TL_W0 = tl.constexpr(PHILOX_W0)
    _TL_W1 = tl.constexpr(PHILOX_W1)
    _TL_ROUNDS = tl.constexpr(PHILOX_ROUNDS)

    @triton.jit
    def philox4x32_10_triton(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on tl.uint32 counters (blocks or scalars, broadcast) and key.

        Bit-identical to :func:`philox4x32_10`. Written out rather than calling
        tl.randint, whose internals (and so its streams) may change between
        Triton versions. Products wrap mod 2**32 (tl.mul without the overflow
        check of debug mode); tl.umulhi gives the high word.
        """
        for _ in tl.static_range(_TL_ROUNDS):
            hi0 = tl.umulhi(c0, _TL_M0)
            lo0 = tl.mul(c0, _TL_M0, sanitize_overflow=False)
            hi1 = tl.umulhi(c2, _TL_M1)
            lo1 = tl.mul(c2, _TL_M1, sanitize_overflow=False)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = tl.add(k0, _TL_W0, sanitize_overflow=False)
            k1 = tl.add(k1, _TL_W1, sanitize_overflow=False)
        return c0, c1, c2, c3
