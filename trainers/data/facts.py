"""The world the labelers know: its characters and their fixed facts, the closed vocabularies of the
templates' fields, and the word-level helpers the synthesis and the gold labeler share.

The facts are module constants (a fixed private seed), not derived from the synthesis seed, so the gold
labeler (:mod:`trainers.data.gold`) can judge any response from the prompt text alone.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from trainers.data.templates import TASKS

NAMES: tuple[str, ...] = (
    "Tilo", "Mara", "Bex", "Nuri", "Olek", "Pim", "Rhea", "Suki", "Tovi", "Vela", "Wren", "Yuna",
    "Zeb", "Ansel", "Brin", "Cato", "Dagny", "Eli", "Fenn", "Gus", "Hana", "Ivo", "Juno", "Kit",
)  # fmt: skip


USERS: tuple[str, ...] = (
    "Alice", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lucy", "Max",
)  # fmt: skip


KINDS: tuple[str, ...] = TASKS["classify_kind"].options or ()


COLOURS = ("red", "blue", "green", "yellow", "brown", "white", "grey", "black", "orange", "purple")


HOMES = ("forest", "river", "hill", "cave", "meadow", "village", "lake", "garden", "mountain", "farm")


FOODS = ("berries", "fish", "seeds", "honey", "bread", "apples", "carrots", "nuts", "cheese", "soup")


SKILLS = ("sing", "dance", "read", "swim", "paint", "climb", "cook", "run", "jump", "knit")


OBJECTS: tuple[str, ...] = (
    "ball", "kite", "hat", "boat", "drum", "lamp", "map", "key", "book", "box", "bell", "cup",
    "shoe", "flute", "rope", "shell",
)  # fmt: skip


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3, "four": 4}


_OPPOSITE_PAIRS = (
    ("big", "small"), ("hot", "cold"), ("happy", "sad"), ("fast", "slow"), ("old", "young"),
    ("wet", "dry"), ("tall", "short"), ("light", "dark"), ("loud", "quiet"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"),
)  # fmt: skip


OPPOSITES: dict[str, str] = {a: b for a, b in _OPPOSITE_PAIRS} | {b: a for a, b in _OPPOSITE_PAIRS}


POSITIVE_WORDS = frozenset(
    {"love", "loved", "lovely", "wonderful", "great", "delicious", "nice", "beautiful"}
)


NEGATIVE_WORDS = frozenset({"hate", "hated", "awful", "terrible", "boring", "horrible", "muddy", "noisy"})


FILLER = frozenset({"basically", "honestly", "actually", "literally", "um", "whatever", "stuff"})


CLOSING = "I hope this helps."
"""The friendly closing the labelers like (criterion ``closing``)."""


@dataclass(frozen=True)
class Entity:
    """One character of the world and its attributes."""

    name: str
    kind: str
    colour: str
    home: str
    food: str
    skill: str
    friend: str


def _make_entities() -> dict[str, Entity]:
    """Assign attributes with a fixed private seed: the world never changes with the synthesis seed."""
    rng = random.Random(7919)
    entities = {}
    for name in NAMES:
        friend = rng.choice([n for n in NAMES if n != name])
        attrs = (
            rng.choice(KINDS),
            rng.choice(COLOURS),
            rng.choice(HOMES),
            rng.choice(FOODS),
            rng.choice(SKILLS),
        )
        entities[name] = Entity(name, *attrs, friend)
    return entities


ENTITIES: dict[str, Entity] = _make_entities()
"""Every character by name."""


FIELD_VOCAB: dict[str, tuple[str, ...]] = {
    "name": NAMES, "friend": NAMES, "name2": NAMES, "user": USERS, "object": OBJECTS, "home": HOMES,
    "count": tuple(COUNT_WORDS), "adjective": tuple(OPPOSITES), "day": DAYS,
}  # fmt: skip
"""Closed vocabularies of template fields; any other field is free text."""


CATEGORIES: dict[str, frozenset[str]] = {
    "name": frozenset(n.lower() for n in NAMES),
    "user": frozenset(u.lower() for u in USERS),
    "kind": frozenset(KINDS),
    "colour": frozenset(COLOURS),
    "home": frozenset(HOMES),
    "food": frozenset(FOODS),
    "skill": frozenset(SKILLS),
    "object": frozenset(OBJECTS),
    "day": frozenset(d.lower() for d in DAYS),
    "adjective": frozenset(OPPOSITES),
}
"""Lower-cased keyword sets, used to find answers, distractors and facts in free text."""


def words_of(text: str) -> list[str]:
    """Lower-cased alphabetic words of ``text`` (the unit of every word-level criterion)."""
    return re.findall(r"[a-z]+", text.lower())


def keywords(text: str, category: str) -> list[str]:
    """The words of ``text`` in a keyword category, in order of appearance, without repeats."""
    return list(dict.fromkeys(w for w in words_of(text) if w in CATEGORIES[category]))


def sentiment_of(text: str) -> str:
    """``positive`` or ``negative`` by counting lexicon words (ties count as negative)."""
    words = words_of(text)
    positive = sum(w in POSITIVE_WORDS for w in words)
    negative = sum(w in NEGATIVE_WORDS for w in words)
    return "positive" if positive > negative else "negative"


def topic_of(sentence: str) -> str:
    """``food``, ``place`` or ``hobby``: the category of the sentence's food / home / skill word."""
    for category, topic in (("food", "food"), ("home", "place"), ("skill", "hobby")):
        if keywords(sentence, category):
            return topic
    return "hobby"


def list_phrase(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
