"""Backups taken while the server serves, and their restore into an empty data directory:
real SQLite (its online backup API), real files, real streaming users."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve import backup
from serve.default_model import MODEL_NAME
from tests.support.server import REPO


def homefire(*args: str, data_dir: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", *args, "--data-dir", str(data_dir),
                           *(["--config", str(config)] if config else [])],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_a_backup_while_eight_users_stream_restores_every_acknowledged_message(server, tmp_path):
    users = {f"drill{i}": server.openai(server.add_user(f"drill{i}")) for i in range(8)}
    acknowledged: list[tuple[str, str, str, float]] = []   # (user, said, reply, when the stream ended)
    lock, stop, failures = threading.Lock(), threading.Event(), []

    def talk(name: str, client) -> None:
        turn = 0
        while not stop.is_set():
            said = f"{name} says hello, turn {turn}"
            try:
                stream = client.chat.completions.create(model="ember", stream=True, max_tokens=6,
                                                        messages=[{"role": "user", "content": said}])
                reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            except Exception as err:   # a 429 would be a finding too: nothing here should refuse
                failures.append(f"{name}: {err}")
                return
            with lock:
                acknowledged.append((name, said, reply, time.time()))
            turn += 1

    threads = [threading.Thread(target=talk, args=item) for item in users.items()]
    for thread in threads:
        thread.start()
    try:
        while len({a[0] for a in acknowledged}) < 8 and not failures:   # every user is mid-conversation
            time.sleep(0.2)
        began = time.time()
        done = homefire("backup", str(tmp_path / "backups"), "--keep", "2", data_dir=server.data_dir)
        ended = time.time()
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert not failures, failures
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout
    assert sum(1 for a in acknowledged if a[3] > began) > 0 or ended - began < 1, \
        "replies went on being written while the backup ran"
    made = backup.backups(tmp_path / "backups")
    assert len(made) == 1 and oct(made[0].stat().st_mode & 0o777) == "0o700"

    restored = tmp_path / "restored"
    (restored / "models").mkdir(parents=True)
    (restored / "models" / MODEL_NAME).symlink_to(server.data_dir / "models" / MODEL_NAME)
    done = homefire("restore", str(made[0]), data_dir=restored, config=server.config_path)
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout and "index rebuilt" in done.stdout
    db = sqlite3.connect(restored / "homefire.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = set(db.execute("""SELECT c.user_id, u.content, r.content FROM messages r
        JOIN messages u ON u.id = (SELECT MAX(id) FROM messages WHERE conversation_id = r.conversation_id
                                   AND id < r.id AND role = 'user')
        JOIN conversations c ON c.id = r.conversation_id WHERE r.role = 'assistant'""").fetchall())
    before = [(name, said, reply) for name, said, reply, at in acknowledged if at < began]
    assert len(before) >= 8
    assert [a for a in before if a not in stored] == [], "an acknowledged reply is missing"
    # The users' keys came along: the restored data answers them.
    assert db.execute("SELECT COUNT(*) FROM users WHERE name LIKE 'drill%'").fetchone() == (8,)
    found = homefire("memory", "search", "ember", "hello", "--json", data_dir=restored,
                     config=server.config_path)
    assert found.returncode == 0, found.stderr


def test_retention_keeps_the_newest_and_a_damaged_or_partial_backup_is_refused(server, tmp_path):
    root = tmp_path / "backups"
    made = [backup.backup(server.data_dir, root, keep=2) for _ in range(3)]
    assert backup.backups(root) == made[1:], "the oldest went once the newest was whole"
    manifest = json.loads((made[-1] / "manifest.json").read_text())
    assert "homefire.db" in manifest["files"] and "api_key" in manifest["files"]
    assert not any(name.endswith(".pt") or "/checkpoint/" in name for name in manifest["files"])

    # A restore never writes over a data directory a server uses, nor one that holds something.
    done = homefire("restore", str(made[-1]), data_dir=server.data_dir)
    assert done.returncode == 2 and "already uses" in done.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "homefire.db").write_bytes(b"mine")
    done = homefire("restore", str(made[-1]), data_dir=tmp_path / "busy")
    assert done.returncode == 2 and "is not empty (homefire.db)" in done.stderr
    assert (tmp_path / "busy" / "homefire.db").read_bytes() == b"mine"
    # One changed byte in the database: refused before anything is copied.
    with (made[-1] / "homefire.db").open("r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    target = tmp_path / "target"
    done = homefire("restore", str(made[-1]), data_dir=target)
    assert done.returncode == 2
    assert "homefire.db: its SHA-256 differs from the manifest's; the backup is damaged" in done.stderr
    assert not (target / "homefire.db").exists()
    # A folder without a manifest (a backup cut short) is no backup.
    done = homefire("restore", str(tmp_path), data_dir=target)
    assert done.returncode == 2 and "no manifest.json" in done.stderr


@pytest.mark.parametrize("keep", ["0", "-1", "two"])
def test_keep_must_be_a_count(keep, tmp_path):
    done = homefire("backup", str(tmp_path), "--keep", keep, data_dir=tmp_path)
    assert done.returncode == 2 and "a whole number of backups, 1 or more" in done.stderr
