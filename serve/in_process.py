"""The command line's Homefire when no server runs: the same application, in the command's own
process, so that a command has one implementation, the API's, whether a server runs or not.

It listens on a Unix socket in the data directory's run/ (private to its owner) for as long as
the command runs, holds the data directory's lock as a server does, and starts no backup
schedule, and no engine unless the command needs replies (`homefire chat`). The command calls
it with the same Client it would send to a server.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from serve.client import Client, ServerError
from serve.config import Settings
from store.run import log_path, socket_path

START_S = 600   # the memory index may be rebuilt as it opens


class InProcess:
    """`with InProcess(settings, data_dir, user, lock, needs) as client:` the application, started
    with what the command needs ("memory": the index that search, facts and imports use;
    "model": the base model that adapters are checked against; "jobs": the training queue;
    "engine": all of a server's, vLLM included; the others are spared their seconds of loading);
    `user` other than the local owner: its requests are that member's. `lock` (the data
    directory's) is released at the end."""

    def __init__(self, settings: Settings, data_dir: Path, user: str, lock, needs: frozenset[str]):
        self.settings, self.data_dir, self.user, self.lock = settings, data_dir, user, lock
        self.needs = needs
        self.socket = socket_path(data_dir, f"cli-{os.getpid()}")

    def __enter__(self) -> Client:
        import uvicorn

        from serve.app import create_app
        from serve.homefire import quiet_libraries

        quiet_libraries()
        self.socket.unlink(missing_ok=True)
        engine = "engine" in self.needs
        if engine:
            print(f"no server runs on {self.data_dir}: starting Homefire and its engine in this command "
                  "(a minute or so; `homefire serve` keeps one running)", file=sys.stderr, flush=True)
        settings = self.settings.model_copy(update={"backup": self.settings.backup.model_copy(
            update={"dir": None})})   # a server's schedule
        self.app = create_app(settings, self.data_dir, "http://homefire", engine=engine,
                              needs=self.needs, act_as=self.user)
        config = uvicorn.Config(self.app, uds=str(self.socket), log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="homefire-in-process", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_S
        try:
            while not self._ready():
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    raise ServerError(f"Homefire could not start on {self.data_dir}; see the messages "
                                       "above")
                time.sleep(0.02)
        except BaseException:   # a failed start, or Ctrl-C while it starts: the lock goes too
            self.close()
            raise
        return Client("http://homefire", self.data_dir, uds=self.socket)

    def _ready(self) -> bool:
        """Listening, and done with what it was started to prepare (its one chore)."""
        hf = getattr(self.app.state, "homefire", None)
        if not self.server.started or hf is None or not hf.chores[0].done():
            return False
        if error := hf.chores[0].exception():
            raise error
        if hf.engine.state == "failed":
            raise ServerError(f"the engine could not start: {hf.engine.detail} (its log: "
                               f"{log_path(self.data_dir, 'engine')})")
        return True

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.unlink(missing_ok=True)
        self.lock.close()

    def __exit__(self, *exc) -> None:
        self.close()
