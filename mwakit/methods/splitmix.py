"""Counter-based random bits for DARE and DELLA: SplitMix64 evaluated with torch integer ops.

Element j of a tensor draws the 31-bit integer r_j = low 31 bits of half (j mod 2) of the
SplitMix64 output number ⌊j/2⌋ (0-based) of the stream seeded with ``seed`` (Steele, Lea and
Flood 2014; the generator of Java's SplittableRandom and of xoshiro's seeding). Because r_j is
a pure function of (seed, j):

- a tensor can be drawn in blocks, in any order, and gives the same bits as drawn whole;
- a CPU and a GPU give the same bits (two's-complement integer arithmetic is exact everywhere),
  with no host-to-device copy of the random numbers;
- it is several times faster than `torch.rand` on a CPU, whose Mersenne Twister runs serially.

Logical right shifts are arithmetic shifts on int64 followed by a mask, and the 64-bit
constants are stored as their signed two's-complement values.
"""

from __future__ import annotations

import torch

GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
LOW31 = (1 << 31) - 1


def signed64(x: int) -> int:
    """``x`` mod 2^64 as a signed int64 value (what torch stores for that bit pattern)."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def reference(seed: int, count: int) -> list[int]:
    """The first ``count`` SplitMix64 outputs for ``seed``, in plain Python (for tests)."""
    out = []
    state = seed & MASK64
    for _ in range(count):
        state = (state + GAMMA) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * MUL1) & MASK64
        z = ((z ^ (z >> 27)) * MUL2) & MASK64
        out.append(z ^ (z >> 31))
    return out


class Stream:
    """Draws r_j for a range of element indices, reusing its buffers between calls.

    Args:
        capacity: The most elements one `bits31` call returns.
        device: Where the bits are computed.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        pairs = (capacity + 1) // 2
        self._index = torch.arange(pairs, dtype=torch.int64, device=device)
        self._z = torch.empty(pairs, dtype=torch.int64, device=device)
        self._t = torch.empty(pairs, dtype=torch.int64, device=device)

    def _xorshift(self, z: torch.Tensor, t: torch.Tensor, shift: int) -> None:
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)  # arithmetic → logical shift
        z.bitwise_xor_(t)

    def bits31(self, seed: int, start: int, count: int) -> torch.Tensor:
        """r_j for j in [start, start + count) as int32 in [0, 2^31), a view of a buffer.

        Args:
            seed: The stream's seed (any int; taken mod 2^64).
            start: First element index; must be even (blocks start at pair boundaries).
            count: How many, at most the capacity.
        """
        if start % 2:
            raise ValueError("blocks of random bits must start at an even element index")
        pairs = (count + 1) // 2
        if pairs > self._z.numel():
            raise ValueError(f"{count} random values asked of a stream for {2 * self._z.numel()}")
        z, t = self._z[:pairs], self._t[:pairs]
        torch.mul(self._index[:pairs], signed64(GAMMA), out=z)
        z.add_(signed64(seed + (start // 2 + 1) * GAMMA))
        self._xorshift(z, t, 30)
        z.mul_(signed64(MUL1))
        self._xorshift(z, t, 27)
        z.mul_(signed64(MUL2))
        self._xorshift(z, t, 31)
        return z.view(torch.int32)[:count].bitwise_and_(LOW31)


def uniform(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 draws, u_j = ⌊r_j / 2^7⌋ / 2^24 (24 bits: exact in float32)."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = Stream(max(n, 1), device).bits31(seed, 0, n)
    return bits.bitwise_right_shift(7).to(torch.float32).mul_(2.0**-24).reshape(shape)
