"""Random numbers keyed by (seed, key, element index): any part of a tensor, drawn on its own,
has the same bytes as the same elements of the whole tensor drawn at once.

Both the model's initial weights (megagrow.model.gpt, key = the parameter's name) and the
growth maps' seeded noise (megagrow.growth.maps, key = the piece's key) draw from here, so a
rank draws only its own shard, whatever the tensor-parallel split or ZeRO-3 partition.

Positions are *boxes*: one half-open ``(start, stop)`` range per dim. The element at position
p of a tensor laid out as ``key_box`` has flat index i = ravel(p - key_box.start, shape of
key_box) (C order), and its 64 random bits are

    z(seed, key, i) = splitmix64(base(seed, key) + (i + 1) * 0x9E3779B97F4A7C15 mod 2**64)

with base = the first 8 bytes of blake2b(f"{seed}\\0{key}"): integer operations only, the
same on every machine. Two distributions are read off z:

``uniform``  the top 53 bits as u in [0, 1), value (2u - 1) sqrt(3) std (float64, rounded to
             float32 once): mean 0, standard deviation std. Exact arithmetic.
``normal``   Box-Muller in float32 on two 24-bit fields, u1 = (z >> 40 + 1) / 2**24 in (0, 1]
             and u2 = (z >> 16 & 0xFFFFFF) / 2**24: value sqrt(-2 ln u1) cos(2 pi u2) std
             (|value| <= 5.77 std, as torch.randn's float32 Box-Muller). The integer fields
             and the scalings are exact; log and cos are numpy's float32 kernels, which give
             one value per input whatever the array around it, so the bytes do not depend on
             the layout; across machines whose math kernels differ they may differ in the
             last bit.

Work is done in chunks of about CHUNK elements (memory and cache), which changes nothing:
every value is a function of its own index only.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

CHUNK = 1 << 16
KINDS = ("uniform", "normal")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_PI_2_24 = np.float32(2.0 * math.pi / 16777216.0)
_2_24 = np.float32(1.0 / 16777216.0)


def box_shape(box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _numel(box) -> int:
    return math.prod(box_shape(box))


def key_base(seed: int, key: str) -> np.uint64:
    h = hashlib.blake2b(f"{int(seed)}\x00{key}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


def flat_index(key_box, box) -> np.ndarray:
    """uint64 flat indices (C order inside `key_box`) of the elements of `box`, shaped like `box`."""
    kshape = box_shape(key_box)
    rel = [np.arange(a - k0, b - k0, dtype=np.uint64) for (a, b), (k0, _) in zip(box, key_box)]
    flat = np.zeros(box_shape(box), dtype=np.uint64)
    stride = 1
    for d in range(len(kshape) - 1, -1, -1):
        sh = [1] * len(kshape)
        sh[d] = -1
        flat += rel[d].reshape(sh) * np.uint64(stride)
        stride *= kshape[d]
    return flat


def bits(base: np.uint64, flat: np.ndarray) -> np.ndarray:
    """splitmix64(base + (flat + 1) * golden), in place on `flat` (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = flat
        z += np.uint64(1)
        z *= _GOLDEN
        z += base
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return z


def _values(kind: str, z: np.ndarray, std: float) -> np.ndarray:
    """float32 values of distribution `kind` from the random bits `z`."""
    if kind == "uniform":
        u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1)
        return ((2.0 * u - 1.0) * (np.sqrt(3.0) * std)).astype(np.float32)
    if kind == "normal":
        r = (z >> np.uint64(40)).astype(np.float32)
        r += np.float32(1.0)
        r *= _2_24  # u1 in (0, 1]
        np.log(r, out=r)
        r *= np.float32(-2.0)
        np.sqrt(r, out=r)
        t = ((z >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32)
        t *= _TWO_PI_2_24
        np.cos(t, out=t)
        r *= t
        r *= np.float32(std)
        return r
    raise ValueError(f"unknown distribution {kind!r} (one of {KINDS})")


def _row_chunks(box):
    """`box` split along dim 0 into boxes of about CHUNK elements (at least one index of dim 0)."""
    if not box:
        yield box
        return
    (a, b), rest = box[0], box[1:]
    step = max(1, CHUNK // max(1, _numel(rest)))
    for s in range(a, b, step):
        yield ((s, min(b, s + step)),) + tuple(rest)


def draw(kind: str, seed: int, key: str, key_box, box, std: float) -> torch.Tensor:
    """float32 tensor shaped like `box`: distribution `kind` (std `std`) at the elements of `box`,
    a sub-box of `key_box` (the key's whole index grid)."""
    out = torch.empty(box_shape(box), dtype=torch.float32)
    fill_box(out, kind, seed, key, key_box, box, std)
    return out


def fill_box(out: torch.Tensor, kind: str, seed: int, key: str, key_box, box, std: float) -> None:
    """Write the values of `box` into `out` (shaped like `box`, any float dtype)."""
    base = key_base(seed, key)
    a0 = box[0][0] if box else 0
    for sub in _row_chunks(box):
        vals = torch.from_numpy(_values(kind, bits(base, flat_index(key_box, sub)), std))
        if box:
            out[sub[0][0] - a0 : sub[0][1] - a0].copy_(vals)
        else:
            out.copy_(vals)


def range_boxes(box, start: int, stop: int) -> list:
    """Boxes that together hold elements [start, stop) of `box` in C order, in that order
    (a ZeRO-3 partition is a flat range of a parameter: a partial row, whole rows, a partial row)."""
    if start >= stop:
        return []
    if len(box) == 1:
        a = box[0][0]
        return [((a + start, a + stop),)]
    (a0, _), rest = box[0], tuple(box[1:])
    inner = _numel(rest)
    r0, r1 = start // inner, (stop - 1) // inner
    row = lambda r: ((a0 + r, a0 + r + 1),)  # noqa: E731
    if r0 == r1:
        return [row(r0) + b for b in range_boxes(rest, start - r0 * inner, stop - r0 * inner)]
    out = []
    if start % inner:
        out += [row(r0) + b for b in range_boxes(rest, start % inner, inner)]
        r0 += 1
    end = stop // inner
    if end > r0:
        out.append(((a0 + r0, a0 + end),) + rest)
    if stop % inner:
        out += [row(end) + b for b in range_boxes(rest, 0, stop % inner)]
    return out


def fill_range(out: torch.Tensor, kind: str, seed: int, key: str, key_box, box, start: int, std: float) -> None:
    """Write elements [start, start + out.numel()) of `box` (C order) into the 1-d tensor `out`."""
    pos = 0
    for sub in range_boxes(box, start, start + out.numel()):
        n = _numel(sub)
        fill_box(out[pos : pos + n].view(box_shape(sub)), kind, seed, key, key_box, sub, std)
        pos += n
