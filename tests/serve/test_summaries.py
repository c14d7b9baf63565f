"""Long conversations: the turns that no longer fit the context fold into a running summary,
written by the real engine in the background, carried where those turns were, shown, edited,
and written again when a covered message is edited (serve/summaries.py, store/summaries.py)."""

from __future__ import annotations

import sqlite3

import httpx

from serve.summaries import cleaned
from tests.support.conversations import long_conversation, wait_for_summary


def ask(client, said: list[dict], content: str):
    return client.chat.completions.with_raw_response.create(
        model="ember", max_tokens=8, temperature=0, messages=[*said, {"role": "user", "content": content}])


def dropped(http: httpx.Client) -> float:
    """Turns left out of prompts that no summary covered, over the server's life (/metrics)."""
    line = next(line for line in http.get("/metrics").text.splitlines()
                if line.startswith("homefire_prompt_turns_dropped_total "))
    return float(line.split()[1])


def test_a_conversation_past_the_context_folds_into_a_summary_that_stands_where_its_turns_were(server):
    client, http = server.openai(), server.http()
    said = long_conversation()
    first = ask(client, said, "What did I plant on row 0?")
    conversation = first.headers["X-Homefire-Conversation"]
    full = first.parse()
    assert dropped(http) > 0   # the prompt was full: the oldest turns fell out, and a fold was asked for

    summary = wait_for_summary(http, conversation)
    stored = http.get(f"/api/v1/conversations/{conversation}").json()["messages"]
    ids = [m["id"] for m in stored]
    assert summary["first_message_id"] == ids[0] and summary["through_message_id"] in ids
    # A chunk is folded (not a turn), and the newest turns stay as they were said.
    assert 10 <= summary["turns"] <= len(stored) - 2 and summary["text"].strip()
    assert ids.index(summary["through_message_id"]) == summary["turns"] - 1

    # The next reply's prompt carries the summary instead of the covered turns: shorter than the
    # full prompt before, and nothing is left out that the summary does not cover.
    before = dropped(http)
    said += [{"role": "user", "content": "What did I plant on row 0?"},
             {"role": "assistant", "content": full.choices[0].message.content}]
    again = ask(client, said, "And what about Ada?")
    assert again.headers["X-Homefire-Conversation"] == conversation
    assert again.parse().usage.prompt_tokens < full.usage.prompt_tokens
    assert dropped(http) == before

    # Shown and put in the user's own words, through the API and the command line.
    edited = http.put(f"/api/v1/conversations/{conversation}/summary",
                      json={"text": "Sam keeps an allotment; Ada, the neighbour, keeps bees."})
    assert edited.status_code == 200 and edited.json()["edited"] is True
    shown = server.cli("memory", "summary", conversation)
    assert shown.returncode == 0, shown.stderr
    assert "Ada, the neighbour, keeps bees" in shown.stdout and "in your words" in shown.stdout
    empty = http.put(f"/api/v1/conversations/{conversation}/summary", json={"text": ""})
    assert empty.status_code == 400 and "text" in empty.json()["error"]["message"]

    # A covered message edited (a client resends it changed): that summary no longer fits, the
    # conversation forks, and the fork's own summary is written from the edited words.
    changed = [dict(m) for m in said]
    changed[2]["content"] = changed[2]["content"].replace("tomatoes", "sunflowers")
    forked = ask(client, changed, "And what about Ada?")
    fork = forked.headers["X-Homefire-Conversation"]
    assert fork != conversation
    assert forked.parse().usage.prompt_tokens > again.parse().usage.prompt_tokens
    rewritten = wait_for_summary(http, fork)
    assert rewritten["id"] != summary["id"] and rewritten["conversation_id"] == fork
    assert not rewritten["edited"]

    # Deleting a conversation deletes its summaries.
    assert http.delete(f"/api/v1/conversations/{conversation}").status_code == 204
    assert http.get(f"/api/v1/conversations/{conversation}/summary").status_code == 404
    db = sqlite3.connect(f"file:{server.data_dir / 'homefire.db'}?mode=ro", uri=True)
    try:
        left = db.execute("SELECT conversation_id FROM summaries").fetchall()
    finally:
        db.close()
    assert (conversation,) not in left and (fork,) in left


def test_a_conversation_that_fits_has_no_summary_and_cannot_be_given_one(server):
    http = server.http()
    made = http.post("/api/v1/conversations", json={"companion": "ember"}).json()
    conversation = made["conversation"]["id"]
    assert http.get(f"/api/v1/conversations/{conversation}/summary").json() == {"summary": None,
                                                                               "folding": False}
    refused = http.put(f"/api/v1/conversations/{conversation}/summary", json={"text": "made up"})
    assert refused.status_code == 409 and "no summary yet" in refused.json()["error"]["message"]
    shown = server.cli("memory", "summary", conversation)
    assert shown.returncode == 0 and "no summary yet" in shown.stdout


def test_what_a_small_model_adds_to_a_summary_is_cleaned_away():
    names = ("Sam", "Ember")
    went_on = ("Sam: Day 4: I went to the library.\nEmber: Oh, lovely!\n\nSam met Ada. Sam met Ada.\n"
               "The updated summary:")
    assert cleaned(went_on, "stop", names) == "Sam met Ada."
    assert cleaned("Sam went to the market. He met Ada and", "length", names) == "Sam went to the market."
    assert cleaned("Sam: hi\nEmber: hello", "stop", names) == ""   # then the user's own words are kept
    about = ("At most 6 sentences, in the third person, about what Sam shared:\n\nSam planted tomatoes. "
             "In this rewriting, I've added a few details to the original summary.")
    assert cleaned(about, "stop", names) == "Sam planted tomatoes."
