"""The synthetic instruction world: every data set of the demo, written deterministically from a seed.

``synthesize(DIR, seed, scale)`` writes::

    DIR/demonstrations/{train,valid,test}.parquet   prompt, response, user_id, task
    DIR/comparisons/{train,valid,test}.parquet      prompt, responses, ranking, user_id, task
    DIR/prompts/{train,valid,test}.parquet          prompt, user_id, task, options, answer
    DIR/pretrain/{train,valid,test}.parquet         text
    DIR/heldout/test.parquet                        prompt, task, options, answer (held-out cluster)
    DIR/tokenizer/                                  byte-level BPE trained on the world's text
    DIR/world.json                                  the summary returned by ``synthesize``

The world is a few dozen animal characters with colours, homes, foods, hobbies and friends (the
fixed facts of :mod:`trainers.data.gold`). The *pretraining corpus* states those facts in many
phrasings, tells small stories and adds plain prose; it is the base model's text and the ptx
distribution. *Prompts* are FLAN-style templates (:mod:`trainers.data.templates`) drawn with the
InstructGPT use-case mix (Table 1). *Demonstrations* are correct answers written with the
imperfections real ones have: only ~30% end with the friendly closing the labelers prefer, ~25%
contain a filler word, ~12% ramble past the useful length, ~12% miss the final full stop.
*Comparisons* hold K = 4..9 responses per prompt (the paper's range) from a mix of sources --
best responses, demonstration-like answers, corrupted variants (truncated, repeated words, wrong
entity, off-topic, rambling, filler, spammed closing, lower-cased) and model-like samples (a word
bigram chain over the pretraining text) -- ranked by the gold labeler, ties allowed, groups where
everything ties are redrawn.

Deviations from InstructGPT, on purpose: the use-case mix is followed as is, but the prompts are
templated (a tiny model must be able to learn them); the held-out ``sentiment`` cluster is not in
the mix at all (FLAN-style zero-shot evaluation only). Users are synthetic ids; splits are by user.

What the tiny preset makes of it (measured once, at about the CPU demo's budget: 500 pretraining
steps of 16 x 256 tokens, 400 SFT steps of 32 demonstrations, 300 RM steps of 8 groups): SFT
samples score ~0.49 gold (correct ~0.5, closing ~0.25, filler ~0.3); the reward model (SFT trunk +
scalar head) reaches 0.85 pairwise accuracy on held-out comparisons and scores a response +2.3
higher with the closing than without; picking the RM's best of 4 SFT samples wins 0.72 against a
plain SFT sample under the gold labeler -- the room PPO has. Held-out (sentiment) zero-shot answers
are at 0%: like FLAN's small models, the tiny model does not transfer to unseen task clusters.

Determinism: each (kind, split) draws from its own ``random.Random`` seeded by a string of the seed
(string seeds hash with SHA-512, so the stream does not depend on ``PYTHONHASHSEED``); rows are
written in generation order with fixed Arrow schemas, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.data import gold
from trainers.data.gold import CLOSING, DAYS, ENTITIES, FOODS, HOMES, NAMES, OBJECTS, SKILLS, USERS, Entity
from trainers.data.templates import HELDOUT_CLUSTERS, TASKS, USE_CASE_MIX, render, tasks_for_use_case
from trainers.data.tokenizer import train_tokenizer

SPLITS: tuple[str, ...] = ("train", "valid", "test")
KINDS: tuple[str, ...] = ("demonstrations", "comparisons", "prompts", "pretrain")
SIZES: dict[str, dict[str, int]] = {
    "demonstrations": {"train": 3000, "valid": 300, "test": 300},
    "comparisons": {"train": 1200, "valid": 150, "test": 150},
    "prompts": {"train": 1000, "valid": 200, "test": 200},
    "pretrain": {"train": 3400, "valid": 150, "test": 150},
}
"""Rows per kind and split at ``scale=1.0`` (pretrain rows are documents of ~100 words)."""
HELDOUT_ROWS = 400
"""Held-out cluster prompts at ``scale=1.0``."""
USERS_PER_SPLIT: dict[str, int] = {"train": 160, "valid": 20, "test": 20}
"""Synthetic labelers/customers per split at ``scale=1.0``; no user is in two splits."""
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
DEFAULT_VOCAB_SIZE = 1024
"""Default BPE vocabulary size of the world's tokenizer."""

_RAMBLE = (
    "There are many things one could say about this.",
    "It is always good to think about such questions.",
    "The weather was nice that day, with a soft wind.",
    "Some people like to talk for a long time about it.",
    "That is all that comes to mind for now, more or less.",
)
_FILLER_PREFIXES = ("Basically, ", "Honestly, ", "Actually, ")
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


# --------------------------------------------------------------------------------------------------
# Sentences about the world
# --------------------------------------------------------------------------------------------------


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
        return rng.sample([e.kind, *rng.sample([k for k in gold.KINDS if k != e.kind], 2)], 3)
    raise KeyError(f"no generator for field {field!r}")


def sample_fields(task_name: str, rng: random.Random) -> dict:
    """Draw the fields of one prompt of ``task_name`` (closed vocabularies first, then free text)."""
    task = TASKS[task_name]
    wanted = list(task.fields()) + (["options"] if task_name == "classify_kind" else [])
    fields: dict = {}
    closed = {"user": USERS, "object": OBJECTS, "home": HOMES, "day": DAYS, "count": tuple(gold.COUNT_WORDS)}
    closed["adjective"] = tuple(gold.OPPOSITES)
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


# --------------------------------------------------------------------------------------------------
# Responses: demonstrations, corruptions, model-like samples
# --------------------------------------------------------------------------------------------------


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
    pools = {w.lower(): p for p in (NAMES, FOODS, HOMES, SKILLS, OBJECTS, DAYS, USERS, gold.KINDS) for w in p}
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


# --------------------------------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------------------------------


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
    a, b = rng.choice(gold._OPPOSITE_PAIRS)[:: rng.choice((1, -1))]
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


# --------------------------------------------------------------------------------------------------
# Rows, files and the summary
# --------------------------------------------------------------------------------------------------

SCHEMAS: dict[str, pa.Schema] = {
    "demonstrations": pa.schema(
        [("prompt", pa.string()), ("response", pa.string()), ("user_id", pa.string()), ("task", pa.string())]
    ),
    "comparisons": pa.schema(
        [
            ("prompt", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("ranking", pa.list_(pa.int64())),
            ("user_id", pa.string()),
            ("task", pa.string()),
        ]
    ),
    "prompts": pa.schema(
        [
            ("prompt", pa.string()),
            ("user_id", pa.string()),
            ("task", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
        ]
    ),
    "pretrain": pa.schema([("text", pa.string())]),
    "heldout": pa.schema(
        [
            ("prompt", pa.string()),
            ("task", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
        ]
    ),
}
"""Column types of every written file (fixed, so files are byte-identical across runs)."""


def scaled(n: int, scale: float, minimum: int = 4) -> int:
    """``n * scale`` rounded, at least ``minimum``."""
    return max(minimum, round(n * scale))


def assign_users(seed: int, scale: float) -> dict[str, list[str]]:
    """Disjoint user ids per split (``user-0007``...), shuffled so ids say nothing about the split."""
    counts = {split: scaled(n, scale, minimum=2) for split, n in USERS_PER_SPLIT.items()}
    ids = [f"user-{i:04d}" for i in range(sum(counts.values()))]
    random.Random(f"{seed}:users").shuffle(ids)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = sorted(ids[start : start + counts[split]])
        start += counts[split]
    return out


def _options_and_answer(prompt: str) -> dict:
    """The ``options`` and ``answer`` columns of a prompt row (None where the task has none)."""
    parsed = gold.parse_prompt(prompt)
    return {"options": list(parsed.options) if parsed.options else None, "answer": gold.answer(prompt)}


def make_rows(
    kind: str, n: int, users: list[str], rng: random.Random, chain: BigramChain, log: dict
) -> list[dict]:
    """``n`` rows of one kind for one split; ``log`` collects comparison sources and scores."""
    if kind == "pretrain":
        return [{"text": pretrain_document(rng)} for _ in range(n)]
    rows: list[dict] = []
    while len(rows) < n:
        task = sample_task(rng)
        prompt = sample_prompt(task, rng)
        row = {"prompt": prompt, "user_id": rng.choice(users), "task": task}
        if kind == "demonstrations":
            row["response"] = demonstration(prompt, rng)
        elif kind == "prompts":
            row.update(_options_and_answer(prompt))
        else:
            group = comparison_group(prompt, chain, rng)
            if group is None:
                log["redrawn"] = log.get("redrawn", 0) + 1
                continue
            row["responses"], row["ranking"], sources = group
            for response, source in zip(row["responses"], sources):
                log.setdefault(source, []).append(gold.score(prompt, response))
        rows.append(row)
    return rows


def heldout_rows(n: int, rng: random.Random) -> list[dict]:
    """Prompts of the held-out clusters with their options and gold answer (zero-shot evaluation)."""
    tasks = [t.name for t in TASKS.values() if t.cluster in HELDOUT_CLUSTERS]
    rows = []
    for _ in range(n):
        task = rng.choice(tasks)
        prompt = sample_prompt(task, rng)
        rows.append({"prompt": prompt, "task": task, **_options_and_answer(prompt)})
    return rows


def write_rows(path: Path, schema: pa.Schema, rows: list[dict]) -> None:
    """Write rows as Parquet with a fixed schema and no time-dependent metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def use_case_shares(rows: list[dict]) -> dict[str, float]:
    """Share of each InstructGPT use case among rows (by their ``task``), in the mix's order."""
    counts = {use_case: 0 for use_case in USE_CASE_MIX}
    for row in rows:
        counts[TASKS[row["task"]].use_case] += 1
    return {k: round(v / max(1, len(rows)), 4) for k, v in counts.items()}


def _mean(values: list[float]) -> float:
    """Mean rounded to 4 places (0.0 for no values)."""
    return round(statistics.fmean(values), 4) if values else 0.0


def gold_summary(demos: list[dict], log: dict) -> dict:
    """Mean gold scores: demonstrations, best responses to the same prompts, comparison sources."""
    demo_scores = [gold.score(r["prompt"], r["response"]) for r in demos]
    best_scores = [gold.score(r["prompt"], gold.best_response(r["prompt"])) for r in demos]
    corrupt = [s for source, scores in log.items() if source == "corrupt" for s in scores]
    out = {
        "demonstrations": _mean(demo_scores),
        "best": _mean(best_scores),
        "room": round(_mean(best_scores) - _mean(demo_scores), 4),
        "demo_closing_rate": _mean([float(gold.strip_closing(r["response"])[1]) for r in demos]),
    }
    for source in SOURCE_MIX:
        out[f"comparisons_{source}"] = _mean(log.get(source, []) if source != "corrupt" else corrupt)
    return out


def token_summary(tokenizer, data: dict[str, dict[str, list[dict]]]) -> dict:
    """Token counts of the pretraining splits and mean/max prompt and response lengths (train)."""

    def lengths(texts: list[str]) -> list[int]:
        """Token count of each text (``[0]`` for none, so max/mean stay defined)."""
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else [0]

    prompts = lengths([r["prompt"] for r in data["demonstrations"]["train"]])
    responses = lengths([r["response"] for r in data["demonstrations"]["train"]])
    out = {f"pretrain_{s}": sum(lengths([r["text"] for r in data["pretrain"][s]])) for s in SPLITS}
    out |= {"prompt_mean": _mean(prompts), "prompt_max": max(prompts)}
    out |= {"response_mean": _mean(responses), "response_max": max(responses)}
    return out


def tokenizer_texts(data: dict[str, dict[str, list[dict]]]) -> list[str]:
    """The text the world's tokenizer learns from: pretraining and training-split prompts/responses."""
    texts = [r["text"] for r in data["pretrain"]["train"]]
    texts += [r["prompt"] for r in data["demonstrations"]["train"]]
    texts += [r["response"] for r in data["demonstrations"]["train"]]
    texts += [r["prompt"] for r in data["prompts"]["train"]]
    return texts


def synthesize(
    out_dir: str | Path, seed: int = 0, scale: float = 1.0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> dict:
    """Write the whole synthetic world into ``out_dir`` (see the module docstring); return its summary.

    Same ``seed`` and ``scale`` -> byte-identical Parquet files and tokenizer. ``scale`` multiplies
    every row count (0.1 makes a set for tests in about a second).
    """
    out = Path(out_dir)
    users = assign_users(seed, scale)
    chain = BigramChain([pretrain_document(random.Random(f"{seed}:chain:{i}")) for i in range(200)])
    data: dict[str, dict[str, list[dict]]] = {}
    log: dict = {}
    for kind in KINDS:
        data[kind] = {}
        for split in SPLITS:
            rng = random.Random(f"{seed}:{kind}:{split}")
            n = scaled(SIZES[kind][split], scale)
            data[kind][split] = make_rows(kind, n, users[split], rng, chain, log if split == "train" else {})
            write_rows(out / kind / f"{split}.parquet", SCHEMAS[kind], data[kind][split])
    heldout = heldout_rows(scaled(HELDOUT_ROWS, scale), random.Random(f"{seed}:heldout"))
    write_rows(out / "heldout" / "test.parquet", SCHEMAS["heldout"], heldout)
    tokenizer = train_tokenizer(tokenizer_texts(data), out / "tokenizer", vocab_size=vocab_size)
    summary = summarize_world(seed, scale, data, heldout, users, log, tokenizer)
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize_world(seed, scale, data, heldout, users, log, tokenizer) -> dict:
    """The ``world.json`` summary: sizes, use-case mix achieved, gold-score statistics, token counts."""
    comparisons = data["comparisons"]["train"]
    return {
        "seed": seed,
        "scale": scale,
        "rows": {kind: {s: len(data[kind][s]) for s in SPLITS} for kind in KINDS} | {"heldout": len(heldout)},
        "users": {s: len(users[s]) for s in SPLITS},
        "use_case_target": USE_CASE_MIX,
        "use_case_achieved": {
            kind: use_case_shares(data[kind]["train"])
            for kind in ("demonstrations", "comparisons", "prompts")
        },
        "heldout_clusters": list(HELDOUT_CLUSTERS),
        "heldout_tasks": sorted({r["task"] for r in heldout}),
        "comparisons_k_mean": _mean([len(r["responses"]) for r in comparisons]),
        "comparisons_redrawn": log.get("redrawn", 0),
        "gold": gold_summary(data["demonstrations"]["train"], log),
        "tokens": token_summary(tokenizer, data),
        "vocab_size": len(tokenizer),
    }
