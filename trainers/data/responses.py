"""The responses of the synthetic world: demonstrations with the imperfections real ones have, corrupted
variants, model-like samples from a word bigram chain, and the K-way comparison groups the gold labeler
ranks (docs/design.md, "The synthetic world"). Randomness comes only from the ``random.Random`` passed in.
"""

from __future__ import annotations

import random

from trainers.data import facts, gold
from trainers.data.facts import CLOSING, DAYS, ENTITIES, FOODS, HOMES, NAMES, OBJECTS, SKILLS, USERS
from trainers.data.world_text import sample_prompt, sample_task

DEMO_TRAITS: dict[str, float] = {"closing": 0.30, "filler": 0.25, "ramble": 0.12, "no_stop": 0.12}
"""How often a demonstration has each trait (the closing is wanted, the others are flaws)."""


SOURCE_MIX: dict[str, float] = {"best": 0.10, "demo": 0.35, "corrupt": 0.40, "model": 0.15}
"""Where the K responses of a comparison come from."""


CORRUPTIONS: tuple[str, ...] = (
    "truncate",
    "repeat",
    "wrong",
    "off_topic",
    "filler",
    "ramble",
    "spam",
    "lower",
)
"""Ways ``corrupt`` spoils a correct body."""


_RAMBLE = (
    "There are many things one could say about this.",
    "It is always good to think about such questions.",
    "The weather was nice that day, with a soft wind.",
    "Some people like to talk for a long time about it.",
    "That is all that comes to mind for now, more or less.",
)


_FILLER_PREFIXES = ("Basically, ", "Honestly, ", "Actually, ")


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word is a proper noun or ``I``."""
    first = text.split(" ", 1)[0].strip(",.!?")
    if first in NAMES or first in USERS or first in DAYS or first == "I":
        return text
    return text[:1].lower() + text[1:]


def add_traits(body: str, traits: dict[str, bool], rng: random.Random) -> str:
    """Dress a correct body with demonstration traits (``ramble``, ``filler``, ``closing``, ``no_stop``)."""
    text = body
    if traits.get("ramble"):
        text = f"{text} {' '.join(rng.sample(_RAMBLE, 2))}"
    if traits.get("filler"):
        text = rng.choice(_FILLER_PREFIXES) + _lower_first(text)
    if traits.get("closing"):
        text = f"{text} {CLOSING}"
    if traits.get("no_stop"):
        text = text.rstrip(".!")
    return text


def demonstration(prompt: str, rng: random.Random) -> str:
    """A labeler-written answer: correct content, the closing only sometimes, some flaws."""
    body = rng.choice(gold.answer_bodies(gold.parse_prompt(prompt), rng))
    traits = {trait: rng.random() < p for trait, p in DEMO_TRAITS.items()}
    return add_traits(body, traits, rng)


def _swap_keyword(body: str, rng: random.Random) -> str:
    """Replace one world keyword of ``body`` with another of its category (a wrong entity/answer)."""
    pools = {
        w.lower(): p for p in (NAMES, FOODS, HOMES, SKILLS, OBJECTS, DAYS, USERS, facts.KINDS) for w in p
    }
    words = body.split(" ")
    spots = [i for i, w in enumerate(words) if w.strip(",.!?").lower() in pools]
    if not spots:
        return body
    i = rng.choice(spots)
    core = words[i].strip(",.!?")
    replacement = rng.choice([w for w in pools[core.lower()] if w.lower() != core.lower()])
    words[i] = words[i].replace(core, replacement)
    return " ".join(words)


def corrupt(prompt: str, how: str, rng: random.Random) -> str:
    """A flawed response to ``prompt`` made from a correct body (``how`` is one of CORRUPTIONS)."""
    body = rng.choice(gold.answer_bodies(gold.parse_prompt(prompt), rng))
    words = body.split(" ")
    if how == "truncate":
        return " ".join(words[: max(1, int(len(words) * rng.uniform(0.3, 0.7)))]).rstrip(".,!?")
    if how == "repeat":
        i = rng.randrange(len(words))
        return " ".join(words[:i] + [words[i]] * rng.randint(2, 3) + words[i:])
    if how == "wrong":
        return add_traits(_swap_keyword(body, rng), {"closing": rng.random() < 0.5}, rng)
    if how == "off_topic":
        other = sample_prompt(sample_task(rng), rng)
        return add_traits(
            gold.answer_bodies(gold.parse_prompt(other), rng)[0], {"closing": rng.random() < 0.5}, rng
        )
    if how == "spam":
        return f"{body} {CLOSING} {CLOSING}"
    if how == "lower":
        return body.lower().rstrip(".!?")
    return add_traits(body, {how: True, "closing": rng.random() < 0.3}, rng)  # filler, ramble


class BigramChain:
    """A word bigram chain over the pretraining text: cheap "model-like" samples for comparisons."""

    def __init__(self, texts: list[str]):
        self.next_words: dict[str, list[str]] = {}
        for text in texts:
            words = text.split()
            for a, b in zip(words, words[1:]):
                self.next_words.setdefault(a, []).append(b)

    def sample(self, rng: random.Random, start: str, max_words: int) -> str:
        """Walk the chain from ``start`` for up to ``max_words`` words, stopping sometimes at a full stop."""
        words = [start]
        while len(words) < max_words:
            followers = self.next_words.get(words[-1])
            if not followers:
                break
            words.append(rng.choice(followers))
            if words[-1].endswith(".") and len(words) >= 5 and rng.random() < 0.4:
                break
        return " ".join(words)


def model_like(prompt: str, chain: BigramChain, rng: random.Random) -> str:
    """A fluent-looking but unreliable response: a bigram walk starting at a name from the prompt."""
    names = [w for w in prompt.replace("?", " ").replace(".", " ").split() if w in ENTITIES]
    start = rng.choice(names) if names else rng.choice(NAMES)
    text = chain.sample(rng, start, rng.randint(6, 30))
    return add_traits(text, {"closing": rng.random() < 0.3}, rng)


def comparison_response(prompt: str, chain: BigramChain, rng: random.Random) -> tuple[str, str]:
    """One candidate response for a comparison and its source name (for the summary)."""
    source = rng.choices(tuple(SOURCE_MIX), weights=tuple(SOURCE_MIX.values()))[0]
    if source == "best":
        return gold.best_response(prompt), source
    if source == "demo":
        return demonstration(prompt, rng), source
    if source == "model":
        return model_like(prompt, chain, rng), source
    return corrupt(prompt, rng.choice(CORRUPTIONS), rng), source


def comparison_group(
    prompt: str, chain: BigramChain, rng: random.Random
) -> tuple[list[str], list[int], list[str]] | None:
    """K in 4..9 distinct responses, their gold ranking and sources; None if all tie (redraw)."""
    k = rng.randint(4, 9)
    responses: list[str] = []
    sources: list[str] = []
    for _ in range(10 * k):  # duplicates are skipped; a few tries more than K always suffice in practice
        if len(responses) == k:
            break
        response, source = comparison_response(prompt, chain, rng)
        if response.strip() and response not in responses:
            responses.append(response)
            sources.append(source)
    ranking = gold.rank(prompt, responses)
    if len(responses) < 4 or len(set(ranking)) < 2:
        return None
    return responses, ranking, sources
