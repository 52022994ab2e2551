"""Append-only results store: one JSON line per finished run, fsync'd before the next run starts.

A run is keyed by :func:`run_key`, a hash of everything that decides its scores: the full
:class:`~ustc.config.CompressionConfig` and the benchmark specs (names, split, limit, model).
A grid that is killed mid-way loses at most the run that was in flight; restarted, it skips
every key already stored.  A line cut short by the kill (no trailing newline, invalid JSON) is
ignored on reading and never glued to the next record.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # a run killed while writing leaves a partial last line: its run is redone
                    warnings.warn(
                        f"{self.path}:{lineno}: skipping an incomplete record", stacklevel=2
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
        with self.path.open("a+b") as fh:
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
