"""Growth maps as data: how each new logical tensor is made from the old logical tensors.

A growth map is a dict ``{new tensor name: TensorMap}``. A TensorMap is the new tensor's
logical (unsharded, unfused) shape and an ordered list of *pieces*; each piece writes one
*box* of the new tensor. A box is a tuple of half-open ``(start, stop)`` ranges, one per dim,
in logical global coordinates. There are three kinds of piece:

``Copy(dst, src, src_box, w, m, v)``
    ``new[dst] = scale * old_src[src_box]`` (the two boxes have the same shape). The scale is
    per state: ``w`` for the fp32 weight, ``m`` for Adam's exp_avg, ``v`` for exp_avg_sq.
    Defaults: ``m = w`` and ``v = w**2`` (m scales like the weight, v like its square).
``Fill(dst, w, m, v, kind)``
    a constant (``kind="const"``) or an identity pattern (``kind="eye"``: the value on the
    box's diagonal, 0 elsewhere), again one value per state (moments default to 0).
``Noise(dst, key, key_box, std, w, m, v)``
    seeded noise: uniform with mean 0 and standard deviation ``std``, times the per-state
    factor (moments default to 0). The value at a position is a pure function of
    (seed, key, the position's flat index in ``key_box``), so every sharding of the tensor
    produces the same bytes, and two pieces that name the same key and key-box shape (with
    opposite factors, say) produce exactly opposite values.

Every piece has ``add``: False writes the box, True adds to it. Pieces are applied in order
onto zeros; a valid map covers every element of every new tensor with at least one
non-``add`` piece (``TensorMap.check`` verifies it). A piece is nothing but box copies,
scales and fills, so it can be applied shard to shard: ``Piece.restrict(box)`` gives the part
of a piece that falls inside a fragment of the destination (with the matching source box),
and applying a map fragment by fragment gives the same bytes as applying it whole.

The same map is applied to the weights (``state="w"``) and to both Adam moments
(``state="m"`` / ``"v"``); each piece's per-state factor is the operator's moment rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from megagrow import rng

Box = tuple  # tuple[tuple[int, int], ...]
STATES = ("w", "m", "v")


# ---------------------------------------------------------------------------------------
# boxes


def full_box(shape: Iterable[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_size(box: Box) -> int:
    n = 1
    for a, b in box:
        n *= max(0, b - a)
    return n


def intersect(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of the same rank, or None if it is empty."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def box_slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    """Slices selecting `box` from a tensor whose element [0, ..] sits at `origin`'s start."""
    if origin is None:
        return tuple(slice(a, b) for a, b in box)
    return tuple(slice(a - o0, b - o0) for (a, b), (o0, _) in zip(box, origin))


def shift(box: Box, delta: tuple[int, ...]) -> Box:
    return tuple((a + d, b + d) for (a, b), d in zip(box, delta))


def uncovered(full: Box, boxes: list) -> Box | None:
    """A cell of `full` that no box in `boxes` covers, or None (coordinate compression:
    cost grows with the number of boxes, not with the tensor's size)."""
    import itertools

    cuts = []
    for d, (lo, hi) in enumerate(full):
        c = {lo, hi}
        for b in boxes:
            c.update(x for x in b[d] if lo < x < hi)
        cuts.append(sorted(c))
    for cell in itertools.product(*[list(zip(c, c[1:])) for c in cuts]):
        if not any(all(b0 <= a and z <= b1 for (a, z), (b0, b1) in zip(cell, b)) for b in boxes):
            return tuple(cell)
    return None


def _as_box(box) -> Box:
    return tuple((int(a), int(b)) for a, b in box)


# ---------------------------------------------------------------------------------------
# seeded noise, keyed by (seed, key, flat index): megagrow.rng (the model's initialisation
# draws from the same generator)


def noise_values(seed: int, key: str, key_box: Box, box: Box, std: float) -> torch.Tensor:
    """float32 noise for the elements of `box` (inside `key_box`): uniform, mean 0, std `std`.

    Element p gets u(seed, key, ravel(p - key_box.start, shape(key_box))) (megagrow.rng's
    "uniform"): only integer operations and one exact scaling, the same bytes on every
    machine and every sharding.
    """
    return rng.draw("uniform", seed, key, key_box, box, std)


# ---------------------------------------------------------------------------------------
# pieces


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")


@dataclass(frozen=True)
class Copy:
    """new[dst] (+)= factor(state) * old[src][src_box]."""

    dst: Box
    src: str
    src_box: Box
    w: float = 1.0
    m: float | None = None  # default: w
    v: float | None = None  # default: w**2
    add: bool = False

    def factor(self, state: str) -> float:
        _check_state(state)
        if state == "w":
            return float(self.w)
        if state == "m":
            return float(self.w if self.m is None else self.m)
        return float(self.w * self.w if self.v is None else self.v)

    def restrict(self, box: Box) -> Copy | None:
        """The part of this piece inside destination `box` (None if they do not meet)."""
        sub = intersect(self.dst, box)
        if sub is None:
            return None
        delta = tuple(s0 - d0 for (s0, _), (d0, _) in zip(self.src_box, self.dst))
        return replace(self, dst=sub, src_box=shift(sub, delta))

    def to_dict(self) -> dict:
        return {
            "kind": "copy",
            "dst": self.dst,
            "src": self.src,
            "src_box": self.src_box,
            "w": self.w,
            "m": self.factor("m"),
            "v": self.factor("v"),
            "add": self.add,
        }


@dataclass(frozen=True)
class Fill:
    """new[dst] (+)= value(state) everywhere (kind="const") or on the box's diagonal (kind="eye")."""

    dst: Box
    w: float = 0.0
    m: float = 0.0
    v: float = 0.0
    kind: str = "const"
    add: bool = False
    eye_origin: Box | None = None  # the box whose diagonal "eye" means (set by restrict)

    def factor(self, state: str) -> float:
        _check_state(state)
        return float(getattr(self, state))

    def restrict(self, box: Box) -> Fill | None:
        sub = intersect(self.dst, box)
        if sub is None:
            return None
        return replace(self, dst=sub, eye_origin=self.eye_origin or self.dst)

    def values(self, state: str, box: Box | None = None) -> torch.Tensor:
        box = self.dst if box is None else box
        val = self.factor(state)
        shape = box_shape(box)
        if self.kind == "const":
            return torch.full(shape, val, dtype=torch.float32)
        if self.kind == "eye":
            if len(box) != 2:
                raise ValueError("an 'eye' fill needs a 2-d box")
            o = self.eye_origin or self.dst
            r = torch.arange(box[0][0] - o[0][0], box[0][1] - o[0][0]).view(-1, 1)
            c = torch.arange(box[1][0] - o[1][0], box[1][1] - o[1][0]).view(1, -1)
            return (r == c).to(torch.float32) * val
        raise ValueError(f"unknown fill kind {self.kind!r}")

    def to_dict(self) -> dict:
        return {"kind": f"fill_{self.kind}", "dst": self.dst, "w": self.w, "m": self.m, "v": self.v, "add": self.add}


@dataclass(frozen=True)
class Noise:
    """new[dst] (+)= factor(state) * noise(seed, key, index in key_box), std `std`."""

    dst: Box
    key: str
    std: float
    w: float = 1.0
    m: float = 0.0
    v: float = 0.0
    add: bool = False
    key_box: Box | None = None  # default: dst (the key grid; restrict keeps it)

    def factor(self, state: str) -> float:
        _check_state(state)
        return float(getattr(self, state))

    def grid(self) -> Box:
        return self.key_box if self.key_box is not None else self.dst

    def restrict(self, box: Box) -> Noise | None:
        sub = intersect(self.dst, box)
        if sub is None:
            return None
        return replace(self, dst=sub, key_box=self.grid())

    def values(self, state: str, seed: int, box: Box | None = None) -> torch.Tensor:
        box = self.dst if box is None else box
        f = self.factor(state)
        if f == 0.0:
            return torch.zeros(box_shape(box))
        return noise_values(seed, self.key, self.grid(), box, self.std) * f

    def to_dict(self) -> dict:
        return {
            "kind": "noise",
            "dst": self.dst,
            "key": self.key,
            "key_box": self.grid(),
            "std": self.std,
            "w": self.w,
            "m": self.m,
            "v": self.v,
            "add": self.add,
        }


Piece = Copy | Fill | Noise


@dataclass(frozen=True)
class TensorMap:
    """One new logical tensor: its shape and the ordered pieces that make it."""

    name: str
    shape: tuple
    pieces: tuple = field(default_factory=tuple)

    def restrict(self, box: Box) -> list:
        """The pieces (clipped) that write inside `box`, e.g. one rank's fragment, in order."""
        out = []
        for p in self.pieces:
            r = p.restrict(box)
            if r is not None:
                out.append(r)
        return out

    def sources(self, box: Box | None = None) -> dict[str, list[Box]]:
        """Which boxes of which old tensors are read to build `box` of this tensor."""
        pieces = self.pieces if box is None else self.restrict(box)
        need: dict[str, list[Box]] = {}
        for p in pieces:
            if isinstance(p, Copy):
                need.setdefault(p.src, []).append(p.src_box)
        return need

    def check(self, old_shapes: Mapping[str, tuple]) -> None:
        """Boxes in bounds, copies shape-consistent, every element written by a non-add piece."""
        full = full_box(self.shape)
        for p in self.pieces:
            if intersect(p.dst, full) != p.dst:
                raise ValueError(f"{self.name}: piece box {p.dst} outside shape {self.shape}")
            if isinstance(p, Copy):
                if p.src not in old_shapes:
                    raise ValueError(f"{self.name}: source tensor {p.src!r} does not exist")
                if intersect(p.src_box, full_box(old_shapes[p.src])) != p.src_box:
                    raise ValueError(f"{self.name}: source box {p.src_box} outside {p.src} {tuple(old_shapes[p.src])}")
                if box_shape(p.src_box) != box_shape(p.dst):
                    raise ValueError(f"{self.name}: copy from {p.src} box {p.src_box} into box {p.dst} of another shape")
            if isinstance(p, Noise) and intersect(p.dst, p.grid()) != p.dst:
                raise ValueError(f"{self.name}: noise box {p.dst} outside its key box {p.grid()}")
        hole = uncovered(full, [p.dst for p in self.pieces if not p.add])
        if hole is not None:
            raise ValueError(f"{self.name}: {box_size(hole)} element(s) in box {hole} written by no piece")

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "pieces": [p.to_dict() for p in self.pieces]}


def apply_pieces(
    out: torch.Tensor, out_box: Box, pieces: Iterable[Piece], old: Mapping[str, torch.Tensor], state: str, seed: int
) -> torch.Tensor:
    """Write `pieces` (already restricted to `out_box`, or not) into `out`, whose element [0, ..]
    is the logical position out_box.start. `old` maps source names to their full logical
    tensors (or anything sliceable the same way). Pure box copies, scales and fills."""
    _check_state(state)
    for p0 in pieces:
        p = p0.restrict(out_box)
        if p is None:
            continue
        sl = box_slices(p.dst, out_box)
        if isinstance(p, Copy):
            f = p.factor(state)
            if f == 0.0:
                val = torch.zeros(box_shape(p.dst), dtype=out.dtype)
            else:
                src = old[p.src][box_slices(p.src_box)].to(out.dtype)
                val = src.clone() if f == 1.0 else src * f
        elif isinstance(p, Fill):
            val = p.values(state).to(out.dtype)
        else:
            val = p.values(state, seed).to(out.dtype)
        if p.add:
            out[sl] += val
        else:
            out[sl] = val
    return out


def apply_tensor(
    tmap: TensorMap, old: Mapping[str, torch.Tensor], state: str, seed: int, box: Box | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Build `box` (default: all) of the new tensor for `state` ("w", "m" or "v")."""
    box = full_box(tmap.shape) if box is None else _as_box(box)
    out = torch.zeros(box_shape(box), dtype=dtype)
    return apply_pieces(out, box, tmap.pieces, old, state, seed)


def apply_map(gmap: Mapping[str, TensorMap], old: Mapping[str, torch.Tensor], state: str, seed: int) -> dict:
    """All new tensors for `state` from the old tensors of the same state."""
    return {name: apply_tensor(t, old, state, seed) for name, t in gmap.items()}
