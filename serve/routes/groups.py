"""Native API: saved groups, the companions a group chat starts with (POST /conversations with
`group`, or the OpenAI route's `model: group:ID`)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from serve.account import AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES
from store.groups import Group

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


@router.get("/groups")
def list_groups(account: AccountDep) -> list[Group]:
    """The user's saved groups (each user's own: no one else sees them)."""
    return account.groups.list()


@router.post("/groups", status_code=201, responses={409: {"description": "The user has a group of that id"}})
def create_group(group: Group, account: AccountDep) -> Group:
    """Save a group: companions the user may talk to, in order, and its reply order."""
    if account.groups.get(group.id) is not None:
        raise HTTPException(409, f"id: you have a group named {group.id!r}; PUT /groups/{group.id} "
                                 "changes it")
    return account.groups.put(_checked(group, account))


@router.get("/groups/{group_id}")
def get_group(group_id: str, account: AccountDep) -> Group:
    return account.group(group_id)


@router.put("/groups/{group_id}")
def replace_group(group_id: str, group: Group, account: AccountDep) -> Group:
    """Change a saved group; its conversations keep the members they began with."""
    if group.id != group_id:
        raise HTTPException(400, f"id: the body's id {group.id!r} differs from the path's {group_id!r}")
    account.group(group_id)
    return account.groups.put(_checked(group, account))


@router.delete("/groups/{group_id}", status_code=204)
def delete_group(group_id: str, account: AccountDep) -> Response:
    """Forget a saved group; its conversations stay."""
    account.group(group_id)
    account.groups.delete(group_id)
    return Response(status_code=204)


def _checked(group: Group, account) -> Group:
    return group.stored_with([c.key for c in account.members(group.companions)])
