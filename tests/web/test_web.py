"""The web app in a real browser (Chromium through Playwright) against a real server on the
embedded model: sign in, talk (streaming, stop, memories used), memory, bringing an export
home, teaching the voice, accounts and isolation, text that looks like markup, a world's
entries, and what a long conversation keeps in mind.

Every test also checks (in the `tab` fixture) that the page asked nothing of another host
and raised no error. Screenshots: .cache/screenshots/.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack
from pathlib import Path

from playwright.sync_api import expect

from serve.bundle import read_bundle
from store.cards import parse_card
from tests.support.cards import SERAPHINA_WORLD, png_with_chara, sillytavern_card
from tests.support.conversations import long_conversation, wait_for_summary
from tests.support.exports import ChatGPTTree, card_png, chatgpt_simple, chatgpt_zip

MARKUP = "<img src=x onerror=alert(1)>"


def import_jsonl(web, companion: str, conversations: list[list[tuple[str, str]]], tmp_path: Path) -> None:
    """History for the owner through the real import API (plain JSONL)."""
    lines = [json.dumps({"id": f"{companion}-{i}", "title": f"Chat {i}",
                         "messages": [{"role": role, "content": text} for role, text in turns]})
             for i, turns in enumerate(conversations)]
    with web.http() as http:
        answer = http.post(f"/api/v1/companions/{companion}/imports", params={"filename": "history.jsonl"},
                           content="\n".join(lines).encode())
    assert answer.status_code == 200, answer.text


def new_companion(web, companion_id: str, **fields) -> None:
    with web.http() as http:
        answer = http.post("/api/v1/companions",
                           json={"id": companion_id, "name": companion_id.title(), **fields})
    assert answer.status_code in (201, 409), answer.text


def test_sign_in_talk_watch_it_stream_and_open_the_memories_it_used(tab, web):
    t = tab()
    response = t.page.goto(web.url + "/")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    page = t.page
    page.fill("#key", "hf_not-a-key")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("not known")
    t.shot("sign-in")
    assert "hf_not-a-key" not in page.url
    page.fill("#key", web.key)
    page.click("button[type=submit]")
    expect(page.locator(".card.companion[data-id=ember]")).to_be_visible()
    t.shot("companions")

    with web.http() as http:
        fact = http.post("/api/v1/companions/ember/memories", json={"text": "My cat is called Miso."})
    assert fact.status_code == 201, fact.text
    page.locator(".card.companion[data-id=ember]").get_by_text("Talk").click()
    expect(page.locator(".message.assistant").first).to_be_visible()   # the greeting
    # Every length the reply's text had while it streamed.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const text = document.querySelector('.message.streaming .text');
            if (text) window.lengths.push(text.textContent.length);
        }).observe(document.querySelector('.messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#message", "What is my cat called?")
    page.keyboard.press("Enter")   # Enter sends
    reply = page.locator(".message.assistant:not(.streaming)").nth(1)
    expect(reply).to_be_visible(timeout=120_000)
    lengths = [n for n in page.evaluate("window.lengths") if n]
    assert len(set(lengths)) >= 2, f"the reply did not arrive in pieces: {lengths}"
    assert page.locator(".message.user .text").last.text_content() == "What is my cat called?"

    reply.locator(".memories-used summary").click()
    used = reply.locator(".memories-used a", has_text="Miso")
    expect(used).to_be_visible()
    expect(reply.locator(".memories-used li").first).not_to_contain_text("deleted")
    # Why it was recalled: the fact matched, with its similarity.
    expect(reply.locator(".memories-used li", has_text="Miso").locator(".why")).to_contain_text(
        re.compile(r"the fact matched \(0\.\d\d\)"))
    t.shot("chat-memories-used")

    # Regenerate: the new reply takes the old one's place, here and on the server.
    old = reply.locator(".text").text_content()
    reply.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".message.assistant:not(.streaming):not([hidden])")).to_have_count(2, timeout=120_000)
    with web.http() as http:
        conversation = http.get("/api/v1/conversations", params={"companion": "ember"}).json()[0]["id"]
        stored = http.get(f"/api/v1/conversations/{conversation}").json()["messages"]
    assert [m["role"] for m in stored] == ["assistant", "user", "assistant"]
    assert page.locator(".message.assistant .text").last.text_content() == stored[-1]["content"]
    print(f"regenerated: {old!r} -> {stored[-1]['content']!r}")
    reply = page.locator(".message.assistant").last
    reply.locator(".memories-used summary").click()
    used.click()
    expect(page.locator(".memory.focus")).to_contain_text("My cat is called Miso.")

    # Shift+Enter is a new line, not a send.
    page.goto(web.url + "/#/chat/ember")
    page.fill("#message", "one")
    page.press("#message", "Shift+Enter")
    page.keyboard.type("two")
    assert page.input_value("#message") == "one\ntwo"


def first_delta(http, conversation: str, stack: ExitStack):
    """Open a streamed reply and read it up to its first token; it goes on until stack closes.
    Keep what it returns: a line reader that is dropped closes its connection."""
    response = stack.enter_context(http.stream(
        "POST", f"/api/v1/conversations/{conversation}/messages", json={"content": "Go on.", "stream": True}))
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    while not next(lines).startswith("event: delta"):
        pass
    return lines


def test_a_busy_server_says_so_with_a_retry_and_a_reply_stops_while_it_streams(tab, web):
    # Hot sampling and a long limit: a reply goes on well past the click on Stop.
    new_companion(web, "rambler", sampling={"temperature": 2.0, "top_p": 1.0, "max_tokens": 1000})
    t = tab()
    page = t.sign_in()
    page.goto(web.url + "/#/chat/rambler")
    expect(page.locator(".conversations li")).to_have_count(1)
    with web.http() as http, ExitStack() as streams:
        # Four replies for this user already being written (limits.max_streams_per_user).
        readers = []
        for _ in range(4):
            conversation = http.post("/api/v1/conversations", json={"companion": "rambler"}).json()
            readers.append(first_delta(http, conversation["conversation"]["id"], streams))
        page.fill("#message", "Tell me a very long story about the sea.")
        page.click("#send")
        busy = page.locator(".message.error")
        expect(busy).to_contain_text("Too busy for now: 4 replies are already being written for you")
        t.shot("chat-busy")
    with web.http() as http:   # wait for the state: the server has let the four go
        conversation = http.post("/api/v1/conversations", json={"companion": "rambler"}).json()
        url = f"/api/v1/conversations/{conversation['conversation']['id']}/messages"
        for _ in range(300):
            if http.post(url, json={"content": "Hi", "max_tokens": 1}).status_code == 200:
                break
            time.sleep(0.1)   # a poll, not a guess: the loop ends on the state
    busy.get_by_role("button", name="Retry").click()
    expect(busy).to_have_count(0)
    # (Locators, not wait_for_function: the page's CSP forbids the eval that one needs.)
    expect(page.locator(".message.streaming .text")).not_to_be_empty(timeout=120_000)
    page.click("#stop")
    expect(page.locator(".message.assistant .hint", has_text="(stopped)")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    assert page.locator(".message.streaming").count() == 0
    t.shot("chat-stopped")



def test_a_reply_the_engine_cut_off_says_when_to_try_again(tab, web):
    """A stream's error comes after its 200, so its status is in the event, not the response:
    a paused engine's must read as the 503 it is, with its "try again" (it read as a bare message)."""
    from serve.engine import EngineUnavailable
    from serve.errors import stream_error
    from serve.sse import event

    t = tab()
    page = t.sign_in()
    page.goto(web.url + "/#/chat/ember")
    expect(page.locator(".conversations li")).not_to_have_count(0)
    # The bytes the server sends when its engine is paused after a reply began (serve.errors),
    # in place of this one reply: the engine is not paused for a test of the page.
    cut = event(stream_error(EngineUnavailable("a companion is learning its voice", 7)), "error")
    page.route("**/messages", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                          body=cut))
    page.fill("#message", "Are you there?")
    page.click("#send")
    expect(page.locator(".message.error")).to_contain_text(
        "a companion is learning its voice. Try again in about 7 s.")
    t.shot("chat-engine-paused")

def test_add_edit_pin_search_and_delete_a_fact(tab, web):
    t = tab()
    page = t.sign_in()
    page.goto(web.url + "/#/memory/ember")
    page.fill("textarea[name=fact]", "I am allergic to walnuts.")
    page.click(".add-fact button[type=submit]")
    row = page.locator("li.memory.fact", has_text="allergic to walnuts")
    expect(row).to_be_visible()
    memory_id = row.get_attribute("data-id")
    row = page.locator(f"li.memory[data-id='{memory_id}']")

    row.get_by_role("button", name="Edit").click()
    row.locator("textarea").fill("I am allergic to walnuts and pecans.")
    row.get_by_role("button", name="Save").click()
    expect(row.locator(".text")).to_have_text("I am allergic to walnuts and pecans.")
    with web.http() as http:
        stored = http.get(f"/api/v1/memories/{memory_id}").json()
    assert stored["text"] == "I am allergic to walnuts and pecans."

    row.get_by_role("button", name="Pin").click()
    expect(row.locator(".badge")).to_have_text("pinned")
    page.select_option("select[name=filter]", "pinned")
    expect(page.locator("li.memory")).to_have_count(1)
    page.select_option("select[name=filter]", "")
    page.fill("input[type=search]", "which nuts should I avoid")
    expect(page.locator("li.memory").first).to_have_attribute("data-id", memory_id)
    t.shot("memory")

    page.locator(f"li.memory[data-id='{memory_id}']").get_by_role("button", name="Delete", exact=True).click()
    expect(page.locator(f"li.memory[data-id='{memory_id}']")).to_have_count(0)
    assert any(d.startswith("confirm") for d in t.dialogs)
    with web.http() as http:
        assert http.get(f"/api/v1/memories/{memory_id}").status_code == 404


def test_bring_a_chatgpt_export_home_with_its_dry_run_and_progress(tab, web, tmp_path):
    new_companion(web, "hearth")
    rex = ChatGPTTree("c-rex", "Rex")
    rex.add("root", "user", content={"content_type": "user_editable_context", "user_profile": "",
                                     "user_instructions": "Be warm and brief."},
            metadata={"is_visually_hidden_from_conversation": True})
    rex.say(("user", "I adopted a dog named Rex yesterday."), ("assistant", "Rex! What a good name."))
    export = chatgpt_zip(tmp_path / "chatgpt-export.zip", [
        rex.export(),
        chatgpt_simple("c-berlin", ("user", "I am moving to Berlin next month."),
                       ("assistant", "Berlin! Big news."), ("user", "Help me pack?"),
                       ("assistant", "Books first."), title="Berlin")])
    t = tab()
    page = t.sign_in()
    page.goto(web.url + "/#/import/hearth")
    page.set_input_files(".drop input[type=file]", str(export))
    expect(page.locator("#run-import")).to_be_visible()
    expect(page.locator("dd.conversations")).to_have_text("2")
    expect(page.locator("dd.messages-count")).to_have_text("6")
    expect(page.locator(".import-result")).to_contain_text("Nothing is written yet")
    expect(page.locator(".persona blockquote")).to_have_text("Be warm and brief.")
    t.shot("import-dry-run")
    page.get_by_role("button", name="Apply to the card").click()
    expect(page.locator(".persona .notice.ok")).to_contain_text("Added to Hearth's description")
    with web.http() as http:
        assert http.get("/api/v1/companions/hearth").json()["description"] == "Be warm and brief."
    with web.http() as http:
        assert http.get("/api/v1/conversations", params={"companion": "hearth"}).json() == []

    page.evaluate("""() => {
        window.progress = [];
        new MutationObserver((records) => records.forEach((r) => {
            const node = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
            const words = node?.closest('.progress-words');
            if (words) window.progress.push(words.textContent);
        })).observe(document.querySelector('.import-result'),
                    {subtree: true, childList: true, characterData: true});
    }""")
    page.click("#run-import")
    expect(page.get_by_role("heading", name="Imported")).to_be_visible(timeout=120_000)
    progress = page.evaluate("window.progress")
    assert any(" of " in words for words in progress), progress
    t.shot("import-done")
    with web.http() as http:
        conversations = http.get("/api/v1/conversations", params={"companion": "hearth"}).json()
        assert sorted(c["title"] for c in conversations) == ["Berlin", "Rex"]
        found = http.get("/api/v1/companions/hearth/memories/search", params={"q": "my dog"}).json()
        assert "Rex" in found[0]["text"]


def test_teach_the_voice_and_read_the_new_versions_report(tab, web, tmp_path):
    topics = ["the rain", "my job", "dinner", "a film", "the garden", "music", "my sister", "the train"]
    new_companion(web, "kit", personality="A sleepy, gentle cat.")
    conversations = [[turn for topic in (topics * 2)[i:i + 4] for turn in (
        ("user", f"Day {i}: what do you think about {topic}?"),
        ("assistant", f"oh, {topic} sounds cozy to me. ~ purr ~"))] for i in range(12)]
    import_jsonl(web, "kit", conversations, tmp_path)
    t = tab()
    page = t.sign_in()
    page.goto(web.url + "/#/voice/kit")
    page.fill("input[name=max_steps]", "4")
    page.click("#start-training")
    expect(page.locator(".job progress")).to_be_visible()
    expect(page.locator(".job .notice.ok")).to_contain_text("Done: v1", timeout=600_000)
    # No companion had an adapter: the engine ran without LoRA, and the first one (chosen at run
    # time, by the training's switch) restarted it with LoRA, once.
    lora = ["--enable-lora" in line for line in (web.data_dir / "run" / "engine.log").read_text().splitlines()
            if "starting:" in line]
    assert not lora[0] and lora[-1] and lora.count(True) == 1, lora
    points = page.locator(".loss-line").get_attribute("points")
    assert points and len(points.split()) >= 2, f"the loss chart drew {points!r}"
    expect(page.locator("tr[data-version=v1]")).to_be_visible()
    expect(page.locator(".report")).to_contain_text("Voice report: v1")   # (or says why not)
    expect(page.locator("td.perplexity-tuned")).to_have_text(re.compile(r"^\d+\.\d\d$"))
    plot = page.locator("img.plot[src^='blob:']")
    assert plot.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    expect(page.locator(".samples li")).to_have_count(2)
    expect(page.locator(".report .drawn")).to_contain_text("tuned at temperature ")
    expect(page.locator(".report .drawn")).to_contain_text("(the version's fitted sampling)")
    t.shot("voice")


def test_a_member_reads_a_shared_voice_reports_figures_but_not_another_members_samples(tab, web, model_dir):
    """The owner's report on a shared companion: every member sees its figures and plot; its
    samples are the owner's held-out words, and the page says whose they are instead."""
    from finetune.evaluate import plot, style
    from tests.support.adapters import make_adapter

    new_companion(web, "lark")
    folder = web.data_dir / "adapters" / "lark" / "v1"
    make_adapter(folder, model_dir, "local")
    real, base, tuned = ["my diary says I miss Lisbon"], ["hello there"], ["I miss Lisbon too"]
    result = {"companion": "lark", "adapter": "v1", "user": "local", "held_out_examples": 1,
              "held_out_tokens": 7, "loss": {"base": 2.2, "tuned": 1.4, "in_use": None},
              "perplexity": {"base": 9.03, "tuned": 4.06}, "similarity_to_real": {"base": 0.1, "tuned": 0.8},
              "style": {"real": style(real), "base": style(base), "tuned": style(tuned)},
              "samples": [{"real": real[0], "base": base[0], "tuned": tuned[0]}],
              "discriminator": {
                  "told_apart": {"base": {"characters": 0.95, "meaning": 0.9},
                                 "tuned": {"characters": 0.7, "meaning": 0.6}},
                  "calibration": {"characters": 0.5, "meaning": 0.45}, "replies": 8,
                  "signatures": [{"phrase": "miss lisbon", "real": 0.5, "base": 0.0, "tuned": 0.25}],
                  "lengths": {w: {"q1": 3, "median": 5, "q3": 6} for w in ("real", "base", "tuned")}}}
    (folder / "eval.json").write_text(json.dumps(result))
    plot(result, folder / "voice.png")
    t = tab(viewport={"width": 390, "height": 844})   # a phone
    page = t.sign_in(web.add_user("quill"))
    page.goto(web.url + "/#/voice/lark")
    page.click("tr[data-version=v1] button.link")
    expect(page.locator(".report")).to_contain_text("Voice report: v1")
    expect(page.locator("td.perplexity-tuned")).to_have_text("4.06")
    plot_img = page.locator("img.plot[src^='blob:']")
    assert plot_img.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
    expect(page.locator(".report")).to_contain_text("only they see them")
    expect(page.locator(".told-apart")).to_have_text(re.compile("tells the tuned replies from the real "
                                                                "ones 7 times in 10"))
    expect(page.locator(".discriminator td").nth(1)).to_have_text("0.70")
    expect(page.locator(".report")).not_to_contain_text("Lisbon")
    expect(page.locator(".report")).not_to_contain_text("lisbon")   # nor the phrases her replies use
    expect(page.locator(".samples li")).to_have_count(0)
    expect(page.locator(".report .drawn")).to_have_count(0)   # a report from before sampling: no line
    t.shot("voice-member-phone")


def test_a_user_sees_only_their_own_companions_and_conversations(tab, web, tmp_path):
    owner = tab()
    page = owner.sign_in()
    page.goto(web.url + "/#/accounts")
    page.fill("input[name=name]", "sam")
    page.click("form button[type=submit]")
    key_field = page.locator("input.key")
    expect(key_field).to_be_visible()
    sam_key = key_field.input_value()
    expect(page.locator("tr[data-user=sam]")).to_contain_text("active")
    owner.shot("accounts")
    with web.http() as http:
        mine = http.post("/api/v1/conversations", json={"companion": "ember", "title": "Owner's secret"})
    secret = mine.json()["conversation"]["id"]

    sam = tab(viewport={"width": 390, "height": 844}, color_scheme="dark")   # a phone, in the dark
    sam_page = sam.sign_in(sam_key)
    expect(sam_page.locator("#nav")).not_to_contain_text("Accounts")
    sam_page.click("text=New companion")
    sam_page.fill("input[name=id]", "pebble")
    sam_page.fill("input[name=name]", "Pebble")
    sam_page.click("form.form button[type=submit]")
    expect(sam_page.locator(".card.companion[data-id=pebble]")).to_be_visible()
    card = tmp_path / "wren.png"
    card.write_bytes(card_png({"spec": "chara_card_v2", "spec_version": "2.0",
                               "data": {"name": "Wren", "description": "{{char}} keeps a lighthouse."}}))
    sam_page.set_input_files(".drop input[type=file]", str(card))
    wren = sam_page.locator(".card.companion[data-id=wren]")
    expect(wren.locator(".about")).to_have_text("Wren keeps a lighthouse.")
    expect(wren.locator(".avatar img")).to_be_visible()
    # Only a companion that has a picture is asked for one (no 404 for each that has none).
    asked = {url.split("/companions/")[1].split("/")[0] for url in sam.requests if url.endswith("/picture")}
    assert "wren" in asked and not asked & {"pebble", "ember"}, asked
    sam.shot("bundle-back-phone-dark")
    # Edited from the listing (whose has_picture is no part of a card), saved as a card.
    sam_page.locator(".card.companion[data-id=pebble]").get_by_role("button", name="Edit").click()
    sam_page.fill("textarea[name=personality]", "smooth and patient")
    sam_page.click("form.form button[type=submit]")
    expect(sam_page.locator(".status")).to_contain_text("Pebble is saved.")
    with web.http(sam_key) as http:
        assert http.get("/api/v1/companions/pebble").json()["personality"] == "smooth and patient"
    # A card dropped on the page, as a file dragged from the desktop is.
    moss = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Moss", "personality": "quiet"}}
    dropped = sam_page.evaluate_handle("""(text) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], 'moss.json', {type: 'application/json'}));
        return transfer;
    }""", json.dumps(moss))
    sam_page.locator(".drop").dispatch_event("dragover", {"dataTransfer": dropped})
    sam_page.locator(".drop").dispatch_event("drop", {"dataTransfer": dropped})
    expect(sam_page.locator(".card.companion[data-id=moss]")).to_be_visible()
    expect(sam_page.locator(".status")).to_contain_text("Moss is imported from moss.json")
    sam.shot("companions-phone-dark")
    # Wren leaves as a card and as a whole bundle, is deleted, and comes back from the bundle.
    with sam_page.expect_download() as saved:
        wren.get_by_role("button", name="Card").click()
    assert saved.value.suggested_filename == "wren.png"
    assert parse_card(Path(saved.value.path()).read_bytes()).description == "{{char}} keeps a lighthouse."
    with sam_page.expect_download() as saved:
        wren.get_by_role("button", name="Bundle").click()
    kept = tmp_path / saved.value.suggested_filename
    saved.value.save_as(kept)
    assert kept.name == "wren.homefire" and read_bundle(kept).companion.name == "Wren"
    wren.get_by_role("button", name="Delete").click()
    expect(wren).to_have_count(0)
    sam_page.set_input_files(".drop input[type=file]", str(kept))
    expect(sam_page.locator(".status")).to_contain_text("imported companion 'wren'")
    expect(wren.locator(".avatar img")).to_be_visible()
    # Wren changes here; the bundle's Wren is another one now, which the page offers another id.
    with web.http(sam_key) as http:
        card = http.get("/api/v1/companions/wren").json()
        changed = http.put("/api/v1/companions/wren", json=card | {"description": "{{char}} moved inland."})
        assert changed.status_code == 200, changed.text
    sam_page.set_input_files(".drop input[type=file]", str(kept))
    expect(sam_page.locator(".status [role=alert]")).to_contain_text("a different companion already has")
    sam_page.fill(".import-as input[name=as_id]", "wren2")
    sam_page.locator(".import-as button").click()
    expect(sam_page.locator(".status")).to_contain_text("imported companion 'wren2'")
    expect(sam_page.locator(".card.companion[data-id=wren2]")).to_be_visible()
    sam_page.goto(web.url + "/#/chat/ember")
    expect(sam_page.locator(".message.assistant").first).to_be_visible()
    expect(sam_page.locator(".conversations")).not_to_contain_text("Owner's secret")
    sam.shot("chat-phone-dark")
    sam_page.goto(web.url + f"/#/chat/ember/{secret}")
    expect(sam_page.get_by_role("alert")).to_contain_text("no conversation")

    page.goto(web.url + "/#/companions")
    expect(page.locator(".card.companion[data-id=ember]")).to_be_visible()
    assert page.locator(".card.companion[data-id=pebble]").count() == 0
    assert page.locator(".card.companion[data-id=wren]").count() == 0
    assert page.locator(".card.companion[data-id=wren2]").count() == 0
    assert page.locator(".card.companion[data-id=moss]").count() == 0

    # Signing out forgets the key: a reload asks for it again. No key is ever in the log.
    sam_page.get_by_role("button", name="Sign out").click()
    expect(sam_page.locator("#key")).to_be_visible()
    assert sam_page.evaluate("sessionStorage.getItem('homefire.key')") is None
    sam_page.reload()
    expect(sam_page.locator("#key")).to_be_visible()
    log = (web.data_dir / "serve.log").read_text(errors="replace")
    assert sam_key not in log and web.key not in log


def test_markup_in_a_reply_a_memory_and_a_title_is_shown_as_text(tab, web, tmp_path):
    import_jsonl(web, "ember", [[("user", "Say something odd."), ("assistant", MARKUP)]], tmp_path)
    with web.http() as http:
        conversation = next(c for c in http.get("/api/v1/conversations", params={"companion": "ember"}).json()
                            if c["title"] == "Chat 0")
        http.patch(f"/api/v1/conversations/{conversation['id']}", json={"title": MARKUP})
        http.post("/api/v1/companions/ember/memories", json={"text": MARKUP})
    t = tab()
    page = t.sign_in()
    page.goto(web.url + f"/#/chat/ember/{conversation['id']}")
    expect(page.locator(".message.assistant .text").last).to_have_text(MARKUP)
    expect(page.locator(".conversations")).to_contain_text(MARKUP)
    assert page.locator("main img").count() == 0
    t.shot("markup-as-text")
    page.goto(web.url + "/#/memory/ember")
    expect(page.locator("li.memory.fact .text", has_text=MARKUP).first).to_be_visible()
    assert page.locator("main img").count() == 0
    assert t.dialogs == []
    assert not any(url.endswith("/x") for url in t.requests), "the page asked for the markup's image"


def test_edit_a_sillytavern_cards_world_test_a_message_and_see_what_a_reply_used(tab, web):
    card = sillytavern_card("Seraphina", "Eldoria", SERAPHINA_WORLD)
    card["data"]["extensions"]["homefire"] = {"sampling": {"max_tokens": 8}}
    with web.http() as http:
        imported = http.post("/api/v1/companions/import", content=png_with_chara(card),
                             params={"filename": "Seraphina.png", "replace": "true"})
    assert imported.status_code == 201, imported.text
    t = tab()
    page = t.sign_in()
    page.locator(".card.companion[data-id=seraphina]").get_by_text("World").click()
    expect(page.locator("li.entry")).to_have_count(5)
    expect(page.locator("li.entry.off")).to_contain_text("river")

    page.fill("textarea[name=probe]", "Is this Eldoria?")
    page.get_by_role("button", name="Which entries fire?").click()
    expect(page.locator(".fired li")).to_have_count(2)
    assert [li.get_attribute("data-entry") for li in page.locator(".fired li").all()] == ["2", "0"]

    page.get_by_role("button", name="New entry").click()
    page.fill("input[name=keys]", "lighthouse, beacon")
    page.fill("textarea[name=content]", "The lighthouse has been dark for years.")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("li.entry")).to_have_count(6)
    row = page.locator("li.entry", has_text="lighthouse")
    row.get_by_role("button", name="Edit").click()
    page.fill("textarea[name=content]", "The lighthouse shines again.")
    page.get_by_role("button", name="Save").click()
    expect(row.locator(".text")).to_have_text("The lighthouse shines again.")
    page.locator("li.entry", has_text="amulet").get_by_role("checkbox").uncheck()
    expect(page.locator("li.entry.off")).to_have_count(2)
    page.locator("li.entry", has_text="river").get_by_role("button", name="Delete").click()
    expect(page.locator("li.entry")).to_have_count(5)
    t.shot("world")
    with web.http() as http:
        book = http.get("/api/v1/companions/seraphina").json()["character_book"]
    original = card["data"]["character_book"]["entries"]
    assert book["entries"][0] == original[0]                      # untouched: every field as it came
    assert book["entries"][1] == original[1] | {"enabled": False}  # SillyTavern's extensions kept
    assert [e["content"] for e in book["entries"]][-1] == "The lighthouse shines again."
    assert book["entries"][-1]["keys"] == ["lighthouse", "beacon"] and book["entries"][-1]["id"] == 5

    # A reply names the entries its prompt carried; they link back here.
    page.goto(web.url + "/#/chat/seraphina")
    page.fill("#message", "Where is the lighthouse?")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant:not(.streaming)").nth(1)
    expect(reply).to_be_visible(timeout=120_000)
    reply.locator(".lore-used summary").click()
    expect(reply.locator(".lore-used li")).to_have_count(2)
    expect(reply.locator(".lore-used li").last).to_contain_text("key 'lighthouse'")
    t.shot("world-used")
    phone = tab(viewport={"width": 390, "height": 844}, color_scheme="dark")
    phone.sign_in().goto(web.url + "/#/world/seraphina")
    expect(phone.page.locator("li.entry")).to_have_count(5)
    phone.shot("world-phone-dark")


def test_a_long_conversation_shows_what_the_companion_keeps_in_mind_and_takes_your_words(tab, web):
    asked = web.openai().chat.completions.with_raw_response.create(
        model="ember", max_tokens=8, messages=[*long_conversation(), {"role": "user", "content": "And Ada?"}])
    conversation = asked.headers["X-Homefire-Conversation"]
    with web.http() as http:
        summary = wait_for_summary(http, conversation)
    t = tab()
    page = t.sign_in()
    page.goto(web.url + f"/#/chat/ember/{conversation}")
    kept = page.locator(".kept-in-mind")
    expect(kept.locator("summary")).to_contain_text(
        f"What Ember keeps in mind from earlier (the first {summary['turns']} messages)")
    # A line after the last message the summary stands in for.
    expect(page.locator(f".message[data-id='{summary['through_message_id']}'] + li.folded")).to_be_visible()
    kept.locator("summary").click()
    expect(page.locator("#summary-text")).to_have_value(summary["text"])
    t.shot("chat-kept-in-mind")

    page.fill("#summary-text", "Sam keeps an allotment with tomatoes; Ada next door keeps bees.")
    page.click("#save-summary")
    expect(kept.get_by_role("status")).to_have_text("saved, in your words")
    with web.http() as http:
        now = http.get(f"/api/v1/conversations/{conversation}/summary").json()["summary"]
    assert now["edited"] and now["text"] == "Sam keeps an allotment with tomatoes; Ada next door keeps bees."

    phone = tab(viewport={"width": 390, "height": 844}, color_scheme="dark")
    phone.sign_in().goto(web.url + f"/#/chat/ember/{conversation}")
    phone.page.locator(".kept-in-mind summary").click()
    expect(phone.page.locator("#summary-text")).to_have_value(now["text"])
    phone.shot("chat-kept-in-mind-phone-dark")


def test_a_group_chat_shows_each_speaker_asks_one_to_answer_and_says_a_reply_again_by_another(tab, web):
    lamp = card_png({"spec": "chara_card_v2", "spec_version": "2.0",
                     "data": {"name": "Lamp", "description": "{{char}} keeps a lighthouse."}})
    with web.http() as http:
        imported = http.post("/api/v1/companions/import", params={"filename": "lamp.png"}, content=lamp)
        assert imported.status_code in (201, 409), imported.text
    new_companion(web, "moss", description="{{char}} grows slowly on stones.")
    t = tab()
    page = t.sign_in()
    page.get_by_role("link", name="Group chats").click()
    starter = page.locator(".new-group")
    if starter.get_attribute("open") is None:   # folded while a group chat is open
        starter.locator("summary").click()
    for member in ("ember", "lamp", "moss"):
        page.locator(f".new-group input[value={member}]").check()
    page.select_option(".new-group select", "natural")
    page.click("#start-group")
    expect(page.locator(".members .member")).to_have_count(3)
    expect(page.locator(".members .member", has_text="Lamp").locator("img")).to_be_visible()   # its picture

    page.fill("#message", "Lamp, is the light on tonight?")
    page.keyboard.press("Enter")
    answered = page.locator(".message.assistant:not(.streaming)[data-speaker=lamp]")
    expect(answered).to_be_visible(timeout=120_000)
    expect(answered.locator(".speaker")).to_contain_text("Lamp")
    expect(answered.locator(".speaker img")).to_be_visible()

    page.locator(".ask-next button[data-speaker=moss]").click()   # Moss answers next, unasked
    expect(page.locator(".message.assistant:not(.streaming)[data-speaker=moss]")).to_be_visible(timeout=120_000)
    t.shot("group-chat")

    last = page.locator(".message.assistant").last
    last.locator("select.regenerate-by").select_option("ember")
    last.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".message.assistant:not(.streaming):not([hidden])").last).to_have_attribute(
        "data-speaker", "ember", timeout=120_000)
    expect(page.locator(".message.assistant[data-speaker=moss]")).to_have_count(0)
    conversation = page.url.rsplit("/", 1)[1]
    with web.http() as http:
        stored = http.get(f"/api/v1/conversations/{conversation}").json()["messages"]
    assert [m["speaker"] for m in stored if m["role"] == "assistant"][-2:] == ["lamp", "ember"]
    t.shot("group-chat-regenerated")

    phone = tab(viewport={"width": 390, "height": 844}, color_scheme="dark")
    phone.sign_in().goto(f"{web.url}/#/group/{conversation}")
    expect(phone.page.locator(".message.assistant[data-speaker=lamp] .speaker img")).to_be_visible()
    phone.shot("group-chat-phone")
