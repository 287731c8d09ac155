"""`rlhf eval`'s judge: the reward model when one is given (--reward, --judge rm:DIR, reward.path), the
synthetic world's rule only by name (--judge gold), and one exit-2 line when neither is given; no model
is loaded (the directories are fakes that only pass the checks)."""

from __future__ import annotations

import json
import re

import pytest

from trainers import cli
from trainers.config import load_config
from trainers.errors import UserError
from trainers.evaluation import cli as eval_cli


def fake_model_dir(path):
    """A directory that passes the model-directory checks but holds no loadable model."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"not really")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_choose_judge():
    assert eval_cli.choose_judge(None, "/rm", None) == "rm:/rm"
    assert eval_cli.choose_judge("rm", None, "/cfg-rm") == "rm:/cfg-rm"
    assert eval_cli.choose_judge(None, "/rm", "/cfg-rm") == "rm:/rm"  # the flag wins over the config
    assert eval_cli.choose_judge("gold", "/rm", "/cfg-rm") == "gold"  # only by name
    assert eval_cli.choose_judge("rm:/x", None, "/cfg-rm") == "rm:/x"
    for judge in (None, "rm"):
        with pytest.raises(UserError, match="give --reward DIR .* or --judge gold"):
            eval_cli.choose_judge(judge, None, None)


def _eval(capsys, argv):
    rc = cli.main(["eval", *argv])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def win_rate_args(tmp_path):
    policy = fake_model_dir(tmp_path / "p")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    return ["--policy", str(policy), "--baseline", str(policy), "--prompts", str(prompts)]


def test_eval_without_a_judge_is_one_line_saying_what_to_pass(capsys, win_rate_args):
    rc, err = _eval(capsys, win_rate_args)
    assert rc == 2 and len(err) == 1
    assert "the win rate needs a judge: give --reward DIR" in err[0] and "--judge gold" in err[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward", "{tmp}/no_rm"], "--reward='.*no_rm' does not exist"),
        (["--judge", "rm", "reward.path={tmp}/no_rm"], "reward.path='.*no_rm' does not exist"),
        (["reward.path={tmp}/no_rm"], "reward.path='.*no_rm' does not exist"),
        (["--reward", "{tmp}/a", "--judge", "rm:{tmp}/b"], "give the reward model once"),
        (["--judge", "RM"], "unknown judge 'RM'"),
    ],
)
def test_eval_judge_errors(capsys, tmp_path, win_rate_args, extra, message):
    rc, err = _eval(capsys, win_rate_args + [x.format(tmp=tmp_path) for x in extra])
    assert rc == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_eval_plan_takes_the_reward_model_as_judge_by_default(tmp_path, win_rate_args):
    parser = cli.build_parser()
    rm = fake_model_dir(tmp_path / "rm")
    plan = eval_cli.check_args(
        parser.parse_args(["eval", *win_rate_args, "--reward", str(rm)]), load_config(None)
    )
    assert plan["judge"] == f"rm:{rm}"
    cfg = load_config(None, [f"reward.path={rm}"])
    assert eval_cli.check_args(parser.parse_args(["eval", *win_rate_args]), cfg)["judge"] == f"rm:{rm}"
    gold = parser.parse_args(["eval", *win_rate_args, "--judge", "gold"])
    assert eval_cli.check_args(gold, cfg)["judge"] == "gold"
