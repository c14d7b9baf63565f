"""What the `homefire` commands share: the data directory, its lock, errors, progress bars."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.client import Client
from serve.config import default_data_dir, load_settings
from store import run
from store.companions import CompanionStore
from store.db import Database
from store.users import LOCAL


class UsageError(RuntimeError):
    """A mistake on the command line; printed without a traceback."""


def resolve_data_dir(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()).expanduser().resolve()


def server_url(args: argparse.Namespace, user_ok: bool = False) -> str | None:
    """The one place a command chooses between a running server and the data directory: --url,
    else the server the data directory names (run/server.json), else None, and the command acts
    on the data directory itself (under its lock where it writes). Through a server a command
    acts as the user whose key is sent, so --user (the operator acting for a member) is refused
    there, unless the command only reads that member's rows itself (`user_ok`)."""
    url = args.url or run.running_url(resolve_data_dir(args))
    user = getattr(args, "user", LOCAL)
    if url and user != LOCAL and not user_ok:
        raise UsageError(f"through a running server a command acts as the user whose key is sent: set "
                         f"HOMEFIRE_API_KEY to {user}'s key and leave out --user")
    return url


@contextmanager
def client(args: argparse.Namespace, *needs: str, settings: dict | None = None) -> Iterator[Client]:
    """What a command calls: the running server (server_url), else the same application run in
    this process on the data directory, under its lock, with what the command needs of it
    ("memory", "model", "jobs": serve/in_process.py), where --user acts for that member, and
    with the command's own `settings` ({"finetune": {"samples": 2}}) over the settings file's
    (a server keeps its own). Either way the command's one implementation is its API calls."""
    url = server_url(args)
    if url:
        yield connect(args, url)
        return
    from serve.in_process import InProcess

    data_dir = resolve_data_dir(args)
    lock = hold_lock(data_dir)
    with InProcess(_settings(args, settings or {}), data_dir, getattr(args, "user", LOCAL), lock,
                   frozenset(needs)) as here:
        yield here


def _settings(args: argparse.Namespace, overrides: dict[str, dict]):
    """The settings file's settings, with a command's own (section by section) over them."""
    from pydantic import ValidationError

    settings = load_settings(args.config)
    if not overrides:
        return settings
    merged = settings.model_dump()
    for section, values in overrides.items():
        merged[section] |= values
    try:
        return type(settings).model_validate(merged)
    except ValidationError as err:
        first = err.errors()[0]
        raise UsageError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def connect(args: argparse.Namespace, url: str) -> Client:
    """A client of the server at url, with the key HOMEFIRE_API_KEY or the data directory holds."""
    return Client(url, resolve_data_dir(args))


def hold_lock(data_dir: Path):
    """The data directory's one-writer lock (an open file; released when it closes)."""
    try:
        return run.hold_lock(data_dir)
    except run.Busy:
        raise UsageError(f"another `homefire serve` already uses {data_dir} "
                         f"(at {run.running_url(data_dir) or 'an unknown address'}); stop it first, "
                         "or pass another --data-dir") from None


def local_store(args: argparse.Namespace) -> CompanionStore:
    settings = load_settings(args.config)
    store = CompanionStore(Database(resolve_data_dir(args) / "homefire.db"))
    store.sync_dir(settings.companions_dir)
    return store


class Bar:
    """The CLI's one kind of progress bar: tqdm on stderr, called with (done[, total]), or fed a
    training's points (`step`); silent when stderr is not a terminal. Every long command's bar
    is one of these."""

    def __init__(self, description: str, total: int, unit: str, leave: bool = False):
        from tqdm import tqdm

        self._tqdm = tqdm(desc=description, total=total, unit=unit, unit_scale=unit == "B",
                          disable=None, leave=leave, file=sys.stderr)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self._tqdm.total = total
        self._tqdm.update(done - self._tqdm.n)

    def step(self, point: dict) -> None:
        """A training's progress (a point of lora.finetune's report, or a job as the server
        sends it): its step of total_steps, with loss, tokens/s and the held-out loss beside."""
        if point.get("total_steps"):
            self._tqdm.total = point["total_steps"]
        if point.get("loss") is not None:
            figures = {"loss": f"{point['loss']:.3f}", "tok/s": f"{point['tokens_per_s']:.0f}"}
            if point.get("eval_loss") is not None:
                figures["held-out"] = f"{point['eval_loss']:.3f}"
            self._tqdm.set_postfix(figures, refresh=False)
        self._tqdm.update((point.get("step") or 0) - self._tqdm.n)

    def describe(self, description: str) -> None:
        self._tqdm.set_description(description, refresh=True)

    def close(self) -> None:
        self._tqdm.close()


