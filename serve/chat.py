"""Chat turns: store what is new, assemble the prompt, stream the reply, commit it.

A reply is committed to SQLite before the caller sees the final event; a reply cut
short (client gone, engine failure) is stored marked truncated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import httpx

from finetune.template import alternate
from memory.embedder import EmbedderError
from memory.remember import remember_new
from memory.store import MemoryStore, Recalled
from serve import metrics
from serve.engine import Engine, EngineUnavailable
from serve.lore import Fired, Lore, LoreCache, fingerprint, place
from serve.prompt import Prompt, PromptBuilder
from store.companions import Companion, CompanionStore, Sampling
from store.db import Database
from store.history import History, Message, ReplyMeta, UnknownConversation
from store.persona import substitute
from store.summaries import Summaries, Summary
from store.users import DEFAULT_USER_NAME, LOCAL

log = logging.getLogger(__name__)


def dated(text: str, created_at: float) -> str:
    """A memory as the prompt shows it."""
    return f"[{datetime.fromtimestamp(created_at):%Y-%m-%d}] {text}"


def adapter_name(companion_id: str, version: str) -> str:
    return f"{companion_id}--{version}"


INDEX_BATCH = 8          # memories embedded at a time in the background
INDEX_PATIENCE_S = 2.0   # longest wait for a moment without replies in flight
# What vllm-router's consistent_hash policy reads to keep a conversation on one worker, the one
# whose prefix cache holds it. Our own engine ignores it.
SESSION_HEADER = "X-Session-ID"
ENGINE_ATTEMPTS = 4      # tries of a reply's request that a router's worker did not take
RETRY_PAUSE_S = 0.5      # times the try's number, between them
ADDRESS = re.compile(r"https?://[^\s)\"']+")


class UnknownCompanion(LookupError):
    def __init__(self, companion_id: str, known: list[str]):
        super().__init__(
            f"no companion named {companion_id!r}; known companions: {', '.join(known) or 'none'}"
        )


class WrongBaseModel(ValueError):
    """The companion was made for a model other than the one the server runs."""


def unnamed(text: str, names: tuple[str, ...]) -> str:
    """A group reply without the name the model put before it ("Owl: ..."), as the others' lines
    in its prompt have one: the page and the history name the speaker already."""
    if not names:
        return text
    leading = rf"^\s*(?:{'|'.join(map(re.escape, names))})\s*:\s*"
    return re.sub(leading, "", text, count=1, flags=re.IGNORECASE)


class NameGate:
    """A group reply's stream with the name the model may put before it taken off (unnamed):
    its first text is held until it cannot be the start of "Name:" any more."""

    def __init__(self, names: tuple[str, ...]):
        self.names = [n.casefold() for n in names]
        self.held, self.open = "", not names

    def feed(self, text: str) -> str:
        """What of the stream so far may be shown now."""
        if self.open:
            return text
        self.held += text
        start = self.held.lstrip().casefold()
        if any(f"{n}:".startswith(start) or (start.startswith(n) and not start[len(n):].strip())
               for n in self.names):
            return ""   # it may still become "Name:"
        self.open = True
        return unnamed(self.held, tuple(self.names))

    def rest(self) -> str:
        """At the stream's end: what is still held."""
        return "" if self.open else unnamed(self.held, tuple(self.names))


def session_key(user: str, conversation_id: str) -> str:
    """A conversation's key for the router: stable, and naming neither the member nor the
    conversation to the workers' logs."""
    return hashlib.sha256(f"{user}\0{conversation_id}".encode()).hexdigest()[:32]


class EngineFailed(RuntimeError):
    """The engine failed in the middle of a reply. `retryable`: the stream broke (a worker died,
    the engine restarts); the same request, made again, is likely to be answered."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    message: Message
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Turn:
    """One reply to produce: who speaks and what they have to go on."""

    companion: Companion | None         # None: the utility model (no persona, no memory)
    history: list[dict]                 # oldest first, ending with the user's message
    overrides: dict = field(default_factory=dict)
    extra_system: list[str] = field(default_factory=list)
    api: str = "native"
    user: str = LOCAL                   # whose memories are recalled
    called: str = DEFAULT_USER_NAME     # what the companion calls them ({{user}})
    group: bool = False                 # a group chat's reply: history is as the speaker heard it
    names: tuple[str, ...] = ()         # a group chat's: a name the reply may begin with ("Owl: "), taken off


@dataclass
class Plan:
    """A turn checked and ready for the engine: nothing has been stored yet."""

    turn: Turn
    params: dict
    prompt: Prompt
    memories: list[Recalled] = field(default_factory=list)
    lore: list[Fired] = field(default_factory=list)     # what the newest message set off
    summary: Summary | None = None     # what the prompt carries instead of the oldest turns


class ChatService:
    def __init__(self, engine: Engine, db: Database, companions: CompanionStore, model_id: str):
        self.engine = engine
        self.db = db
        self.companions = companions
        self.model_id = model_id
        self.prompts: PromptBuilder | None = None  # set once the tokenizer is loaded
        self.memory: MemoryStore | None = None     # set once the memory index is open
        self._index_wanted = False
        self._indexer: asyncio.Task | None = None
        self._streaming = 0  # replies being generated now
        self.adapters: dict[str, str] = {}   # companion key -> adapter version in use
        self.fitted: dict[str, dict] = {}    # companion key -> that version's fitted sampling
        self.lore_cache = LoreCache()
        self.summaries = True   # prompts carry conversations' summaries (serve/summaries.py)
        # Called with (plan, conversation id, prompt tokens) once a reply is stored.
        self.after_reply: list[Callable[[Plan, str, int], None]] = []

    def companion(self, companion_id: str, viewer: str | None = None) -> Companion:
        """The companion, if `viewer` may see it (None: anyone's), made for the served model."""
        companion = self.companions.get(companion_id, viewer)
        if companion is None:
            raise UnknownCompanion(companion_id, self.companions.ids(viewer))
        if companion.base_model and companion.base_model not in (
            self.model_id, Path(self.model_id).name
        ):
            raise WrongBaseModel(
                f"companion {companion_id!r} is made for base model {companion.base_model!r}, "
                f"but this server runs {self.model_id!r}"
            )
        return companion

    def served_name(self, companion_id: str | None) -> str:
        """The engine's name for the companion's model: its adapter's, or the base model's."""
        version = self.adapters.get(companion_id) if companion_id else None
        return adapter_name(companion_id, version) if version else self.engine.served_name

    def sampling(self, companion: Companion | None, overrides: dict) -> dict:
        """The card's sampling, then the fitted sampling of the version the companion speaks
        through (finetune/sampling.py), then the request's own values. The card's max_tokens
        stays the ceiling: clients and fitting may ask for less, never more."""
        if companion is None:
            return Sampling().drawn(asked=overrides)
        return companion.sampling.drawn(self.fitted.get(companion.key), overrides)

    def plan(self, turn: Turn) -> Plan:
        """Check the turn and assemble its prompt; raises before anything is stored."""
        self.engine.require_ready()
        if self.prompts is None or self.memory is None:
            raise EngineUnavailable("the engine is ready but the tokenizer or memory is still loading")
        params = self.sampling(turn.companion, turn.overrides)
        build = self.prompts.build
        if turn.companion is None:
            prompt = build(None, turn.history, params["max_tokens"], extra_system=turn.extra_system)
            return Plan(turn, params, prompt)
        # The turns a summary covers are not shown: it stands where they were.
        summary = None
        # A group chat's history is the speaker's view of it (serve/groups.py): no stored chain
        # matches it, so no summary stands in it.
        if self.summaries and not turn.group:
            summary = Summaries(self.db, turn.user).covering(
                turn.companion.key, [(m["role"], m["content"]) for m in turn.history[:-1]])
        if summary is None:
            history = self.shown_before(turn)
        else:
            # A long conversation shows an earlier reply's memories no more: kept in place, they
            # would fill the context with memories (up to memory.budget_tokens a turn) and fold it
            # every few turns. The fold that made the summary moved the prefix anyway.
            covered = [i for i, m in enumerate(turn.history) if m["content"]][summary.turns - 1]
            history = turn.history[covered + 1:]
        history = alternate(history)
        lore = self.lore(turn.companion, history, turn.called)
        text = summary.text if summary else None
        prompt = build(turn.companion, history, params["max_tokens"], extra_system=turn.extra_system,
                       user=turn.called, lore=lore, summary=text)
        kept = history[len(history) - prompt.history_kept:]
        memories = self.recall(turn.companion, turn.user, history, prompt.history_kept,
                               skip_ids={i for m in kept for i in m.get("memory_ids", ())})
        if memories:
            prompt = build(turn.companion, history, params["max_tokens"], extra_system=turn.extra_system,
                           memories=[dated(m.text, m.created_at) for m in memories], user=turn.called,
                           lore=lore, summary=text)
        metrics.DROPPED.inc(prompt.history_dropped)
        return Plan(turn, params, prompt, memories, lore.used, summary)

    def lore(self, companion: Companion, history: list[dict], user: str) -> Lore:
        """The companion's lorebook entries for a prompt of `history` (serve/lore.py)."""
        book = companion.character_book
        if book is None or not book.entries:
            return Lore()
        assert self.prompts is not None
        return place(book, fingerprint(companion, user), history, self.lore_cache,
                     lambda text: len(self.prompts.encode(text)),
                     lambda text: substitute(text, companion, user))

    def shown_before(self, turn: Turn) -> list[dict]:
        """turn.history with the memories each stored reply's prompt showed attached to the user
        message before it ("memories", "memory_ids"), so they are shown in the same place
        again and the engine's cached prefix still holds. Deleted memories are left out."""
        assert self.memory is not None and turn.companion is not None
        if turn.group:   # the speaker's own replies say what their prompts showed (serve/groups.py)
            shown = {i: m["shown_ids"] for i, m in enumerate(turn.history) if m.get("shown_ids")}
        else:
            turns = [(m["role"], m["content"]) for m in turn.history]
            shown = History(self.db, turn.user).memories_shown(turn.companion.key, turns)
        if not shown:
            return turn.history
        texts = self.memory.for_user(turn.user).texts([i for ids in shown.values() for i in ids])
        history = list(turn.history)
        for reply, ids in shown.items():
            ids = [i for i in ids if i in texts]
            if reply > 0 and history[reply - 1]["role"] == "user" and ids:
                history[reply - 1] = {**history[reply - 1], "memory_ids": ids,
                                      "memories": [dated(*texts[i]) for i in ids]}
        return history

    def recall(self, companion: Companion, user: str, history: list[dict], kept: int | None = None,
               skip_ids: set[int] = frozenset()) -> list[Recalled]:
        """The memories a reply to history's newest message places in its prompt: what the
        kept history (its newest `kept` messages; all by default) does not already hold."""
        if self.engine.state == "stopped":   # the command line's application: no engine, no tokenizer
            raise EngineUnavailable(self.engine.detail)
        if self.prompts is None or self.memory is None:
            raise EngineUnavailable("the tokenizer or the memory is still loading")
        if not history:   # every message was empty: nothing to recall for
            return []
        kept_turns = history[len(history) - (len(history) if kept is None else kept):]
        asked = history[-1]["content"]
        # The companion's last reply, as context ("yes, that one"); a greeting before the
        # user's first message is the card's, the same in every conversation, not context.
        first_user = next((i for i, m in enumerate(history) if m["role"] == "user"), len(history))
        context = next((m["content"][-300:] for m in reversed(history[first_user:-1])
                        if m["role"] == "assistant"), "")
        try:
            return self.memory.for_user(user).recall(
                companion.key, asked, context=context,
                skip_asked={m["content"] for m in kept_turns if m["role"] == "user"}, skip_ids=skip_ids,
                count_tokens=lambda text: len(self.prompts.encode(text)))
        except EmbedderError as err:   # memory.embedder's server is down: the reply goes without
            log.warning("memory: no recall for this reply: %s", err)
            return []

    def remember(self, companion: Companion, conversation_id: str) -> None:
        """Turn what the committed reply ends into a memory: the user's messages since the last
        one, with the reply (SQLite; embedded later, see index_soon)."""
        assert self.memory is not None
        remember_new(self.memory, conversation_id, companion.name)

    def index_soon(self) -> None:
        """Embed new and edited memories in the background, one indexing run at a time."""
        self._index_wanted = True
        if self._indexer is None or self._indexer.done():
            self._indexer = asyncio.get_running_loop().create_task(self._index())

    async def _index(self) -> None:
        # Embedding competes with replies for the CPU, so it runs in small batches, each in
        # a quiet moment between replies; under steady load, everything pending at once
        # after INDEX_PATIENCE_S, so memories never fall further behind than that.
        while self._index_wanted:
            self._index_wanted = False
            while True:
                waited = 0.0
                while self._streaming and waited < INDEX_PATIENCE_S:
                    await asyncio.sleep(0.05)
                    waited += 0.05
                limit = INDEX_BATCH if waited < INDEX_PATIENCE_S else None
                try:
                    # An import indexes what it brought itself (with its progress); this is for
                    # replies and facts, which must never wait behind an import's thousands.
                    if not await asyncio.to_thread(self.memory.index_pending, limit=limit,
                                                   imported=False):
                        break
                except Exception:  # the rows stay unindexed; the next reply or start-up retries
                    log.exception("memory: indexing failed")
                    break

    @staticmethod
    def _keep_truncated(history: History, conversation_id: str, text: str, meta: ReplyMeta) -> None:
        try:
            history.append(conversation_id, "assistant", text, meta)
        except UnknownConversation:   # the user deleted the conversation meanwhile: nowhere to keep it
            pass
        except Exception:   # the failure being reported matters more than this one
            log.exception("history: could not keep the cut-off reply in %s", conversation_id)

    async def _open(self, request: httpx.Request) -> httpx.Response:
        """Send a reply's request to the engine. Through a router (engine.workers), one its worker
        did not take (a 5xx, or no connection) is sent again, up to ENGINE_ATTEMPTS times: the
        worker may have just died, and the router sends the next try to another once it knows."""
        attempts = ENGINE_ATTEMPTS if self.engine.workers else 1
        for attempt in range(1, attempts + 1):
            try:
                response = await self.engine.client.send(request, stream=True)
            except httpx.TransportError:
                if attempt == attempts:
                    raise
            else:
                if response.status_code < 500 or attempt == attempts:
                    return response
                await response.aclose()
            log.warning("engine: a reply's request was not taken (try %d of %d); sending it again",
                        attempt, attempts)
            await asyncio.sleep(RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    async def reply(self, plan: Plan, conversation_id: str | None, keep_cut: bool = True
                    ) -> AsyncIterator[Delta | Done]:
        """Stream the planned reply; the last event is Done, sent after the commit. No
        conversation: nothing is stored or remembered (store false, the utility model). A reply
        cut short (stopped, failed) is kept as such, unless not `keep_cut` (a reply made again:
        the one it would replace stays, and the conversation is as it was)."""
        turn, params, prompt = plan.turn, plan.params, plan.prompt
        key = turn.companion.key if turn.companion else None
        started = time.perf_counter()
        payload = {
            "model": self.served_name(key), "prompt": prompt.for_engine, "stream": True,
            # The template already placed every special token.
            "add_special_tokens": False, "stream_options": {"include_usage": True}, **params,
        }
        parts: list[str] = []
        gate = NameGate(turn.names)
        finish, usage, outcome = None, None, "disconnected"
        history = History(self.db, turn.user)
        request = self.engine.client.build_request(
            "POST", "/v1/completions", json=payload,
            headers={SESSION_HEADER: session_key(turn.user, conversation_id or f"{key}/unstored")})
        self._streaming += 1
        try:
            try:
                response = await self._open(request)
            except httpx.HTTPError as err:
                outcome = "engine_error"
                raise EngineUnavailable(f"the engine cannot be reached ({type(err).__name__})") from err
            try:
                if response.status_code != 200:
                    outcome = "engine_error"
                    body = (await response.aread()).decode(errors="replace")[:500]
                    body = ADDRESS.sub("<worker>", body)   # a router names its workers: not for members
                    raise EngineFailed(f"the engine refused the request ({response.status_code}): {body}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        outcome = "engine_error"
                        raise EngineFailed(f"the engine failed mid-reply: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk["choices"]:
                        if choice["text"]:
                            if not parts:
                                metrics.TTFT.observe(time.perf_counter() - started)
                            parts.append(choice["text"])
                            if shown := gate.feed(choice["text"]):
                                yield Delta(shown)
                        finish = choice.get("finish_reason") or finish
            except httpx.HTTPError as err:
                outcome = "engine_error"
                raise EngineFailed(f"the engine stopped mid-reply ({type(err).__name__}); the reply "
                                   "was kept as cut short: ask again", retryable=True) from err
            finally:
                # Closing the upstream stream is what makes vLLM abort the generation,
                # so it must happen even while this task is being cancelled.
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            if rest := gate.rest():
                yield Delta(rest)
            if finish is None:
                outcome = "engine_error"
                raise EngineFailed("the engine closed the stream before the reply was finished; the "
                                   "reply was kept as cut short: ask again", retryable=True)
            usage = usage or {}
            completion = usage.get("completion_tokens", len(parts))
            prompt_tokens = usage.get("prompt_tokens", len(prompt.token_ids or ()))
            meta = ReplyMeta(tokens=completion, prompt_tokens=prompt_tokens, model=self.model_id,
                             adapter=self.adapters.get(key), sampling=params, finish_reason=finish,
                             memories_used=[m.model_dump(include={"id", "text", "score", "why"})
                                            for m in plan.memories],
                             lore_used=[f.used() for f in plan.lore], speaker=key if turn.group else None)
            if conversation_id is None:   # answered, and kept nowhere
                message = Message(id=0, conversation_id="", role="assistant",
                                  content=unnamed("".join(parts), turn.names),
                                  created_at=time.time(), **meta.model_dump())
                outcome = "ok"
            else:
                # SQLite (a durable commit, then the memory row) never runs on the event loop;
                # the commit is shielded, so a client leaving meanwhile cannot have it stored twice.
                said = unnamed("".join(parts), turn.names)
                with anyio.CancelScope(shield=True):
                    message = await asyncio.to_thread(history.append, conversation_id, "assistant", said,
                                                      meta)
                    outcome = "ok"
                try:
                    await asyncio.to_thread(self.remember, turn.companion, conversation_id)
                    self.index_soon()
                except Exception:  # the reply stands; start-up repair remembers it later
                    log.exception("memory: could not remember reply %s", message.id)
                for then in self.after_reply:
                    then(plan, conversation_id, prompt_tokens)
            metrics.TOKENS.inc(completion)
        except Exception as err:
            # Neither the engine's doing, nor the client's, nor a conversation deleted meanwhile.
            if outcome in ("disconnected", "ok") and not isinstance(err, UnknownConversation):
                outcome = "server_error"
            raise
        finally:
            self._streaming -= 1
            metrics.REPLIES.labels(turn.api, outcome).inc()
            if (outcome != "ok" and conversation_id is not None and keep_cut
                    and (parts or outcome == "disconnected")):
                # Shielded: a client that leaves cancels this task, and the cut reply is kept all the same.
                with anyio.CancelScope(shield=True):
                    await asyncio.to_thread(self._keep_truncated, history, conversation_id,
                                            unnamed("".join(parts), turn.names),
                                            ReplyMeta(tokens=len(parts),
                                                      prompt_tokens=(usage or {}).get("prompt_tokens"),
                                                      model=self.model_id,
                                                      adapter=self.adapters.get(key), sampling=params,
                                                      finish_reason=outcome, truncated=True,
                                                      speaker=key if turn.group else None))
        yield Done(message, finish, prompt_tokens, completion)
