"""The data directory's run/: its one-writer lock, and where its server listens."""

from __future__ import annotations

import subprocess
import sys

import pytest

from store import run

TAKE_LOCK = "import sys; from pathlib import Path; from store import run; run.hold_lock(Path(sys.argv[1]))"


def test_one_process_holds_the_lock_and_closing_it_releases_it(tmp_path):
    lock = run.hold_lock(tmp_path)
    other = subprocess.run([sys.executable, "-c", TAKE_LOCK, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 1 and "store.run.Busy" in other.stderr
    lock.close()
    again = run.hold_lock(tmp_path)
    with pytest.raises(run.Busy):
        run.hold_lock(tmp_path)
    again.close()


def test_the_server_it_names_is_found_only_while_its_process_lives(tmp_path):
    assert run.running_url(tmp_path) is None
    run.announce(tmp_path, "http://127.0.0.1:8123")
    assert run.running_url(tmp_path) == "http://127.0.0.1:8123"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (tmp_path / "run" / "server.json").write_text(f'{{"url": "http://x", "pid": {int(ended.stdout)}}}')
    assert run.running_url(tmp_path) is None, "a server that ended names nothing"
    (tmp_path / "run" / "server.json").write_text("{not json")
    assert run.running_url(tmp_path) is None
    run.announce(tmp_path, "http://[::1]:9")
    run.withdraw(tmp_path)
    assert run.running_url(tmp_path) is None and not (tmp_path / "run" / "server.json").exists()
