"""Saved groups: a user's named list of companions that talk together, with the order in which
they reply (serve/groups.py picks the speaker). A group chat is a conversation with members
(store/history.py); a saved group is what a client names to start one, or the OpenAI route's
`model` ("group:ID")."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from store.companions import visible_id
from store.db import Database

ReplyOrder = Literal["manual", "round_robin", "natural"]
GROUP_MODEL = "group:"   # the OpenAI route's model for a saved group: group:ID
MAX_MEMBERS = 8


class Group(BaseModel):
    """Companions that talk together in one conversation with the user."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, json_schema_extra={
        "examples": [{"id": "book-club", "name": "Book club", "companions": ["ember", "wren"],
                      "reply_order": "natural"}]})

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    """Stable handle; the OpenAI route names the group as `group:ID`."""
    name: str = Field(min_length=1, max_length=200)
    companions: list[str] = Field(min_length=2, max_length=MAX_MEMBERS)
    """The member companions' ids, in order (round_robin follows it)."""
    reply_order: ReplyOrder = "natural"
    """Who answers the user: `manual` (the user names the speaker every time), `round_robin`
    (each member in turn), `natural` (who the message names, else who has not spoken longest)."""

    _keys: list[str] = PrivateAttr(default_factory=list)

    @field_validator("companions")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a companion can be in a group once")
        return value

    @property
    def keys(self) -> list[str]:
        """The members' storage keys (store.companions.key_for)."""
        return self._keys or self.companions

    def stored_with(self, keys: list[str]) -> Group:
        self._keys = list(keys)
        return self


class Groups:
    """One user's saved groups."""

    def __init__(self, db: Database, user: str):
        self.db = db
        self.user = user

    def put(self, group: Group) -> Group:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                """INSERT INTO groups (user_id, id, name, members, reply_order, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, id) DO UPDATE SET
                   name = excluded.name, members = excluded.members, reply_order = excluded.reply_order,
                   updated_at = excluded.updated_at""",
                (self.user, group.id, group.name, json.dumps(group.keys), group.reply_order, now, now))
        return group

    def get(self, group_id: str) -> Group | None:
        rows = self.db.query("SELECT * FROM groups WHERE user_id = ? AND id = ?", (self.user, group_id))
        return _group(rows[0]) if rows else None

    def list(self) -> list[Group]:
        return [_group(r) for r in self.db.query("SELECT * FROM groups WHERE user_id = ? ORDER BY id",
                                                 (self.user,))]

    def delete(self, group_id: str) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM groups WHERE user_id = ? AND id = ?",
                                (self.user, group_id)).rowcount > 0


def _group(row) -> Group:
    keys = json.loads(row["members"])
    return Group(id=row["id"], name=row["name"], companions=[visible_id(k) for k in keys],
                 reply_order=row["reply_order"]).stored_with(keys)
