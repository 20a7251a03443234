"""Writing DeepSpeed's native checkpoint of a target layout straight from the logical tensors:
no engine, no model, no megatron-core.

Target rank (tp_rank t, dp_rank d) of stage k's layout fills its own flat partitions -- fp32
master, exp_avg, exp_avg_sq, per param group -- fragment by fragment: the target `ShardMap`
(`SourceCheckpoint.planned`, the same partitioning arithmetic the reader checks every source
file against) says which elements of which TP-local param sit where; `executor.fragment_box`
turns a fragment into a box of the logical tensor and the growth map evaluates that box, reading
only the source boxes it names. Then it writes the files DeepSpeed 0.19's `save_checkpoint`
writes for that rank, with the same keys, types, dtypes and values:

* its optimizer file (`[bf16_]zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt`), as
  DeepSpeedZeroOptimizer (ZeRO-1/2; bf16 at ZeRO-2), BF16_Optimizer (bf16 at ZeRO-1: megagrow
  accumulates gradients in fp32) or DeepSpeedZeroOptimizer_Stage3 (ZeRO-3) lay it out;
* its module-states file: ZeRO-1/2 on DP rank 0 only (`mp_rank_{t:02d}_model_states.pt`,
  holding the TP-local weights in the training dtype, rounded from the fp32 master as
  DeepSpeed's update_lp_params does and gathered from the DP ranks as DeepSpeed gathers them),
  ZeRO-3 on every rank (`zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`, empty placeholders).
  Both carry the engine's metadata (param_shapes, ds_config, ...) and megagrow's stage record.

Global rank 0 also writes `latest` and DeepSpeed's recovery scripts. tests/dist/test_regrow_writer.py
loads the result in a real engine and compares it with what the engine path writes, bitwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import sys
import time
from collections import OrderedDict

import torch

from megagrow.paths import LATEST
from megagrow.state.checkpoint import SourceCheckpoint

# the module (last path component) of every megatron-core Column/RowParallelLinear in megagrow's GPT:
# their state dict carries an `_extra_state` entry (None) after their parameters
LINEARS = {"q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down", "lm_head"}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHUNK = 1 << 20  # elements of the fp32 master a rank rounds and DP rank 0 gathers at a time, for the module file


def module_keys(names: list[str]) -> list[str]:
    """The module state dict's keys in order, from the parameter names in named_parameters order:
    each parameter, and `<linear>._extra_state` after a parallel linear's last parameter."""
    out = []
    for i, n in enumerate(names):
        out.append(n)
        mod = n.rsplit(".", 1)[0]
        last = i + 1 == len(names) or names[i + 1].rsplit(".", 1)[0] != mod
        if last and mod.rsplit(".", 1)[-1] in LINEARS:
            out.append(f"{mod}._extra_state")
    return out


def optimizer_kind(layout) -> str:
    """Which DeepSpeed optimizer writes the files of `layout`: zero (ZeRO-1/2), bf16 (BF16_Optimizer:
    bf16 at ZeRO-1, gradients accumulated in fp32) or zero3."""
    if layout.zero_stage == 3:
        return "zero3"
    return "bf16" if (layout.dtype == "bf16" and layout.zero_stage == 1) else "zero"


def supported(layout) -> bool:
    return layout.zero_stage in (1, 2, 3)


def file_names(layout, t: int, d: int) -> tuple[str, str | None]:
    """(optimizer file, module-states file or None) that target rank (t, d) writes."""
    prefix = "bf16_" if layout.dtype == "bf16" else ""
    optim = f"{prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
    if layout.zero_stage == 3:
        return optim, f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt"
    return optim, (f"mp_rank_{t:02d}_model_states.pt" if d == 0 else None)


class RankWriter:
    """The files of target rank (t, d) of stage k of `plan`, from `src` through the growth `tensors`."""

    def __init__(self, plan, k: int, tensors: dict, src: SourceCheckpoint, t: int, d: int, reset: bool = False, dp_group=None):
        """dp_group: the torch.distributed group of this TP rank's DP ranks (global ranks t + tp x d, in
        DP order), needed when dp > 1 at ZeRO-1/2: DP rank 0 gathers the module weights over it."""
        self.plan, self.stage, self.tensors, self.src = plan, plan.stages[k], tensors, src
        L = self.stage.layout
        self.L, self.t, self.d, self.reset, self.dp_group = L, t, d, reset, dp_group
        self.map = SourceCheckpoint.planned(self.stage.model, L.tp, L.dp, L.zero_stage).map
        self.shapes = self.map.local_shapes()
        self.lazies = {s: src.lazy(s) for s in ("w", "m", "v")}
        self.bytes_filled = 0

    def values(self, name: str, state: str, start: int, numel: int) -> torch.Tensor:
        """Flat elements [start, start+numel) of TP-local param `name` for state w | m | v (fp32)."""
        from megagrow.growth.maps import apply_tensor
        from megagrow.state.executor import fragment_box

        if self.reset and state != "w":
            return torch.zeros(numel, dtype=torch.float32)
        box, skip = fragment_box(name, self.shapes[name], start, numel, self.L.tp, self.t)
        return apply_tensor(self.tensors[name], self.lazies[state], state, self.plan.seed, box=box).reshape(-1)[skip : skip + numel]

    def my_fragments(self) -> list:
        """(name, fragment) of every fragment this DP rank owns, in flat order."""
        return [(n, f) for n, lst in self.map.frags.items() for f in lst if f.dp_rank == self.d and f.numel > 0]

    def _bar(self, progress: bool):
        if not progress:
            return None
        from tqdm import tqdm

        return tqdm(total=3 * len(self.my_fragments()), desc="regrow", unit="tensor", file=sys.stderr)

    def fill(self, state: str, group: int, put, bar=None) -> None:
        """Compute this rank's elements of `state` (w | m | v, fp32) in param group `group`, fragment by
        fragment in flat order: put(flat_start, values). After each fragment the source pages it touched
        leave this process's memory (`SourceCheckpoint.release`): a rank's RSS holds at most one
        fragment's source pages, not every page of every source file it reads."""
        for name, f in self.my_fragments():
            if f.group == group:
                put(f.flat_start, self.values(name, state, f.param_offset, f.numel))
                self.src.release(state)
                if bar is not None:
                    bar.update()

    def placeholders(self) -> dict:
        """{state: [flat partition per group]} of fp32 placeholders (`torch.empty`, never touched: no memory)
        for the optimizer file's master and moments, which `stream_states` writes into the file."""
        return {s: [torch.empty(P, dtype=torch.float32) for P in self.map.partition_numel] for s in ("w", "m", "v")}

    def stream_states(self, f, flats: dict, bar=None) -> None:
        """Write this rank's fp32 master and Adam moments into the optimizer file `f` (a StreamedSave),
        fragment by fragment, straight from the growth map. The padding is never written: it reads as
        zeros. A reset (zeroed) moment writes nothing."""
        for s in ("w", "m", "v"):
            for g, flat in enumerate(flats[s]):
                if s == "w" or not self.reset:
                    self.fill(s, g, lambda start, x, flat=flat: f.write(flat, 4 * start, x), bar)

    def module_flats(self) -> list:
        """Per group, DP rank 0's placeholder for the flat buffer its module weights view (DeepSpeed's bit16
        flat layout: the DP ranks' partitions in DP order, in the training dtype); None elsewhere."""
        if self.d != 0:
            return [None] * len(self.map.partition_numel)
        return [torch.empty(P * self.L.dp, dtype=DTYPE[self.L.dtype]) for P in self.map.partition_numel]

    def module_weights(self, flats: list) -> OrderedDict:
        """The TP-local weights, each a view into its group's flat buffer `flats[g]`."""
        out = OrderedDict()
        for name, shape in self.shapes.items():
            lst = self.map.frags[name]
            if not lst:  # an empty parameter: no elements anywhere
                out[name] = torch.zeros(shape, dtype=DTYPE[self.L.dtype])
                continue
            start = lst[0].dp_rank * self.map.partition_numel[lst[0].group] + lst[0].flat_start  # its offset in the flat group
            out[name] = flats[lst[0].group][start : start + math.prod(shape)].view(shape)
        return out

    def stream_module(self, optim, w: list, module, flats: list) -> None:
        """ZeRO-1/2, collective over the DP group: the module weights in the training dtype, as DeepSpeed's
        update_lp_params leaves them -- each DP rank rounds its fp32 master (read back, chunk by chunk, from
        its optimizer file `optim`) and DP rank 0 gathers the chunks and writes them into its module file
        `module` (a StreamedSave; None on the other DP ranks) at their place in `flats`."""
        from megagrow import collectives

        dtype, dp = DTYPE[self.L.dtype], self.L.dp
        size = torch.empty((), dtype=dtype).element_size()
        # the same few buffers for every chunk: a new allocation per chunk would stay in the heap's free lists
        master = torch.empty(CHUNK, dtype=torch.float32)
        parts = [torch.empty(CHUNK, dtype=dtype) for _ in range(dp)] if self.d == 0 else None
        mine = parts[0] if parts is not None else torch.empty(CHUNK, dtype=dtype)
        for g, P in enumerate(self.map.partition_numel):
            for c0 in range(0, P, CHUNK):
                n = min(CHUNK, P - c0)
                optim.read(w[g], 4 * c0, out=master[:n])
                mine[:n].copy_(master[:n])
                got = [p[:n] for p in parts] if parts is not None else None
                if dp > 1:
                    collectives.gather(mine[:n], dst=self.t, group=self.dp_group, out=got)
                if module is not None:
                    for d, part in enumerate(got):
                        module.write(flats[g], (d * P + c0) * size, part)

    # ------------------------------------------------------------------ file contents
    def param_groups(self) -> list:
        """torch AdamW's param_groups as a new engine of this stage holds them: the source's groups
        (the same torch writes the same keys, in its order) with this stage's hyperparameters; the
        decayed group (matrices, embeddings) first. Taken from the source rather than from an AdamW
        made here: the first optimizer a process makes imports torch's compiler stack (seconds)."""
        o = self.stage.optim
        groups = self.src.param_groups()
        if len(groups) != len(self.map.groups):
            raise RuntimeError(f"source has {len(groups)} param groups, the target {len(self.map.groups)}")
        for i, g in enumerate(groups):
            g.update(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay if i == 0 else 0.0, params=[i])
        return groups

    def base_state(self, flats: dict, step: int, lean: list | None = None) -> dict:
        state = {}
        for g in range(len(self.map.groups)):
            m, v = flats["m"][g], flats["v"][g]
            if lean is not None:
                m, v = m[: lean[g]], v[: lean[g]]
            state[g] = {"step": torch.tensor(float(step)), "exp_avg": m, "exp_avg_sq": v}
        return {"state": state, "param_groups": self.param_groups()}

    def paddings(self) -> list:
        """Per group, the padding at the end of this rank's partition, as the optimizer records it."""
        out = []
        for g, shapes in enumerate(self.map.groups):
            total = sum(int(torch.Size(s).numel()) for s in shapes.values())
            P = self.map.partition_numel[g]
            if optimizer_kind(self.L) == "bf16":  # padding counted on the last rank only
                out.append(P * self.L.dp - total if self.d == self.L.dp - 1 else 0)
            else:
                left = self.d * P
                out.append(P if total <= left else max(0, left + P - total))
        return out

    def slice_mappings(self) -> list:
        from deepspeed.utils.tensor_fragment import fragment_address

        maps = [OrderedDict() for _ in self.map.groups]
        for name, f in self.my_fragments():
            maps[f.group][name] = fragment_address(numel=f.numel, start=f.flat_start)
        return maps

    def optimizer_state(self, flats: dict, step: int) -> dict:
        from deepspeed import __version__ as version
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        kind, G = optimizer_kind(self.L), len(self.map.groups)
        master = [w.detach().requires_grad_(True) for w in flats["w"]]  # as DeepSpeed holds it (a leaf)
        if kind == "zero3":
            return {
                "zero_stage": ZeroStageEnum.weights,
                "loss_scaler": LossScaler(1.0),
                "dynamic_loss_scale": False,
                "overflow": False,
                "partition_count": self.L.dp,
                "optimizer_state_dict": self.base_state(flats, step),
                "fp32_flat_groups": master,
            }
        clip = self.stage.optim.grad_clip
        pads = self.paddings()
        if kind == "bf16":
            return {
                "clip_grad": clip,
                "base_optimizer_state": self.base_state(flats, step),
                "single_partition_of_fp32_groups": master,
                "group_paddings": pads,
                "partition_count": [self.L.dp] * G,
                "ds_version": version,
                "param_slice_mappings": self.slice_mappings(),
            }
        lean = [w.numel() - p for w, p in zip(master, pads)]
        return {
            "loss_scaler": LossScaler(1.0),
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": clip,
            "base_optimizer_state": self.base_state(flats, step),
            "single_partition_of_fp32_groups": [w.detach()[:n].requires_grad_(True) for w, n in zip(master, lean)],
            "zero_stage": ZeroStageEnum.gradients if self.L.zero_stage == 2 else ZeroStageEnum.optimizer_states,
            "group_paddings": pads,
            "param_alignment_paddings": [[0] * len(s) for s in self.map.groups],
            "partition_count": [self.L.dp] * G,
            "ds_version": version,
            "param_slice_mappings": self.slice_mappings(),
        }

    def model_state(self, module: OrderedDict, step: int, client_state: dict, ds_config: dict) -> dict:
        from deepspeed import __version__ as version

        L = self.L
        z3 = L.zero_stage == 3
        if z3:  # every weight lives in the optimizer files: the module holds empty placeholders
            module = {n: torch.empty(0, dtype=DTYPE[L.dtype]) for n in self.shapes}
        sd = OrderedDict((key, None if key.endswith("._extra_state") else module[key]) for key in module_keys(self.shapes_in_model_order()))
        frozen = OrderedDict() if L.zero_stage >= 2 else None
        state = {
            "module": sd,
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in self.map.groups],
            "frozen_param_shapes": frozen,
            "shared_params": {},
            "frozen_param_fragments": None if frozen is None else OrderedDict(),
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": 0,
            "global_steps": step,
            "global_samples": 0,
            "dp_world_size": L.dp,
            "mp_world_size": L.tp,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": L.tp},
            "ds_config": ds_config,
            "ds_version": version,
        }
        state.update(client_state)
        return state

    def shapes_in_model_order(self) -> list:
        from megagrow.params import logical_tensors

        return list(logical_tensors(self.stage.model))

    # ------------------------------------------------------------------ writing
    @torch.no_grad()  # the source's fp32 master is saved as a leaf that requires grad: copies must not track it
    def write(self, tag_dir: str, step: int, client_state: dict, ds_config: dict, progress: bool = False, adam_step=lambda: 0) -> dict:
        """Write this rank's files into `tag_dir`: `step` DeepSpeed's global step, `adam_step()` Adam's.
        Neither file is ever whole in memory: the optimizer file's states are written fragment by fragment,
        the module file chunk by chunk (`StreamedSave`). Returns timings and byte counts."""
        from megagrow.state.streamsave import StreamedSave

        t0 = time.perf_counter()
        optim_name, model_name = file_names(self.L, self.t, self.d)
        bar = self._bar(progress)
        astep = adam_step()
        flats = self.placeholders()
        obj = {"optimizer_state_dict": self.optimizer_state(flats, astep), "ds_config": ds_config, "ds_version": _version()}
        with no_record_crc(), StreamedSave(obj, os.path.join(tag_dir, optim_name), lazy=[t for s in flats.values() for t in s]) as optim:
            del obj
            self.stream_states(optim, flats, bar)
            self.bytes_filled += sum(f.numel for _, f in self.my_fragments()) * 4 * 3
            if bar is not None:
                bar.close()
            t1 = time.perf_counter()
            if self.L.zero_stage in (1, 2):  # every DP rank takes part; DP rank 0 writes the module file
                mflats = self.module_flats()
                module = None
                if model_name:
                    obj = self.model_state(self.module_weights(mflats), step, client_state, ds_config)
                    module = StreamedSave(obj, os.path.join(tag_dir, model_name), lazy=mflats)
                    del obj
                try:
                    self.stream_module(optim, flats["w"], module, mflats)
                finally:
                    if module is not None:
                        module.close()
            elif model_name:
                torch.save(self.model_state({}, step, client_state, ds_config), os.path.join(tag_dir, model_name))
        return {
            "bytes_written_state": self.bytes_filled,
            "fill_seconds": t1 - t0,
            "save_seconds": time.perf_counter() - t1,
            "adam_step": astep,
        }


@contextlib.contextmanager
def no_record_crc():
    """torch.save without the zip records' own CRC-32 (half of torch.save's time for a large tensor
    on this machine: 1.04 -> 0.51 s for 0.48 GB): torch.load never checks it, and megagrow's
    manifest holds the CRC-32 of every whole file, which `seal` computes and `megagrow verify` and
    every resume check. Everything else about the file is torch.save's."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def _version() -> str:
    from deepspeed import __version__

    return __version__


def write_shared(ckpt_dir: str, tag: str) -> None:
    """What global rank 0 writes besides its own files: `latest` and DeepSpeed's recovery scripts."""
    import deepspeed

    base = os.path.join(os.path.dirname(deepspeed.__file__), "utils")
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        dst = os.path.join(ckpt_dir, script)
        shutil.copyfile(os.path.join(base, script), dst)
        os.chmod(dst, os.stat(dst).st_mode | stat.S_IEXEC)
    with open(os.path.join(ckpt_dir, LATEST), "w") as fd:
        fd.write(tag)


def init_ranks(layout) -> int:
    """torch.distributed for an offline regrow over `layout`'s ranks (torchrun or Slurm variables):
    one gloo group of the world, no megatron-core or DeepSpeed groups (the ranks meet at barriers,
    exchange a few names, and at ZeRO-1/2 gather the module weights over per-TP-rank DP groups,
    `regrow_offline` makes them). A single rank starts nothing. Returns the global rank."""
    import datetime

    from megagrow.errors import UserError
    from megagrow.parallel.groups import _env_rank, collective_timeout_s

    rank, world, local_rank = _env_rank()
    layout.check_world(world)
    if world == 1:
        return 0
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run (torchrun or the launcher sets them)")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=collective_timeout_s())
        )
    return rank
