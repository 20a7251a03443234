"""megagrow.rng: values keyed by (seed, key, element index), the same bytes under any sharding."""

from __future__ import annotations

import random

import pytest
import torch

from megagrow import rng

KEY_BOX = ((0, 301), (0, 700))  # 210,700 elements: several CHUNKs, rows not a multiple of anything


@pytest.mark.parametrize("kind", rng.KINDS)
def test_any_box_is_the_slice_of_the_whole(kind):
    """draw(box) == draw(whole)[box], bitwise, for TP-like row and column slices and odd boxes (1-d and 2-d)."""
    whole = rng.draw(kind, 5, "w", KEY_BOX, KEY_BOX, 0.02)
    boxes = [
        ((0, 150), (0, 700)),
        ((150, 301), (0, 700)),
        ((0, 301), (350, 700)),
        ((7, 8), (3, 699)),
        ((100, 299), (1, 2)),
        ((13, 257), (91, 613)),
    ]
    for box in boxes:
        sl = tuple(slice(a, b) for a, b in box)
        assert torch.equal(rng.draw(kind, 5, "w", KEY_BOX, box, 0.02), whole[sl]), box
    line = rng.draw(kind, 5, "b", ((0, 70001),), ((0, 70001),), 1.0)
    assert torch.equal(rng.draw(kind, 5, "b", ((0, 70001),), ((65530, 65547),), 1.0), line[65530:65547])


def test_flat_ranges_of_a_box_are_its_flattened_slices():
    """fill_range (a ZeRO-3 partition: a flat range of a TP shard) == the shard's draw flattened and sliced,
    bitwise, for random ranges (partial first row, whole rows, partial last row, within one row) into a bf16
    destination too."""
    shard = ((0, 301), (350, 700))  # a row-parallel TP shard: columns 350..700 of the key box
    flat = rng.draw("normal", 9, "p", KEY_BOX, shard, 0.02).reshape(-1)
    r = random.Random(0)
    ranges = [(0, flat.numel()), (0, 1), (349, 351), (350, 700), (flat.numel() - 5, flat.numel())]
    ranges += [tuple(sorted(r.sample(range(flat.numel() + 1), 2))) for _ in range(20)]
    for a, b in ranges:
        out = torch.empty(b - a)
        rng.fill_range(out, "normal", 9, "p", KEY_BOX, shard, a, 0.02)
        assert torch.equal(out, flat[a:b]), (a, b)
        assert sum(rng.box_shape(x)[0] * rng.box_shape(x)[1] for x in rng.range_boxes(shard, a, b)) == b - a
    half = torch.empty(1000, dtype=torch.bfloat16)
    rng.fill_range(half, "normal", 9, "p", KEY_BOX, shard, 777, 0.02)
    assert torch.equal(half, flat[777:1777].to(torch.bfloat16))


def test_normal_is_a_standard_normal_and_keys_are_independent():
    """2^20 draws: mean within 0.005, std within 0.005 of 1, P(|z| > 2) within 0.002 of 0.0455 (normal, not
    uniform), |z| < 5.8; another seed or key gives other values (correlation < 0.01)."""
    box = ((0, 1 << 20),)
    z = rng.draw("normal", 1, "k", box, box, 1.0).double()
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002 and z.abs().max().item() < 5.8
    for other in (rng.draw("normal", 2, "k", box, box, 1.0), rng.draw("normal", 1, "k2", box, box, 1.0)):
        assert abs(torch.corrcoef(torch.stack([z, other.double()]))[0, 1].item()) < 0.01
