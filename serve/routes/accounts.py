"""Accounts over the API: who am I, and (admins) list, add, rotate and revoke users.

The same rules as `homefire user`: a new or rotated key is shown once and never stored.
An admin cannot revoke or rotate their own key here (the request's own key would stop
working mid-session), nor the server owner's (`local`): one admin must never lock the owner
out of their own server. The CLI on the server's machine can do both.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from serve.account import Account, AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES
from store.users import LOCAL, User, UserError

router = APIRouter(prefix="/api/v1", tags=["accounts"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)
UserName = Annotated[str, Path(min_length=1, max_length=64)]


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "sam"}]})
    name: str = Field(min_length=1, max_length=64)
    admin: bool = False
    display_name: str | None = Field(None, min_length=1, max_length=64)


class UserWithKey(BaseModel):
    user: User
    api_key: str = Field(description="shown once: it is not stored and cannot be shown again")


def admin_only(account: AccountDep) -> AccountDep:
    if not account.user.admin:
        raise HTTPException(403, "only an admin may manage users")
    return account


AdminDep = Annotated[Account, Depends(admin_only)]


def _not_yourself(account: Account, name: str, what: str) -> None:
    if name == LOCAL and account.name != LOCAL:
        raise HTTPException(403, f"only the server's owner may {what} the owner's key, with "
                                 f"`homefire user {what} {LOCAL}` on the server")
    if name == account.name:
        raise HTTPException(409, f"you cannot {what} your own key here: the page or client using it would "
                                 f"stop working; run `homefire user {what} {name}` on the server")


def _user(account: Account, name: str) -> User:
    found = account.hf.users.get(name)
    if found is None:
        raise HTTPException(404, f"no user named {name!r}")
    return found


@router.get("/me")
def me(account: AccountDep) -> User:
    """The user whose key this is: name, display name, and whether an admin."""
    return account.user


@router.get("/users")
def list_users(account: AdminDep) -> list[User]:
    """Every account, revoked ones included (admins)."""
    return account.hf.users.list()


@router.post("/users", status_code=201)
def add_user(body: NewUser, account: AdminDep) -> UserWithKey:
    """Create an account and show its key once (admins)."""
    try:
        key = account.hf.users.add(body.name, body.admin, body.display_name)
    except UserError as err:
        raise HTTPException(409 if "exists" in str(err) else 422, str(err)) from err
    return UserWithKey(user=_user(account, body.name), api_key=key)


@router.post("/users/{name}/rotate")
def rotate_key(name: UserName, account: AdminDep) -> UserWithKey:
    """A new key for the user (re-enabling a revoked one); the old key stops working (admins)."""
    _user(account, name)
    _not_yourself(account, name, "rotate")
    key = account.hf.users.rotate(name)
    return UserWithKey(user=_user(account, name), api_key=key)


@router.post("/users/{name}/revoke")
def revoke_user(name: UserName, account: AdminDep) -> User:
    """The user's key stops working at once; their data stays (admins)."""
    _user(account, name)
    _not_yourself(account, name, "revoke")
    try:
        account.hf.users.revoke(name)
    except UserError as err:
        raise HTTPException(409, str(err)) from err
    return _user(account, name)
