"""Lorebooks: which entries the recent messages set off, and where the prompt carries them, with
the embedded model's real tokenizer and chat template (serve/lore.py, serve/prompt.py)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from serve.lore import LoreCache, fire, place
from serve.prompt import PromptBuilder
from store.cards import card_to_companion
from store.companions import Companion
from store.lorebook import Lorebook
from store.persona import substitute
from tests.support.cards import SERAPHINA_WORLD, sillytavern_card


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def entry(keys, content, **more) -> dict:
    return {"keys": keys, "content": content, "enabled": True, "insertion_order": 100,
            "extensions": {}} | more


def said(*texts: str) -> list[dict]:
    """A conversation of these messages, the user's first and every other one."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def fired(book: dict, *texts: str, tokens=None) -> list[str]:
    count = tokens or (lambda text: len(text.split()))
    return [f.text for f in fire(Lorebook.model_validate(book), said(*texts), count)]


def test_keys_secondary_keys_regex_and_constant_decide_what_fires():
    book = {"entries": [
        entry(["Eldoria"], "forest"),                                        # plain: any case
        entry(["Moon"], "moon", case_sensitive=True),
        entry(["/shadow ?wolf/i"], "wolves"),                                # SillyTavern's regex keys
        entry(["^lighthouse\\b"], "lighthouse", use_regex=True),             # V3 use_regex
        entry(["(unclosed"], "never", use_regex=True),                       # invalid: never a match
        entry(["amulet"], "amulet", selective=True, secondary_keys=["blue", "glow"]),
        entry(["river"], "river", selective=True, secondary_keys=["boat"], extensions={"selectiveLogic": 2}),
        entry([], "always", constant=True),
        entry(["eldoria"], "disabled", enabled=False),
        entry(["cat"], "whole", extensions={"match_whole_words": True}),
        entry(["/(a+)+$/"], "slow"),      # catastrophic backtracking: stopped at its time limit
    ]}
    assert fired(book, "I walked in ELDORIA and saw the moon") == ["forest", "always"]
    assert fired(book, "a Moon, a ShadowWolf") == ["moon", "wolves", "always"]
    assert fired(book, "lighthouse ahead") == ["lighthouse", "always"]
    assert fired(book, "the old lighthouse") == ["always"]
    assert fired(book, "her amulet") == ["always"]
    assert fired(book, "her amulet began to GLOW") == ["amulet", "always"]
    assert fired(book, "down the river") == ["river", "always"]          # NOT_ANY: no boat
    assert fired(book, "down the river by boat") == ["always"]
    assert fired(book, "a" * 40 + "!") == ["always"]
    assert fired(book, "a category") == ["always"] and fired(book, "my cat!") == ["always", "whole"]


def test_scan_depth_decorators_recursion_order_and_budget():
    # The default scan depth is the two newest messages; the book's or an entry's own may be wider.
    book = {"entries": [entry(["dragon"], "dragons")]}
    assert fired(book, "a dragon", "hm", "go on") == []
    assert fired(book | {"scan_depth": 3}, "a dragon", "hm", "go on") == ["dragons"]
    own = {"entries": [entry(["dragon"], "@@scan_depth 3\ndragons")]}
    assert fired(own, "a dragon", "hm", "go on") == ["dragons"]
    # @@activate_only_after counts the companion's replies; @@exclude_keys vetoes; @@activate wins.
    book = {"entries": [entry(["storm"], "@@activate_only_after 2\nstorms"),
                        entry(["ship"], "@@exclude_keys wreck, ruin\nships"),
                        entry(["nothing"], "@@dont_activate\n@@activate\nforced")]}
    assert fired(book, "storm ship wreck") == ["forced"]
    assert fired(book, "a", "b", "c", "d", "storm and ship") == ["storms", "ships", "forced"]
    # With recursive scanning, an entry's content sets off others.
    chain = {"entries": [entry(["king"], "The king lives in Aldor."), entry(["Aldor"], "Aldor is a city.")]}
    assert fired(chain, "the king") == ["The king lives in Aldor."]
    assert fired(chain | {"recursive_scanning": True}, "the king") == [
        "The king lives in Aldor.", "Aldor is a city."]
    # Insertion order decides the order; over the budget the lowest priority goes first.
    book = {"token_budget": 6, "entries": [
        entry(["a"], "three words one", insertion_order=30, priority=1),
        entry(["a"], "three words two", insertion_order=10, priority=9),
        entry(["a"], "three words three", insertion_order=20, priority=5)]}
    assert fired(book, "a") == ["three words two", "three words three"]


def seraphina() -> Companion:
    return card_to_companion(sillytavern_card("Seraphina", "Eldoria", SERAPHINA_WORLD))


def lore_for(companion: Companion, history: list[dict], builder: PromptBuilder, cache: LoreCache):
    return place(companion.character_book, "seraphina", history, cache, lambda t: len(builder.encode(t)),
                 lambda t: substitute(t, companion, "Sam"))


def test_entries_sit_where_they_say_and_keep_the_cached_prefix(tokenizer):
    companion, builder, cache = seraphina(), PromptBuilder(tokenizer, 4096), LoreCache()
    turns = said("hello there", "Hello.", "what is this forest called?")
    lore = lore_for(companion, turns, builder, cache)
    first = builder.build(companion, turns, 64, user="Sam", lore=lore)
    system = first.messages[0]["content"]
    # The constant entry is in the system message, before the description (position 0: before_char).
    assert system.index("Seraphina never lies to Sam.") < system.index("Seraphina is a healer")
    # The fired one just before the message that set it off.
    forest = first.text.index("Eldoria is an ancient forest")
    assert forest < first.text.index("what is this forest called?")
    assert [f.used()["entry"] for f in lore.used] == ["2", "0"]
    assert [f.used()["where"] for f in lore.used] == ["persona", "before the message"]

    # Next turn: the forest is named again, and the amulet (after_char). The forest entry is not
    # shown twice, and the whole first prompt, up to its generation prompt, is the second's prefix.
    later = turns + [{"role": "assistant", "content": "It is Eldoria."},
                     {"role": "user", "content": "tell me about the forest and your amulet"}]
    lore = lore_for(companion, later, builder, cache)
    second = builder.build(companion, later, 64, user="Sam", lore=lore)
    assert second.text.count("Eldoria is an ancient forest") == 1
    assert second.text.startswith(first.text.removesuffix("<|im_start|>assistant\n"))
    newest = second.text.rindex("tell me about the forest")
    amulet = second.text.rindex("Seraphina's amulet glows blue", 0, newest)
    assert amulet > second.text.rindex("It is Eldoria.")
    # The shadow wolves need the moon as well (selective); the river's entry is disabled.
    wolves = lore_for(companion, said("a shadow wolf!"), builder, cache)
    assert "Shadow wolves" not in " ".join(f.text for f in wolves.used)
    wolves = lore_for(companion, said("a shadow wolf under the moon, by the river"), builder, cache)
    assert [f.handle for f in wolves.used] == ["2", "3"]


def test_an_entry_at_depth_sits_that_many_messages_from_the_newest(tokenizer):
    book = {"entries": [entry(["tea"], "@@depth 2\nJasmine tea at dusk."),
                        entry(["tea"], "Brewed strong.", extensions={"position": 4, "depth": 0})]}
    companion = Companion(id="maris", name="Maris", character_book=book)
    builder = PromptBuilder(tokenizer, 4096)
    turns = said("one", "two", "three", "four", "some tea?")
    lore = lore_for(companion, turns, builder, LoreCache())
    prompt = builder.build(companion, turns, 64, lore=lore)
    at = [m["content"] for m in prompt.messages[1:]]
    assert at.index("Jasmine tea at dusk.") == at.index("four") - 1 and at[-1] == "Brewed strong."


def test_a_long_conversations_earlier_messages_are_not_scanned_again(tokenizer):
    companion, builder, cache = seraphina(), PromptBuilder(tokenizer, 4096), LoreCache()
    turns = said(*[f"message {i} about the forest" for i in range(41)])
    lore_for(companion, turns, builder, cache)
    assert len(cache.seen) == 21                    # one scan per user message
    later = turns + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "the amulet?"}]
    lore_for(companion, later, builder, cache)
    assert len(cache.seen) == 22                    # the next turn scans its new message only


def test_an_entry_many_messages_set_off_is_counted_once_so_no_turn_that_fits_is_dropped(tokenizer):
    # Shown once, where it first fired; counted at every message that fired it, the estimate would
    # drop turns that fit (and move the prefix the cache keeps from turn to turn).
    book = {"entries": [entry(["forest"], "The forest of Eldoria is old. " * 25)]}
    companion = Companion(id="maris", name="Maris", character_book=book)
    builder, cache = PromptBuilder(tokenizer, 1024), LoreCache()
    turns = said(*[f"more about the forest, part {i}" if i % 2 == 0 else f"the forest, reply {i}"
                   for i in range(21)])
    prompt = builder.build(companion, turns, 64, lore=lore_for(companion, turns, builder, cache))
    assert prompt.token_ids is not None and len(prompt.token_ids) < 1024 - 64
    assert prompt.history_dropped == 0 and prompt.text.count("The forest of Eldoria is old.") == 25
