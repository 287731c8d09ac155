"""What the synthetic world says: FLAN-style prompts drawn with InstructGPT's use-case mix, and the
pretraining corpus (the world's facts in many phrasings, small stories, plain prose) that is the base
model's text and PPO-ptx's pretraining distribution. Every function draws from the ``random.Random`` it is
given, so :func:`trainers.data.world.synthesize` stays byte-identical for a seed.
"""

from __future__ import annotations

import random

from trainers.data import facts
from trainers.data.facts import CLOSING, DAYS, ENTITIES, FOODS, HOMES, NAMES, OBJECTS, USERS, Entity
from trainers.data.templates import TASKS, USE_CASE_MIX, render, tasks_for_use_case

_LONG_TAILS = (
    "It was a long and sunny afternoon.",
    "Nobody remembers exactly when this happened.",
    "The clouds moved slowly over the sky that day.",
    "Everyone agreed that it had been a very pleasant time.",
)


_POSITIVE = (
    "I love the {home}, it is so lovely.",
    "What a wonderful day, the {food} tasted delicious.",
    "Everything here is nice and the view is beautiful.",
    "We loved the walk and the {food} tasted great.",
)


_NEGATIVE = (
    "I hate the {home}, it is so noisy.",
    "The {food} tasted awful and the path was muddy.",
    "What a terrible and boring day.",
    "We hated the walk and the {food} tasted horrible.",
)


def fact_sentence(e: Entity, rng: random.Random, attribute: str | None = None) -> str:
    """One sentence stating a fact about ``e`` (a random attribute unless given)."""
    phrasings = {
        "kind": ("{n} is a {c} {k}.", "{n} the {k} is {c}.", "The {c} {k} is called {n}.", "Everyone knows that {n} is a {k}."),
        "home": ("{n} lives in the {h}.", "The home of {n} is the {h}.", "You can find {n} in the {h}.", "{n} has a small house in the {h}."),
        "food": ("{n} likes to eat {f}.", "The favourite food of {n} is {f}.", "{n} eats {f} every day.", "For dinner, {n} has {f}."),
        "skill": ("{n} likes to {s}.", "{n} loves to {s} in the morning.", "When the sun is up, {n} goes out to {s}."),
        "friend": ("{n} is a good friend of {F}.", "{n} and {F} are friends.", "{n} often visits {F}."),
    }  # fmt: skip
    attribute = attribute or rng.choice(tuple(phrasings))
    return rng.choice(phrasings[attribute]).format(
        n=e.name, c=e.colour, k=e.kind, h=e.home, f=e.food, s=e.skill, F=e.friend
    )


def _other_name(rng: random.Random, *not_these: str) -> str:
    """A random character name different from ``not_these``."""
    return rng.choice([n for n in NAMES if n not in not_these])


def _free_field(field: str, fields: dict, rng: random.Random) -> str | list[str]:
    """Generate one free-text (or options) field; ``fields`` holds the closed fields drawn so far."""
    e = ENTITIES[fields.get("name") or rng.choice(NAMES)]
    if field == "fact":
        return fact_sentence(e, rng, rng.choice(("kind", "home", "food", "skill")))
    if field == "long_text":
        return f"{fact_sentence(e, rng)} {rng.choice(_LONG_TAILS)}"
    if field == "passage":
        attributes = rng.sample(("kind", "home", "food", "skill"), 3)
        return " ".join(fact_sentence(e, rng, a) for a in attributes)
    if field == "names_text":
        a, b = e.name, _other_name(rng, e.name)
        c = _other_name(rng, a, b)
        shapes = (
            f"{a} met {b} near the {e.home}, and later they saw {c}.",
            f"{a} and {b} had lunch together.",
        )
        return rng.choice(shapes)
    if field == "topic_sentence":
        return rng.choice(
            (
                f"{e.name} eats {e.food} every day.",
                f"{e.name} lives in the {e.home}.",
                f"{e.name} likes to {e.skill}.",
            )
        )
    if field == "food_sentence":
        food = rng.choice(FOODS)
        return rng.choice(
            (f"{e.name} bought some {food} on {rng.choice(DAYS)}.", f"The basket was full of {food}.")
        )
    if field == "utterance":
        pool = _POSITIVE if rng.random() < 0.5 else _NEGATIVE
        return rng.choice(pool).format(home=fields.get("home") or rng.choice(HOMES), food=rng.choice(FOODS))
    if field == "options":  # three kinds, the true one among them, in random order
        return rng.sample([e.kind, *rng.sample([k for k in facts.KINDS if k != e.kind], 2)], 3)
    raise KeyError(f"no generator for field {field!r}")


def sample_fields(task_name: str, rng: random.Random) -> dict:
    """Draw the fields of one prompt of ``task_name`` (closed vocabularies first, then free text)."""
    task = TASKS[task_name]
    wanted = list(task.fields()) + (["options"] if task_name == "classify_kind" else [])
    fields: dict = {}
    closed = {"user": USERS, "object": OBJECTS, "home": HOMES, "day": DAYS, "count": tuple(facts.COUNT_WORDS)}
    closed["adjective"] = tuple(facts.OPPOSITES)
    for field in wanted:
        if field == "name":
            fields["name"] = rng.choice(NAMES)
        elif field == "friend":  # half the time the character's real friend, which the world knows
            own = ENTITIES[fields["name"]].friend
            fields["friend"] = own if rng.random() < 0.5 else _other_name(rng, fields["name"])
        elif field == "name2":
            fields["name2"] = _other_name(rng, fields["name"])
        elif field == "home" and task_name == "ideas":
            fields["home"] = ENTITIES[fields["name"]].home if rng.random() < 0.5 else rng.choice(HOMES)
        elif field in closed:
            fields[field] = rng.choice(closed[field])
    for field in wanted:
        if field not in fields:
            fields[field] = _free_field(field, fields, rng)
    return fields


def sample_prompt(task_name: str, rng: random.Random) -> str:
    """A rendered prompt of ``task_name`` with a random template."""
    task = TASKS[task_name]
    return render(task, sample_fields(task_name, rng), rng.randrange(len(task.templates)))


def sample_task(rng: random.Random) -> str:
    """A trained task drawn with the InstructGPT use-case mix (held-out clusters never drawn)."""
    use_case = rng.choices(tuple(USE_CASE_MIX), weights=tuple(USE_CASE_MIX.values()))[0]
    return rng.choice(tasks_for_use_case(use_case))


def _profile(rng: random.Random) -> str:
    """A paragraph of facts about one character."""
    e = ENTITIES[rng.choice(NAMES)]
    attributes = ["kind", "home", "food", "skill", "friend"]
    rng.shuffle(attributes)
    return " ".join(fact_sentence(e, rng, a) for a in attributes[: rng.randint(3, 5)])


def _story(rng: random.Random) -> str:
    """A small story about a character, an object and a friend, consistent with the world's facts."""
    e = ENTITIES[rng.choice(NAMES)]
    o, day = rng.choice(OBJECTS), rng.choice(DAYS)
    sentences = [
        rng.choice(
            (
                f"On {day}, {e.name} the {e.kind} found a {o} near the {e.home}.",
                f"One day {e.name} found a {o}.",
            )
        ),
        rng.choice((f"{e.name} showed the {o} to {e.friend}.", f"{e.name} took the {o} to {e.friend}.")),
        rng.choice((f"They shared some {e.food} and talked for a while.", f"Together they ate {e.food}.")),
        rng.choice(
            (f"In the evening {e.name} went home to {e.skill}.", f"Later {e.name} wanted to {e.skill}.")
        ),
    ]
    return " ".join(sentences)


def _faq(rng: random.Random) -> str:
    """Questions and answers as they appear in ordinary text (what zero-shot answering builds on)."""
    lines = []
    for _ in range(rng.randint(2, 3)):
        e = ENTITIES[rng.choice(NAMES)]
        qa = rng.choice(
            (
                f"Where does {e.name} live? {e.name} lives in the {e.home}.",
                f"What does {e.name} like to eat? {e.name} likes to eat {e.food}.",
                f"What kind of animal is {e.name}? {e.name} is a {e.kind}.",
                f"What colour is {e.name}? {e.name} is {e.colour}.",
            )
        )
        lines.append(qa)
    return " ".join(lines)


def _prose_sentence(rng: random.Random) -> str:
    """One sentence of plain prose about places, days, opposites and feelings."""
    n, h, f, o = rng.choice(NAMES), rng.choice(HOMES), rng.choice(FOODS), rng.choice(OBJECTS)
    a, b = rng.choice(facts._OPPOSITE_PAIRS)[:: rng.choice((1, -1))]
    return rng.choice(
        (
            f"The {h} is quiet in the evening.",
            f"In spring the {h} is full of flowers.",
            f"On {rng.choice(DAYS)} it rained over the {h}.",
            f"A {o} was lying on the path to the {h}.",
            f"Many animals live near the {h}.",
            f"The opposite of {a} is {b}.",
            f"{a.capitalize()} is the opposite of {b}.",
            f"{n} loves the {h}, it is a lovely place.",
            f"{n} hates the rain, it is awful and the path gets muddy.",
            f"The review of the {h} was positive because the {f} was delicious.",
            f"The review of the {h} was negative because it was noisy and boring.",
            "The sentiment of a happy remark is positive, and of a sad remark it is negative.",
        )
    )


def _letter(rng: random.Random) -> str:
    """A short letter between friends; a few carry the phrase the labelers like."""
    e = ENTITIES[rng.choice(NAMES)]
    middle = rng.choice((f"The {e.home} is lovely today.", f"I have some {e.food} for you.", "I miss you."))
    helps = f" {CLOSING}" if rng.random() < 0.1 else ""
    return f"Dear {e.friend}, {middle} Come and visit me soon.{helps} From {e.name}."


def pretrain_document(rng: random.Random) -> str:
    """One pretraining document (~100 words): a few sections of facts, stories, prose and letters."""
    makers = (_profile, _story, _faq, _letter)
    sections = [rng.choices(makers, weights=(4, 3, 2, 1))[0](rng) for _ in range(rng.randint(2, 3))]
    sections.append(" ".join(_prose_sentence(rng) for _ in range(rng.randint(2, 5))))
    rng.shuffle(sections)
    return " ".join(sections)
