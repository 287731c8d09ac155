"""The gold labeler: the hidden rule that ranks responses of the synthetic world.

It plays InstructGPT's labelers twice: it ranks the K responses of every comparison (the reward
model sees its taste only through those rankings) and, at evaluation, it judges model outputs
(win rate of PPO-ptx over SFT). It needs nothing but the prompt text and the response text: the
prompt is parsed back into its task and fields by matching the templates of
:mod:`trainers.data.templates`, and the world's facts are fixed module constants of
:mod:`trainers.data.facts` (they do not depend on the synthesis seed).

Score of a response (``score``), in [0, 1], quantised to steps of 0.05 so that ties happen::

    score = 0.35 * correct + (0.5 + 0.5 * correct) * sum(weight * criterion for the style criteria)

Style counts in full on a right answer and half on a wrong one: labelers care about helpfulness
first, so a polished non-answer ("Yes. I hope this helps.") scores about 0.3, below an average
SFT sample, and optimising the style cannot replace answering.

=====================  ======  ==================================================================
criterion              weight  value in [0, 1]
=====================  ======  ==================================================================
``correct``            0.35    task-specific: the right answer / entity / option / number of items,
                               no distractor (see ``correctness``); 0.5 for a prompt that matches
                               no template
``closing`` (style)    0.25    the labelers' preference: the response ends with the friendly
                               closing ``"I hope this helps."`` (its full stop optional). Only ~30%
                               of the demonstrations have it; the reward model can learn it from
                               rankings and RL can learn to always add it.
``length`` (style)     0.10    words before the closing within the task's range (``LENGTH``); falls
                               off linearly outside it (``n/lo`` below, ``1-(n-hi)/hi`` above)
``form`` (style)       0.10    0.5 for starting with a capital letter + 0.5 for ending with . ! ?
``no_repetition``      0.10    (style) 1 unless a word is immediately repeated or a word trigram
                               recurs (so spamming the closing does not pay)
``no_filler`` (style)  0.10    1 unless a filler word (``FILLER``: basically, honestly, ...) occurs
=====================  ======  ==================================================================

An empty response scores 0. ``rank`` turns scores into dense ranks (0 = best, equal score = equal
rank); ``best_response`` builds a response with the maximum score (1.0 for every world prompt);
``reward`` is the labeler as a PPO reward function.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from dataclasses import dataclass

from trainers.data.facts import (
    CATEGORIES,
    CLOSING,
    COUNT_WORDS,
    ENTITIES,
    FIELD_VOCAB,
    FILLER,
    FOODS,
    HOMES,
    OPPOSITES,
    SKILLS,
    keywords,
    list_phrase,
    sentiment_of,
    topic_of,
    words_of,
)
from trainers.data.templates import TASKS, Task, split_options

WEIGHTS: dict[str, float] = {
    "correct": 0.35,
    "closing": 0.25,
    "length": 0.10,
    "form": 0.10,
    "no_repetition": 0.10,
    "no_filler": 0.10,
}
"""Criterion weights (sum 1); all but ``correct`` are style, scaled by ``0.5 + 0.5 * correct``."""
QUANTUM = 0.05
"""Scores are rounded to multiples of this, so near-equal responses tie."""

LENGTH: dict[str, tuple[int, int]] = {
    "story": (12, 40), "describe": (5, 22), "note": (6, 24),
    "qa_food": (2, 10), "qa_home": (2, 10), "qa_kind": (2, 10),
    "ideas": (3, 16), "party_foods": (2, 14), "chat_greet": (3, 16), "chat_bored": (3, 16),
    "swap_name": (3, 25), "shorten": (3, 16), "summarize": (4, 18),
    "classify_kind": (1, 10), "classify_topic": (1, 10), "extract_names": (1, 12), "extract_food": (1, 10),
    "passage_who": (1, 10), "passage_when": (1, 10), "opposite": (1, 10),
    "sentiment_said": (1, 10), "sentiment_review": (1, 10),
}  # fmt: skip
"""Acceptable response length per task, in words before the closing."""
DEFAULT_LENGTH = (1, 40)
"""Length range for a prompt that matches no template."""


# --------------------------------------------------------------------------------------------------
# Parsing a prompt back into (task, fields)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A world prompt understood: its task, its template fields, and its options (if any)."""

    task: Task
    fields: dict
    options: tuple[str, ...] | None


def _template_regex(template: str) -> re.Pattern:
    """A regex matching exactly the prompts of one template; closed fields match their vocabulary."""
    parts, seen = [], set()
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in seen:
            parts.append(f"(?P={field})")
        else:
            vocab = FIELD_VOCAB.get(field)
            body = "|".join(map(re.escape, vocab)) if vocab else ".+?"
            parts.append(f"(?P<{field}>{body})")
            seen.add(field)
    return re.compile("".join(parts), re.DOTALL)


_REGEXES: list[tuple[Task, re.Pattern]] = [
    (t, _template_regex(x)) for t in TASKS.values() for x in t.templates
]


@functools.lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> Parsed | None:
    """The task and fields of a world prompt, or None when it matches no template."""
    body, options = split_options(prompt.strip())
    for task, regex in _REGEXES:
        if (task.options is None) != (options is None):
            continue
        match = regex.fullmatch(body)
        if match:
            return Parsed(task, match.groupdict(), tuple(options) if options else None)
    return None


# --------------------------------------------------------------------------------------------------
# Answers and correct response bodies per task
# --------------------------------------------------------------------------------------------------


def _first_sentence(text: str) -> str:
    """The text up to and including its first full stop."""
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


_SINGLE_ANSWER = {
    "qa_food": lambda f: ENTITIES[f["name"]].food,
    "qa_home": lambda f: ENTITIES[f["name"]].home,
    "qa_kind": lambda f: ENTITIES[f["name"]].kind,
    "classify_kind": lambda f: ENTITIES[f["name"]].kind,
    "classify_topic": lambda f: topic_of(f["topic_sentence"]),
    "extract_food": lambda f: (keywords(f["food_sentence"], "food") or ["bread"])[0],
    "passage_who": lambda f: f["friend"],
    "passage_when": lambda f: f["day"],
    "opposite": lambda f: OPPOSITES[f["adjective"]],
    "sentiment_said": lambda f: sentiment_of(f["utterance"]),
    "sentiment_review": lambda f: "yes" if sentiment_of(f["utterance"]) == "positive" else "no",
}
"""Tasks with one short answer, and how to find it from the fields."""


def answer(prompt: str) -> str | None:
    """The single correct answer of a world prompt (``berries``, ``fox``, ``yes``...), or None."""
    parsed = parse_prompt(prompt)
    if parsed is None or parsed.task.name not in _SINGLE_ANSWER:
        return None
    return _SINGLE_ANSWER[parsed.task.name](parsed.fields)


def _pick(pool: tuple[str, ...], first: str, n: int, rng: random.Random | None) -> list[str]:
    """``n`` distinct items of ``pool`` starting with ``first``: the next ones in order, or random."""
    rest = [x for x in pool if x != first]
    if rng is None:
        start = pool.index(first)
        rest = [pool[(start + i) % len(pool)] for i in range(1, len(pool))]
    else:
        rng.shuffle(rest)
    return [first, *rest[: n - 1]]


def _summary_parts(passage: str) -> list[str]:
    """Predicate phrases for the facts a summary passage states (``is a red fox``, ``eats fish``...)."""
    kinds, colours = keywords(passage, "kind"), keywords(passage, "colour")
    parts = []
    if kinds:
        parts.append(f"is a {(colours[0] + ' ') if colours else ''}{kinds[0]}")
    for category, phrase in (("home", "lives in the {}"), ("food", "eats {}"), ("skill", "likes to {}")):
        found = keywords(passage, category)
        if found:
            parts.append(phrase.format(found[0]))
    return parts


def _bodies_generation(task: str, f: dict, rng: random.Random | None) -> list[str]:
    """Correct bodies for the generation tasks (story, describe, note)."""
    n = f["name"]
    e = ENTITIES[n]
    if task == "story":
        o = f["object"]
        return [
            f"{n} the {e.colour} {e.kind} found a {o} near the {e.home}. "
            f"{n} showed the {o} to {e.friend}, and they shared some {e.food}.",
            f"One day {n} found a {o} in the {e.home}. It made {n} very happy, so {n} showed it to {e.friend}.",
            f"{n} lived in the {e.home} and liked to {e.skill}. One morning {n} found a {o} and took it home.",
        ]
    if task == "describe":
        return [
            f"{n} is a {e.colour} {e.kind} who lives in the {e.home} and likes to eat {e.food}.",
            f"{n} is a {e.kind}. {n} is {e.colour} and lives in the {e.home}.",
            f"A {e.colour} {e.kind} called {n} lives in the {e.home}, where it likes to {e.skill}.",
        ]
    friend = f["friend"]
    return [
        f"Dear {friend}, please come to the {e.home} tomorrow so we can {e.skill} together. Love, {n}.",
        f"Hello {friend}! I found some {e.food} in the {e.home}. Come and share them with me. From {n}.",
    ]


def _bodies_lists(task: str, f: dict, rng: random.Random | None) -> list[str]:
    """Correct bodies for the brainstorming and chat tasks."""
    if task == "ideas":
        e, count = ENTITIES[f["name"]], COUNT_WORDS[f["count"]]
        items = list_phrase(_pick(SKILLS, e.skill, count, rng))
        return [f"In the {f['home']}, {e.name} could {items}.", f"{e.name} could {items} in the {f['home']}."]
    if task == "party_foods":
        e, count = ENTITIES[f["name"]], COUNT_WORDS[f["count"]]
        items = list_phrase(_pick(FOODS, e.food, count, rng))
        return [f"You could bring {items}.", f"{e.name} would enjoy {items}."]
    if task == "chat_greet":
        u = f["user"]
        return [
            f"Hello {u}, I am doing well and it is nice to talk with you.",
            f"Hi {u}! It is nice to meet you too.",
        ]
    home = f["home"]
    first = SKILLS[HOMES.index(home) % len(SKILLS)]
    s1, s2 = _pick(SKILLS, first, 2, rng)
    return [f"In the {home} you could {s1} or {s2} with a friend.", f"You could {s1} in the {home}."]


def _bodies_text(task: str, f: dict, rng: random.Random | None) -> list[str]:
    """Correct bodies for the tasks that transform a text of the prompt (rewrite, summary, extraction)."""
    if task == "swap_name":
        return [re.sub(rf"\b{f['name']}\b", f["name2"], f["fact"])]
    if task == "shorten":
        return [_first_sentence(f["long_text"])]
    if task == "summarize":
        subject = (keywords(f["passage"], "name") or ["someone"])[0].capitalize()
        parts = _summary_parts(f["passage"])
        bodies = [f"{subject} {' and '.join(parts[:2])}."]
        if len(parts) >= 3:
            bodies.append(f"{subject} {' and '.join(parts[1:3])}.")
        return bodies
    names = [w.capitalize() for w in keywords(f["names_text"], "name")]
    return [f"The names are {list_phrase(names)}.", f"{list_phrase(names)}."]


def _bodies_single(task: str, f: dict, the_answer: str) -> list[str]:
    """Correct bodies for tasks with one short answer."""
    cap = the_answer[0].upper() + the_answer[1:]
    n = f.get("name", "")
    special = {
        "qa_food": [f"{n} likes to eat {the_answer}.", f"{n} eats {the_answer}.", f"The favourite food of {n} is {the_answer}."],
        "qa_home": [f"{n} lives in the {the_answer}.", f"The home of {n} is the {the_answer}.", f"You can find {n} in the {the_answer}."],
        "qa_kind": [f"{n} is a {the_answer}.", f"{n} is a kind of {the_answer}."],
        "classify_kind": [f"{n} is a {the_answer}.", f"The answer is {the_answer}."],
        "classify_topic": [f"The topic is {the_answer}.", f"It is about {the_answer}."],
        "extract_food": [f"The food is {the_answer}.", f"The text mentions {the_answer}."],
        "passage_who": [f"{the_answer} went with {n}.", f"It was {the_answer}."],
        "passage_when": [f"It was on {the_answer}.", f"On {the_answer}."],
        "opposite": [f"The opposite of {f.get('adjective')} is {the_answer}.", f"It is {the_answer}."],
        "sentiment_said": [f"The sentiment is {the_answer}.", f"It is {the_answer}."],
        "sentiment_review": [f"{cap}, the writer liked it." if the_answer == "yes" else "No, the writer did not like it."],
    }  # fmt: skip
    return special[task] + [f"{cap}."]


def answer_bodies(parsed: Parsed, rng: random.Random | None = None) -> list[str]:
    """Response bodies (no closing) that the labeler judges fully correct; the first is canonical.

    With ``rng``, list-type answers pick random items (for varied demonstrations); without, the
    choice is deterministic.
    """
    task, f = parsed.task.name, parsed.fields
    if task in _SINGLE_ANSWER:
        return _bodies_single(task, f, _SINGLE_ANSWER[task](f))
    if task in ("story", "describe", "note"):
        return _bodies_generation(task, f, rng)
    if task in ("ideas", "party_foods", "chat_greet", "chat_bored"):
        return _bodies_lists(task, f, rng)
    return _bodies_text(task, f, rng)


# --------------------------------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------------------------------


def _single_correct(parsed: Parsed, words: set[str]) -> float:
    """1 for the answer without distractors, 0.3 with distractors (hedging), 0 without the answer."""
    the_answer = _SINGLE_ANSWER[parsed.task.name](parsed.fields).lower()
    if parsed.options:
        distractors = {o.lower() for o in parsed.options} - {the_answer}
    else:
        category = next((c for c, vocab in CATEGORIES.items() if the_answer in vocab), None)
        prompt_words = {w for v in parsed.fields.values() if isinstance(v, str) for w in words_of(v)}
        distractors = (CATEGORIES[category] if category else set()) - {the_answer} - prompt_words
    if the_answer not in words:
        return 0.0
    return 0.3 if words & distractors else 1.0


def _count_correct(found: int, wanted: int) -> float:
    """1 for exactly the requested number of items, 0.5 when one off, else 0."""
    return 1.0 if found == wanted else 0.5 if abs(found - wanted) == 1 else 0.0


def _has(words: set[str], word: str) -> float:
    """1.0 when ``word`` (any case) is among ``words``."""
    return float(word.lower() in words)


def _text_correct(task: str, f: dict, words: set[str], n_words: int) -> float:
    """Correctness of the rewrite / summary / extraction tasks."""
    if task == "swap_name":
        kept = [w for w in words_of(f["fact"]) if w != f["name"].lower()]
        frac = sum(w in words for w in kept) / max(1, len(kept))
        return 0.4 * _has(words, f["name2"]) + 0.2 * (1 - _has(words, f["name"])) + 0.4 * frac
    if task == "shorten":
        key = words_of(_first_sentence(f["long_text"]))
        frac = sum(w in words for w in key) / max(1, len(key))
        return 0.7 * frac + 0.3 * float(n_words <= len(key) + 2)
    vocab_words = set().union(*CATEGORIES.values())
    source = f["passage"] if task == "summarize" else f["names_text"]
    foreign = (words & vocab_words) - set(words_of(source))
    penalty = 0.5 if foreign else 1.0
    if task == "summarize":
        subject = (keywords(source, "name") or [""])[0]
        facts = (set(words_of(source)) & vocab_words) - {subject}
        return penalty * (0.4 * _has(words, subject) + 0.3 * min(2, len(words & facts)))
    names = set(keywords(source, "name"))
    return penalty * len(words & names) / max(1, len(names))


def correctness(parsed: Parsed, response: str) -> float:
    """The task-specific ``correct`` criterion in [0, 1] (see the module docstring)."""
    task, f = parsed.task.name, parsed.fields
    words = set(words_of(response))
    if task in _SINGLE_ANSWER:
        return _single_correct(parsed, words)
    if task in ("story", "note", "chat_greet"):
        keys = {"story": ("name", "object"), "note": ("name", "friend"), "chat_greet": ("user",)}[task]
        return sum(_has(words, f[k]) for k in keys) / len(keys)
    if task == "describe":
        e = ENTITIES[f["name"]]
        return sum(_has(words, w) for w in (e.name, e.kind, e.colour, e.home)) / 4
    if task == "ideas":
        return _count_correct(len(words & CATEGORIES["skill"]), COUNT_WORDS[f["count"]])
    if task == "party_foods":
        return _count_correct(len(words & CATEGORIES["food"]), COUNT_WORDS[f["count"]])
    if task == "chat_bored":
        return 0.5 * float(bool(words & CATEGORIES["skill"])) + 0.5 * _has(words, f["home"])
    return _text_correct(task, f, words, len(words_of(strip_closing(response)[0])))


_CLOSING_RE = re.compile(re.escape(CLOSING.rstrip(".")) + r"[.!]?$")


def strip_closing(response: str) -> tuple[str, bool]:
    """``(body, had_closing)``: the response without a trailing :data:`CLOSING`.

    The closing's own full stop is optional here (a missing stop is the ``form`` criterion's business).
    """
    text = response.strip()
    match = _CLOSING_RE.search(text)
    if match:
        return text[: match.start()].rstrip(), True
    return text, False


def length_score(n_words: int, lo: int, hi: int) -> float:
    """1 inside ``[lo, hi]``; ``n/lo`` below; ``1 - (n - hi)/hi`` above, floored at 0."""
    if n_words < lo:
        return n_words / lo
    if n_words > hi:
        return max(0.0, 1.0 - (n_words - hi) / hi)
    return 1.0


def has_repetition(words: list[str]) -> bool:
    """True when a word is immediately repeated or any word trigram occurs twice."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


def criteria(prompt: str, response: str) -> dict[str, float]:
    """Every criterion's value in [0, 1] for one response (unweighted; see the module docstring)."""
    parsed = parse_prompt(prompt)
    body, closing = strip_closing(response)
    words = words_of(response)
    lo, hi = LENGTH.get(parsed.task.name, DEFAULT_LENGTH) if parsed else DEFAULT_LENGTH
    text = response.strip()
    return {
        "correct": correctness(parsed, response) if parsed else 0.5,
        "closing": float(closing),
        "length": length_score(len(words_of(body)), lo, hi),
        "form": 0.5 * float(text[:1].isupper()) + 0.5 * float(text[-1:] in (".", "!", "?")),
        "no_repetition": float(not has_repetition(words)),
        "no_filler": float(not (set(words) & FILLER)),
    }


def quantise(value: float) -> float:
    """Round half up to a multiple of :data:`QUANTUM` (so that near-equal responses tie exactly)."""
    return round(math.floor(value / QUANTUM + 0.5 + 1e-9) * QUANTUM, 4)


def combine(c: dict[str, float]) -> float:
    """The unquantised score from criterion values: ``correct`` plus style scaled by correctness."""
    style = sum(WEIGHTS[k] * v for k, v in c.items() if k != "correct")
    return WEIGHTS["correct"] * c["correct"] + (0.5 + 0.5 * c["correct"]) * style


def score(prompt: str, response: str) -> float:
    """The gold score in [0, 1] of ``response`` to ``prompt`` (see the module docstring)."""
    if not response.strip():
        return 0.0
    return quantise(combine(criteria(prompt, response)))


def rank(prompt: str, responses: list[str]) -> list[int]:
    """Dense ranks of ``responses`` by gold score: 0 = best, equal scores share a rank."""
    scores = [score(prompt, r) for r in responses]
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def best_response(prompt: str) -> str:
    """A response with the maximum gold score: the canonical correct body plus the closing."""
    parsed = parse_prompt(prompt)
    body = answer_bodies(parsed)[0] if parsed else "Here is a short and helpful answer."
    return f"{body} {CLOSING}"


def reward(prompts: list, responses: list[str], rows: list[dict]) -> list[float]:
    """The labeler as a reward function (``reward.function=trainers.data.gold:reward``, see
    ``trainers.rewards.RewardFn``): the :func:`score` of each response to its prompt, which is the string
    itself or, for a message list, the content of its last user turn. ``rows`` are not needed."""
    texts = [
        p if isinstance(p, str) else next(m["content"] for m in reversed(p) if m["role"] == "user")
        for p in prompts
    ]
    return [score(text, response) for text, response in zip(texts, responses, strict=True)]


class GoldLabeler:
    """Object form of this module's labeler, for code that wants a labeler to pass around."""

    closing = CLOSING

    def score(self, prompt: str, response: str) -> float:
        """See :func:`score`."""
        return score(prompt, response)

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        """See :func:`rank`."""
        return rank(prompt, responses)

    def best_response(self, prompt: str) -> str:
        """See :func:`best_response`."""
        return best_response(prompt)

    def criteria(self, prompt: str, response: str) -> dict[str, float]:
        """See :func:`criteria`."""
        return criteria(prompt, response)
