"""How well memory finds what was said: recall@k and evidence in the prompt, on generated lives.

Two corpora, generated from a seed and never edited by hand:
- conversations (the default; bench/conversations.py): people as they talk. Long sessions
  in which each fact is one turn among others that name the same people, pets, places and
  pastimes in other ways; questions in other words than their evidence; facts that answer
  only together; a time relative to another event ("the week before I went to Ghent").
  Plain dense search finds the evidence in its top 10 for about 0.6 of the questions, as on
  real long conversations (issue 25).
- simple: this file's own lives (issue 13): small talk around facts said once, in the words
  the questions use.
Each person's sessions are imported with Homefire's importer into a companion of their own
and indexed. Every question knows its evidence (the messages that answer it); a memory holds
evidence when its text holds that message. Prints, per kind of question and overall,
recall@5/10/20 of the evidence for plain dense search (MiniLM cosine over the memory texts,
computed here) and for Homefire's search, and the share of questions whose evidence is all
in what a reply would put in the prompt (MemoryStore.recall with the default settings and
the model's tokenizer), and how many memories the prompt gets for questions about nothing
anyone said (noise). Goals (issue 25, on the conversations): ours at least 0.15 above plain
dense at recall@10, and the evidence in the prompt for at least 65% of the questions.

    .venv/bin/python bench/memory_quality.py [--corpus conversations|simple] [--people 10]
        [--sessions 24] [--seed 1] [--embedder SETTING] [--reranker SETTING]

--embedder and --reranker take what memory.embedder and memory.reranker do (a directory or a
URL): an owner with a GPU measures a stronger retriever on the same corpus (with --reranker,
"reranked" is measured beside the default in the same run, with recall's time per question).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import conversations  # noqa: E402
from memory.embedder import AnyEmbedder, open_embedder  # noqa: E402
from memory.importer import Importer  # noqa: E402
from memory.imports import open_export  # noqa: E402
from memory.recall import RecallSettings  # noqa: E402
from memory.rerank import Reranker  # noqa: E402
from memory.store import MemoryStore  # noqa: E402
from store.companions import Companion, CompanionStore  # noqa: E402
from store.db import Database  # noqa: E402

SIBLINGS = ["Ada", "Noor", "Lena", "Mira", "Ines", "Tove", "Hana", "Zoe", "Ruth", "Elif"]
JOBS = ["a midwife", "an air traffic controller", "a patent lawyer", "a pastry chef", "a vet",
        "a firefighter", "a sound engineer", "a translator", "a pharmacist", "a structural engineer"]
CITIES = ["Berlin", "Lisbon", "Oslo", "Porto", "Vienna", "Krakow", "Lyon", "Ghent", "Turin", "Bergen"]
PETS = ["Miso", "Pepper", "Biscuit", "Olive", "Tofu", "Mango", "Pixel", "Nori", "Juniper", "Basil"]
DOGS = ["Rex", "Bruno", "Luna", "Otto", "Maple", "Fig", "Scout", "Hugo", "Poppy", "Atlas"]
HOBBIES = ["pottery", "salsa", "bouldering", "watercolour", "cello", "fencing", "ceramics", "kendo",
           "calligraphy", "sailing"]
ALLERGIES = ["shellfish", "peanuts", "sesame", "kiwi", "mustard", "celery", "lupin", "soy", "walnuts",
             "buckwheat"]
FEATS = ["ran my first half marathon", "passed my driving test", "sold my first painting",
         "gave a talk at the conference", "finished the quilt for grandma", "swam across the lake"]
SMALL_TALK = ["I had a long day at work.", "The weather was grey again.", "I made soup for dinner.",
              "The bus was late this morning.", "I watched a documentary about whales.",
              "My phone battery died twice today.", "I tidied the kitchen finally.",
              "I read a few chapters before bed.", "The neighbours were loud again.",
              "I went for a short walk at lunch.", "Work meetings ran over today.",
              "I tried a new coffee place.", "I fixed the squeaky door.", "I called my aunt for a bit.",
              "I bought new running socks.", "The train was packed.", "I baked bread, it was dense.",
              "I spent the evening on the sofa.", "I cleaned out my inbox.", "I planted some basil."]
REPLIES = ["That sounds like a lot, I'm glad you told me.", "Oh, tell me more about that!",
           "I hope tomorrow is gentler.", "That made me smile.", "How did that feel?",
           "You deserve a quiet evening.", "I love hearing about your days."]
PEOPLE = ["Dr. Okafor", "Mrs. Halvorsen", "Tomasz", "Priyanka", "Mr. Achterberg", "Ingeborg", "Dariusz",
          "Aoife", "Mr. Szabo", "Keziah"]
ROLES = ["dentist", "new manager", "landlord", "piano teacher", "neighbour", "physio", "mechanic",
         "driving instructor", "accountant", "flatmate"]
# Questions about nothing anyone said: what is recalled for them is noise in the prompt.
UNRELATED = ["Can you recommend a good science fiction novel?", "What's the capital of Australia?",
             "Tell me a joke.", "How do I boil an egg?", "Write me a short poem about rain.",
             "What is the tallest mountain in Africa?", "Explain how a rainbow forms.",
             "What's a good name for a sailing boat?"]
START = datetime(2025, 1, 6, 19, 0, tzinfo=UTC)


@dataclass
class Question:
    text: str
    evidence: list[str]   # the user's messages that answer it
    kind: str             # once | change | time | two_facts | name


def life(rng: random.Random, n: int, sessions: int) -> tuple[list[tuple[datetime, list]], list[Question]]:
    """One person's dated sessions (each a list of (role, text)) and the questions about them."""
    sibling, job, pet, dog, hobby = (SIBLINGS[n], rng.choice(JOBS), PETS[n], DOGS[n], HOBBIES[n])
    home, away = rng.sample(CITIES, 2)
    allergy, feat = rng.choice(ALLERGIES), rng.choice(FEATS)
    when = [START + timedelta(days=5 * i + rng.randint(0, 3)) for i in range(sessions)]
    named, role = PEOPLE[n], ROLES[(n * 3) % len(ROLES)]
    moved, back = sorted(rng.sample(range(2, sessions - 2), 2))
    if back - moved < 3:
        moved, back = 2, sessions - 3
    # The other facts go to other sessions: one session says one of them (a shared slot
    # once replaced the move with another fact, and its question asked for that fact).
    slots = rng.sample([s for s in range(1, sessions - 1) if s not in (moved, back)], 8)
    said = {
        slots[0]: f"My sister {sibling} just started working as {job} over in {home}.",
        moved: f"We finally moved to {away}! The new flat has a balcony.",
        back: f"Big news: we are moving back to {home}, {away} never felt like home.",
        slots[1]: f"Today I adopted a kitten and called her {pet}.",
        slots[2]: f"Tonight was my very first {hobby} class, my hands still ache.",
        slots[3]: f"The doctor says I'm allergic to {allergy}, so no more of that for me.",
        slots[4]: f"I {feat} this morning, I can't believe it!",
        slots[5]: f"{dog} the dog turned {rng.randint(6, 11)} this week, he's getting grey.",
        slots[6]: f"{pet} is {rng.randint(3, 9)} months old now and climbs everything.",
        slots[7]: f"Had a chat with {named} today, my {role}, who was surprisingly kind.",
    }
    assert len(said) == 10, "two facts share a session: one is never said"
    month = when[slots[4]].strftime("%B")
    questions = [
        Question("What does my sibling do for a living?", [said[slots[0]]], "once"),
        Question("Is there any food I have to stay away from?", [said[slots[3]]], "once"),
        Question("Which city do I live in these days?", [said[back]], "change"),
        Question("Where did I live for a while before returning?", [said[moved]], "change"),
        Question(f"When did {pet} join the family?", [said[slots[1]]], "time"),
        Question(f"When did I start learning {hobby}?", [said[slots[2]]], "time"),
        Question(f"What did I achieve in {month}?", [said[slots[4]]], "time"),
        Question("Which of my animals is older?", [said[slots[5]], said[slots[6]]], "two_facts"),
        Question(f"Who is {named.split()[-1]} again?", [said[slots[7]]], "name"),
    ]
    lives = []
    for i, at in enumerate(when):
        turns = []
        talk = rng.sample(SMALL_TALK, rng.randint(4, 7))
        if i in said:
            talk.insert(rng.randint(0, len(talk)), said[i])
        for text in talk:
            turns += [("user", text), ("assistant", rng.choice(REPLIES))]
        lives.append((at, turns))
    return lives, questions


def export(path: Path, lives: list[tuple[datetime, list]]) -> None:
    with path.open("w") as out:
        for s, (at, turns) in enumerate(lives):
            messages = [{"role": role, "content": text,
                         "created_at": (at + timedelta(minutes=j)).timestamp()}
                        for j, (role, text) in enumerate(turns)]
            session = {"id": f"session-{s}", "created_at": at.timestamp(), "messages": messages}
            out.write(json.dumps(session) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=10, help="conversations (one person each)")
    parser.add_argument("--sessions", type=int, default=24, help="dated sessions per person")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=KEY:VALUE,...",
                        help="also measure recall with these settings changed (e.g. wider=top_k:8), in the "
                        "same run, on the same index")
    parser.add_argument("--embedder", help="memory.embedder: a sentence-transformers directory or an "
                        "embeddings URL (default: the bundled MiniLM)")
    parser.add_argument("--reranker", help="memory.reranker: a /rerank or /score URL or a CrossEncoder "
                        "directory; measured as the variant \"reranked\"")
    parser.add_argument("--rerank-budget-ms", type=int, default=2000)
    parser.add_argument("--corpus", choices=("conversations", "simple"), default="conversations",
                        help="conversations: bench/conversations.py, as people talk (paraphrase, on-topic "
                        "distractors, relative time); simple: this file's, the facts in their own words")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from serve.default_model import ensure_default_model

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="homefire-memory-quality-"))
    db = Database(work / "homefire.db")
    embedder = open_embedder(args.embedder)
    store = MemoryStore(db, work / "index", embedder)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model(work / "models"))
    people = []
    make_life = conversations.life if args.corpus == "conversations" else life
    for n in range(args.people):
        lives, questions = make_life(rng, n, args.sessions)
        key = f"p{n}"
        CompanionStore(db).put(Companion(id=key, name="Ember"), "api")
        export(work / f"{key}.jsonl", lives)
        with open_export(str(work / f"{key}.jsonl")) as opened:
            Importer(db, work / "run").run(opened, key, "Ember")
        people.append((key, lives, questions))
    started = time.perf_counter()
    indexed = store.index_pending()
    print(f"{args.people} people, {args.sessions} sessions each: {indexed} memories indexed in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; embedder {embedder.identity}; "
          f"corpus {args.corpus}; seed {args.seed}")
    results = {}
    reranker = Reranker(args.reranker, args.rerank_budget_ms) if args.reranker else None
    runs = [("default", RecallSettings(), None)] + [(n, s, None) for n, s in args.variant] + (
        [("reranked", RecallSettings(), reranker)] if reranker else [])
    for name, settings, rerank in runs:
        store.settings, store.reranker = settings, rerank
        print(f"\n== {name}: {settings}" + (f"; reranker {args.reranker}" if rerank else ""))
        started = time.perf_counter()
        results[name] = evaluate(store, embedder, tokenizer, people)
        print(f"   {time.perf_counter() - started:.1f} s" + (f"; reranker calls {dict(rerank.outcomes)}"
                                                           if rerank else ""))
    print(json.dumps(results))


def variant(text: str) -> tuple[str, RecallSettings]:
    """NAME=top_k:8,threshold:0.3 -> (NAME, the default RecallSettings with those changed)."""
    name, _, changes = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(RecallSettings)}
    values = {}
    for change in filter(None, changes.split(",")):
        key, _, value = change.partition(":")
        if key not in fields:
            raise argparse.ArgumentTypeError(f"{key}: not a recall setting ({', '.join(fields)})")
        values[key] = int(value) if fields[key] in (int, "int") else float(value)
    return name, dataclasses.replace(RecallSettings(), **values)


def evaluate(store: MemoryStore, embedder: AnyEmbedder, tokenizer, people: list) -> dict:
    """Recall@k of plain dense and of the store's search, evidence in the prompt, and noise,
    by kind of question, printed and returned."""
    found: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    in_prompt: dict[str, list[bool]] = defaultdict(list)
    db = store.db

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    for key, lives, questions in people:
        rows = db.query("SELECT id, text FROM memories WHERE companion_id = ? ORDER BY id", (key,))
        ids = np.array([r["id"] for r in rows])
        vectors = np.array(embedder.embed([r["text"] for r in rows]), dtype=np.float32)
        now = lives[-1][0].timestamp() + 86400
        for q in questions:
            wanted = [{r["id"] for r in rows if text in r["text"]} for text in q.evidence]
            assert all(wanted), f"evidence not in any memory: {q.evidence}"
            scores = vectors @ np.array(embedder.embed([q.text])[0], dtype=np.float32)
            rankings = {"plain dense": list(ids[np.argsort(-scores, kind="stable")][:20]),
                        "homefire": [m.id for m in store.search(key, q.text, 20, now=now, distinct=True)]}
            for name, ranking in rankings.items():
                for k in (5, 10, 20):
                    hits = sum(bool(w & set(ranking[:k])) for w in wanted) / len(wanted)
                    for kind in (q.kind, "all"):
                        found[(name, kind)][k].append(hits)
            recalled = {m.id for m in store.recall(key, q.text, now=now, count_tokens=count)}
            for kind in (q.kind, "all"):
                in_prompt[kind].append(all(w & recalled for w in wanted))

    noise = []   # memories placed in the prompt for questions about nothing said
    for key, lives, _ in people:
        now = lives[-1][0].timestamp() + 86400
        noise += [len(store.recall(key, text, now=now, count_tokens=count)) for text in UNRELATED]

    result: dict = {}
    kinds = list(dict.fromkeys(q.kind for _, _, questions in people for q in questions)) + ["all"]
    for kind in kinds:
        line = {name: {k: float(np.mean(found[(name, kind)][k])) for k in (5, 10, 20)}
                for name in ("plain dense", "homefire")}
        prompt = float(np.mean(in_prompt[kind]))
        result[kind] = {**line, "evidence_in_prompt": prompt, "questions": len(in_prompt[kind])}
        print(f"{kind:>13} ({len(in_prompt[kind]):3d} questions): " + "  ".join(
            f"{name} R@5 {v[5]:.3f} R@10 {v[10]:.3f} R@20 {v[20]:.3f}" for name, v in line.items())
            + f"  evidence in prompt {prompt:.2f}")
    gain = result["all"]["homefire"][10] - result["all"]["plain dense"][10]
    print(f"recall@10 gain over plain dense: {gain:+.3f}   (goal >= +0.15); evidence in the prompt: "
          f"{result['all']['evidence_in_prompt']:.2f}   (goal >= 0.65)")
    result["unrelated"] = {"questions": len(noise), "mean_recalled": float(np.mean(noise)),
                           "share_with_any": float(np.mean([n > 0 for n in noise]))}
    print(f"questions about nothing said ({len(noise)}): {np.mean(noise):.2f} memories in the prompt on "
          f"average, some in {np.mean([n > 0 for n in noise]):.0%} of them")
    return result


if __name__ == "__main__":
    main()
