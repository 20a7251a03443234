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
"""

from __future__ import annotations

import functools
import glob
import math
import os
from dataclasses import dataclass, field

import torch

from megagrow.config import ModelConfig, Plan, Stage
from megagrow.errors import UserError
from megagrow.model.gpt import partition_dim
from megagrow.state.record import StageRecord

STATE_KEYS = {"w": None, "m": "exp_avg", "v": "exp_avg_sq"}


def latest_tag(ckpt_dir: str) -> str:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        raise UserError(f"no DeepSpeed checkpoint in {ckpt_dir} (no 'latest' file); pass --tag")
    with open(path) as f:
        return f.read().strip()


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
    frags: dict = field(default_factory=dict)  # (tp_rank, name) -> [_Frag]
    local_shapes: dict = field(default_factory=dict)  # name -> TP-local shape
    _files: dict = field(default_factory=dict)
    bytes_read: int = 0

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, ckpt_dir: str, tag: str | None = None) -> "SourceCheckpoint":
        if not os.path.isdir(ckpt_dir):
            raise UserError(f"checkpoint directory not found: {ckpt_dir}")
        tag = tag or latest_tag(ckpt_dir)
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
        for g, shapes in enumerate(ms["param_shapes"]):
            for name, shape in shapes.items():
                ck.local_shapes[name] = tuple(shape)
        for t in range(tp):  # every rank file readable (metadata only: tensors stay mmapped)
            for d in range(dp):
                ck._optim(t, d)
        ck._index(ms)
        ck._check_shapes()
        return ck

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
            sd = _load(self.path("optim", tp_rank, dp_rank))["optimizer_state_dict"]
            self._files[key] = sd
        return self._files[key]

    def _index(self, ms: dict) -> None:
        """Where every TP-local param's elements live among the DP ranks' files (metadata only)."""
        for t in range(self.tp):
            if self.zero_stage == 3:
                for g, shapes in enumerate(ms["param_shapes"]):
                    off = 0
                    for name, shape in shapes.items():
                        n = math.prod(shape)
                        P = -(-n // self.dp)
                        self.frags[(t, name)] = [
                            _Frag(d, d * P, max(0, min(P, n - d * P)), g, off) for d in range(self.dp) if d * P < n
                        ]
                        off += P
            else:
                seen: dict = {}
                for d in range(self.dp):
                    for g, mapping in enumerate(self._optim(t, d)["param_slice_mappings"]):
                        for name, addr in mapping.items():
                            lst = seen.setdefault(name, [])
                            done = sum(f.numel for f in lst)
                            lst.append(_Frag(d, done, int(addr.numel), g, int(addr.start)))
                for name, lst in seen.items():
                    self.frags[(t, name)] = lst

    def _check_shapes(self) -> None:
        for name in self.logical_shapes():
            n = math.prod(self.local_shapes[name])
            for t in range(self.tp):
                got = sum(f.numel for f in self.frags.get((t, name), []))
                if got != n:
                    raise UserError(f"{self.dir}/{self.tag}: {name} has {got} of {n} elements on TP rank {t}: incomplete checkpoint")

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
        sd = self._optim(0, 0)
        base = sd["optimizer_state_dict"] if self.zero_stage == 3 else sd["base_optimizer_state"]
        return int(next(iter(base["state"].values()))["step"])

    def files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, self.tag, "*.pt")))

    # ---------------------------------------------------------------- reading
    def _flat(self, tp_rank: int, dp_rank: int, group: int, state: str) -> torch.Tensor:
        sd = self._optim(tp_rank, dp_rank)
        if state == "w":
            return sd["fp32_flat_groups" if self.zero_stage == 3 else "single_partition_of_fp32_groups"][group]
        base = sd["optimizer_state_dict"] if self.zero_stage == 3 else sd["base_optimizer_state"]
        return base["state"][group][STATE_KEYS[state]]

    def read_flat(self, tp_rank: int, name: str, state: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened TP-local param `name` of TP rank `tp_rank`."""
        out = torch.empty(stop - start, dtype=torch.float32)
        for f in self.frags[(tp_rank, name)]:
            lo, hi = max(start, f.param_offset), min(stop, f.param_offset + f.numel)
            if lo >= hi:
                continue
            flat = self._flat(tp_rank, f.dp_rank, f.group, state)
            a = f.flat_start + lo - f.param_offset
            out[lo - start:hi - start] = flat[a:a + hi - lo]
            self.bytes_read += (hi - lo) * flat.element_size()
        return out

    def read_box(self, name: str, state: str, box: tuple) -> torch.Tensor:
        """The logical box `box` ((start, stop) per dim) of tensor `name` for state w | m | v."""
        pd = partition_dim(name)
        local = self.local_shapes[name]
        parts = []
        if pd is None or self.tp == 1:
            shards = [(0, box)]
        else:
            size = local[pd]
            lo, hi = box[pd]
            shards = []
            for t in range(lo // size, (hi - 1) // size + 1):
                b = list(box)
                b[pd] = (max(lo, t * size) - t * size, min(hi, (t + 1) * size) - t * size)
                shards.append((t, tuple(b)))
        for t, b in shards:
            if len(local) == 1:
                parts.append(self.read_flat(t, name, state, b[0][0], b[0][1]))
            else:
                parts.append(self._read_matrix_box(t, name, state, local[1], b))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=pd)

    def _read_matrix_box(self, t: int, name: str, state: str, cols: int, b: tuple) -> torch.Tensor:
        """Rows [r0, r1) x cols [c0, c1) of a TP-local matrix stored row-major in flat fragments:
        whole rows in one read when all columns are wanted, else one strided read per fragment."""
        (r0, r1), (c0, c1) = b
        if c0 == 0 and c1 == cols:
            return self.read_flat(t, name, state, r0 * cols, r1 * cols).view(r1 - r0, cols)
        out = torch.empty(r1 - r0, c1 - c0, dtype=torch.float32)
        for f in self.frags[(t, name)]:
            # rows of the box that this fragment touches, then per row the wanted columns in it
            fr0, fr1 = max(r0, f.param_offset // cols), min(r1, -(-(f.param_offset + f.numel) // cols))
            if fr0 >= fr1:
                continue
            flat = self._flat(t, f.dp_rank, f.group, state)
            base = f.flat_start - f.param_offset
            lo_all, hi_all = f.param_offset, f.param_offset + f.numel
            full = [r for r in range(fr0, fr1) if lo_all <= r * cols + c0 and r * cols + c1 <= hi_all]
            if full:  # rows whose wanted columns lie inside this fragment: one strided view
                a, z = full[0], full[-1] + 1
                view = flat[base + a * cols: base + z * cols].view(z - a, cols)[:, c0:c1]
                out[a - r0:z - r0] = view
                self.bytes_read += view.numel() * flat.element_size()
            for r in range(fr0, fr1):  # rows cut by the fragment's ends
                if full and full[0] <= r < full[-1] + 1:
                    continue
                lo, hi = max(r * cols + c0, lo_all), min(r * cols + c1, hi_all)
                if lo < hi:
                    out[r - r0, lo - r * cols - c0: hi - r * cols - c0] = flat[base + lo: base + hi]
                    self.bytes_read += (hi - lo) * flat.element_size()
        return out

    def lazy(self, state: str) -> "LazyTensors":
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

