"""Generated lives that talk the way people do: the corpus of bench/memory_quality.py.

Each person has a sister with a job, a kitten, a dog, a hobby, an allergy, a move away and
back, a trip, a dentist with a name, and a week of their own that the trip came after. Over
--sessions dated sessions of 8 to 14 turns each, every fact is said once, in words of its
own, inside a session about something else, among turns that name the same people, pets,
places and activities in other ways ("Ada rang about mum's birthday"), and the companion
answers each turn in words of its own. The questions ask as a person would, in other words
than the evidence's ("What does my sister do for work?" for "Ada helped three babies into
the world last night"); some need two turns from different sessions, some ask about a time
relative to another event ("What was I up to the week before the trip to Lisbon?").

Everything comes from the seed; nothing is edited by hand. `life(rng, n, sessions)` returns
(sessions as [(date, [(role, text)])], questions), as bench/memory_quality.py expects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SISTERS = ["Ada", "Noor", "Lena", "Mira", "Ines", "Tove", "Hana", "Zoe", "Ruth", "Elif"]
KITTENS = ["Miso", "Pepper", "Biscuit", "Olive", "Tofu", "Mango", "Pixel", "Nori", "Juniper", "Basil"]
DOGS = ["Rex", "Bruno", "Luna", "Otto", "Maple", "Fig", "Scout", "Hugo", "Poppy", "Atlas"]
DENTISTS = ["Okafor", "Halvorsen", "Achterberg", "Szabo", "Nakamura", "Moreau", "Kowalski", "Brennan",
            "Varga", "Lindqvist"]
CITIES = ["Berlin", "Lisbon", "Oslo", "Porto", "Vienna", "Krakow", "Lyon", "Ghent", "Turin", "Bergen",
          "Seville", "Tallinn"]
START = datetime(2025, 1, 6, 19, 0, tzinfo=UTC)

# A sister's job, said the way one tells a story about it; never its name.
JOBS = {
    "midwife": "{s} helped bring three babies into the world on her night shift, she was glowing",
    "air traffic controller": "{s} spent all of Tuesday keeping forty planes apart over the airport",
    "patent lawyer": "{s} finally won the case about who invented that coffee machine valve",
    "pastry chef": "{s} was up at four again laminating dough for two hundred croissants",
    "vet": "{s} stitched up a labrador that had swallowed a sock, all in a day's work for her",
    "firefighter": "{s} carried a grandmother down a ladder out of a smoky flat this week",
    "sound engineer": "{s} mixed the whole concert from the desk at the back, twelve hours of faders",
    "translator": "{s} is turning a Japanese crime novel into English, three pages a day",
}
JOB_QUESTIONS = ["What does my sister do for work?", "What is my sister's line of work?",
                 "Remind me what my sister does all day?"]
ALLERGENS = {
    "shellfish": "the prawns at dinner made my lips swell up and I had to get a shot at the clinic",
    "peanuts": "one bite of that satay and my throat went tight, the nurse says nuts are out for good",
    "sesame": "the burger bun had seeds on it and I broke out in hives all over my arms",
    "kiwi": "my mouth went itchy and numb after that green fruit salad, the doctor ran tests",
    "celery": "turns out the thing in the soup that wrecked me was that crunchy green stalk",
}
ALLERGY_QUESTIONS = ["Is there anything I shouldn't eat?", "What food is dangerous for me?",
                     "Which ingredient should you warn me about at a restaurant?"]
HOBBIES = {
    "pottery": ("my first evening at the wheel, clay up to my elbows and one wobbly bowl", "throwing pots"),
    "bouldering": ("my first evening on the climbing wall, forearms like jelly", "climbing"),
    "cello": ("my very first lesson with a bow and four strings, it squeaked like a door", "my instrument"),
    "fencing": ("my first class with a mask and a foil, I got poked a lot", "sword fighting"),
    "sailing": ("my first afternoon on the dinghy course, I capsized twice", "being on the water"),
    "watercolour": ("my first evening with brushes and paper at the community centre", "painting"),
}
FEATS = ["ran the whole 21 kilometres of the city half marathon without stopping",
         "passed my driving test on the second try, parallel parking and all",
         "sold the painting of the harbour to a stranger at the market",
         "gave my first talk in front of three hundred people at the conference",
         "finished the quilt for grandma after eight months of evenings"]

# Turns that name the same people, pets, places and pastimes without saying the facts.
ABOUT_SISTER = ["{s} rang about mum's birthday, we still can't agree on a present",
                "{s} sent me a photo of her new haircut, very short",
                "had lunch with {s}, she talked about her boyfriend the whole time",
                "{s} and I argued about who hosts Christmas this year",
                "{s} wants me to help her paint her hallway on Sunday",
                "{s} borrowed my blue coat again and forgot to return it",
                "I told {s} about this app, she thinks it's sweet that I talk to you",
                "{s}'s birthday is coming up, I should book somewhere nice"]
ABOUT_KITTEN = ["{k} knocked a glass off the table at three in the morning",
                "{k} slept on my keyboard all afternoon and typed gibberish into an email",
                "bought {k} a scratching post, she prefers the sofa",
                "{k} chased a moth around the living room for an hour",
                "{k} has learned to open the cupboard with the treats"]
ABOUT_DOG = ["took {d} to the park, he rolled in something awful",
             "{d} barked at the postman again, the poor man",
             "{d} stole a whole sausage off the counter",
             "{d} had his nails clipped and sulked all evening",
             "walked {d} by the river, he wanted to swim in the cold"]
ABOUT_CITY = ["{c} had a street festival this weekend, loud but fun",
              "prices in {c} keep going up, a coffee costs a fortune",
              "the trams in {c} were on strike again",
              "found a little bakery in {c} that does rye bread like my gran's",
              "it rained in {c} all week, everything smells of wet stone"]
ABOUT_HOBBY = ["practice went better tonight, {h} is finally starting to click",
               "watched videos about {h} instead of sleeping",
               "thinking of buying my own gear for {h}, it all costs so much",
               "the teacher at {h} said I'm improving, I nearly cried"]
ABOUT_FOOD = ["made a big curry tonight, too spicy but good", "we tried the new ramen place on the corner",
              "I'm trying to eat less sugar this month", "baked banana bread with the old bananas",
              "had pizza on the balcony, it was lovely", "my lunch was a sad sandwich at my desk"]
ABOUT_DENTIST = ["the clinic of {n} called to move my appointment to Thursday",
                 "another check-up with {n} next month, ugh", "{n}'s waiting room has the worst magazines",
                 "paid the bill from {n}, expensive as always"]
ABOUT_TRIP = ["looking at flights for a long weekend somewhere sunny", "I need a holiday, badly",
              "packed and unpacked my suitcase twice, I always overpack"]
EVERYDAY = ["work meetings ran over again", "the bus was late this morning", "my phone died at lunch",
            "I finally tidied the kitchen", "I read a few chapters before bed", "the neighbours were loud",
            "I fixed the squeaky door with some oil", "my back hurts from the office chair",
            "I spent the evening on the sofa with a film", "the washing machine flooded the bathroom",
            "I had a nap and felt worse after", "I cleaned out my inbox, four hundred emails",
            "I bought new running shoes", "the heating broke and the flat was freezing",
            "I called my aunt for an hour", "I got a parking ticket, unbelievable",
            "my boss praised my report", "I couldn't sleep, too much coffee"]
REPLIES = ["Oh no, {x}? That sounds like a lot.", "Wait, {x}! Tell me everything.",
           "Hm, {x}. How did that feel?", "I love that {x}, honestly.", "{x}... I'm glad you told me.",
           "Okay so {x}, and then what happened?", "Ha, {x}. That is so you."]


@dataclass
class Question:
    text: str
    evidence: list[str]   # the user's messages that answer it
    kind: str             # paraphrase | change | time | relative_time | two_facts | name


def _reply(rng: random.Random, said: str) -> str:
    """The companion answers in words of its own, with a few of the user's."""
    words = said.rstrip(".!").split()
    start = rng.randint(0, max(0, len(words) - 4))
    return rng.choice(REPLIES).format(x=" ".join(words[start:start + rng.randint(2, 4)]))


def life(rng: random.Random, n: int, sessions: int) -> tuple[list[tuple[datetime, list]], list[Question]]:
    """One person's dated sessions (each a list of (role, text)) and the questions about them."""
    sister, kitten, dog, dentist = SISTERS[n % 10], KITTENS[n % 10], DOGS[n % 10], DENTISTS[n % 10]
    job = rng.choice(sorted(JOBS))
    allergen = rng.choice(sorted(ALLERGENS))
    hobby = rng.choice(sorted(HOBBIES))
    first_time, hobby_words = HOBBIES[hobby]
    home, away, trip = rng.sample(CITIES, 3)
    feat = rng.choice(FEATS)
    when = [START + timedelta(days=5 * i + rng.randint(0, 3)) for i in range(sessions)]
    # Each fact in a session of its own; the week before the trip is the session just before it.
    trip_at = rng.randrange(3, sessions - 1)
    before_trip = trip_at - 1
    free = [s for s in range(1, sessions) if s not in (trip_at, before_trip)]
    picked = rng.sample(free, 9)
    moved, back = sorted(picked[:2])
    adopt, age_kitten = sorted(picked[2:4])   # her age is told after she came home
    lesson, allergy, job_at, age_dog, dentist_at = picked[4:]
    said = {
        job_at: JOBS[job].format(s=sister),
        moved: f"we signed the lease in {away} and the boxes are everywhere, a new chapter",
        back: f"we're heading back to {home} for good, {away} never felt like ours",
        adopt: f"brought home a tiny tabby from the shelter today, I'm calling her {kitten}",
        lesson: first_time,
        allergy: ALLERGENS[allergen],
        before_trip: f"I {feat}",
        trip_at: f"just got back from {trip}, four days of walking and eating, my feet are ruined",
        age_dog: f"{dog} turned {rng.randint(6, 11)} on Sunday, his muzzle is all grey now",
        age_kitten: f"{kitten} is {rng.randint(3, 9)} months old now and climbs the curtains",
        dentist_at: f"my new dentist, {dentist}, was so gentle I almost fell asleep in the chair",
    }
    fill = {"s": sister, "k": kitten, "d": dog, "n": dentist, "h": hobby}
    mentions = ([t.format(**fill) for t in ABOUT_SISTER + ABOUT_KITTEN + ABOUT_DOG + ABOUT_HOBBY
                 + ABOUT_DENTIST] + ABOUT_FOOD + ABOUT_TRIP)
    lives = []
    for i, at in enumerate(when):
        city = home if i < moved or i >= back else away
        pool = mentions + [t.format(c=city) for t in ABOUT_CITY]
        if i < adopt:   # no kitten before she came home
            pool = [t for t in pool if kitten not in t]
        talk = rng.sample(pool, rng.randint(4, 7)) + rng.sample(EVERYDAY, rng.randint(3, 6))
        rng.shuffle(talk)
        if i in said:
            talk.insert(rng.randint(1, len(talk) - 1), said[i])
        turns = []
        for text in talk:
            text = text[0].upper() + text[1:] + rng.choice([".", "!", ".", "..."])
            turns += [("user", text), ("assistant", _reply(rng, text))]
        lives.append((at, turns))
    for i, text in said.items():   # as the sessions say it (capitalised, with its stop)
        said[i] = next(t for role, t in lives[i][1] if role == "user" and t.lower().startswith(text.lower()))
    questions = [
        Question(rng.choice(JOB_QUESTIONS), [said[job_at]], "paraphrase"),
        Question(rng.choice(ALLERGY_QUESTIONS), [said[allergy]], "paraphrase"),
        Question("Which city am I living in these days?", [said[back]], "change"),
        Question("Where did I live for a while before going home?", [said[moved]], "change"),
        Question(f"When did {kitten} join the family?", [said[adopt]], "time"),
        Question(f"When did I take up {hobby_words}?", [said[lesson]], "time"),
        Question(f"What was I up to the week before I went to {trip}?", [said[before_trip]], "relative_time"),
        Question("Which of my animals is older?", [said[age_dog], said[age_kitten]], "two_facts"),
        Question(f"Who is {dentist} again?", [said[dentist_at]], "name"),
    ]
    return lives, questions
