"""Request dependencies: the process's Homefire objects and the API key check."""

from __future__ import annotations

import os
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memory.companions import CompanionStore
from memory.history import History
from memory.store import MemoryStore
from serve.chat import ChatService
from serve.engine import EngineUnavailable
from serve.limits import Limiter, user_of

_bearer = HTTPBearer(auto_error=False)


def get_homefire(request: Request):
    return request.app.state.homefire


def get_chat(request: Request) -> ChatService:
    return request.app.state.homefire.chat


def get_history(request: Request) -> History:
    return request.app.state.homefire.history


def get_companions(request: Request) -> CompanionStore:
    return request.app.state.homefire.companions


def get_memory(request: Request) -> MemoryStore:
    memory = request.app.state.homefire.chat.memory
    if memory is None:
        raise EngineUnavailable("the memory index is still opening")
    return memory


def require_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With HOMEFIRE_API_KEY set, every route but /healthz needs `Authorization: Bearer KEY`."""
    expected = os.environ.get("HOMEFIRE_API_KEY")
    if not expected:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials, expected):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})


HomefireDep = Annotated[object, Depends(get_homefire)]   # serve.app.Homefire (imported lazily)
def get_limiter(request: Request) -> Limiter:
    return request.app.state.homefire.limiter


def current_user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return user_of(credentials.credentials if credentials else None)


def rate_limit(request: Request, user: Annotated[str, Depends(current_user)]) -> None:
    request.app.state.homefire.limiter.check_rate(user)


UserDep = Annotated[str, Depends(current_user)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
HistoryDep = Annotated[History, Depends(get_history)]
CompanionsDep = Annotated[CompanionStore, Depends(get_companions)]
MemoryDep = Annotated[MemoryStore, Depends(get_memory)]

# Every API route: the key check, then the user's request rate.
API_GUARDS = [Depends(require_key), Depends(rate_limit)]
