"""Reading native DeepSpeed checkpoints by logical box, touching only the bytes asked for.

The shard map of a checkpoint written at layout (tp, dp, zero_stage):

* TP: logical tensor `name` is split into `tp` equal contiguous chunks along
  `partition_dim(name)` (megatron's Column/Row/VocabParallel layout); replicated tensors are
  read from TP rank 0. TP rank t's files are `*mp_rank_{t:02d}*`.
* ZeRO-1/2 (fp32 `zero_pp_rank_{d}_mp_rank_{t}_optim_states.pt`, bf16 the same with a
  `bf16_` prefix): per param group, one flat buffer over the group's TP-local params,
  split into `dp` equal partitions. `single_partition_of_fp32_groups[g]` is DP rank d's
  partition of the fp32 master, `base_optimizer_state.state[g]` its exp_avg/exp_avg_sq, and
  `param_slice_mappings[g][name] = (start, numel)` where the param's fragment sits in it.
  A param's fragments over DP ranks, in rank order, concatenate to the flattened param.
* ZeRO-3: every TP-local param is split by itself: DP rank d holds flat elements
  [d*P, (d+1)*P) with P = ceil(numel/dp) (the last rank zero-padded); `fp32_flat_groups[g]`
  concatenates the group's partitions in `param_shapes[g]` order.

Files are opened with torch.load(mmap=True): slicing a flat tensor reads only those pages.
`bytes_read` counts the tensor bytes actually sliced out.

The shard map is computed once from one file's metadata: the model-states file records
`param_shapes` (per param group, in the flat order), and the layout gives the rest -- ZeRO-1/2
pads each group's flat buffer to a multiple of 2*dp and cuts it into dp equal partitions;
ZeRO-3 pads each param by itself (above). So `open` reads one file, and an optimizer file is
opened only when a read needs one of its fragments: a rank opens the files its own boxes
touch, not the tp x dp files of the source. Each optimizer file, when opened, is checked
against the computed map (its own `param_slice_mappings` / flat lengths); a checkpoint
partitioned some other way (e.g. `zero_optimization.parameter_alignment`) is refused with a
clear error rather than misread. `opened` lists the files opened, in order.
"""

from __future__ import annotations

import bisect
import functools
import glob
import math
import os
from dataclasses import dataclass, field

import torch

from megagrow.config import ModelConfig, Plan, Stage
from megagrow.errors import UserError
from megagrow.params import partition_dim
from megagrow.state import manifest
from megagrow.state.record import StageRecord

STATE_KEYS = {"w": None, "m": "exp_avg", "v": "exp_avg_sq"}


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint file missing: {path}") from None
    except Exception as e:  # truncated / corrupt zip
        raise UserError(f"cannot read checkpoint file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


@dataclass
class _Frag:
    dp_rank: int
    param_offset: int  # first element of the flattened TP-local param held here
    numel: int
    group: int
    flat_start: int  # where it sits in that rank's flat partition of the group


def _touches(f: _Frag, r0: int, r1: int, c0: int, c1: int, cols: int) -> bool:
    """Whether fragment `f` of a row-major matrix with `cols` columns holds an element of
    rows [r0, r1) x columns [c0, c1)."""
    a, b = f.param_offset, f.param_offset + f.numel
    lo, hi = max(r0, a // cols), min(r1, -(-b // cols))  # rows the fragment reaches
    if lo >= hi:
        return False
    if hi - lo > 2:  # a middle row lies wholly inside the fragment
        return True
    return any(max(a, r * cols + c0) < min(b, r * cols + c1) for r in range(lo, hi))


@dataclass
class ShardMap:
    """Where every TP-local param's elements live among the DP ranks' optimizer files, computed
    from the param shapes (per group, in DeepSpeed's flat order), the DP size and the ZeRO stage.
    The same for every TP rank (TP ranks hold equally shaped local params)."""

    groups: list  # [{name: local shape}] per param group, flat order
    dp: int
    zero_stage: int
    frags: dict  # name -> [_Frag] in DP rank order
    partition_numel: list  # per group: ZeRO-1/2 elements of one rank's flat partition; ZeRO-3 the rank's flat group
    _starts: dict = field(default_factory=dict, repr=False, compare=False)  # name -> [param_offset of each fragment] (bisect)
    _by_rank: dict | None = field(default=None, repr=False, compare=False)  # dp_rank -> [(name, start, numel)], built once

    @classmethod
    def of(cls, groups: list, dp: int, zero_stage: int) -> ShardMap:
        frags: dict = {}
        sizes = []
        for g, shapes in enumerate(groups):
            if zero_stage == 3:
                off = 0
                for name, shape in shapes.items():
                    n = math.prod(shape)
                    P = -(-n // dp)
                    frags[name] = [_Frag(d, d * P, min(P, n - d * P), g, off) for d in range(dp) if d * P < n]
                    off += P
                sizes.append(off)
            else:  # one flat buffer per group, padded to a multiple of 2*dp, cut into dp equal parts
                total = sum(math.prod(s) for s in shapes.values())
                P = -(-total // (2 * dp)) * 2  # (total rounded up to a multiple of 2*dp) / dp
                off = 0
                for name, shape in shapes.items():
                    n = math.prod(shape)
                    lst = []
                    for d in range(off // P, dp) if P else ():
                        lo, hi = max(off, d * P), min(off + n, (d + 1) * P)
                        if lo >= hi:
                            break
                        lst.append(_Frag(d, lo - off, hi - lo, g, lo - d * P))
                    frags[name] = lst
                    off += n
                sizes.append(P)
        return cls(groups, dp, zero_stage, frags, sizes)

    def local_shapes(self) -> dict:
        return {n: s for g in self.groups for n, s in g.items()}

    def overlapping(self, name: str, start: int, stop: int) -> list:
        """Fragments of `name` holding some of its flat elements [start, stop). A param's fragments
        lie in increasing param_offset order: a binary search, not a scan over every DP rank."""
        lst = self.frags[name]
        starts = self._starts.get(name)
        if starts is None:
            starts = self._starts[name] = [f.param_offset for f in lst]
        i = max(0, bisect.bisect_right(starts, start) - 1)
        out = []
        for f in lst[i:]:
            if f.param_offset >= stop:
                break
            if start < f.param_offset + f.numel:
                out.append(f)
        return out

    def rank_fragments(self, dp_rank: int) -> list:
        """(name, start, numel) of every fragment DP rank `dp_rank` holds (its own share). The index
        by rank is built once (linear in the fragments), so asking for every rank stays linear in
        ranks (ZeRO-3: dp fragments per param) instead of dp x fragments."""
        if self._by_rank is None:
            by: dict = {}
            for n, lst in self.frags.items():
                for f in lst:
                    by.setdefault(f.dp_rank, []).append((n, f.param_offset, f.numel))
            self._by_rank = by
        return list(self._by_rank.get(dp_rank, ()))

    def check_file(self, sd: dict, dp_rank: int, path: str) -> None:
        """An opened optimizer file must hold exactly the fragments the map puts there."""
        bad = None
        if self.zero_stage == 3:
            flats = sd.get("fp32_flat_groups", [])
            got = [int(t.numel()) for t in flats]
            if got != self.partition_numel:
                bad = f"flat group sizes {got}, expected {self.partition_numel}"
        else:
            parts = sd.get("single_partition_of_fp32_groups", [])
            got = [int(t.numel()) for t in parts]
            if got != self.partition_numel:
                bad = f"partition sizes {got}, expected {self.partition_numel}"
            else:
                for g, mapping in enumerate(sd.get("param_slice_mappings", [])):
                    have = {n: (int(a.start), int(a.numel)) for n, a in mapping.items() if int(a.numel) > 0}
                    want = {
                        n: (f.flat_start, f.numel) for n, lst in self.frags.items() for f in lst if f.dp_rank == dp_rank and f.group == g
                    }
                    if have != want:
                        bad = f"group {g} fragments {sorted(set(have.items()) ^ set(want.items()))[:4]} differ"
                        break
        if bad:
            raise UserError(
                f"{path}: not partitioned as DeepSpeed's ZeRO-{self.zero_stage} default layout for its "
                f"param_shapes ({bad}); unsupported (e.g. zero_optimization.parameter_alignment)"
            )


@dataclass
class SourceCheckpoint:
    """A native DeepSpeed checkpoint of a megagrow stage, readable box by box."""

    dir: str
    tag: str
    client: dict
    tp: int
    dp: int
    zero_stage: int
    prefix: str  # "" or "bf16_"
    local_shapes: dict = field(default_factory=dict)  # name -> TP-local shape
    _files: dict = field(default_factory=dict)
    bytes_read: int = 0
    opened: list = field(default_factory=list)  # paths of the files opened, in order
    boxes: set = field(default_factory=set)  # (name, logical box) of every read_box: what this reader needed
    map: ShardMap | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, ckpt_dir: str, tag: str | None = None) -> SourceCheckpoint:
        if not os.path.isdir(ckpt_dir):
            raise UserError(f"checkpoint directory not found: {ckpt_dir}")
        # no tag asked for: the newest complete checkpoint (manifest.current), not what `latest` says
        tag = tag or manifest.current(ckpt_dir)
        d = os.path.join(ckpt_dir, tag)
        if not os.path.isdir(d):
            raise UserError(f"checkpoint tag {tag!r} not found in {ckpt_dir}")
        z3 = sorted(glob.glob(os.path.join(d, "zero_pp_rank_*_mp_rank_*_model_states.pt")))
        model_file = z3[0] if z3 else os.path.join(d, "mp_rank_00_model_states.pt")
        ms = _load(model_file)
        if "stage" not in ms:
            raise UserError(f"{model_file}: not a megagrow checkpoint (no stage config recorded)")
        zero = 3 if z3 else int(ms["stage"]["layout"]["zero_stage"])
        tp = int(ms.get("mp_world_size", 1))
        dp = int(ms["dp_world_size"])
        prefix = "bf16_" if ms["stage"]["layout"]["dtype"] == "bf16" else ""
        ck = cls(ckpt_dir, tag, {k: v for k, v in ms.items() if k not in ("module", "optimizer")}, tp, dp, zero, prefix)
        ck.opened.append(model_file)
        ck._set_map(ShardMap.of([{n: tuple(s) for n, s in g.items()} for g in ms["param_shapes"]], dp, zero))
        return ck

    @classmethod
    def planned(cls, model: ModelConfig, tp: int, dp: int, zero_stage: int, record: StageRecord | None = None) -> SourceCheckpoint:
        """A checkpoint of `model` at layout (tp, dp, zero_stage) as DeepSpeed would write it, with
        no files: its shard map answers `files_for` (which files a box's read opens) at any scale,
        for planning and docs/scale.md. Param groups as megagrow.parallel.engine makes them
        (matrices and embeddings, then vectors), each in model order. `record`: the stage record
        it would carry (needed by `reads.read_plan`)."""
        from megagrow.growth.ops import logical_tensors

        groups: list = [{}, {}]
        for name, shape in logical_tensors(model).items():
            s = list(shape)
            pd = partition_dim(name)
            if pd is not None:
                s[pd] //= tp
            groups[0 if len(s) >= 2 else 1][name] = tuple(s)
        ck = cls("(planned)", "(planned)", record.to_client_state() if record else {}, tp, dp, zero_stage, "")
        ck._set_map(ShardMap.of(groups, dp, zero_stage))
        return ck

    def _set_map(self, smap: ShardMap) -> None:
        self.map = smap
        self.local_shapes = smap.local_shapes()

    def check_files(self) -> None:
        """Open every optimizer file of the source and check it against the shard map (one
        process validating a source before its ranks start; the ranks then open only their own)."""
        for t in range(self.tp):
            for d in range(self.dp):
                self._optim(t, d)

    def file_bytes(self, kind: str, tp_rank: int, dp_rank: int) -> int:
        """The size of a source file ("optim" or "model"): from the tag's manifest or the file itself
        when the checkpoint exists; for a planned one, what DeepSpeed writes: an optimizer file is 12 B
        (fp32 weight, exp_avg, exp_avg_sq) per element of the rank's flat partitions, a ZeRO-1/2 module
        file 2 B (bf16/fp16) or 4 B per TP-local element, a ZeRO-3 module file metadata only (0 here)."""
        path = self.path(kind, tp_rank, dp_rank)
        if self.dir != "(planned)":
            from megagrow.state.manifest import MANIFEST

            m = getattr(self, "_manifest", None)
            if m is None:
                try:
                    import json

                    with open(os.path.join(self.dir, self.tag, MANIFEST)) as f:
                        m = json.load(f).get("files", {})
                except (OSError, ValueError, AttributeError):
                    m = {}
                self._manifest = m
            got = m.get(os.path.basename(path), {}).get("size") if isinstance(m, dict) else None
            if isinstance(got, int):
                return got
            try:
                return os.path.getsize(path)
            except OSError:
                return 0
        if kind == "optim":
            return 12 * sum(self.map.partition_numel)
        if self.zero_stage == 3:
            return 0
        dtype = (self.client.get("stage") or {}).get("layout", {}).get("dtype", "bf16")
        return (2 if dtype in ("bf16", "fp16") else 4) * sum(math.prod(s) for s in self.local_shapes.values())

    def path(self, kind: str, tp_rank: int, dp_rank: int) -> str:
        base = os.path.join(self.dir, self.tag)
        if kind == "optim":
            return os.path.join(base, f"{self.prefix}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt")
        if self.zero_stage == 3:
            return os.path.join(base, f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt")
        return os.path.join(base, f"mp_rank_{tp_rank:02d}_model_states.pt")

    def _optim(self, tp_rank: int, dp_rank: int) -> dict:
        key = (tp_rank, dp_rank)
        if key not in self._files:
            path = self.path("optim", tp_rank, dp_rank)
            sd = _load(path)["optimizer_state_dict"]
            if path not in self.opened:  # reopened after close(): listed once
                self.opened.append(path)
            self.map.check_file(sd, dp_rank, path)
            self._files[key] = sd
        return self._files[key]

    def files_for(self, name: str, box: tuple) -> set:
        """The (tp_rank, dp_rank) optimizer files that `read_box(name, _, box)` opens (metadata only)."""
        out = set()
        for t, b in self._tp_shards(name, box):
            local = self.local_shapes[name]
            if len(local) == 1:
                out |= {(t, f.dp_rank) for f in self.map.overlapping(name, b[0][0], b[0][1])}
            else:
                (r0, r1), (c0, c1) = b
                cols = local[1]
                out |= {(t, f.dp_rank) for f in self.map.overlapping(name, r0 * cols, r1 * cols) if _touches(f, r0, r1, c0, c1, cols)}
        return out

    def needed_files(self) -> set:
        """The optimizer files (tp_rank, dp_rank) that the boxes read so far need (metadata only)."""
        return set().union(*(self.files_for(n, b) for n, b in self.boxes))

    def close(self) -> None:
        """Drop the opened files' mappings (the object stays usable: files reopen on demand)."""
        self._files.clear()

    def release(self, state: str | None = None) -> None:
        """Take the pages read so far out of this process's memory, keeping the files open: the flat
        partitions of every opened file are memory-mapped privately and only read, so dropping their
        pages (madvise DONTNEED) loses nothing; they stay in the page cache and fault back on the next
        read. A column box of a row-major matrix touches every page of its rows, twice the bytes it
        reads at TP=2: without this a rank's RSS holds all of it until the file is closed. state: only
        that state's partitions (w | m | v)."""
        from megagrow.memory import drop_pages

        for sd in self._files.values():  # every file here was mapped by `_load` (torch.load mmap=True)
            for s in [state] if state else STATE_KEYS:
                for g in range(len(self.map.groups)):
                    t = self._flat_of(sd, g, s)
                    drop_pages(t.data_ptr(), t.numel() * t.element_size())

    # ---------------------------------------------------------------- metadata
    @functools.cached_property
    def record(self) -> StageRecord:
        return StageRecord.from_client_state(self.client, os.path.join(self.dir, self.tag))

    @property
    def stage(self) -> Stage:
        return self.record.stage

    @property
    def plan(self) -> Plan:
        return self.record.plan

    @property
    def model(self) -> ModelConfig:
        return self.stage.model

    def logical_shapes(self) -> dict:
        out = {}
        for name, s in self.local_shapes.items():
            s = list(s)
            pd = partition_dim(name)
            if pd is not None:
                s[pd] *= self.tp
            out[name] = tuple(s)
        return out

    def adam_step(self) -> int:
        sd = next(iter(self._files.values())) if self._files else self._optim(0, 0)  # every file holds it
        base = sd["optimizer_state_dict"] if self.zero_stage == 3 else sd["base_optimizer_state"]
        return int(next(iter(base["state"].values()))["step"])

    def param_groups(self) -> list:
        """The base optimizer's param_groups as an opened optimizer file holds them (torch's AdamW
        keys, in its order; the values of the source's last step), copies."""
        sd = next(iter(self._files.values())) if self._files else self._optim(0, 0)
        base = sd["optimizer_state_dict"] if self.zero_stage == 3 else sd["base_optimizer_state"]
        return [dict(g) for g in base["param_groups"]]

    def files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, self.tag, "*.pt")))

    # ---------------------------------------------------------------- reading
    def _flat(self, tp_rank: int, dp_rank: int, group: int, state: str) -> torch.Tensor:
        return self._flat_of(self._optim(tp_rank, dp_rank), group, state)

    def _flat_of(self, sd: dict, group: int, state: str) -> torch.Tensor:
        if state == "w":
            return sd["fp32_flat_groups" if self.zero_stage == 3 else "single_partition_of_fp32_groups"][group]
        base = sd["optimizer_state_dict"] if self.zero_stage == 3 else sd["base_optimizer_state"]
        return base["state"][group][STATE_KEYS[state]]

    def read_flat(self, tp_rank: int, name: str, state: str, start: int, stop: int, view: bool = False) -> torch.Tensor:
        """Elements [start, stop) of the flattened TP-local param `name` of TP rank `tp_rank`. view: when one
        fragment holds them all, the memory-mapped slice itself (read-only to the caller: no copy), else a
        new float32 tensor assembled from the fragments."""
        frags = self.map.overlapping(name, start, stop)
        if view and len(frags) == 1 and frags[0].param_offset <= start and stop <= frags[0].param_offset + frags[0].numel:
            f = frags[0]
            flat = self._flat(tp_rank, f.dp_rank, f.group, state)
            a = f.flat_start + start - f.param_offset
            self.bytes_read += (stop - start) * flat.element_size()
            return flat[a : a + stop - start]
        out = torch.empty(stop - start, dtype=torch.float32)
        for f in frags:
            lo, hi = max(start, f.param_offset), min(stop, f.param_offset + f.numel)
            flat = self._flat(tp_rank, f.dp_rank, f.group, state)
            a = f.flat_start + lo - f.param_offset
            out[lo - start : hi - start] = flat[a : a + hi - lo]
            self.bytes_read += (hi - lo) * flat.element_size()
        return out

    def read_box(self, name: str, state: str, box: tuple) -> torch.Tensor:
        """The logical box `box` ((start, stop) per dim) of tensor `name` for state w | m | v."""
        self.boxes.add((name, box))
        local = self.local_shapes[name]
        parts = []
        for t, b in self._tp_shards(name, box):
            if len(local) == 1:
                parts.append(self.read_flat(t, name, state, b[0][0], b[0][1]))
            else:
                parts.append(self._read_matrix_box(t, name, state, local[1], b))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=partition_dim(name))

    def _tp_shards(self, name: str, box: tuple) -> list:
        """[(tp_rank, box in that rank's TP-local tensor)] covering the logical `box`."""
        pd = partition_dim(name)
        if pd is None or self.tp == 1:
            return [(0, box)]
        size = self.local_shapes[name][pd]
        lo, hi = box[pd]
        shards = []
        for t in range(lo // size, (hi - 1) // size + 1):
            b = list(box)
            b[pd] = (max(lo, t * size) - t * size, min(hi, (t + 1) * size) - t * size)
            shards.append((t, tuple(b)))
        return shards

    def _read_matrix_box(self, t: int, name: str, state: str, cols: int, b: tuple) -> torch.Tensor:
        """Rows [r0, r1) x cols [c0, c1) of a TP-local matrix stored row-major in flat fragments:
        whole rows in one read when all columns are wanted, else one strided read per fragment."""
        (r0, r1), (c0, c1) = b
        if c0 == 0 and c1 == cols:
            return self.read_flat(t, name, state, r0 * cols, r1 * cols).view(r1 - r0, cols)
        out = torch.empty(r1 - r0, c1 - c0, dtype=torch.float32)
        for f in self.map.overlapping(name, r0 * cols, r1 * cols):
            if not _touches(f, r0, r1, c0, c1, cols):
                continue  # the fragment holds only columns outside the box: its file is not opened
            # rows of the box that this fragment touches, then per row the wanted columns in it
            fr0, fr1 = max(r0, f.param_offset // cols), min(r1, -(-(f.param_offset + f.numel) // cols))
            flat = self._flat(t, f.dp_rank, f.group, state)
            base = f.flat_start - f.param_offset
            lo_all, hi_all = f.param_offset, f.param_offset + f.numel
            full = [r for r in range(fr0, fr1) if lo_all <= r * cols + c0 and r * cols + c1 <= hi_all]
            if full:  # rows whose wanted columns lie inside this fragment: one strided view
                a, z = full[0], full[-1] + 1
                view = flat[base + a * cols : base + z * cols].view(z - a, cols)[:, c0:c1]
                out[a - r0 : z - r0] = view
                self.bytes_read += view.numel() * flat.element_size()
            for r in range(fr0, fr1):  # rows cut by the fragment's ends
                if full and full[0] <= r < full[-1] + 1:
                    continue
                lo, hi = max(r * cols + c0, lo_all), min(r * cols + c1, hi_all)
                if lo < hi:
                    out[r - r0, lo - r * cols - c0 : hi - r * cols - c0] = flat[base + lo : base + hi]
                    self.bytes_read += (hi - lo) * flat.element_size()
        return out

    def lazy(self, state: str) -> LazyTensors:
        return LazyTensors(self, state)


class LazyTensors:
    """`old[name][slices]` for growth maps: reads only the sliced box from the checkpoint."""

    def __init__(self, ck: SourceCheckpoint, state: str):
        self.ck, self.state = ck, state
        self.shapes = ck.logical_shapes()

    def __contains__(self, name):
        return name in self.shapes

    def __getitem__(self, name):
        ck, state, shape = self.ck, self.state, self.shapes[name]

        class _View:
            def __getitem__(self, slices):
                box = tuple((s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(slices))
                return ck.read_box(name, state, box)

        return _View()
