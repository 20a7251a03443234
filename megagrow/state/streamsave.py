"""`torch.save` whose large storages are written piece by piece, never held whole in memory.

The file is torch.save's own, as `torch.load` reads it: first torch.save writes it under
`torch.serialization.skip_data` -- every record (the pickle, the version records, one `data/K`
record per storage) with its size and place, the storage bytes left as a hole -- then every storage
not named lazy is written from its memory, and the caller writes the lazy ones in pieces
(`StreamedSave.write`), in any order. What it leaves unwritten is the hole, which reads as zeros.

A lazy storage is a placeholder (`torch.empty`, never touched): pickling reads only its size,
dtype and identity, so it takes no resident memory. torch.load reads no CRC of a record;
megagrow's manifest holds the CRC-32 of every whole file.
"""

from __future__ import annotations

import io
import os
import pickle

import torch

# the pickle protocol torch.save uses (torch.serialization.DEFAULT_PROTOCOL)
PROTOCOL = 2


def storage_order(obj) -> list[torch.UntypedStorage]:
    """The storages of `obj` in the order torch.save numbers them (`data/0`, `data/1`, ...): the order
    its pickler first meets them."""
    seen: dict[int, torch.UntypedStorage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.storage.TypedStorage) or torch.is_storage(o):
                s = o._untyped_storage if isinstance(o, torch.storage.TypedStorage) else o
                seen.setdefault(s._cdata, s)
                return ("storage", len(seen))  # this pickle is thrown away: only the order matters
            return None

    Pickler(io.BytesIO(), protocol=PROTOCOL).dump(obj)
    return list(seen.values())


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class StreamedSave:
    """torch.save(obj, path) with the storages of the tensors in `lazy` written later, by `write`.
    A context manager: the file is open until it exits."""

    def __init__(self, obj, path: str, lazy: list[torch.Tensor] = ()):
        from torch.serialization import skip_data

        order = storage_order(obj)
        with skip_data():
            torch.save(obj, path)
        reader = torch._C.PyTorchFileReader(path)
        records = set(reader.get_all_records())
        if f"data/{len(order)}" in records or (order and f"data/{len(order) - 1}" not in records):
            raise RuntimeError(f"{path}: torch.save's storage records do not match the {len(order)} storages of the object")
        self.path, self.place = path, {}  # storage id -> (file offset, bytes)
        for key, s in enumerate(order):
            self.place[s._cdata] = (reader.get_record_offset(f"data/{key}"), s.nbytes())
        del reader
        self._f = open(path, "r+b")
        lazy_ids = {t.untyped_storage()._cdata for t in lazy}
        for s in order:
            if s._cdata not in lazy_ids:
                self._pwrite(_bytes(torch.empty(0, dtype=torch.uint8).set_(s)), self.place[s._cdata][0])

    def _where(self, t: torch.Tensor, offset: int, n: int) -> int:
        base, size = self.place[t.untyped_storage()._cdata]
        if offset < 0 or offset + n > size:
            raise ValueError(f"{n} bytes at {offset} fall outside a storage of {size} bytes")
        return base + offset

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self._f.fileno(), data, offset)
            data, offset = data[n:], offset + n

    def write(self, t: torch.Tensor, byte_offset: int, data: torch.Tensor) -> None:
        """Write `data`'s bytes into the storage of placeholder `t`, at `byte_offset` in it."""
        b = _bytes(data)
        self._pwrite(b, self._where(t, byte_offset, len(b)))

    def read(self, t: torch.Tensor, byte_offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (contiguous) with its bytes read back from the storage of `t` in the file, from `byte_offset`."""
        b, at = _bytes(out), 0
        where = self._where(t, byte_offset, len(b))
        while at < len(b):
            n = os.preadv(self._f.fileno(), [b[at:]], where + at)
            if n <= 0:
                raise OSError(f"{self.path}: short read at {where + at}")
            at += n
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
