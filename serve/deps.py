"""Request dependencies: the process's Homefire objects, the user's account and rate limit.

The ones that only read memory are async: a sync dependency costs a thread-pool hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.account import authenticate
from serve.chat import ChatService
from serve.homefire import Homefire
from serve.limits import Limiter
from store.users import User


async def get_homefire(request: Request) -> Homefire:
    return request.app.state.homefire


async def get_chat(request: Request) -> ChatService:
    return request.app.state.homefire.chat


async def get_limiter(request: Request) -> Limiter:
    return request.app.state.homefire.limiter


async def rate_limit(request: Request, user: Annotated[User, Depends(authenticate)]) -> None:
    request.app.state.homefire.limiter.check_rate(user.name)


HomefireDep = Annotated[Homefire, Depends(get_homefire)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]

# Every API route: the key check, then the user's request rate.
API_GUARDS = [Depends(authenticate), Depends(rate_limit)]
