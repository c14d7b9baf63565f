"""Which of a companion's lorebook entries (store/lorebook.py) a prompt carries, and where.

An entry fires when the newest messages (the book's scan depth, 2 by default) name one of
its keys: plain words match anywhere (case-insensitive unless the entry says), `/regex/flags`
keys and V3 `use_regex` entries as regular expressions; `selective` entries also need a
secondary key (SillyTavern's selectiveLogic kept), `constant` ones always fire. The fired
entries of one message, in insertion order, stay within the book's token budget (the lowest
priority goes first).

Where, chosen for vLLM's prefix cache: constant entries in the system message (before or after
the character's description, as they say), which stays the same from turn to turn; an entry a
message set off just before that message, where it stays on later turns while the message is
in the prompt (shown once: not again for a later message); `@@depth N` entries (SillyTavern's
"at depth") N messages from the newest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import regex

from store.companions import Companion
from store.lorebook import Lorebook, LoreEntry, chosen, decorators

log = logging.getLogger(__name__)

DEFAULT_SCAN_DEPTH = 2
DEFAULT_BUDGET = 512      # tokens the entries fired by one message may take
RECURSION_PASSES = 3
SLASHED = re.compile(r"^/(.+)/([a-z]*)$", re.S)
ST_AT_DEPTH = 4           # SillyTavern's extensions.position for "@ depth"
# Keys come from cards and members: a key like (a+)+$ must not hold a CPU for long. Past this,
# the key counts as not matching (the `regex` module stops a search at a time limit; `re` cannot).
REGEX_TIMEOUT_S = 0.02
# And a whole book's scan for one message stops here (a member's book of thousands of such keys
# must not either): the entries not reached do not fire, and the log says so.
SCAN_BUDGET_S = 0.25
# A prompt's whole placement (a resent conversation scans each earlier message once): past this,
# older messages go without their entries.
PLACE_BUDGET_S = 1.0
NEVER = regex.compile(r"(?!)")


@dataclass(frozen=True)
class Fired:
    handle: str            # the entry's id, or #index
    label: str
    text: str              # the content as the prompt shows it
    why: str               # "key 'Eldoria'", "constant", ...
    order: float
    before_char: bool
    depth: int | None      # @@depth: that many messages from the newest
    constant: bool         # fires on every turn: its place is the system message

    def used(self) -> dict:
        """As a reply's metadata names it."""
        where = (f"depth {self.depth}" if self.depth is not None else "persona" if self.constant
                 else "before the message")
        return {"entry": self.handle, "name": self.label, "why": self.why, "where": where}


@dataclass
class Lore:
    """A prompt's entries: the system message's, each user message's (by history index), and
    those at a depth; `used` names what the newest message fired, for the reply's metadata."""

    before_char: list[str] = field(default_factory=list)
    after_char: list[str] = field(default_factory=list)
    at: dict[int, list[Fired]] = field(default_factory=dict)
    depth: list[tuple[int, str]] = field(default_factory=list)
    used: list[Fired] = field(default_factory=list)


@lru_cache(maxsize=4096)
def _parsed(content: str) -> tuple[dict[str, str], str]:
    found, text = decorators(content)
    return chosen(found)[0], text


@lru_cache(maxsize=4096)
def _pattern(key: str, use_regex: bool, case: bool, whole: bool) -> regex.Pattern | None:
    """A key as a compiled pattern; None: a plain key (matched by `in`). An invalid regex never
    matches, as V3 asks."""
    slashed = SLASHED.match(key)
    try:
        if slashed:
            flags = regex.I if "i" in slashed[2] else 0
            return regex.compile(slashed[1], flags | (regex.S if "s" in slashed[2] else 0))
        if use_regex:
            return regex.compile(key, 0 if case else regex.I)
        if whole:
            return regex.compile(rf"(?<!\w){regex.escape(key)}(?!\w)", 0 if case else regex.I)
    except (regex.error, ValueError):
        return NEVER
    return None


def _matching(keys: list[str], text: str, folded: str, regex: bool, case: bool, whole: bool,
              deadline: float = float("inf")) -> str | None:
    for key in keys:
        key = key.strip()
        if not key:
            continue
        pattern = _pattern(key, regex, case, whole)
        if pattern is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                if pattern.search(text, timeout=min(REGEX_TIMEOUT_S, left)):
                    return key
            except TimeoutError:
                continue
        elif (key in text) if case else (key.lower() in folded):
            return key
    return None


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class _Scan:
    """The text an entry is matched against, by scan depth (texts of the newest messages)."""

    def __init__(self, history: list[dict]):
        self.history = history
        self.cache: dict[int, tuple[str, str]] = {}
        self.extra = ""   # fired entries' contents, with recursive scanning
        self.deadline = time.monotonic() + SCAN_BUDGET_S

    def text(self, depth: int) -> tuple[str, str]:
        if depth not in self.cache:
            text = "\n".join(m["content"] for m in self.history[len(self.history) - depth:] if depth)
            self.cache[depth] = (text, text.lower())
        text, folded = self.cache[depth]
        if not self.extra:
            return text, folded
        return text + "\n" + self.extra, folded + "\n" + self.extra.lower()


def _fires(book: Lorebook, entry: LoreEntry, scan: _Scan, replies: int) -> str | None:
    """Why the entry fires for these messages, or None."""
    acted, text = _parsed(entry.content)
    if not entry.enabled or not text.strip():
        return None
    ext = entry.extensions
    try:
        after = int(acted.get("activate_only_after", 0) or 0)
        every = int(acted.get("activate_only_every", 0) or 0)
        depth = int(acted.get("scan_depth") or ext.get("scan_depth") or
                    (book.scan_depth if book.scan_depth is not None else DEFAULT_SCAN_DEPTH))
    except ValueError:
        after, every, depth = 0, 0, DEFAULT_SCAN_DEPTH
    if "activate" in acted:
        return "@@activate"
    if "dont_activate" in acted or replies < after or (every > 0 and replies % every):
        return None
    if entry.constant:
        return "constant"
    case = entry.case_sensitive if entry.case_sensitive is not None else bool(ext.get("case_sensitive"))
    regex, whole = bool(entry.use_regex), bool(ext.get("match_whole_words"))
    text_, folded = scan.text(depth)
    key = _matching(entry.keys, text_, folded, regex, case, whole, scan.deadline)
    if key is None:
        return None
    if "additional_keys" in acted and _matching(_split(acted["additional_keys"]), text_, folded,
                                                regex, case, whole, scan.deadline) is None:
        return None
    if "exclude_keys" in acted and _matching(_split(acted["exclude_keys"]), text_, folded,
                                             regex, case, whole, scan.deadline) is not None:
        return None
    secondary = [k for k in entry.secondary_keys or () if k.strip()]
    if entry.selective and secondary:
        hits = [_matching([k], text_, folded, regex, case, whole, scan.deadline) is not None
                for k in secondary]
        logic = ext.get("selectiveLogic", 0)
        if not {0: any(hits), 1: not all(hits), 2: not any(hits), 3: all(hits)}.get(logic, any(hits)):
            return None
    return f"key {key!r}"


def fire(book: Lorebook | None, history: list[dict], count_tokens: Callable[[str], int],
         substitute: Callable[[str], str] = lambda text: text) -> list[Fired]:
    """The entries that the newest message of history (oldest first) sets off, in insertion
    order, within the book's token budget."""
    if book is None or not book.entries or not history:
        return []
    scan, replies = _Scan(history), sum(m["role"] == "assistant" for m in history)
    fired: dict[int, str] = {}
    for _ in range(RECURSION_PASSES if book.recursive_scanning else 1):
        new = {}
        for i, entry in enumerate(book.entries):
            if time.monotonic() > scan.deadline:
                log.warning("lorebook %r: its scan took over %.2f s; %d of its %d entries were not "
                            "checked", book.name, SCAN_BUDGET_S, len(book.entries) - i, len(book.entries))
                break
            if i in fired or (scan.extra and entry.extensions.get("exclude_recursion")):
                continue
            if why := _fires(book, entry, scan, replies):
                new[i] = why
        if not new:
            break
        fired |= new
        scan.extra = "\n".join(_parsed(book.entries[i].content)[1] for i in sorted(fired)
                               if not book.entries[i].extensions.get("prevent_recursion"))
    chosen_ = [_fired(book.entries[i], i, why, substitute) for i, why in fired.items()]
    chosen_.sort(key=lambda f: f.order)
    budget = book.token_budget if book.token_budget is not None else DEFAULT_BUDGET
    sizes = {f.handle: count_tokens(f.text) for f in chosen_}
    dropping = sorted(chosen_, key=lambda f: (_priority(book, f), f.order))
    while chosen_ and sum(sizes[f.handle] for f in chosen_) > budget:
        chosen_.remove(dropping.pop(0))
    return chosen_


def _priority(book: Lorebook, fired: Fired) -> float:
    entry = next(e for i, e in enumerate(book.entries) if e.handle(i) == fired.handle)
    return entry.priority if entry.priority is not None else fired.order


def _fired(entry: LoreEntry, index: int, why: str, substitute: Callable[[str], str]) -> Fired:
    acted, text = _parsed(entry.content)
    ext, depth = entry.extensions, None
    if "depth" in acted:
        try:
            depth = max(0, int(acted["depth"]))
        except ValueError:
            depth = None
    elif ext.get("position") == ST_AT_DEPTH:
        depth = ext.get("depth")
        depth = max(0, int(depth)) if isinstance(depth, int | float) else 4
    return Fired(entry.handle(index), entry.label(index), substitute(text.strip()), why,
                 entry.insertion_order, entry.position == "before_char" or ext.get("position") == 0,
                 depth, why in ("constant", "@@activate"))


class LoreCache:
    """What each message fired, remembered (an LRU by the book and the messages it scanned), so a
    long conversation's earlier messages are not scanned again on every turn."""

    def __init__(self, size: int = 8192):
        self.size, self.seen = size, OrderedDict()

    def fired(self, book: Lorebook, fingerprint: str, history: list[dict], widest: int, count_tokens,
              substitute) -> list[Fired]:
        """What history's newest message fires; `widest`: the book's widest scan depth."""
        scanned = "\0".join(m["content"] for m in history[len(history) - widest:] if widest)
        key = (fingerprint, sum(m["role"] == "assistant" for m in history),
               hashlib.blake2b(scanned.encode(), digest_size=16).digest())   # not the texts: bounded
        if key in self.seen:
            self.seen.move_to_end(key)
            return self.seen[key]
        found = self.seen[key] = fire(book, history, count_tokens, substitute)
        if len(self.seen) > self.size:
            self.seen.popitem(last=False)
        return found


def widest_scan(book: Lorebook) -> int:
    """The most messages any entry of the book looks back at."""
    depths = [book.scan_depth if book.scan_depth is not None else DEFAULT_SCAN_DEPTH]
    for entry in book.entries:
        own = _parsed(entry.content)[0].get("scan_depth") or entry.extensions.get("scan_depth")
        if str(own or "").isdigit():
            depths.append(int(own))
    return max(depths)


def fingerprint(companion: Companion, user: str) -> str:
    """What a cached scan depends on besides the messages: the book and the names it substitutes.
    A stored companion's card has a hash already; another one's book is hashed here."""
    book = companion.character_book
    card = companion.stored_hash if companion.stored_hash is not None else book.model_dump_json()
    return f"{companion.key}\0{companion.name}\0{user}\0{hash(card)}"


def place(book: Lorebook | None, fingerprint: str, history: list[dict], cache: LoreCache,
          count_tokens, substitute) -> Lore:
    """The lore of a prompt for `history` (oldest first, ending with the newest message)."""
    lore = Lore()
    if book is None or not book.entries:
        return lore
    widest, deadline = widest_scan(book), time.monotonic() + PLACE_BUDGET_S
    for index in range(len(history) - 1, -1, -1):   # the newest first: it matters most
        if history[index]["role"] != "user":
            continue
        if time.monotonic() > deadline:
            log.warning("lorebook %r: placing its entries took over %.1f s; messages before #%d go "
                        "without theirs", book.name, PLACE_BUDGET_S, index + 1)
            break
        fired = cache.fired(book, fingerprint, history[:index + 1], widest, count_tokens, substitute)
        lore.at[index] = [f for f in fired if not f.constant and f.depth is None]
        if index == len(history) - 1:
            lore.used = fired
            lore.before_char = [f.text for f in fired if f.constant and f.depth is None and f.before_char]
            lore.after_char = [f.text for f in fired if f.constant and f.depth is None and not f.before_char]
            lore.depth = [(f.depth, f.text) for f in fired if f.depth is not None]
    return lore
