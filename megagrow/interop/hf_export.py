"""Writing a model's transformers weights as safetensors, sharded like transformers'
save_pretrained, one tensor in memory at a time.

The shard plan is made first from the tensors' shapes alone (megagrow.interop.hf_weights.to_hf
run on meta tensors: no byte read), so every file's name (`model-0000i-of-0000N.safetensors`)
and header are known before any weight is read. Then each shard file is written as its header
and its tensors one after the other: each tensor is read from the checkpoint, cast, written and
dropped before the next is read. After each shard `after_shard()` runs (the exporter closes the
checkpoint's memory maps there, so the pages it touched leave the process too). Peak memory:
about one tensor (two for a transposed or concatenated one), plus the mapped checkpoint pages of
one shard, never the model.

The files are standard safetensors (8-byte little-endian header length, JSON header with
dtype / shape / data_offsets and `__metadata__` {"format": "pt"}, padded with spaces to a
multiple of 8, then the tensors' bytes back to back); `model.safetensors.index.json` has
transformers' `metadata.total_size` (bytes of all tensors) and `weight_map`. One shard: a
single `model.safetensors` and no index, as transformers writes it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from megagrow.config import ModelConfig
from megagrow.errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def parse_size(spec: str | int) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or 1000000 (GB = 10^9 and GiB = 2^30, as transformers
    reads them). One-line UserError for anything else."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        n = spec
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(spec))
        unit = m and m.group(2).upper()
        if not m or unit not in _UNITS:
            raise UserError(f"--max-shard-size: {spec!r} is not a size (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UserError(f"--max-shard-size must be positive, got {spec!r}")
    return n


def _meta_reader(shapes: dict) -> Callable:
    import torch

    return lambda name: torch.empty(shapes[name], dtype=torch.float32, device="meta")


def shard_plan(m: ModelConfig, shapes: dict, dtype: torch.dtype, max_bytes: int) -> list[list[tuple]]:
    """[[(transformers name, shape), ...] per shard] of model `m` (logical `shapes`) in `dtype`: tensors
    in to_hf's order, a new shard started when the next tensor would take the current one past
    max_bytes (a tensor larger than max_bytes alone in its shard), as transformers shards."""
    from megagrow.interop.hf_weights import to_hf

    size = dtype.itemsize
    shards: list[list[tuple]] = [[]]
    used = 0
    for name, t in to_hf(m, _meta_reader(shapes)):
        nbytes = t.numel() * size
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, tuple(t.shape)))
        used += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' file names of n shards (one: model.safetensors)."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(entries: list[tuple], dtype: torch.dtype) -> bytes:
    """The safetensors header (length prefix included) of tensors `entries` [(name, shape)] in that order."""
    st, size = _ST_DTYPES[str(dtype).replace("torch.", "")], dtype.itemsize
    h: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = size
        for s in shape:
            n *= s
        h[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, t: torch.Tensor) -> int:
    """Write t's bytes (C order, little-endian: the machine's) to f without another copy; returns their count."""
    import torch

    t = t.detach().contiguous()  # the checkpoint's master weights were saved as parameters (requires_grad)
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    f.write(memoryview(arr).cast("B"))
    return arr.nbytes


def write_safetensors(
    out_dir: str,
    m: ModelConfig,
    shapes: dict,
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    max_shard_bytes: int,
    after_shard: Callable[[], None] | None = None,
) -> dict:
    """Write model `m`'s transformers weights into `out_dir` (an empty directory the caller renames into place):
    shards of at most max_shard_bytes (model.safetensors when one is enough, else model-0000i-of-0000N.safetensors
    and model.safetensors.index.json). `read(name)` gives megagrow's logical fp32 tensor `name` of logical shape
    shapes[name]. Returns {files, params, total_size, largest_shard, largest_tensor} (bytes)."""
    from megagrow.interop.hf_weights import to_hf

    plan = shard_plan(m, shapes, dtype, max_shard_bytes)
    names = shard_names(len(plan))
    tensors = to_hf(m, read)
    weight_map, total, params, largest_shard, largest_tensor = {}, 0, 0, 0, 0
    for fn, entries in zip(names, plan):
        written = 0
        with open(os.path.join(out_dir, fn), "wb") as f:
            f.write(_header(entries, dtype))
            for name, shape in entries:
                got, t = next(tensors)
                if got != name or tuple(t.shape) != shape:  # the plan and the weights come from the same to_hf
                    raise AssertionError(f"shard plan {name} {shape} != tensor {got} {tuple(t.shape)}")
                nbytes = _write_tensor(f, t.to(dtype))
                del t
                written += nbytes
                params += _numel(shape)
                largest_tensor = max(largest_tensor, nbytes)
                weight_map[name] = fn
        total += written
        largest_shard = max(largest_shard, written)
        if after_shard is not None:
            after_shard()
    if next(tensors, None) is not None:
        raise AssertionError("to_hf yielded more tensors than the shard plan holds")
    if len(names) > 1:
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")
    return {"files": names, "params": params, "total_size": total, "largest_shard": largest_shard, "largest_tensor": largest_tensor}


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
