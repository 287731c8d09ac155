"""Evaluation maths and checks without models: win rates, Wilson intervals, option matching, CLI errors."""

from __future__ import annotations

import json

import pytest

from trainers import cli
from trainers.data import gold
from trainers.data.templates import render
from trainers.errors import DataError, UserError
from trainers.evaluation import generation, heldout, judges


class LengthJudge:
    """Toy judge: longer is better. Records its calls."""

    name = "length"

    def __init__(self):
        self.calls = []

    def scores(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [float(len(r)) for r in responses]


# --- win rate arithmetic ---------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    a = ["long answer", "xx", "same", "abc", "z"]
    b = ["short", "yy", "same", "a", "zzzz"]  # win, tie (equal score), tie (identical), win, loss
    r = judges.win_rate(prompts, a, b, LengthJudge())
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 2, 1, 5)
    assert r["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert r["score_a"] == pytest.approx((11 + 2 + 4 + 3 + 1) / 5)
    assert r["score_b"] == pytest.approx((5 + 2 + 4 + 1 + 4) / 5)


def test_judge_sees_each_side_with_its_prompts_and_order_matters():
    judge = LengthJudge()
    prompts = ["p1", "p2"]
    better, worse = ["aaaa", "bbbb"], ["a", "b"]
    assert judges.win_rate(prompts, better, worse, judge)["win_rate"] == 1.0
    assert judge.calls == [(prompts, better), (prompts, worse)]
    assert judges.win_rate(prompts, worse, better, judge)["win_rate"] == 0.0


def test_identical_responses_tie_whatever_the_judge_says():
    class Noisy:
        name = "noisy"
        counter = 0.0

        def scores(self, prompts, responses):
            self.counter += 1.0  # the second call (side B) always scores higher
            return [self.counter] * len(responses)

    r = judges.win_rate(["p", "q"], ["same", "x"], ["same", "y"], Noisy())
    assert (r["wins"], r["ties"], r["losses"]) == (0, 1, 1)


def test_win_rate_rejects_empty_and_mismatched_inputs():
    with pytest.raises(DataError):
        judges.win_rate([], [], [], LengthJudge())
    with pytest.raises(ValueError, match="lengths differ"):
        judges.win_rate(["p"], ["a", "b"], ["c"], LengthJudge())


def test_outcome():
    assert judges.outcome(0.7, 0.2) == 1.0
    assert judges.outcome(0.2, 0.7) == 0.0
    assert judges.outcome(0.5, 0.5) == 0.5


# --- Wilson interval -------------------------------------------------------------------------------


def test_wilson_hand_computed():
    # p = 0.5, n = 10: centre 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10) = 0.2634.
    low, high = judges.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    # All successes: lower bound n / (n + z^2), upper bound 1.
    low, high = judges.wilson_interval(10, 10)
    assert low == pytest.approx(10 / (10 + judges.WILSON_Z**2))
    assert high == pytest.approx(1.0)
    assert judges.wilson_interval(0, 10)[0] == pytest.approx(0.0)


def test_ci_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000):
        outcomes = [1.0] * (6 * n // 10) + [0.5] * (n // 10) + [0.0] * (3 * n // 10)
        r = judges.win_rate_from_outcomes(outcomes)
        assert r["win_rate"] == pytest.approx(0.65)
        assert r["ci_low"] < r["win_rate"] < r["ci_high"]
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2]


def test_all_ties_interval_is_centred_on_half():
    r = judges.win_rate_from_outcomes([0.5] * 20)
    assert r["win_rate"] == 0.5 and r["ties"] == 20
    assert r["ci_low"] == pytest.approx(1 - r["ci_high"])


# --- judges ------------------------------------------------------------------------------------------


def test_gold_judge_and_make_judge():
    prompt = render("qa_food", {"name": "Tilo"}, 0)
    judge = judges.make_judge("gold")
    assert judge.scores([prompt, prompt], [gold.best_response(prompt), ""]) == [1.0, 0.0]
    for bad in ("rm:", "judge", "RM:/x"):
        with pytest.raises(UserError, match="unknown judge"):
            judges.make_judge(bad)
    with pytest.raises(UserError, match="does not exist"):
        judges.make_judge("rm:/no/such/dir")


def test_gold_scores_summary():
    prompt = render("qa_food", {"name": "Tilo"}, 0)
    s = judges.gold_scores([prompt, prompt], [gold.best_response(prompt), ""])
    assert s["n"] == 2
    assert s["score"] == pytest.approx(0.5)
    assert s["closing"] == pytest.approx(0.5)  # the best response ends with the closing, "" does not
    assert s["empty_rate"] == pytest.approx(0.5)


# --- held-out accuracy: matching and aggregation ------------------------------------------------------


def test_normalize_answer():
    assert heldout.normalize_answer("  Positive. I hope this helps.") == "positive"
    assert heldout.normalize_answer("The Small one!") == "small one"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Positive.", "positive"),
        ("The sentiment is negative. I hope this helps.", "negative"),
        ("It is positive, not negative.", "positive"),  # the option named first
        ("I cannot tell.", None),
        ("positively", None),  # whole words only
    ],
)
def test_match_option(response, expected):
    assert heldout.match_option(response, ["positive", "negative"]) == expected


def test_match_option_prefers_longer_option_at_same_place():
    assert heldout.match_option("I like ice cream", ["cream", "ice cream"]) == "ice cream"


def test_accuracy_breakdown_hand_built():
    rows = [
        {"task": "t1", "answer": "yes", "options": ["yes", "no"]},
        {"task": "t1", "answer": "no", "options": ["yes", "no"]},
        {"task": "t2", "answer": "positive", "options": ["positive", "negative", "neutral", "mixed"]},
        {"task": "t3", "answer": "small"},
    ]
    predictions = ["yes", "yes", "positive", "Small."]
    r = heldout.accuracy_breakdown(rows, predictions)
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["n"] == 4
    assert r["chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.0) / 4)
    assert r["per_task"] == {
        "t1": {"accuracy": 0.5, "n": 2},
        "t2": {"accuracy": 1.0, "n": 1},
        "t3": {"accuracy": 1.0, "n": 1},
    }
    assert heldout.accuracy_breakdown(rows[:1], [None])["accuracy"] == 0.0


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_heldout_filters_cluster_and_fills_task(tmp_path):
    said = render("sentiment_said", {"name": "Tilo", "utterance": "I love it."}, 0)
    review = render("sentiment_review", {"home": "lake", "utterance": "It was awful."}, 1)
    other = render("qa_food", {"name": "Tilo"}, 0)
    path = _write_jsonl(
        tmp_path / "h.jsonl",
        [
            {"prompt": said, "options": ["positive", "negative"], "answer": "positive"},  # no task: parsed
            {"prompt": review, "task": "sentiment_review", "options": ["yes", "no"], "answer": "no"},
            {"prompt": other, "task": "qa_food", "answer": "fish"},  # another cluster
            {"prompt": review, "task": "sentiment_review"},  # no answer: cannot be scored
        ],
    )
    rows = heldout.load_heldout("sentiment", path)
    assert [r["task"] for r in rows] == ["sentiment_said", "sentiment_review"]
    assert [r["answer"] for r in rows] == ["positive", "no"]
    with pytest.raises(DataError, match="no rows of cluster 'chat'"):
        heldout.load_heldout("chat", path)


def test_load_heldout_unknown_cluster_names_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown task cluster 'feelings'.*sentiment"):
        heldout.load_heldout("feelings", tmp_path)


def test_heldout_file_from_dir_or_file(tmp_path):
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "test.parquet").write_bytes(b"")
    assert heldout.heldout_file(tmp_path) == tmp_path / "heldout" / "test.parquet"
    with pytest.raises(DataError, match="does not exist"):
        heldout.heldout_file(tmp_path / "nope.parquet")


# --- model directories ---------------------------------------------------------------------------------


def fake_model_dir(path, *, weights=True, tokenizer=True):
    """A directory that passes the checks but holds no loadable model (proves nothing was loaded)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"not really")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_resolve_model_dir_accepts_stage_output_and_model_dir(tmp_path):
    model = fake_model_dir(tmp_path / "run" / "model")
    assert generation.resolve_model_dir(tmp_path / "run") == model
    assert generation.resolve_model_dir(model) == model


@pytest.mark.parametrize(
    "weights, tokenizer, message",
    [(False, True, "no .safetensors"), (True, False, "no tokenizer.json")],
)
def test_resolve_model_dir_errors(tmp_path, weights, tokenizer, message):
    fake_model_dir(tmp_path / "m", weights=weights, tokenizer=tokenizer)
    with pytest.raises(UserError, match=message):
        generation.resolve_model_dir(tmp_path / "m", what="--policy")
    with pytest.raises(UserError, match="--policy='.*nope' does not exist"):
        generation.resolve_model_dir(tmp_path / "nope", what="--policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        generation.resolve_model_dir(tmp_path / "empty")


# --- rlhf eval: user errors exit 2 with one line, before any model is loaded ----------------------------


def _run_cli(capsys, argv):
    rc = cli.main(["eval", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_cli_missing_policy(capsys, tmp_path):
    rc, err = _run_cli(capsys, ["--policy", str(tmp_path / "missing"), "--heldout-cluster", "sentiment"])
    assert rc == 2
    assert len(err) == 1 and "does not exist" in err[0]


def test_cli_unknown_cluster_names_valid_ones(capsys, tmp_path):
    policy = fake_model_dir(tmp_path / "p")
    (tmp_path / "data").mkdir()
    rows = [{"prompt": "Is this good?", "task": "sentiment_said", "answer": "positive"}]
    _write_jsonl(tmp_path / "h.jsonl", rows)
    argv = [
        "--policy",
        str(policy),
        "--heldout-cluster",
        "moods",
        "--heldout-file",
        str(tmp_path / "h.jsonl"),
    ]
    rc, err = _run_cli(capsys, argv)
    assert rc == 2
    assert len(err) == 1 and "unknown task cluster 'moods'" in err[0] and "sentiment" in err[0]


def test_cli_bad_prompts_file_prints_validator_lines(capsys, tmp_path):
    policy = fake_model_dir(tmp_path / "p")
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    rc, err = _run_cli(
        capsys, ["--policy", str(policy), "--baseline", str(policy), "--prompts", str(prompts)]
    )
    assert rc == 2
    assert err and err[0].startswith(f"{prompts}:2:") and "prompt" in err[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to evaluate"),
        (["--baseline", "{p}"], "needs both --baseline DIR and --prompts FILE"),
        (["--heldout-cluster", "sentiment"], "needs --data-dir"),
        (["--pretrain-file", "{d}/none.parquet"], "does not exist"),
        (["--n", "0", "--heldout-cluster", "sentiment"], "--n must be at least 1"),
    ],
)
def test_cli_usage_errors(capsys, tmp_path, extra, message):
    policy = fake_model_dir(tmp_path / "p")
    extra = [x.format(p=policy, d=tmp_path) for x in extra]
    rc, err = _run_cli(capsys, ["--policy", str(policy), *extra])
    assert rc == 2
    assert len(err) == 1 and message in err[0]


def test_cli_bad_judge_before_loading(capsys, tmp_path):
    policy = fake_model_dir(tmp_path / "p")
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    base = ["--policy", str(policy), "--baseline", str(policy), "--prompts", str(prompts)]
    rc, err = _run_cli(capsys, [*base, "--judge", "human"])
    assert rc == 2 and len(err) == 1 and "unknown judge 'human'" in err[0]
    rc, err = _run_cli(capsys, [*base, "--judge", f"rm:{tmp_path / 'no_rm'}"])
    assert rc == 2 and len(err) == 1 and "--judge reward model" in err[0]


# --- stop ids (docs/ppo_details.md item 28) -----------------------------------------------------------


class IdsTokenizer:
    """Toy tokenizer: EOS 2, PAD 0; decodes ids as space-separated numbers."""

    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_decode_cuts_before_the_first_stop_id_of_the_set():
    tok = IdsTokenizer()
    rows = [[5, 9, 6, 2], [5, 6, 2, 9], [5, 6]]
    assert generation.decode_responses(tok, rows, stop_ids=(2, 9)) == ["5", "5 6", "5 6"]
    assert generation.decode_responses(tok, rows) == ["5 9 6", "5 6", "5 6"]  # fallback: the tokenizer's EOS


def test_hf_generation_stops_on_every_stop_id():
    tok = IdsTokenizer()
    assert generation._generation_config(tok, 8, 1.0, stop_ids=(9, 2, 9)).eos_token_id == [2, 9]
    assert generation._generation_config(tok, 8, 0.0).eos_token_id == [2]
