"""Weights & Biases logging that never needs a W&B server.

Mode (``--wandb``): ``auto`` (default) honours ``WANDB_MODE`` when it is set, otherwise logs
online only when an API key is configured *and* the server answers within a second, and offline
otherwise (``./wandb/offline-run-*``, uploadable later with ``wandb sync``).  ``disabled`` turns
every call into a no-op (the tests set ``WANDB_MODE=disabled``).  When wandb is not installed
nothing is logged and the run goes on.
"""

from __future__ import annotations

import importlib.util
import os
import socket
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


def _init(mode: str, project: str, **kwargs: Any) -> Any:
    import wandb

    settings = wandb.Settings(init_timeout=30, silent=True, console="off")
    return wandb.init(
        project=project, mode=mode, settings=settings, reinit="finish_previous", **kwargs
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
) -> str:
    """Log one run record; returns the mode used.  Inside a ``wandb agent`` the run joins the
    sweep (wandb reads the sweep id from the agent's environment)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return mode
    run = _init(
        mode,
        project,
        group=group,
        job_type="ablation",
        name=record.get("name"),
        config={
            "compression": record["config"],
            "benchmarks": record["benchmarks"],
            "key": record["key"],
        },
    )
    metrics = metrics_of(record)
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()
    return mode


def log_table(
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    *,
    mode: str = "auto",
    project: str = "ustc-ablations",
) -> str:
    """Log a finished ablation table as a ``wandb.Table`` in its own run."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return mode
    import wandb

    run = _init(mode, project, job_type="table", name=title)
    table = wandb.Table(columns=columns, data=[[_cell(v) for v in row] for row in rows])
    run.log({title: table})
    run.finish()
    return mode


def _cell(value: Any) -> Any:
    return "" if value is None else value
