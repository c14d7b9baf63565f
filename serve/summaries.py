"""Long conversations fold into a running summary instead of losing their oldest turns.

After a reply whose prompt neared the context (or had to leave turns out), the oldest turns are
summarised by the served model as the utility model (no persona), in the background: a fold
waits for a moment without replies, one fold runs at a time server-wide, members' folds take
turns. A fold covers a chunk, from the oldest uncovered turn to where the newest turns fill
LOW_WATER of the prompt, so the prompt's prefix (persona, summary, history) then stays the same
for many replies (serve/prompt.py places the summary where the folded turns were).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from serve import metrics
from serve.chat import ChatService, Done, Plan, Turn
from serve.engine import EngineUnavailable
from store.companions import Companion
from store.history import History, Message
from store.summaries import Summaries, Summary

log = logging.getLogger(__name__)

HIGH_WATER = 0.75    # a prompt past this share of its budget folds after its reply
# Before the first fold, earlier replies' memories are shown again in place (serve/chat.py) and the
# prompt grows by up to memory.budget_tokens more a turn: it folds sooner.
FIRST_HIGH_WATER = 0.6
LOW_WATER = 0.45     # a fold leaves a prompt of about this share (persona, summary, memories, turns)
# Less than this share to fold is left for later: with a persona and lorebook that fill most of the
# context, a fold after every reply would move the prefix every turn, as truncation does.
MIN_CHUNK = 0.15
TURN_OVERHEAD = 5    # tokens a chat template adds around a message
QUIET_PATIENCE_S = 2.0
HEADINGS = ("summary so far", "conversation:", "the updated summary", "rewrite the summary")
# Sentences about the task rather than the conversation ("In this rewriting, I've added ...").
ABOUT_THE_TASK = re.compile(r"\b(rewrit\w*|this version|the (original |new )?summary|at most \d+ sentences|"
                            r"in the third person)\b", re.IGNORECASE)
# The instruction comes last: small models otherwise go on with the conversation they are shown.
SYSTEM = "You write short summaries of conversations."
ASK = ("Summary so far: {so_far}\n\nConversation:\n{said}\n\nRewrite the summary so far to include the "
       "new conversation: at most {sentences} sentences, in the third person, about what {user} shared "
       "(names, places, plans, feelings), what was decided or promised, and where the conversation "
       "stands. Write only the summary.")


@dataclass
class Fold:
    conversation_id: str
    user: str
    companion: Companion
    called: str
    budget: int        # the prompt tokens a reply may use (the context less its max_tokens)
    prompt_tokens: int    # the last reply's prompt, how many turns of history it held, and
    history_kept: int     # whether it had a summary (else earlier replies' memories were in it)
    summarised: bool


class Folds:
    """The server's folds: which are waiting, and the one worker that writes them."""

    def __init__(self, chat: ChatService, enabled: bool = True, summary_tokens: int = 256):
        self.chat = chat
        self.enabled = chat.summaries = enabled
        chat.after_reply.append(self.after)
        self.summary_tokens = summary_tokens
        self.waiting: dict[str, Fold] = {}     # conversation id -> its fold, oldest first
        self.running: str | None = None
        self._worker: asyncio.Task | None = None
        self._last_user: str | None = None

    def folding(self, conversation_id: str) -> bool:
        return conversation_id == self.running or conversation_id in self.waiting

    def after(self, plan: Plan, conversation_id: str, prompt_tokens: int) -> None:
        """A reply of `plan` was stored in the conversation: fold it if its prompt neared the context."""
        turn = plan.turn
        if not self.enabled or turn.companion is None:
            return
        budget = self.chat.prompts.max_model_len - plan.params["max_tokens"]
        high = HIGH_WATER if plan.summary is not None else FIRST_HIGH_WATER
        if plan.prompt.history_dropped == 0 and prompt_tokens <= high * budget:
            return
        self.waiting[conversation_id] = Fold(conversation_id, turn.user, turn.companion, turn.called,
                                             budget, prompt_tokens, plan.prompt.history_kept,
                                             plan.summary is not None)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def _next(self) -> Fold:
        # Members take turns: the oldest fold of someone other than the last one served.
        fold = next((f for f in self.waiting.values() if f.user != self._last_user),
                    next(iter(self.waiting.values())))
        del self.waiting[fold.conversation_id]
        self._last_user = fold.user
        return fold

    async def _work(self) -> None:
        while self.waiting:
            fold = self._next()
            self.running = fold.conversation_id
            try:
                waited = 0.0   # a reply in flight goes first, for a moment
                while self.chat._streaming and waited < QUIET_PATIENCE_S:
                    await asyncio.sleep(0.05)
                    waited += 0.05
                more = await self.fold(fold)
                if more is not None:
                    metrics.FOLDS.labels("ok").inc()
                if more:   # a long backlog: a chunk at a time, behind the others' folds
                    self.waiting.setdefault(fold.conversation_id, fold)
            except EngineUnavailable as err:   # stopped, asleep for a training: its next reply asks again
                metrics.FOLDS.labels("failed").inc()
                log.info("summaries: conversation %s folds later: %s", fold.conversation_id, err)
            except Exception:   # the conversation goes on without; its next reply tries again
                metrics.FOLDS.labels("failed").inc()
                log.exception("summaries: could not fold conversation %s", fold.conversation_id)
            finally:
                self.running = None

    async def fold(self, fold: Fold) -> bool | None:
        """Fold the next chunk of the conversation's uncovered turns into its summary; True
        when more is left to fold than one fold could take, None when there was nothing to fold."""
        chunk = await asyncio.to_thread(self._chunk, fold)
        if chunk is None:
            return None
        said, summary, start, end, more = chunk
        so_far = summary.text if summary else ""
        plan = await asyncio.to_thread(self.chat.plan, self._request(fold, so_far, said[start:end]))
        text = ""
        async for item in self.chat.reply(plan, None):
            if isinstance(item, Done):
                text = cleaned(item.message.content, item.finish_reason, (fold.called, fold.companion.name))
        if not text:   # it only went on with the conversation: what the user said, in their words
            metrics.FOLDS.labels("extractive").inc()
            text = self._extract(fold, so_far, said[start:end])
        turns = [(m.role, m.content) for m in said[:end]]
        await asyncio.to_thread(Summaries(self.chat.db, fold.user).add, fold.conversation_id,
                                fold.companion.key, turns, said[end - 1].id, text)
        return more

    def _chunk(self, fold: Fold) -> tuple[list[Message], Summary | None, int, int, bool] | None:
        """(the conversation's non-empty messages, its summary so far, the turns to fold now
        [start:end], whether more is left), or None when nothing is to fold."""
        said = [m for m in History(self.chat.db, fold.user).messages(fold.conversation_id) if m.content]
        summary = Summaries(self.chat.db, fold.user).covering(fold.companion.key,
                                                              [(m.role, m.content) for m in said])
        start = summary.turns if summary else 0
        backend = self.chat.prompts.backend
        sizes = [len(e.ids) + TURN_OVERHEAD for e in backend.encode_batch(
            [m.content for m in said], add_special_tokens=False)]
        # What the last prompt held besides its turns (persona, memories, lore, the summary) stays:
        # the turns kept get what is left of LOW_WATER, with a full-sized summary. Without a summary
        # it also held the memories of earlier replies, before the turns they answered; no more after.
        first = max(0, len(said) - 1 - fold.history_kept)
        shown = sum(sizes[first:len(said) - 1])
        if not fold.summarised:
            recalled = ["\n".join(r["text"] for r in m.memories_used or ())
                        for m in said[first + 1:len(said) - 1]]
            shown += sum(len(e.ids) + TURN_OVERHEAD for e in backend.encode_batch(
                [text for text in recalled if text], add_special_tokens=False))
        old = len(self.chat.prompts.encode(summary.text)) if summary else 0
        room = LOW_WATER * fold.budget - max(0, fold.prompt_tokens - shown - old) - self.summary_tokens
        kept, used = len(said), 0
        while kept > 0 and used + sizes[kept - 1] <= room:
            kept -= 1
            used += sizes[kept]
        target = min(kept, len(said) - 2)   # the last exchange always stays as it was said
        if target <= start or sum(sizes[start:target]) < MIN_CHUNK * fold.budget:
            return None
        # One fold's prompt holds the summary so far, the chunk and the new summary.
        room = self.chat.prompts.max_model_len - 2 * self.summary_tokens - 300
        end, used = start, 0
        while end < target and (end == start or used + sizes[end] <= room):
            used += sizes[end]
            end += 1
        return said, summary, start, end, end < target

    def _request(self, fold: Fold, so_far: str, turns: list[Message]) -> Turn:
        said = _transcript(fold, turns)
        # Longer than the room in one fold's prompt (a message of 100,000 characters): its end is
        # what the conversation went on from.
        room = self.chat.prompts.max_model_len - 2 * self.summary_tokens - 300
        ids = self.chat.prompts.encode(said)
        if len(ids) > room:
            said = self.chat.prompts.tokenizer.decode(ids[-room:])
        ask = ASK.format(so_far=so_far.strip() or "(none yet)", said=said, user=fold.called,
                         sentences=max(3, self.summary_tokens // 40))
        return Turn(None, [{"role": "user", "content": ask}],
                    {"max_tokens": self.summary_tokens, "temperature": 0, "repetition_penalty": 1.1},
                    [SYSTEM], api="summary", user=fold.user)

    def _extract(self, fold: Fold, so_far: str, turns: list[Message]) -> str:
        """The summary so far and the first sentence of each of the user's messages, the newest
        kept where they are more than summary_tokens."""
        firsts = [f"{fold.called}: {_sentences(m.content)[0]}" for m in turns if m.role == "user"]
        lines = [so_far.strip(), *firsts] if so_far.strip() else firsts
        while len(lines) > 1 and len(self.chat.prompts.encode("\n".join(lines))) > self.summary_tokens:
            lines.pop(0)
        return "\n".join(lines)


def _transcript(fold: Fold, turns: list[Message]) -> str:
    names = {"user": fold.called, "assistant": fold.companion.name}
    return "\n".join(f"{names[m.role]}: {m.content}" for m in turns)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?…])\s+|\n+", text.strip()) if s.strip()] or [text.strip()]


def cleaned(text: str, finish_reason: str | None, speakers: tuple[str, ...]) -> str:
    """The model's summary without what small models add: lines that go on with the conversation
    ("Name: ..."), the request's own headings, sentences said twice, and (cut off by its token
    limit) a last sentence left unfinished."""
    lines = [line for line in text.strip().splitlines()
             if not line.strip().startswith(tuple(f"{name}:" for name in speakers))
             and not line.strip().lower().startswith(HEADINGS)]
    seen, kept = set(), []
    for sentence in _sentences("\n".join(lines)):
        if sentence.lower() not in seen and not ABOUT_THE_TASK.search(sentence):
            seen.add(sentence.lower())
            kept.append(sentence)
    if finish_reason == "length" and kept and not re.search(r"[.!?…][\"')\]]?$", kept[-1]):
        kept.pop()
    return " ".join(kept)
