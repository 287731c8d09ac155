"""The synthetic world: determinism, schemas, user splits, held-out cluster, comparisons, summary."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.data import facts, gold, world
from trainers.data.templates import HELDOUT_CLUSTERS, OPTIONS_HEADER, TASKS, USE_CASE_MIX
from trainers.data.validate import validate_files

SCALE = 0.1
KIND_FILES = [(kind, split) for kind in world.KINDS for split in world.SPLITS]
FACT_TASKS = {"qa_food": "food", "qa_home": "home", "qa_kind": "kind", "classify_kind": "kind"}
"""Tasks whose answer is one attribute of the character the prompt names (the world's fact table)."""
TOPIC_CUES = {" eats ": "food", " lives in the ": "place", " likes to ": "hobby"}
"""How each topic sentence of ``classify_topic`` is phrased, and its topic."""
SENTIMENT_CUES = {
    "love": "positive", "loved": "positive", "wonderful": "positive", "nice": "positive",
    "hate": "negative", "hated": "negative", "awful": "negative", "terrible": "negative",
}  # fmt: skip
"""The one cue word in each utterance the world writes (its four positive and four negative ones)."""
ANSWER_POOLS = {
    "qa_food": facts.FOODS,
    "qa_home": facts.HOMES,
    "qa_kind": facts.KINDS,
    "opposite": tuple(facts.OPPOSITES),
}
"""Single-answer tasks and the words any of their answers could be."""


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two worlds with seed 0 (for determinism) and one with seed 1."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = tmp_path_factory.mktemp(f"world_{name}")
        out[name] = (path, world.synthesize(path, seed=seed, scale=SCALE))
    return out


def _rows(root, kind, split):
    return pq.read_table(root / kind / f"{split}.parquet").to_pylist()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _expected_answer(task: str, prompt: str) -> str | None:
    """The answer to a world prompt, read off the prompt and the world's fact table here (not through
    ``gold.answer``, which the world itself uses); None for the open-ended tasks."""
    text = prompt.split(OPTIONS_HEADER)[0]
    words = re.findall(r"[A-Za-z]+", text)
    names = [w for w in words if w in facts.ENTITIES]
    if task in FACT_TASKS:
        return getattr(facts.ENTITIES[names[0]], FACT_TASKS[task])
    if task == "passage_who":  # the subject is named in the text and in the question, the companion once
        return next(n for n in names if names.count(n) == 1)
    if task == "passage_when":
        return next(w for w in words if w in facts.DAYS)
    if task == "opposite":  # every template ends with the adjective
        return facts.OPPOSITES[words[-1]]
    if task == "extract_food":
        return next(w for w in words if w in facts.FOODS)
    if task == "classify_topic":
        return next(topic for cue, topic in TOPIC_CUES.items() if cue in text)
    if task in ("sentiment_said", "sentiment_review"):
        sentiment = next(SENTIMENT_CUES[w] for w in _words(text) if w in SENTIMENT_CUES)
        return sentiment if task == "sentiment_said" else {"positive": "yes", "negative": "no"}[sentiment]
    return None


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(worlds):
    (a, summary_a), (b, summary_b), (c, _) = worlds["a"], worlds["b"], worlds["c"]
    files = [f"{kind}/{split}.parquet" for kind, split in KIND_FILES]
    files += ["heldout/test.parquet", "tokenizer/tokenizer.json", "world.json"]
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert summary_a == summary_b == json.loads((a / "world.json").read_text())
    for name in ("demonstrations/train.parquet", "comparisons/train.parquet", "pretrain/train.parquet"):
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


def test_every_file_has_its_schema(worlds):
    root = worlds["a"][0]
    list_str, list_int = pa.list_(pa.string()), pa.list_(pa.int64())
    expected = {
        "demonstrations": {
            "prompt": pa.string(),
            "response": pa.string(),
            "user_id": pa.string(),
            "task": pa.string(),
        },
        "comparisons": {
            "prompt": pa.string(),
            "responses": list_str,
            "ranking": list_int,
            "user_id": pa.string(),
        },
        "prompts": {"prompt": pa.string(), "user_id": pa.string(), "task": pa.string(), "options": list_str},
        "pretrain": {"text": pa.string()},
    }
    for kind, split in KIND_FILES:
        schema = pq.read_schema(root / kind / f"{split}.parquet")
        for column, arrow_type in expected[kind].items():
            assert schema.field(column).type == arrow_type, (kind, column)
        assert pq.read_metadata(root / kind / f"{split}.parquet").num_rows == world.scaled(
            world.SIZES[kind][split], SCALE
        )
    heldout = pq.read_schema(root / "heldout" / "test.parquet")
    assert heldout.names == ["prompt", "task", "options", "answer"]


def test_no_user_is_in_two_splits(worlds):
    root = worlds["a"][0]
    users = {split: set() for split in world.SPLITS}
    for kind in ("demonstrations", "comparisons", "prompts"):
        for split in world.SPLITS:
            users[split] |= {r["user_id"] for r in _rows(root, kind, split)}
    assert all(users.values())
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    assert not users["valid"] & users["test"]


def test_heldout_cluster_only_in_the_heldout_file(worlds):
    root = worlds["a"][0]
    heldout_tasks = {t.name for t in TASKS.values() if t.cluster in HELDOUT_CLUSTERS}
    for kind in ("demonstrations", "comparisons", "prompts"):
        for split in world.SPLITS:
            assert not {r["task"] for r in _rows(root, kind, split)} & heldout_tasks, (kind, split)
    rows = _rows(root, "heldout", "test")
    assert {r["task"] for r in rows} == heldout_tasks
    assert {r["answer"] for r in rows} == {"positive", "negative", "yes", "no"}
    for r in rows:
        assert r["answer"] in r["options"] and r["answer"] == _expected_answer(r["task"], r["prompt"]), r


def test_comparisons_have_k_in_4_to_9_and_gold_rankings(worlds):
    """Rankings are checked against what the labeler's rule (gold's docstring) implies, not against
    ``gold.rank``, which wrote them: on a question with one answer, a response with the right answer (from
    the world's fact table), no other possible answer, the closing and no filler scores at least
    0.35 + 0.25 + 0.10 = 0.7; one without the answer at most 0.5 * 0.65, quantised 0.35. So the first kind
    ranks strictly better in every comparison that holds both."""
    root = worlds["a"][0]
    pairs = 0
    for split in world.SPLITS:
        for r in _rows(root, "comparisons", split):
            assert 4 <= len(r["responses"]) <= 9
            assert len(set(r["responses"])) == len(r["responses"])
            assert sorted(set(r["ranking"])) == list(range(max(r["ranking"]) + 1)) and max(r["ranking"]) >= 1
            if r["task"] not in ANSWER_POOLS:
                continue
            answer, prompt_words = _expected_answer(r["task"], r["prompt"]), set(_words(r["prompt"]))
            right, unanswered = [], []
            for response, rank in zip(r["responses"], r["ranking"], strict=True):
                words = set(_words(response))
                others = (words & set(ANSWER_POOLS[r["task"]])) - {answer} - prompt_words
                if answer not in words:
                    unanswered.append(rank)
                elif not others and response.endswith(facts.CLOSING) and not words & facts.FILLER:
                    right.append(rank)
            pairs += len(right) * len(unanswered)
            assert max(right, default=-1) < min(unanswered, default=99), r
    assert pairs >= 20  # enough such comparisons in the world to mean something


def test_demonstrations_and_prompts_are_world_prompts(worlds):
    """Demonstrations of single-answer tasks state the answer of the world's fact table; prompts carry
    that answer (both found here from the prompt text, see ``_expected_answer``)."""
    root = worlds["a"][0]
    answered = 0
    for r in _rows(root, "demonstrations", "train"):
        parsed = gold.parse_prompt(r["prompt"])
        assert parsed is not None and parsed.task.name == r["task"]
        assert r["response"].strip()
        expected = _expected_answer(r["task"], r["prompt"])
        if expected is not None:
            assert expected.lower() in _words(r["response"]), r
            answered += 1
    assert answered >= 20
    answers = []
    for split in world.SPLITS:
        for r in _rows(root, "prompts", split):
            assert r["answer"] == _expected_answer(r["task"], r["prompt"]), r
            assert (r["options"] is None) == (TASKS[r["task"]].options is None)
            answers.append(r["answer"])
    assert sum(a is not None for a in answers) >= 20


def test_summary_reports_sizes_mix_and_the_room(worlds):
    summary = worlds["a"][1]
    assert summary["rows"]["demonstrations"]["train"] == world.scaled(
        world.SIZES["demonstrations"]["train"], SCALE
    )
    for kind, shares in summary["use_case_achieved"].items():
        assert set(shares) == set(USE_CASE_MIX) and sum(shares.values()) == pytest.approx(1.0, abs=1e-3), kind
    assert summary["gold"]["best"] == 1.0
    assert summary["gold"]["room"] >= 0.15
    assert summary["gold"]["comparisons_model"] < summary["gold"]["comparisons_demo"]
    assert summary["tokens"]["pretrain_train"] > 10_000
    assert summary["heldout_tasks"] == ["sentiment_review", "sentiment_said"]


def test_every_file_passes_the_data_validator(worlds):
    root = worlds["a"][0]
    for kind, split in KIND_FILES:
        report = validate_files(kind, [root / kind / f"{split}.parquet"])
        assert report.ok and report.n_records > 0, (kind, split, report.problem_lines())
    report = validate_files("prompts", [root / "heldout" / "test.parquet"])
    assert report.ok, report.problem_lines()


def test_world_tokenizer_covers_the_world_compactly(worlds):
    from trainers.data.tokenizer import load_tokenizer

    root, summary = worlds["a"]
    tok = load_tokenizer(root / "tokenizer")
    assert len(tok) == summary["vocab_size"] == world.DEFAULT_VOCAB_SIZE
    text = _rows(root, "pretrain", "valid")[0]["text"]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < 1.6 * len(text.split())  # world words are mostly single tokens
