"""A checking wrapper over torch.distributed for a CPU run that declares its groups NCCL.

install() sets MEGAGROW_DECLARE_NCCL=1 (megagrow.collectives then treats every group but its
gloo side group as NCCL) and wraps torch.distributed's collectives: a call made from a megagrow
module with a tensor on a declared-NCCL group raises unless the tensor is a device copy made by
megagrow.collectives (on a GPU the same call would fail: NCCL takes CUDA tensors only). Calls from
DeepSpeed and megatron-core are not checked (on a GPU their tensors are on the device already).
SEEN counts the checked calls, per collective and kind of group, so a test can show the checker
was on the path it claims to check.
"""

from __future__ import annotations

import collections
import inspect
import os
import sys

import torch

NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
         "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
         "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
SEEN: collections.Counter = collections.Counter()


class CPUTensorOnNCCL(RuntimeError):
    pass


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)


def install() -> None:
    from megagrow import collectives

    os.environ[collectives.DECLARE_NCCL_ENV] = "1"
    dist = torch.distributed
    for name in NAMES:
        orig = getattr(dist, name)
        sig = inspect.signature(orig)

        def wrapper(*a, _orig=orig, _name=name, _sig=sig, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] == "megagrow":
                args = _sig.bind(*a, **kw).arguments
                group = args.get("group")
                side = group is not None and group is collectives._side
                SEEN[f"{_name}@{'gloo-side' if side else 'nccl'}"] += 1
                if not side:
                    for t in (t for k, v in args.items() if k != "group" for t in _tensors(v)):
                        if not getattr(t, collectives.ON_DEVICE, False):
                            raise CPUTensorOnNCCL(f"{_name} from {caller}: a {t.device.type} tensor {tuple(t.shape)} on a "
                                                  f"group declared NCCL (NCCL takes device tensors only)")
            return _orig(*a, **kw)

        setattr(dist, name, wrapper)
