"""Every torch.distributed collective megagrow makes goes through this module, which runs it
where its backend can.

NCCL moves CUDA tensors only. A tensor collective (all_reduce, all_gather, broadcast) on an
NCCL group copies its tensor to the accelerator (the current CUDA device, which
`parallel.groups.init_distributed` set to the rank's local GPU), runs there and copies the
result back into the caller's tensor; a tensor already on the device is used as it is (the step
loop's per-step reduction costs no copy). Object collectives (strings, paths, lists of problems:
metadata the ranks agree on) run on a gloo side group of the whole world, created once per
process when the default group is NCCL (megatron-core keeps gloo groups for the same purpose):
they never touch the GPU. A barrier runs on the default group (on NCCL naming the current
device), so a barrier after GPU work also waits for that work.

On gloo (CPU runs) every collective runs on the group it is given: nothing is copied and no side
group is made.

Checking the NCCL path without a GPU: MEGAGROW_DECLARE_NCCL=1 makes this module treat every
group but the side group as NCCL on a CPU machine. The side group is then created (gloo, for
real), and the "device copy" of a tensor is a clone carrying the attribute ON_DEVICE, so a
checking wrapper over torch.distributed (tests/dist/nccl_check.py) can reject any tensor that
reaches a declared-NCCL group without passing through here.

tests/unit/test_structure.py fails when any other module of megagrow, tools/ or bench/ calls a
torch.distributed collective itself.
"""

from __future__ import annotations

import os

import torch

DECLARE_NCCL_ENV = "MEGAGROW_DECLARE_NCCL"
ON_DEVICE = "_megagrow_on_device"  # set on the device copies made while NCCL is only declared

_side = None  # the gloo group of the whole world, when the default group is NCCL
_ops = {"sum": "SUM", "max": "MAX", "min": "MIN", "prod": "PRODUCT"}


def _dist():
    return torch.distributed


def declared_nccl() -> bool:
    """True while MEGAGROW_DECLARE_NCCL=1 (tests): CPU tensors are treated as if the groups were NCCL."""
    return os.environ.get(DECLARE_NCCL_ENV, "") not in ("", "0")


def is_nccl(group=None) -> bool:
    """Whether tensors of a collective on `group` (None: the default group) must live on the device."""
    if group is not None and group is _side:
        return False
    if declared_nccl():
        return True
    return "nccl" in str(_dist().get_backend(group)).lower()


def device() -> torch.device:
    """Where an NCCL collective's tensors live: the current CUDA device (CPU when there is none)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(timeout_s: float | None = None) -> None:
    """Create the gloo side group for metadata when the default group is NCCL (or declared so).
    Collective over the whole world: `init_distributed` calls it on every rank, once the default
    group exists; later calls do nothing (the world does not change with the layout)."""
    global _side
    if _side is not None or not is_nccl(None):
        return
    import datetime

    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
    _side = _dist().new_group(backend="gloo", **kw)


def side_group():
    """The gloo group object collectives use (None: the default group, which is gloo already)."""
    if _side is None and is_nccl(None):
        setup()  # a process that started torch.distributed without init_distributed: every rank is here too
    return _side


# --------------------------------------------------------------------------------------
# tensor collectives


def _on_device(t: torch.Tensor, group) -> torch.Tensor:
    """The tensor the collective runs on: `t` itself where the backend takes it, else a device copy."""
    if not is_nccl(group):
        return t
    if declared_nccl() and not torch.cuda.is_available():
        c = t.detach().clone()
        setattr(c, ON_DEVICE, True)
        return c
    d = device()
    return t if t.device == d else t.to(d)


def _back(t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if d is not t:
        with torch.no_grad():
            t.copy_(d)
    return t


def _op(op):
    if isinstance(op, str):
        return getattr(_dist().ReduceOp, _ops[op.lower()])
    return op


def all_reduce(t: torch.Tensor, op="sum", group=None) -> torch.Tensor:
    """Reduce `t` over `group` in place (op: "sum", "max", "min", "prod" or a ReduceOp); returns `t`."""
    d = _on_device(t, group)
    _dist().all_reduce(d, op=_op(op), group=group)
    return _back(t, d)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on every rank), in group-rank order, on `t`'s device."""
    d = _on_device(t.contiguous(), group)
    parts = [_on_device(torch.empty_like(t), group) for _ in range(_dist().get_world_size(group))]
    _dist().all_gather(parts, d, group=group)
    return [p if p.device == t.device and not hasattr(p, ON_DEVICE) else p.to(t.device, copy=True) for p in parts]


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """`t` from global rank `src` to every rank of `group`, in place; returns `t`."""
    d = _on_device(t, group)
    _dist().broadcast(d, src=src, group=group)
    return _back(t, d)


def barrier(group=None) -> None:
    """Every rank of `group` (default: all) is here. On NCCL it names the current device, so it also
    waits for the work queued there."""
    kw = {}
    if group is not _side and torch.cuda.is_available() and is_nccl(group) and not declared_nccl():
        kw["device_ids"] = [torch.cuda.current_device()]
    _dist().barrier(group=group, **kw)


# --------------------------------------------------------------------------------------
# object collectives (metadata): on the side group when the default group is NCCL


def _meta_group(group):
    return side_group() if group is None else group


def broadcast_object_list(objs: list, src: int = 0, group=None) -> list:
    """`objs` from global rank `src` to every rank, in place (picklable objects); returns it."""
    _dist().broadcast_object_list(objs, src=src, group=_meta_group(group))
    return objs


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s `obj` on every rank."""
    box = [obj]
    broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * _dist().get_world_size(group)
    _dist().all_gather_object(out, obj, group=_meta_group(group))
    return out


def gather_object(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's `obj`, in rank order, on global rank `dst` (None elsewhere)."""
    out = [None] * _dist().get_world_size(group) if _dist().get_rank() == dst else None
    _dist().gather_object(obj, out, dst=dst, group=_meta_group(group))
    return out


def gather(t: torch.Tensor, dst: int, group=None, out: list | None = None) -> list | None:
    """Every rank's `t` (same shape and dtype on every rank), in group-rank order, on global rank `dst`
    (None elsewhere). `out` (on `dst`): the tensors to receive into, e.g. views of one flat buffer."""
    d = _on_device(t.contiguous(), group)
    parts = None
    if _dist().get_rank() == dst:
        out = out if out is not None else [torch.empty_like(t) for _ in range(_dist().get_world_size(group))]
        parts = [_on_device(p, group) for p in out]
    _dist().gather(d, parts, dst=dst, group=group)
    if parts is None:
        return None
    for o, p in zip(out, parts):
        _back(o, p)
    return out


def all_reduce_async(t: torch.Tensor, group=None):
    """Start summing `t` over `group` in place and return without waiting (async_op); returns wait(),
    which waits and leaves the sum in `t` (returned). While torch.compile traces (it traces no async
    collective) the sum is made at once and wait() only returns `t`."""
    d = _on_device(t, group)
    if torch.compiler.is_compiling():
        _dist().all_reduce(d, op=_op("sum"), group=group)
        _back(t, d)
        return lambda: t
    work = _dist().all_reduce(d, op=_op("sum"), group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return _back(t, d)

    return wait
