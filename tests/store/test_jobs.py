"""Training jobs' rows: a member's jobs are theirs, and a job is admitted on facts read in the
transaction that adds it (the policy itself is tested through the server: test_finetunes)."""

from __future__ import annotations

import pytest

from store.companions import Companion, CompanionStore
from store.db import Database
from store.history import History
from store.jobs import Admission, Jobs
from store.users import Users


class Refused(Exception):
    pass


def test_a_job_is_added_only_when_admitted_and_read_only_by_its_member(tmp_path):
    db = Database(tmp_path / "homefire.db")
    CompanionStore(db).put(Companion(id="kit", name="Kit"), "api")
    Users(db).add("bob")
    jobs, seen = Jobs(db), []

    def refuse(facts: Admission) -> None:
        seen.append(facts)
        raise Refused

    with pytest.raises(Refused):
        jobs.add("ft-1", "local", "kit", "train", "{}", "auto", None, refuse)
    assert seen[0].until is None and seen[0].busy is None and seen[0].open_jobs == 0
    assert jobs.list(None) == [], "a refused job leaves no row"

    history = History(db)
    conversation = history.create_conversation("kit").id
    history.append(conversation, "user", "hi")
    reply = history.append(conversation, "assistant", "purr")
    jobs.add("ft-1", "local", "kit", "train", "{}", "auto", None, seen.append)
    assert seen[-1].until == reply.id
    jobs.add("ft-2", "local", "kit", "eval", "{}", "never", "v1", seen.append)
    assert seen[-1].busy == "ft-1" and seen[-1].open_jobs == 1, "the facts of the moment it is added"
    assert jobs.get("ft-1", "bob") is None and [r["id"] for r in jobs.list("bob")] == []
    assert jobs.get("ft-1", "local")["until_message"] == reply.id and jobs.get("ft-1", None) is not None
    assert [r["id"] for r in jobs.queued()] == ["ft-1", "ft-2"]
    assert jobs.queue_position(jobs.get("ft-2", None)["created_at"]) == 2
    assert jobs.open_for("kit") == 2

    jobs.update("ft-1", {"step": 3}, state="running", started_at=1.0)
    assert jobs.interrupt_running("stopped") == 1
    assert jobs.get("ft-1", None)["state"] == "interrupted" and jobs.open_for("kit") == 1
    jobs.requeue("ft-1")
    assert [r["id"] for r in jobs.queued()] == ["ft-2", "ft-1"], "back of the queue"
    db.close()
