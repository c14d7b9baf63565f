"""The data directory's run/: what a running Homefire keeps there while it runs, none of which
outlives it (a backup leaves run/ out). Every name under run/ is given here:

    serve.lock          the one-writer lock: a server, or a command's own Homefire, holds it
    server.json         where the server that holds the lock listens, and its pid
    cli-PID.sock        a command's own Homefire (serve/in_process.py) listens here
    engine.sock         the engine (vLLM) listens here, reachable by this user only
    engine.log          the engine's output; finetune.log: the training jobs' children's
    uploads/            request bodies being received (exports, bundles)
    bundle-*/           a bundle being checked in (store.bundles); staging files: store.staging
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO

from store.files import write_whole


class Busy(RuntimeError):
    """Another process holds the data directory's lock."""


def run_dir(data_dir: Path) -> Path:
    """run/, made if need be."""
    folder = data_dir / "run"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def hold_lock(data_dir: Path) -> IO:
    """The data directory's one-writer lock (an open file: released when it is closed, or when
    the process ends, however it ends); Busy if another process holds it."""
    lock = (run_dir(data_dir) / "serve.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise Busy(str(data_dir)) from None
    return lock


def announce(data_dir: Path, url: str) -> None:
    """Say where this process, which holds the lock, serves the data directory."""
    write_whole(run_dir(data_dir) / "server.json", json.dumps({"url": url, "pid": os.getpid()}).encode())


def withdraw(data_dir: Path) -> None:
    (data_dir / "run" / "server.json").unlink(missing_ok=True)


def running_url(data_dir: Path) -> str | None:
    """The URL of the server that owns data_dir, if one is running."""
    try:
        info = json.loads((data_dir / "run" / "server.json").read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return info["url"]


def socket_path(data_dir: Path, name: str) -> Path:
    """run/NAME.sock ("engine", or "cli-PID")."""
    return run_dir(data_dir) / f"{name}.sock"


def log_path(data_dir: Path, name: str) -> Path:
    """run/NAME.log ("engine", "finetune")."""
    return run_dir(data_dir) / f"{name}.log"


def uploads(data_dir: Path) -> Path:
    """run/uploads/, where request bodies are received, made if need be."""
    folder = run_dir(data_dir) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
