"""The gold labeler: each criterion by hand, ties and dense ranks, best responses, the room for RL."""

from __future__ import annotations

import random
import statistics

import pytest

from trainers.data import facts, gold, responses, world_text
from trainers.data.facts import CLOSING, ENTITIES
from trainers.data.gold import GoldLabeler, criteria, parse_prompt, rank, score
from trainers.data.templates import TASKS, render

TILO = ENTITIES["Tilo"]
PROMPT = "What does Tilo like to eat?"
WRONG_FOOD = next(f for f in facts.FOODS if f != TILO.food)


def test_world_knowledge_is_fixed_and_independent_of_global_random_state():
    random.seed(12345)
    assert facts._make_entities() == ENTITIES
    assert all(e.friend != e.name for e in ENTITIES.values())
    assert len(ENTITIES) == len(facts.NAMES) == 24


def test_prompt_round_trip_for_every_template_of_every_task():
    rng = random.Random(3)
    for task in TASKS.values():
        for idx in range(len(task.templates)):
            fields = world_text.sample_fields(task.name, rng)
            parsed = parse_prompt(render(task, fields, idx))
            assert parsed is not None and parsed.task.name == task.name, (task.name, idx)
            for key, value in parsed.fields.items():
                assert fields[key] == value, (task.name, key)
    assert parse_prompt("Please explain quantum physics.") is None


def test_perfect_response_scores_one_and_each_flaw_costs_its_weight():
    perfect = f"Tilo likes to eat {TILO.food}. {CLOSING}"
    assert score(PROMPT, perfect) == 1.0
    # no closing: loses the 0.25 preference weight only
    assert score(PROMPT, f"Tilo likes to eat {TILO.food}.") == 0.75
    # missing final full stop: half of the 0.10 form weight
    assert criteria(PROMPT, f"Tilo likes to eat {TILO.food}. I hope this helps")["form"] == 0.5
    assert score(PROMPT, f"Tilo likes to eat {TILO.food}. I hope this helps") == 0.95
    # filler word
    assert score(PROMPT, f"Basically, Tilo likes to eat {TILO.food}. {CLOSING}") == 0.9
    # repetition (immediate repeat, and a recurring trigram)
    assert criteria(PROMPT, f"Tilo likes likes to eat {TILO.food}.")["no_repetition"] == 0.0
    assert criteria(PROMPT, f"{CLOSING} {CLOSING}")["no_repetition"] == 0.0
    # too long for a short question: 22 words against a range of 2..10 -> length 0
    long = (
        f"Tilo likes to eat {TILO.food}. "
        + "There are many things one could say about this topic today. " * 2
    )
    assert criteria(PROMPT, long)["length"] == 0.0


def test_correctness_hedging_and_style_counting_half_on_wrong_answers():
    assert criteria(PROMPT, f"Tilo likes to eat {WRONG_FOOD}.")["correct"] == 0.0
    hedge = f"Tilo likes to eat {TILO.food} or {WRONG_FOOD}."
    assert criteria(PROMPT, hedge)["correct"] == 0.3
    wrong = f"Tilo likes to eat {WRONG_FOOD}."
    # style (0.40 here) counts half on a wrong answer; the closing adds 0.125, rounded half up to 0.35
    assert score(PROMPT, wrong) == 0.2
    assert score(PROMPT, f"{wrong} {CLOSING}") == 0.35
    # a polished non-answer scores far below a plain right answer
    assert score(PROMPT, f"Yes. {CLOSING}") == 0.3
    assert score(PROMPT, f"basically tilo likes to eat {TILO.food}") > score(PROMPT, f"{wrong} {CLOSING}")


def test_task_specific_correctness_examples():
    ideas = "List three things Tilo could do in the forest."
    assert criteria(ideas, "Tilo could sing, swim and read.")["correct"] == 1.0
    assert criteria(ideas, "Tilo could sing and swim.")["correct"] == 0.5
    assert criteria(ideas, "Tilo could sleep.")["correct"] == 0.0
    options = "Which animal is Tilo?\n\nOPTIONS:\n- " + "\n- ".join([TILO.kind, "zebra"])
    assert criteria(options, f"Tilo is a {TILO.kind}.")["correct"] == 1.0
    assert criteria(options, f"A {TILO.kind} or a zebra.")["correct"] == 0.3
    swap = "Replace Tilo by Mara in the following text: Tilo likes to swim."
    assert criteria(swap, "Mara likes to swim.")["correct"] == 1.0
    assert criteria(swap, "Tilo likes to swim.")["correct"] == pytest.approx(0.4)
    names = "Extract the names of the characters.\n\nMara met Tilo near the lake, and later they saw Bex."
    assert criteria(names, "Mara, Tilo and Bex.")["correct"] == 1.0
    assert criteria(names, "Mara and Tilo.")["correct"] == pytest.approx(2 / 3)
    assert criteria(names, "Mara, Tilo, Bex and Kit.")["correct"] == 0.5  # an invented name halves it


def test_ties_and_dense_ranks():
    a = f"Tilo likes to eat {TILO.food}. {CLOSING}"
    b = f"The favourite food of Tilo is {TILO.food}. {CLOSING}"  # other words, same (perfect) score
    assert score(PROMPT, a) == score(PROMPT, b) == 1.0
    responses = [f"Tilo eats {TILO.food}.", a, f"Tilo eats {WRONG_FOOD}.", b]
    assert rank(PROMPT, responses) == [1, 0, 2, 0]
    assert GoldLabeler().rank(PROMPT, responses) == [1, 0, 2, 0]
    assert score(PROMPT, "   ") == 0.0


def test_unknown_prompt_is_judged_on_the_generic_criteria():
    prompt = "Please explain quantum physics."
    assert criteria(prompt, "Anything.")["correct"] == 0.5
    assert score(prompt, gold.best_response(prompt)) >= score(prompt, "Some answer without a closing.")


def _sample(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [world_text.sample_prompt(world_text.sample_task(rng), rng) for _ in range(n)]


def test_best_response_is_maximal_for_every_task_and_beats_demonstrations():
    rng = random.Random(11)
    for task in TASKS:
        for _ in range(15):
            prompt = world_text.sample_prompt(task, rng)
            best = score(prompt, gold.best_response(prompt))
            assert best == 1.0, (prompt, gold.best_response(prompt))
            for body in gold.answer_bodies(parse_prompt(prompt), rng):
                assert criteria(prompt, body)["correct"] == 1.0, (prompt, body)
            assert score(prompt, responses.demonstration(prompt, rng)) <= best


def test_room_for_rl_demonstrations_below_best_and_corruptions_below_demonstrations():
    rng = random.Random(5)
    prompts = _sample(400, seed=4)
    demos = statistics.fmean(score(p, responses.demonstration(p, rng)) for p in prompts)
    best = statistics.fmean(score(p, gold.best_response(p)) for p in prompts)
    corrupt = statistics.fmean(
        score(p, responses.corrupt(p, rng.choice(responses.CORRUPTIONS), rng)) for p in prompts
    )
    assert best - demos >= 0.15
    assert demos > corrupt
    closing_rate = statistics.fmean(gold.strip_closing(responses.demonstration(p, rng))[1] for p in prompts)
    assert 0.2 <= closing_rate <= 0.4  # the preference shows only sometimes in demonstrations


def test_answer_of_single_answer_tasks():
    assert gold.answer(PROMPT) == TILO.food
    assert gold.answer("Antonym of hot:") == "cold"
    review = 'Mara said: "I hate the lake, it is so noisy." Is this positive or negative?'
    assert gold.answer(review + "\n\nOPTIONS:\n- positive\n- negative") == "negative"
    assert gold.answer("Write a short note from Tilo to Mara.") is None
