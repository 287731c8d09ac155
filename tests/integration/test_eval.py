"""Evaluation with real transformers models on CPU: generation, judges, held-out accuracy, LM loss, CLI.

The models are tiny and random (no training: the machine is small). The causal LM has untied input
and output embeddings: a random *tied* model's greedy choice is its last input token (the newline
before the response) forever, so every greedy response would be empty; untied, greedy decoding
writes varied, non-empty text. The reward model is the same trunk with a scalar head and a
``reward_bias``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from tests.conftest import REPO, template_ids
from trainers import cli
from trainers.data import gold
from trainers.data.tokenizer import load_tokenizer
from trainers.data.world import synthesize
from trainers.evaluation import generation, heldout, judges, lm_loss
from trainers.runtime.presets import build_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REWARD_BIAS = 3.25


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world (prompts, held-out cluster, pretraining text, tokenizer)."""
    root = tmp_path_factory.mktemp("world")
    synthesize(root, seed=0, scale=0.05)
    return root


@pytest.fixture(scope="module")
def prompts(world):
    return [r["prompt"] for r in pq.read_table(world / "prompts" / "test.parquet").to_pylist()][:6]


@pytest.fixture(scope="module")
def policy_run(world, tmp_path_factory):
    """A stage-output-like directory ``RUN/model`` holding a random tiny Llama and the tokenizer."""
    run = tmp_path_factory.mktemp("policy_run")
    tok = load_tokenizer(world / "tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config("tiny", tok, tie_word_embeddings=False))
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    return run


@pytest.fixture(scope="module")
def rm_dir(world, policy_run, tmp_path_factory):
    """A random reward model (the policy's trunk + a scalar head) with ``reward_bias`` in its config."""
    path = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer(world / "tokenizer")
    config = build_config("tiny", tok)
    config.num_labels, config.reward_bias = 1, REWARD_BIAS
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- generation --------------------------------------------------------------------------------------


def test_greedy_generation_is_one_string_per_prompt_and_batch_invariant(policy_run, prompts):
    batched = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=0, batch_size=4)
    single = generation.generate(
        policy_run / "model", prompts, max_new_tokens=12, temperature=0, batch_size=1
    )
    assert len(batched) == len(prompts) and all(isinstance(r, str) for r in batched)
    assert all(r.strip() for r in batched)  # an untied random model writes something
    assert batched == single  # left padding with masks and positions changes nothing


def test_sampling_is_seeded(policy_run, prompts):
    a = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=1.0, seed=5)
    b = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=1.0, seed=5)
    c = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=1.0, seed=6)
    assert a == b
    assert a != c


# --- win rates -------------------------------------------------------------------------------------------


def test_model_against_itself_greedy_is_all_ties(policy_run, prompts):
    first = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=0)
    second = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=0)
    r = judges.win_rate(prompts, first, second, judges.GoldJudge())
    assert r["win_rate"] == 0.5
    assert (r["ties"], r["n"]) == (len(prompts), len(prompts))
    assert r["ci_low"] < 0.5 < r["ci_high"]


def test_gold_best_responses_beat_empty_and_model_garbage(policy_run, prompts):
    best = [gold.best_response(p) for p in prompts]
    garbage = generation.generate(policy_run, prompts, max_new_tokens=12, temperature=1.0, seed=0)
    judge = judges.GoldJudge()
    for baseline in ([""] * len(prompts), garbage):
        r = judges.win_rate(prompts, best, baseline, judge)
        assert r["win_rate"] == 1.0 and r["wins"] == len(prompts)
        assert r["ci_low"] > 0.5
        assert judges.win_rate(prompts, baseline, best, judge)["win_rate"] == 0.0
    assert judges.gold_scores(prompts, best)["score"] == 1.0


def test_reward_model_judge_adds_bias_and_is_batch_invariant(rm_dir, prompts):
    responses = [f"Answer number {i}." for i in range(len(prompts))]
    batched = judges.RewardModelJudge(rm_dir, batch_size=4).scores(prompts, responses)
    single = judges.RewardModelJudge(rm_dir, batch_size=1).scores(prompts, responses)
    assert batched == pytest.approx(single, abs=1e-5)
    # Independent path: transformers' own pooling on an unpadded row, plus the bias from config.json.
    tok = load_tokenizer(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ids = torch.tensor([template_ids(tok, prompts[0], responses[0])])
    with torch.no_grad():
        raw = float(model(input_ids=ids).logits[0, 0])
    assert batched[0] == pytest.approx(raw + REWARD_BIAS, abs=1e-5)
    r = judges.win_rate(prompts, responses, list(responses), judges.make_judge(f"rm:{rm_dir}"))
    assert r["ties"] == len(prompts)


# --- held-out accuracy ------------------------------------------------------------------------------------


def _option_loglik(model, tok, prompt: str, option: str) -> float:
    """Log-likelihood of ``option`` as the response to ``prompt``: one unpadded transformers forward."""
    prompt_ids = template_ids(tok, prompt)
    option_ids = tok.encode(option, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + option_ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(option_ids))


def test_heldout_accuracy_rank_classification(policy_run, world, tmp_path):
    """Rank classification answers with the option the model finds likeliest. That option is found here
    per row with a plain forward pass; the accuracy must be the share of rows where it is the answer, a
    copy of the file whose answer is it must score 1.0, and one whose answer is the other option 0.0.
    The copies reverse the options column on every other row (the prompt text stays, so every option's
    likelihood does too): a pick by position cannot pass."""
    rows = heldout.load_heldout("sentiment", world)
    result = heldout.heldout_accuracy(policy_run, "sentiment", world, method="rank")
    assert result["n"] == len(rows) == len(pq.read_table(world / "heldout" / "test.parquet"))
    assert set(result["per_task"]) <= {"sentiment_said", "sentiment_review"}
    assert sum(t["n"] for t in result["per_task"].values()) == result["n"]
    assert result["chance"] == 0.5
    model, tok = generation.load_causal_lm(policy_run)
    picks = [max(r["options"], key=lambda o, r=r: _option_loglik(model, tok, r["prompt"], o)) for r in rows]
    assert result["accuracy"] == pytest.approx(sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows))
    schema = pq.read_schema(world / "heldout" / "test.parquet")
    best, worst = [], []
    for i, (row, pick) in enumerate(zip(rows, picks, strict=True)):
        options = list(reversed(row["options"])) if i % 2 else list(row["options"])
        other = next(o for o in options if o != pick)
        best.append({**row, "options": options, "answer": pick})
        worst.append({**row, "options": options, "answer": other})
    assert {r["options"].index(r["answer"]) for r in best} == {0, 1}  # the picks sit at both positions
    for name, copy, accuracy in (("best", best, 1.0), ("worst", worst, 0.0)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(copy, schema=schema), path)
        assert (
            heldout.heldout_accuracy(policy_run, "sentiment", path, method="rank")["accuracy"] == accuracy
        ), name
    generated = heldout.heldout_accuracy(
        policy_run, "sentiment", world / "heldout" / "test.parquet", method="generate"
    )
    assert generated["n"] == result["n"] and generated["method"] == "generate"


def test_option_logprobs_match_unpadded_forward(policy_run, world):
    rows = heldout.load_heldout("sentiment", world)[:3]
    model, tok = generation.load_causal_lm(policy_run)
    batched = heldout.option_logprobs(
        model, tok, [r["prompt"] for r in rows], [r["options"] for r in rows], 4
    )
    for row, scores in zip(rows, batched):
        for option, score in zip(row["options"], scores):
            prompt_ids = template_ids(tok, row["prompt"])
            option_ids = tok.encode(option, add_special_tokens=False)
            ids = torch.tensor([prompt_ids + option_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
            expected = sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(option_ids))
            assert score == pytest.approx(expected, abs=1e-4)


# --- pretraining loss -------------------------------------------------------------------------------------


def test_pretrain_loss_matches_transformers_and_is_batch_invariant(policy_run, world):
    texts = [r["text"] for r in pq.read_table(world / "pretrain" / "valid.parquet").to_pylist()][:4]
    texts.append("Tilo lives in the forest.")  # a short one: rows of very different lengths
    batched = lm_loss.pretrain_loss(policy_run, texts, max_len=64, batch_size=5)
    single = lm_loss.pretrain_loss(policy_run, texts, max_len=64, batch_size=1)
    assert batched == pytest.approx(single, rel=1e-5)
    model, tok = generation.load_causal_lm(policy_run)
    ids = torch.tensor(
        [[tok.bos_token_id, *tok.encode(texts[-1], add_special_tokens=False), tok.eos_token_id]]
    )
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)
    assert lm_loss.pretrain_loss(policy_run, texts[-1:]) == pytest.approx(hf_loss, rel=1e-5)
    assert abs(batched - math.log(len(tok))) < 0.2  # a random model is near uniform


# --- rlhf eval ----------------------------------------------------------------------------------------------


def test_cli_missing_model_dir_exits_2_with_one_line(tmp_path, world):
    cmd = [sys.executable, "-m", "trainers.cli", "eval", "--policy", str(tmp_path / "nowhere")]
    cmd += ["--baseline", str(tmp_path / "nowhere"), "--prompts", str(world / "prompts" / "test.parquet")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere' does not exist" in lines[0] and "Traceback" not in proc.stderr


def test_cli_win_rate_and_heldout_end_to_end(tmp_path, world, policy_run, capsys):
    out = tmp_path / "eval.json"
    argv = ["--policy", str(policy_run), "--baseline", str(policy_run / "model")]
    argv += ["--prompts", str(world / "prompts" / "test.parquet"), "--n", "4", "--temperature", "0"]
    argv += ["--judge", "gold"]  # the world's prompts: its rule is a meaningful judge (no default)
    argv += [
        "--max-new-tokens",
        "8",
        "--heldout-cluster",
        "sentiment",
        "--data-dir",
        str(world),
        "--out",
        str(out),
    ]
    assert cli.main(["eval", *argv]) == 0
    printed = capsys.readouterr().out
    assert (
        "win rate of" in printed
        and ": 0.500 [95% CI" in printed
        and "held-out 'sentiment' accuracy" in printed
    )
    result = json.loads(out.read_text())
    assert result["win_rate"]["win_rate"] == 0.5 and result["win_rate"]["n"] == 4
    assert result["sampling"] == {"max_new_tokens": 8, "temperature": 0.0, "seed": 0}
    assert result["heldout"]["n"] == len(heldout.load_heldout("sentiment", world))
    assert len(result["examples"]) == 4 and result["gold"]["policy"]["n"] == 4


VLLM_SCRIPT = """
import json, sys
from trainers.evaluation import generation, heldout, judges, lm_loss
if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    out = generation.generate(model, prompts, max_new_tokens=12, temperature=0, backend="vllm", device="cpu")
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_vllm_backend_greedy_matches_transformers(policy_run, prompts, tmp_path):
    """vLLM (in-process CPU engine, in a child process so its thread binding stays there) vs transformers."""
    script = tmp_path / "gen_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(policy_run), json.dumps(prompts)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    vllm_out = json.loads(result[len("RESULT ") :])
    assert vllm_out == generation.generate(policy_run, prompts, max_new_tokens=12, temperature=0)
