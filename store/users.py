"""Accounts: who may use the server, with API keys stored only as hashes.

The local owner ("local", an admin) needs no setup: its key is written once to the data
directory (`api_key`, readable only by its owner), where the CLI and clients on the same
machine find it, as Jupyter does with its token. HOMEFIRE_API_KEY, when set, is that key
instead. Keys are 256 random bits, so a plain SHA-256 cannot be reversed by guessing;
a slow password hash would only slow every request.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path

from pydantic import BaseModel

from store.db import Database
from store.files import write_whole

LOCAL = "local"
DEFAULT_USER_NAME = "User"   # what companions call a user who has not said
# No "--": memory collections are named u-<user>--c-<companion> and must not collide.
NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_]|-(?!-)){0,31}$")
# Printed after "{name}: " at the start of memory lines and put in prompts: one line, no
# speaker colon, no template braces or markup.
DISPLAY_NAME = re.compile(r"^[^\x00-\x1f\x7f:{}<>\[\]]{1,40}$")


class User(BaseModel):
    name: str
    admin: bool
    created_at: float
    revoked_at: float | None = None
    display_name: str | None = None   # what companions call them (None: "User")


def check_display_name(display_name: str) -> str:
    """The display name, trimmed, or UserError saying what is wrong with it."""
    trimmed = re.sub(" {2,}", " ", display_name.strip(" "))
    if not DISPLAY_NAME.match(trimmed):
        raise UserError(f"display name {display_name!r}: use 1 to 40 characters on one line, without "
                        "':', braces, brackets or '<' '>'")
    return trimmed


class UserError(ValueError):
    """A user command that cannot be done; the message says why."""


def new_key() -> str:
    return "hf-" + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file(data_dir: Path) -> Path:
    return data_dir / "api_key"


def local_key(data_dir: Path) -> str:
    """The local owner's key: HOMEFIRE_API_KEY, else the data directory's key file (made once)."""
    if env := os.environ.get("HOMEFIRE_API_KEY"):
        return env
    path = key_file(data_dir)
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_key(path, new_key())
    return path.read_text().strip()


def write_key(path: Path, key: str) -> None:
    """Replace the key file atomically, never readable by others, not even for a moment."""
    write_whole(path, key + "\n", mode=0o600)


class Users:
    def __init__(self, db: Database):
        self.db = db

    def by_key(self, key: str) -> User | None:
        """The active user whose key this is."""
        rows = self.db.query("SELECT * FROM users WHERE key_hash = ? AND revoked_at IS NULL",
                             (key_hash(key),))
        return _user(rows[0]) if rows else None

    def get(self, name: str) -> User | None:
        rows = self.db.query("SELECT * FROM users WHERE name = ?", (name,))
        return _user(rows[0]) if rows else None

    def list(self) -> list[User]:
        return [_user(r) for r in self.db.query("SELECT * FROM users ORDER BY created_at, name")]

    def add(self, name: str, admin: bool = False, display_name: str | None = None) -> str:
        """Create an account; returns its key, which is not stored and cannot be shown again."""
        if not NAME.match(name):
            raise UserError(f"user name {name!r}: use 1 to 32 lower-case letters, digits, '_' or "
                            "single '-', starting with a letter or digit")
        shown = check_display_name(display_name) if display_name is not None else None
        key = new_key()
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserError(f"a user named {name!r} exists; `homefire user rotate {name}` gives "
                                "it a new key")
            conn.execute("INSERT INTO users (name, key_hash, admin, created_at, display_name) "
                         "VALUES (?, ?, ?, ?, ?)", (name, key_hash(key), int(admin), time.time(), shown))
        return key

    def set_display_name(self, name: str, display_name: str) -> str:
        """What companions call the user from now on (memories already made keep theirs)."""
        shown = check_display_name(display_name)
        with self.db.transaction() as conn:
            if not conn.execute("UPDATE users SET display_name = ? WHERE name = ?", (shown, name)).rowcount:
                raise UserError(f"no user named {name!r}")
        return shown

    def called(self, name: str) -> str:
        """What companions call the user: their display name, else "User"."""
        rows = self.db.query("SELECT display_name FROM users WHERE name = ?", (name,))
        return (rows[0][0] if rows else None) or DEFAULT_USER_NAME

    def rotate(self, name: str) -> str:
        """A new key for the user (also re-enabling a revoked one); the old key stops working."""
        key = new_key()
        with self.db.transaction() as conn:
            if not conn.execute("UPDATE users SET key_hash = ?, revoked_at = NULL WHERE name = ?",
                                (key_hash(key), name)).rowcount:
                raise UserError(f"no user named {name!r}")
        return key

    def revoke(self, name: str) -> None:
        """The user's key stops working at once; their data stays (rotate gives a new key)."""
        if name == LOCAL:
            raise UserError("'local' is the server's owner; rotate its key instead of revoking it")
        with self.db.transaction() as conn:
            if not conn.execute("UPDATE users SET revoked_at = ? WHERE name = ?",
                                (time.time(), name)).rowcount:
                raise UserError(f"no user named {name!r}")

    def ensure_local(self, key: str) -> None:
        """Make `key` the local owner's key (the server calls this at every start)."""
        with self.db.transaction() as conn:
            conn.execute(
                """INSERT INTO users (name, key_hash, admin, created_at) VALUES (?, ?, 1, ?)
                   ON CONFLICT(name) DO UPDATE SET key_hash = excluded.key_hash, admin = 1,
                       revoked_at = NULL""", (LOCAL, key_hash(key), time.time()))


def _user(row) -> User:
    return User(name=row["name"], admin=bool(row["admin"]), created_at=row["created_at"],
                revoked_at=row["revoked_at"], display_name=row["display_name"])
