"""Append-only results store: one JSON line per finished run, fsync'd before the next run starts.

A run is keyed by :func:`run_key`, a hash of everything that decides its scores: the full
:class:`~ustc.config.CompressionConfig` and the benchmark specs (names, split, limit, model).
A grid that is killed mid-way loses at most the run that was in flight; restarted, it skips
every key already stored.  A last line cut short by the kill (no trailing newline, invalid JSON) is
repaired once, on the next read: it is moved to ``<store>.broken`` (appended there, so nothing is
lost) and the store is cut back to its last complete record, with a warning that says so.  An
invalid line in the middle of the store is skipped with a warning and left where it is.

:class:`Claims` lets several processes (on one machine or on a shared file system) split a grid:
a process claims a run's key before running it by creating ``<store>.claims/<key>.claim`` with
``O_CREAT | O_EXCL`` (atomic, also on NFS), and removes it when the record is stored.  A claim
whose process is gone (same host, pid not alive) or that is older than ``stale_after`` seconds is
taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks serialise the repair with appends of other processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: bump when the meaning of a stored record changes, so that old records are not reused
STORE_VERSION = 1


def _canonical(value: Any) -> Any:
    """JSON-stable form: floats that are integers stay floats, so 1 and 1.0 hash the same."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def run_key(config: dict[str, Any], benchmarks: list[dict[str, Any]]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of config + benchmark specs."""
    payload = {"version": STORE_VERSION, "config": config, "benchmarks": benchmarks}
    text = json.dumps(_canonical(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultStore:
    """A JSONL file of run records, each a dict with a ``key``.

    Appending a key that is already stored is refused, so that a resumed grid keeps every result
    exactly once; ``replace=True`` (``run.py --force``) appends a newer record of the key, and the
    last record of a key wins.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def broken_path(self) -> Path:
        """Where a repaired store's incomplete last line is kept."""
        return self.path.with_name(self.path.name + ".broken")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive advisory lock on ``<store>.lock`` (appends and repairs of all processes)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with lock.open("a") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def repair(self) -> bool:
        """Move an incomplete last line (no newline, not JSON) to :attr:`broken_path` and cut the
        store back to its last complete record.  True if something was moved."""
        if not self.path.exists():
            return False
        with self._locked():
            data = self.path.read_bytes()
            if not data or data.endswith(b"\n"):
                return False
            start = data.rfind(b"\n") + 1
            tail = data[start:]
            try:
                json.loads(tail)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            else:  # a complete record that only lacks its newline: keep it, add the newline
                with self.path.open("ab") as fh:
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                return False
            with self.broken_path.open("ab") as fh:
                fh.write(tail + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            with self.path.open("r+b") as fh:
                fh.truncate(start)
                fh.flush()
                os.fsync(fh.fileno())
        warnings.warn(
            f"{self.path}: its last line was incomplete (a run killed while writing it); moved "
            f"it to {self.broken_path} ({len(tail)} bytes) and kept the {start} bytes before it; "
            "that run is redone",
            stacklevel=3,
        )
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        self.repair()
        with self.path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if not line.endswith("\n"):
                        continue  # another process is writing this line right now
                    # an invalid complete line was not written by this store: leave it to the user
                    warnings.warn(
                        f"{self.path}:{lineno}: skipping a line that is not JSON", stacklevel=2
                    )
                    continue
                if isinstance(record, dict) and "key" in record:
                    yield record

    def records(self) -> dict[str, dict[str, Any]]:
        """key -> record (the last one of its key)."""
        return {record["key"]: record for record in self}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records().get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return len(self.records())

    def append(self, record: dict[str, Any], replace: bool = False) -> bool:
        """Write ``record`` as one line and fsync it; False (and nothing written) if its key is
        already stored, unless ``replace``."""
        if "key" not in record:
            raise ValueError("a stored record needs a 'key' (see ablations.store.run_key)")
        if not replace and record["key"] in self:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str)
        with self._locked(), self.path.open("a+b") as fh:
            # a killed writer may have left a line without its newline: start on a fresh line
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True


class ClaimedElsewhere(Exception):
    """The key is being run by another live process (``owner`` says which)."""

    def __init__(self, key: str, owner: dict[str, Any]) -> None:
        super().__init__(f"{key} is being run by {describe_owner(owner)}")
        self.key = key
        self.owner = owner


def describe_owner(owner: dict[str, Any]) -> str:
    age = time.time() - float(owner.get("time", time.time()))
    return f"pid {owner.get('pid')} on {owner.get('host')} (claimed {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


class Claims:
    """Claim records of a store: ``<store>.claims/<key>.claim``, one per run in flight.

    ``acquire(key)`` creates the record atomically (``O_CREAT | O_EXCL``) with this process's host,
    pid and time, and raises :class:`ClaimedElsewhere` when a live process holds it; ``release``
    removes it.  A record is stale, and taken over, when its host is this host and its pid is not
    alive, or when it is older than ``stale_after`` seconds (a process on another machine that
    died; set it above the longest run).
    """

    def __init__(self, store_path: str | os.PathLike[str], stale_after: float = 24 * 3600) -> None:
        store = Path(store_path)
        self.dir = store.with_name(store.name + ".claims")
        self.stale_after = stale_after
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.claim"

    def owner(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # being written right now, or cut by a crash: judged by its age

    def is_stale(self, owner: dict[str, Any], path: Path) -> bool:
        if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int):
            if not _pid_alive(owner["pid"]):
                return True
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def acquire(self, key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        record = json.dumps({**self.me, "time": time.time(), "key": key}).encode()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner(key)
                if owner is None:
                    continue  # released in between: try again
                if owner.get("host") == self.me["host"] and owner.get("pid") == self.me["pid"]:
                    return  # ours already
                if not self.is_stale(owner, path):
                    raise ClaimedElsewhere(key, owner) from None
                # take the stale record over: rename it away (atomic; only one process wins),
                # then check that what was renamed is the stale record and not a fresh claim
                aside = path.with_name(f"{path.name}.stale.{self.me['host']}.{self.me['pid']}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                try:
                    moved = json.loads(aside.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError):
                    moved = {}
                if moved != owner:  # a live claim made in between: give it back
                    with contextlib.suppress(OSError):
                        os.link(aside, path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(aside)
                    raise ClaimedElsewhere(key, moved) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(aside)
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(record)
                fh.flush()
                os.fsync(fh.fileno())
            return
        owner = self.owner(key) or {}
        raise ClaimedElsewhere(key, owner)

    def release(self, key: str) -> None:
        owner = self.owner(key)
        if owner and owner.get("host") == self.me["host"] and owner.get("pid") == self.me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                self.path(key).unlink()
