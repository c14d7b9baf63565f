"""Training jobs' rows (`finetune_jobs`): who asked, for which companion, the settings, state,
progress and result. What a job may do, and when, is decided above (serve/finetunes.py);
here are the rows, and the facts a new job is admitted on, read in the transaction that adds it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from store.db import Database

OPEN = ("queued", "running", "evaluating")
_OPEN = "('queued', 'running', 'evaluating')"
DAY_S = 86400


@dataclass(frozen=True)
class Admission:
    """What a new job of a member's is admitted on, as the database holds it at that moment."""

    busy: str | None                     # their unfinished job for this companion, if any
    open_jobs: int                       # their unfinished jobs, for any companion
    ran: list[tuple[float, float]]       # (start, end) of their jobs that ran in the last day
    until: int | None                    # the last reply of the companion's to them (None: none)
    now: float


class Jobs:
    def __init__(self, db: Database):
        self.db = db

    def add(self, job_id: str, user: str, companion_key: str, kind: str, settings: str, switch: str,
            version: str | None, admit: Callable[[Admission], None], target: str | None = None) -> None:
        """Queue a job of `user`'s, if `admit` (which raises to refuse) lets it in on the facts
        read in the same transaction: no two requests are both let in on the same count."""
        with self.db.transaction() as conn:
            now = time.time()
            busy = conn.execute(f"SELECT id FROM finetune_jobs WHERE user_id = ? AND companion_id = ? AND "
                                f"state IN {_OPEN}", (user, companion_key)).fetchone()
            open_jobs = conn.execute(f"SELECT COUNT(*) FROM finetune_jobs WHERE user_id = ? AND state IN "
                                     f"{_OPEN}", (user,)).fetchone()[0]
            ran = conn.execute("SELECT started_at, COALESCE(ended_at, ?) FROM finetune_jobs WHERE "
                               "user_id = ? AND started_at IS NOT NULL AND COALESCE(ended_at, ?) > ?",
                               (now, user, now, now - DAY_S)).fetchall()
            until = conn.execute("SELECT MAX(m.id) FROM messages m JOIN conversations c ON c.id = "
                                 "m.conversation_id WHERE c.companion_id = ? AND c.user_id = ? AND m.role = "
                                 "'assistant'", (companion_key, user)).fetchone()[0]
            admit(Admission(busy[0] if busy else None, open_jobs, [tuple(r) for r in ran], until, now))
            conn.execute(
                "INSERT INTO finetune_jobs (id, user_id, companion_id, kind, state, settings, switch, "
                "until_message, version, target, created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, user, companion_key, kind, settings, switch, until, version, target, now))

    def get(self, job_id: str, user: str | None) -> sqlite3.Row | None:
        """The job, if it is `user`'s (None: anyone's, for an admin or the runner)."""
        rows = self.db.query("SELECT * FROM finetune_jobs WHERE id = ? AND (user_id = ? OR ?)",
                             (job_id, user, user is None))
        return rows[0] if rows else None

    def list(self, user: str | None, limit: int = 100) -> list[sqlite3.Row]:
        """`user`'s jobs, newest first (None: everyone's)."""
        return self.db.query("SELECT * FROM finetune_jobs WHERE user_id = ? OR ? ORDER BY created_at DESC "
                             "LIMIT ?", (user, user is None, limit))

    def queued(self) -> list[sqlite3.Row]:
        """Every queued job, oldest first: the runner's queue."""
        return self.db.query("SELECT * FROM finetune_jobs WHERE state = 'queued' ORDER BY created_at")

    def queue_position(self, created_at: float) -> int:
        """1 for the oldest queued job, and so on."""
        return 1 + self.db.query("SELECT COUNT(*) FROM finetune_jobs WHERE state = 'queued' AND "
                                 "created_at < ?", (created_at,))[0][0]

    def open_for(self, companion_key: str) -> int:
        """Anyone's unfinished jobs for the companion."""
        return self.db.query(f"SELECT COUNT(*) FROM finetune_jobs WHERE companion_id = ? AND state IN "
                             f"{_OPEN}", (companion_key,))[0][0]

    def update(self, job_id: str, progress: dict | None = None, **columns) -> None:
        if progress is not None:
            columns["progress"] = json.dumps(progress)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE finetune_jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                         (*columns.values(), job_id))

    def requeue(self, job_id: str) -> None:
        """An interrupted job goes to the back of the queue again."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE finetune_jobs SET state = 'queued', error = NULL, ended_at = NULL, "
                         "created_at = ? WHERE id = ?", (time.time(), job_id))

    def interrupt_running(self, why: str) -> int:
        """At a start or a stop: the jobs that were running are interrupted. Returns how many."""
        with self.db.transaction() as conn:
            return conn.execute(
                "UPDATE finetune_jobs SET state = 'interrupted', ended_at = ?, error = ? WHERE state IN "
                "('running', 'evaluating')", (time.time(), why)).rowcount
