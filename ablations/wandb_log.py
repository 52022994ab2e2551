"""Weights & Biases logging that never needs a W&B server.

Mode (``--wandb``): ``auto`` (default) honours ``WANDB_MODE`` when it is set, otherwise logs
online only when an API key is configured *and* the server answers within a second, and offline
otherwise (``$WANDB_DIR/wandb/offline-run-*``, uploadable later with ``wandb sync``).
``disabled`` turns every call into a no-op (the tests set ``WANDB_MODE=disabled``).  When wandb
is not installed nothing is logged and the run goes on.

Online asked for explicitly (``--wandb online`` or ``WANDB_MODE=online``) is checked by
:func:`preflight` before any work: without an API key, or with a server that does not answer,
the command stops with a one-line error instead of evaluating first and then waiting 30 s per
run for wandb to give up.  A logging call that fails anyway (the network drops mid-sweep) falls
back to offline with a warning; the results store has every run regardless.

:func:`read_offline_run` reads an offline run's ``.wandb`` file back (config, logged rows,
summary, tables) without wandb's servers: what the tests check, and a way to look at a run
before ``wandb sync`` uploads it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MODES = ("auto", "online", "offline", "disabled")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc().authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _server_reachable(timeout: float = 1.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(requested: str = "auto") -> str:
    """The wandb mode a run will use: ``online``, ``offline`` or ``disabled``."""
    if requested not in MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(MODES)}, got {requested!r}")
    if importlib.util.find_spec("wandb") is None:
        return "disabled"
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "disabled"
    if _has_api_key() and _server_reachable():
        return "online"
    return "offline"


class WandbUnavailable(ValueError):
    """Online logging was asked for and cannot work (no API key, no server)."""


def preflight(requested: str = "auto") -> str:
    """The mode runs will log in, checked before any work (raises :class:`WandbUnavailable`
    when online mode is asked for and cannot work).  Pass the result to :func:`log_run` and
    :func:`log_table`, so that every run of a sweep logs in the same mode."""
    mode = resolve_mode(requested)
    if mode == "offline" and requested == "auto" and not os.environ.get("WANDB_MODE"):
        where = Path(os.environ.get("WANDB_DIR") or ".") / "wandb"
        _warn(
            f"no W&B credentials or server: logging offline to {where}/offline-run-* "
            "(upload later with `wandb sync`; --wandb disabled turns this off)"
        )
    if mode != "online":
        return mode
    source = "--wandb online" if requested == "online" else "WANDB_MODE=online"
    instead = "use --wandb offline (upload later with `wandb sync`) or --wandb disabled"
    if not _has_api_key():
        raise WandbUnavailable(
            f"{source}: no W&B API key (set WANDB_API_KEY or run `wandb login`); {instead}"
        )
    if not _server_reachable():
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        raise WandbUnavailable(f"{source}: the W&B server {host} does not answer; {instead}")
    return mode


def _warn(message: str) -> None:
    print(f"wandb: {message}", file=sys.stderr, flush=True)


def _logged(mode: str, project: str, what: str, log: Any, **init: Any) -> str:
    """Open a run in ``mode``, call ``log(run)``, finish it; an online run that fails (wandb's
    own errors, the network) is logged offline instead.  Returns the mode that logged."""
    import wandb

    try:
        run = _init(mode, project, **init)
        log(run)
        run.finish()
        return mode
    except (wandb.errors.Error, OSError, TimeoutError) as exc:
        if mode != "online":
            raise
        _warn(f"logging {what} online failed ({exc}); logged offline instead (`wandb sync`)")
    run = _init("offline", project, **init)
    log(run)
    run.finish()
    return "offline"


def _init(mode: str, project: str, **kwargs: Any) -> Any:
    import wandb

    settings = wandb.Settings(init_timeout=30, silent=True, console="off")
    # WANDB_DIR read now: wandb reads it once per process, at its first run
    return wandb.init(
        project=project,
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or None,
        settings=settings,
        reinit="finish_previous",
        **kwargs,
    )


def metrics_of(record: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics of one run record: scores, averages, FLOPs, token counts, latency."""
    out: dict[str, Any] = {f"score/{k}": v for k, v in record["scores"].items()}
    out["avg_score"] = record["avg"]
    if record.get("pct_of_uncompressed") is not None:
        out["pct_of_uncompressed"] = record["pct_of_uncompressed"]
    flops = record.get("flops") or {}
    for name in ("tflops", "ratio"):
        if flops.get(name) is not None:
            out[f"flops/{name}"] = flops[name]
    out.update({f"tokens/{k}": v for k, v in (record.get("tokens") or {}).items()})
    out.update({f"latency_s/{k}": v for k, v in (record.get("timings") or {}).items()})
    out["n"] = record.get("n", 0)
    return out


def log_run(
    record: dict[str, Any],
    *,
    mode: str = "auto",
    project: str = "ustc-ablations",
    group: str | None = None,
    name: str | None = None,
) -> str:
    """Log one run record (W&B run name ``name``, else the record's key); returns the mode
    used.  Inside a ``wandb agent`` the run joins the sweep (wandb reads the sweep id from the
    agent's environment)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return mode
    metrics = metrics_of(record)

    def log(run: Any) -> None:
        run.log(metrics)
        run.summary.update(metrics)

    return _logged(
        mode,
        project,
        f"run {record['key']}",
        log,
        group=group,
        job_type="ablation",
        name=name or record.get("name") or record["key"],
        config={
            "compression": record["config"],
            "benchmarks": record["benchmarks"],
            "key": record["key"],
        },
    )


def log_table(
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    *,
    mode: str = "auto",
    project: str = "ustc-ablations",
) -> str:
    """Log a finished ablation table as a ``wandb.Table`` in its own run (cells typed by
    :func:`table_cells`)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return mode
    import wandb

    data = table_cells(rows)

    def log(run: Any) -> None:
        run.log({title: wandb.Table(columns=columns, data=data)})

    return _logged(mode, project, f"table {title}", log, job_type="table", name=title)


_PLACEHOLDERS = ("-", "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table_cells(rows: list[list[Any]]) -> list[list[Any]]:
    """Rows a ``wandb.Table`` can hold: it types each column by its first row and refuses a
    later cell of another type (Table 5's "Vanilla" row has "-" where the other rows have a
    cluster ratio).  Every column is optional, so a missing cell is None; in a column of numbers
    the tables' placeholders for "not applicable" ("-", "") become None too, so that W&B can plot
    it; a column that mixes numbers with other text, or any other kinds, becomes text."""
    if not rows:
        return []
    width = max(len(r) for r in rows)
    kinds: list[set[str]] = [set() for _ in range(width)]
    for row in rows:
        for i, value in enumerate(row):
            if value is not None and value not in _PLACEHOLDERS:
                kinds[i].add("number" if _is_number(value) else type(value).__name__)
    numeric = [k == {"number"} for k in kinds]
    text = [len(k) > 1 or not k <= {"number", "str", "bool"} for k in kinds]

    def cell(i: int, value: Any) -> Any:
        if value is None or (numeric[i] and value in _PLACEHOLDERS):
            return None
        return str(value) if text[i] else value

    return [[cell(i, v) for i, v in enumerate(row)] + [None] * (width - len(row)) for row in rows]


# --------------------------------------------------------------------------------------------
# Reading an offline run back
# --------------------------------------------------------------------------------------------

_BLOCK = 32 * 1024  # the LevelDB log format wandb writes: 32 KiB blocks of chunked records
_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_CHUNK = struct.Struct("<IHB")  # crc32c, length, type (1 full, 2 first, 3 middle, 4 last)


def _records(path: Path) -> list[bytes]:
    """The serialised ``wandb.proto.wandb_internal_pb2.Record`` messages of a ``.wandb`` file."""
    data = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    out: list[bytes] = []
    pending = b""
    pos = _HEADER.size
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = _CHUNK.unpack_from(data, pos)
        start = pos + _CHUNK.size
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[start : start + length]
        pos = start + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return out


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


def _put(into: dict[str, Any], item: Any) -> None:
    """Set an item's value at its key; wandb splits a logged dict into nested keys."""
    path = [item.key] if item.key else list(item.nested_key)
    for name in path[:-1]:
        into = into.setdefault(name, {})
    into[path[-1]] = _value(item)


def read_offline_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """An offline run (``.../wandb/offline-run-*``) as written: ``{"id", "name", "job_type",
    "group", "config", "history", "summary", "tables", "finished"}``; ``history`` is the list of
    logged rows, ``tables`` maps each logged ``wandb.Table`` key to ``{"columns", "data"}`` (read
    from the run's ``files/``), ``finished`` says whether the run's exit record is written (wandb's
    service writes the file behind the process: ``wandb.teardown()`` waits for it).  Needs
    wandb's protobuf classes, not its servers."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(run_dir)
    files = list(folder.glob("*.wandb"))
    if len(files) != 1:
        raise ValueError(f"{folder} holds {len(files)} .wandb files; expected one run file")
    out: dict[str, Any] = {
        "id": None,
        "name": None,
        "job_type": None,
        "group": None,
        "config": {},
        "history": [],
        "summary": {},
        "tables": {},
        "finished": False,
    }
    for blob in _records(files[0]):
        record = pb.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, name=run.display_name, job_type=run.job_type)
            out["group"] = run.run_group or None
            for item in run.config.update:
                _put(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _put(out["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            out["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], item)
        elif kind == "exit":
            out["finished"] = True
    for row in out["history"]:
        for name, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "table-file":
                table = json.loads((folder / "files" / value["path"]).read_text())
                out["tables"][name] = {"columns": table["columns"], "data": table["data"]}
    return out
