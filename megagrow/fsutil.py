"""Small file-system helpers shared by every room: atomic text and JSON writes, the JSON-lines log reader,
quiet unlinks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time


def write_file_atomic(path: str, data: str | bytes, durable: bool = False) -> None:
    """Write `data` (text or bytes) to `path` so that readers see the old file or the whole new one,
    never a torn one; no temp file is left behind, also when the write fails (disk full, interrupted).
    durable: also fsync the directory, so the rename itself survives a crash (checkpoint pointers)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj: dict) -> None:
    """Write `obj` as JSON to `path` with write_file_atomic."""
    write_file_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


@contextlib.contextmanager
def publish_dir(out: str, suffix: str = ".export-tmp"):
    """Build directory `out` atomically: yields OUT+suffix (emptied first), which replaces `out` (absent
    or empty) when the block ends normally; on any failure, the temporary directory is removed and
    nothing is left."""
    tmp = f"{out}{suffix}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename into it), quietly where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str):
    """The JSON object in `path`, or None if the file is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_records(path: str) -> list[dict]:
    """The records of a JSON-lines log (a stage's log.jsonl), in file order. Every reader of log.jsonl
    reads it here, with one rule: a line without its newline is a record cut short by a kill (the
    writer ends every record with one) and is left out, as is a line that is not a JSON object; a
    missing or unreadable file has no records."""
    out = []
    try:
        with open(path, errors="replace") as f:  # a garbled byte spoils its line only
            for line in f:
                if not line.endswith("\n"):
                    continue  # a record cut short by a kill
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    out.append(r)
    except OSError:
        return []
    return out


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def try_exclusive_lock(path: str):
    """An exclusive, non-blocking flock on `path` (created if missing), held while the returned file
    stays open and released when the process ends, however it ends. Returns (file, "") when held,
    (None, "held") when another process holds it, and (None, why) where the file system cannot
    lock (some network file systems mounted without flock): the caller warns and goes on unlocked."""
    import fcntl

    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None, "held"
    except OSError as e:
        f.close()
        return None, f"{path}: cannot be locked on this file system ({e.strerror or e})"
    return f, ""


class Heartbeat:
    """A file that changes whenever its writer makes progress: `beat()` rewrites it with a beat counter
    (which also moves its modification time), at most once every `every_s` seconds (cheap enough for
    every training step, also on network file systems). A watchdog judges it by whether it changed
    (`HeartbeatWatch`), on its own clock: the writer's clock, which stamps the mtime, may be off."""

    def __init__(self, path: str | None, every_s: float = 5.0):
        self.path, self.every_s, self.last, self.count = path, every_s, float("-inf"), 0

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self.last < self.every_s):
            return
        self.last = now
        self.count += 1
        try:
            with open(self.path, "w") as f:
                f.write(f"{os.getpid()} {self.count}\n")
        except OSError:  # a full or read-only disk: the watchdog then sees no progress, which is true
            pass

    @staticmethod
    def mtime(path: str) -> float | None:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None

    @staticmethod
    def signature(path: str) -> list | None:
        """What changes with every beat: inode, mtime, size and content (None: no such file)."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(64)
        except OSError:
            return None
        return [st.st_ino, st.st_mtime_ns, st.st_size, head.hex()]


class HeartbeatWatch:
    """How long a heartbeat has gone unchanged, measured on the watcher's own clock: the time since it
    last saw the file change (`age()`), counted from the watch's start while it has not changed yet.
    No timestamp written on another host is ever subtracted from this host's time, so a writer whose
    clock is hours ahead or behind neither looks hung nor looks fresh forever.

    `publish(fs_now)` records the observation next to the heartbeat (`PATH.seen`: its signature and
    since when, on the file system's clock `FsClock`) for `megagrow status`, which reads it with
    `observed_age`."""

    def __init__(self, path: str, clock=time.monotonic):
        self.path, self.clock = path, clock
        self.sig, self.since = Heartbeat.signature(path), clock()

    def age(self) -> float:
        now, sig = self.clock(), Heartbeat.signature(self.path)
        if sig != self.sig:
            self.sig, self.since = sig, now
        return now - self.since

    def publish(self, fs_now: float) -> None:
        try:
            write_json_atomic(self.path + ".seen", {"signature": self.sig, "since": fs_now - (self.clock() - self.since)})
        except OSError:
            pass


def observed_age(path: str, fs_now: float) -> float | None:
    """`megagrow status`'s age of heartbeat `path`, in seconds, at file-system time `fs_now` (FsClock):
    the time since the heartbeat last changed, by the observation recorded in `PATH.seen` (the hang
    watchdog's, or an earlier status call's). A heartbeat that changed since that observation is fresh (0)
    and the change is recorded now. With no observation yet, the file's own mtime is believed only when it
    lies in the past (a writer's clock ahead would make a stale heartbeat look fresh forever); a past
    stamp off by skew shows once, then the next change resets it. None: no heartbeat file."""
    sig = Heartbeat.signature(path)
    if sig is None:
        return None
    seen = read_json(path + ".seen")
    if isinstance(seen, dict) and seen.get("signature") == sig and isinstance(seen.get("since"), (int, float)):
        return max(0.0, fs_now - seen["since"])
    since = fs_now if isinstance(seen, dict) else min(fs_now, sig[1] / 1e9)
    try:
        write_json_atomic(path + ".seen", {"signature": sig, "since": since})
    except OSError:
        pass
    return fs_now - since


class FsClock:
    """ "Now" as a file system stamps it: `now()` touches `path` (a file next to the one being watched)
    and returns its modification time, so a watchdog compares a heartbeat's mtime with an mtime set
    the same way on the same file system, not with its own host's clock (a controller and rank 0 on
    different nodes may disagree by seconds). Where `path` cannot be touched: this host's clock."""

    def __init__(self, path: str):
        self.path = path

    def now(self) -> float:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a"):
                os.utime(self.path)
            return os.stat(self.path).st_mtime
        except OSError:
            return time.time()
