"""The checkpoint shard map: computed from metadata alone, it tells each rank which source files
its fragments need, so opens per rank follow the rank's share, not tp x dp."""

from __future__ import annotations

import math

import pytest
from conftest import REPO

from megagrow.config import load_plan
from megagrow.state.checkpoint import ShardMap, SourceCheckpoint
from megagrow.state.executor import fragment_box


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_fragments_tile_every_param_and_stay_inside_partitions(zero):
    """Every param's fragments, in DP rank order, tile its flat elements [0, n) exactly once; each
    fragment lies inside its rank's flat partition of its group (ZeRO-1/2: the group padded to a
    multiple of 2*dp, cut in dp equal parts; ZeRO-3: each param padded and cut by itself)."""
    groups = [{"a": (7, 5), "b": (3, 11), "c": (1, 1)}, {"x": (13,), "y": (2,)}]
    for dp in (1, 2, 3, 8):
        m = ShardMap.of(groups, dp, zero)
        for g, shapes in enumerate(groups):
            for name, shape in shapes.items():
                off = 0
                for f in m.frags[name]:
                    assert f.param_offset == off and f.numel > 0 and f.group == g
                    assert 0 <= f.flat_start and f.flat_start + f.numel <= m.partition_numel[g]
                    off += f.numel
                assert off == math.prod(shape)
            if zero != 3:
                total = sum(math.prod(s) for s in shapes.values())
                assert m.partition_numel[g] * dp % (2 * dp) == 0 and total <= m.partition_numel[g] * dp < total + 2 * dp


def _files_per_rank(src: SourceCheckpoint, model, tp: int, dp: int, zero: int) -> list[set]:
    """For each rank of target layout (tp, dp, zero): the source files its own fragments' boxes
    (whole rows of a matrix, as the executor reads them) would open."""
    target = SourceCheckpoint.planned(model, tp, dp, zero)
    out = []
    for t in range(tp):
        for d in range(dp):
            need = set()
            for name, start, numel in target.map.rank_fragments(d):
                box, _ = fragment_box(name, target.local_shapes[name], start, numel, tp, t)
                need |= src.files_for(name, box)
            out.append(need)
    return out


def test_512_rank_checkpoint_each_rank_opens_only_its_files():
    """Metadata of a 512-rank checkpoint (staged_1b's 1.3B final model at TP=8 x DP=64, ZeRO-2), no
    tensors: resharding it to 512 ranks, each rank's file set follows what it holds (before, every
    rank opened all 512). Replicated tensors (norms, some biases) are read from TP rank 0.
    Same partitioning (ZeRO-1): at most 3 files, its own and DP neighbours (whole rows at fragment
    edges) of its own TP rank and TP rank 0; TP 8 -> 4 and DP 64 -> 128, or TP 8 -> 16 and DP 64 -> 32:
    at most 8; ZeRO-3 (every rank holds 1/64 of every param): at most the 64 files of its own TP
    rank plus TP rank 0's."""
    model = load_plan(f"{REPO}/recipes/staged_1b.yaml").stages[-1].model
    src = SourceCheckpoint.planned(model, 8, 64, 2)
    assert sum(math.prod(s) for s in src.local_shapes.values()) * 8 > 1.2e9  # the 1.3B model, TP-split
    same = _files_per_rank(src, model, 8, 64, 1)
    for r, files in enumerate(same):
        t, d = divmod(r, 64)
        assert (t, d) in files and len(files) <= 3, (r, files)
        assert {ft for ft, _ in files} <= {0, t} and all(abs(fd - d) <= 1 for _, fd in files), (r, files)
    assert set().union(*same) == {(t, d) for t in range(8) for d in range(64)}  # every file is someone's
    for tp, dp in ((4, 128), (16, 32)):
        assert max(len(f) for f in _files_per_rank(src, model, tp, dp, 2)) <= 8, (tp, dp)
    z3 = _files_per_rank(src, model, 8, 64, 3)
    assert all({ft for ft, _ in f} <= {0, r // 64} and len(f) <= 2 * 64 for r, f in enumerate(z3))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_indexed_lookups_equal_the_scans(zero):
    """`overlapping` (a binary search) and `rank_fragments` (an index built once) return exactly what a
    scan over every fragment returns, for every range and rank: the plan is linear in ranks, not DP^2."""
    groups = [{"a": (7, 5), "b": (3, 11), "c": (1, 1)}, {"x": (13,), "y": (2,)}]
    for dp in (1, 2, 3, 8):
        m = ShardMap.of(groups, dp, zero)
        for name, lst in m.frags.items():
            n = sum(f.numel for f in lst)
            for a in range(n + 1):
                for b in range(a, n + 2):
                    scan = [f for f in lst if f.param_offset < b and a < f.param_offset + f.numel]
                    assert m.overlapping(name, a, b) == scan
        for d in range(dp + 1):
            assert m.rank_fragments(d) == [(nm, f.param_offset, f.numel) for nm, lst in m.frags.items() for f in lst if f.dp_rank == d]


def test_each_opened_file_is_verified_once_by_a_rank_that_opens_it():
    """assign_verifiers: every file some rank opens is checked by exactly one of its openers, the
    biggest files spread first (no rank checks a file it does not open); the same input gives the
    same assignment."""
    from megagrow.state.reads import assign_verifiers

    opened = [{"f0", "f1"}, {"f1", "f2"}, {"f2"}, set(), {"f0", "f3"}]
    sizes = {"f0": 5, "f1": 5, "f2": 9, "f3": 1}
    owner = assign_verifiers(opened, sizes)
    assert set(owner) == {"f0", "f1", "f2", "f3"}
    assert all(n in opened[r] for n, r in owner.items())
    assert owner == assign_verifiers([sorted(s) for s in opened], sizes)
    assert owner["f2"] == 1 and owner["f0"] == 0 and owner["f1"] == 0 and owner["f3"] == 4
