"""Reward functions: loading by spec (module, file, every bad case), calling and checking, the gold reward."""

from __future__ import annotations

import math
import pickle
import random
import sys

import pytest

from trainers.data import gold
from trainers.data.chat import user_turn
from trainers.data.templates import TASKS
from trainers.data.world_text import sample_prompt
from trainers.errors import ConfigError
from trainers.rewards import (
    RewardSourceError,
    absolute_spec,
    call_reward_function,
    check_scores,
    load_reward_function,
)

SOURCE = "reward.function='f.py:fn'"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_module_spec_loads_the_function_it_names():
    assert load_reward_function("trainers.data.gold:reward") is gold.reward
    assert load_reward_function("trainers.data.gold:GoldLabeler.score") is gold.GoldLabeler.score


def test_a_file_spec_loads_relative_to_the_current_directory_and_leaves_sys_path_alone(tmp_path, monkeypatch):
    (tmp_path / "helper.py").write_text("BONUS = 0.5\n")
    (tmp_path / "my_reward.py").write_text(
        "from helper import BONUS\n\ndef score(prompts, responses, rows):\n"
        "    return [len(r) + BONUS for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    fn = load_reward_function("my_reward.py:score")
    assert fn(["p", "q"], ["ab", "abcd"], [{}, {}]) == [2.5, 4.5]
    assert sys.path == path_before
    assert "my_reward" not in sys.modules  # imported under a private name only
    assert absolute_spec("my_reward.py:score") == f"{tmp_path / 'my_reward.py'}:score"
    assert absolute_spec("trainers.data.gold:reward") == "trainers.data.gold:reward"
    # loading again by the absolute spec (what the actors do) gives a function that behaves the same
    assert load_reward_function(absolute_spec("my_reward.py:score"))(["p"], ["abc"], [{}]) == [3.5]


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        ("trainers.data.gold", "expected 'package.module:function'"),
        ("trainers.data.gold:", "expected 'package.module:function'"),
        ("no_such_module_xyz:fn", "importing no_such_module_xyz failed: ModuleNotFoundError: No module"),
        ("missing.py:fn", "no such file"),
        ("trainers.data.gold:no_such_fn", "trainers.data.gold has no attribute 'no_such_fn'"),
        ("trainers.data.gold:QUANTUM", "QUANTUM is a float, not a callable"),
    ],
)
def test_a_bad_spec_is_one_config_line_naming_the_spec_and_the_cause(spec, cause, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reward_function(spec)
    message = one_line(err)
    assert message.startswith(f"reward.function={spec!r}: ")
    assert cause in message


def test_a_file_that_fails_to_import_names_the_exception(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import math\nraise ValueError('no config here\\nsecond line')\n")
    with pytest.raises(ConfigError) as err:
        load_reward_function(f"{broken}:fn", where="eval.reward")
    message = one_line(err)
    assert message.startswith(f"eval.reward='{broken}:fn': importing {broken} failed: ValueError: no config")
    assert "second line" not in message
    (tmp_path / "syntax.py").write_text("def fn(:\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        load_reward_function(f"{tmp_path / 'syntax.py'}:fn")


def test_check_scores_returns_floats_for_any_sized_sequence_of_numbers():
    assert check_scores([1, 0.5, True], 3, SOURCE) == [1.0, 0.5, 1.0]
    assert check_scores((0.25,), 1, SOURCE) == [0.25]
    assert all(type(s) is float for s in check_scores([1, 2], 2, SOURCE))


@pytest.mark.parametrize(
    ("scores", "row", "says"),
    [
        ([1.0, 2.0], 10, "returned 2 scores for the 3 rows 10..12"),
        ("0.5", 10, "returned a str"),
        ({"a": 1}, 10, "returned a dict"),
        ((s for s in [1.0, 2.0, 3.0]), 10, "returned a generator"),
        ([1.0, math.nan, math.inf], 11, "row 11: the score is nan"),
        ([1.0, 2.0, -math.inf], 12, "row 12: the score is -inf"),
        ([1.0, None, 2.0], 11, "row 11: the score None is not a number"),
        ([1.0, 2.0, "0.5"], 12, "row 12: the score '0.5' is not a number"),
    ],
)
def test_check_scores_names_the_source_and_the_first_offending_rows_absolute_index(scores, row, says):
    with pytest.raises(RewardSourceError) as err:
        check_scores(scores, 3, SOURCE, first_row=10)
    assert err.value.source == SOURCE
    assert err.value.row == row
    assert one_line(err).startswith(f"{SOURCE}: ")
    assert says in str(err.value)


def test_call_reward_function_wraps_an_exception_with_the_first_row_of_the_call():
    def fails(prompts, responses, rows):
        raise KeyError("answer")

    with pytest.raises(RewardSourceError) as err:
        call_reward_function(fails, ["p"] * 4, ["r"] * 4, [{}] * 4, SOURCE, first_row=8)
    assert err.value.row == 8
    assert one_line(err) == f"{SOURCE}: raised KeyError: 'answer' on the rows 8..11"
    assert isinstance(err.value.__cause__, KeyError)  # the traceback still shows the user's code


def test_call_reward_function_checks_what_the_function_returns():
    def half_nan(prompts, responses, rows):
        return [0.0 if r["ok"] else math.nan for r in rows]

    rows = [{"ok": True}, {"ok": True}, {"ok": False}]
    with pytest.raises(RewardSourceError) as err:
        call_reward_function(half_nan, ["p"] * 3, ["r"] * 3, rows, SOURCE, first_row=5)
    assert err.value.row == 7
    scores = call_reward_function(
        lambda p, r, rows: [len(x) for x in r], ["p", "q"], ["ab", ""], [{}, {}], SOURCE
    )
    assert scores == [2.0, 0.0]


def test_a_reward_source_error_survives_pickling_with_its_fields():
    err = RewardSourceError(f"{SOURCE}: row 3: the score is nan", SOURCE, 3)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.source, back.row) == (str(err), SOURCE, 3)


def test_the_gold_reward_scores_world_prompts_as_strings_and_as_messages():
    rng = random.Random(7)
    prompts = [sample_prompt(name, rng) for name in list(TASKS)[:6]]
    best = [gold.best_response(p) for p in prompts]
    rows = [{"prompt": p} for p in prompts]
    assert gold.reward(prompts, best, rows) == [1.0] * len(prompts)
    flawed = [f"Basically, {b}" for b in best]
    expected = [gold.score(p, r) for p, r in zip(prompts, flawed)]
    assert all(s < 1.0 for s in expected)
    as_messages = [[{"role": "system", "content": "Be brief."}, *user_turn(p)] for p in prompts[:3]] + [
        [*user_turn("An earlier question?"), {"role": "assistant", "content": "Yes."}, *user_turn(p)]
        for p in prompts[3:]
    ]
    assert gold.reward(prompts, flawed, rows) == expected
    assert gold.reward(as_messages, flawed, rows) == expected
    assert load_reward_function("trainers.data.gold:reward")(as_messages, best, rows) == [1.0] * len(prompts)
