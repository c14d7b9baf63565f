"""Who is asking, and the one gate every request's data passes through.

A route reaches a member's rows through an Account: its history and memory are views bound
to the user in SQL (store/), its lookups turn an id the user may not see into the same 404 as
an id that does not exist, and the writers of imports and bundles are given `account.name`
as the owner of everything they write. Admins manage users and shared companions;
they read no one else's conversations or memories either.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memory.store import MemoryStore
from serve.chat import UnknownCompanion
from serve.engine import EngineUnavailable
from serve.groups import GroupChat
from serve.homefire import Homefire
from store.companions import Companion, key_for, visible_id
from store.groups import Group, Groups
from store.history import Conversation, History, UnknownConversation
from store.memories import Memory
from store.summaries import Summaries, Summary
from store.users import DEFAULT_USER_NAME, User

_bearer = HTTPBearer(auto_error=False, description="an API key: `homefire user add NAME` prints one; "
                     "the local owner's is in the data directory's api_key file")


def authenticate(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    """Every route but /healthz: the user whose key is sent as `Authorization: Bearer KEY`."""
    users = request.app.state.homefire.users
    user = credentials and users.by_key(credentials.credentials)
    if not user:
        raise HTTPException(401, "missing, unknown or revoked API key: send 'Authorization: Bearer "
                                 "KEY' (the local owner's key is in the data directory's api_key file)",
                            headers={"WWW-Authenticate": "Bearer"})
    # The command line's own application (never a server's), run for an admin acting for a
    # member with --user: the admin's requests are the member's.
    act_as = getattr(request.app.state, "act_as", None)
    if act_as and user.admin and act_as != user.name:
        member = users.get(act_as)
        if member is None or member.revoked_at:
            raise HTTPException(404, f"no user named {act_as!r}; add one with `homefire user add {act_as}`")
        return member
    return user


class Account:
    def __init__(self, hf: Homefire, user: User):
        self.hf = hf
        self.user = user
        self.name = user.name
        self.history = History(hf.db, user.name)
        self.summaries = Summaries(hf.db, user.name)
        self.called = user.display_name or DEFAULT_USER_NAME   # what companions call them
        self.groups = Groups(hf.db, user.name)

    @property
    def memory(self) -> MemoryStore:
        if self.hf.chat.memory is None:
            raise EngineUnavailable("the memory index is still opening")
        return self.hf.chat.memory.for_user(self.name)

    # -- companions: shared ones and the user's own ---------------------------------------

    def companions(self) -> list[Companion]:
        return self.hf.companions.list(self.name)

    def companion(self, companion_id: str) -> Companion:
        """A companion the user may talk to, or 404; also checked against the served model."""
        return self.hf.chat.companion(companion_id, self.name)

    def editable(self, companion_id: str) -> tuple[Companion, str | None]:
        """(companion, owner) the user may change: their own, or a shared one for an admin."""
        companion = self.companion_card(companion_id)
        source, path, owner = self.hf.companions.origin(companion.key)
        if owner is None and not self.user.admin:
            raise HTTPException(403, f"companion {companion_id!r} is shared; only an admin may change it")
        if source == "config":
            raise HTTPException(409, f"companion {companion_id!r} is defined in {path}; edit that file")
        return companion, owner

    def tunable(self, companion_id: str) -> Companion:
        """A companion whose voice (adapters, training) the user may change: their own, or a
        shared one for an admin; one defined in a config file too (its card is not changed)."""
        companion = self.companion_card(companion_id)
        if self.hf.companions.origin(companion.key)[2] is None and not self.user.admin:
            raise HTTPException(403, f"companion {companion_id!r} is shared; only an admin may change "
                                     "its voice")
        return companion

    def companion_card(self, companion_id: str) -> Companion:
        """The card alone (no base-model check), or 404."""
        found = self.hf.companions.get(companion_id, self.name)
        if found is None:
            raise UnknownCompanion(companion_id, self.hf.companions.ids(self.name))
        return found

    def new_id_is_free(self, companion_id: str, where: str = "") -> None:
        """409 if the id is shared, or already one of this user's own (for an admin: shared)."""
        if companion_id == self.hf.tasks.model:
            raise HTTPException(409, f"{where + ': ' if where else ''}the id {companion_id!r} is the utility "
                                     "model's (tasks.model); choose another")
        store, owner = self.hf.companions, self.owner_for_new()
        taken = store.origin(companion_id) or (owner and store.origin(key_for(companion_id, owner)))
        if taken:
            prefix = f"{where}: " if where else ""
            raise HTTPException(409, f"{prefix}the id {companion_id!r} is taken; choose another"
                                + ("" if not where else ", or import with replace=true (`homefire companion "
                                                       "import-card --replace`) to replace yours"))

    def owner_for_new(self) -> str | None:
        """Who owns a companion this user creates: an admin's is shared, anyone else's their own."""
        return None if self.user.admin else self.name

    # -- the user's own data ----------------------------------------------------------

    def conversation(self, conversation_id: str) -> Conversation:
        found = self.history.get_conversation(conversation_id)
        if found is None:
            raise UnknownConversation(conversation_id)
        return found

    def group(self, group_id: str) -> Group:
        found = self.groups.get(group_id)
        if found is None:
            raise HTTPException(404, f"no group named {group_id!r}; known groups: "
                                     + (", ".join(g.id for g in self.groups.list()) or "none"))
        return found

    def group_chat(self, conversation: Conversation) -> GroupChat | None:
        """A group conversation's members (those still here) and reply order; None for one
        companion's conversation."""
        if conversation.reply_order is None:
            return None
        members = [self.companion(visible_id(key)) for key in conversation.member_keys]
        return GroupChat(members, conversation.reply_order)

    def members(self, ids: list[str]) -> list[Companion]:
        """Companions named for a group, each one the user may talk to (or 404)."""
        found = [self.companion(i) for i in ids]
        if len({c.key for c in found}) != len(found):
            raise HTTPException(400, "companions: a companion can be in a group once")
        return found

    def summary(self, conversation_id: str) -> Summary | None:
        """The running summary the conversation's next reply carries, if any (serve/summaries.py)."""
        conversation = self.conversation(conversation_id)
        said = [(m.role, m.content) for m in self.history.messages(conversation.id)]
        return self.summaries.covering(conversation.companion_key, said[:-1])

    def memory_item(self, memory_id: int) -> Memory:
        found = self.memory.get(memory_id)
        if found is None:
            raise HTTPException(404, f"no memory with id {memory_id}")
        return found


async def get_account(request: Request, user: Annotated[User, Depends(authenticate)]) -> Account:
    return Account(request.app.state.homefire, user)


AccountDep = Annotated[Account, Depends(get_account)]
