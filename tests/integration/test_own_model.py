"""A user's own model and data: `rlhf sft`, `rlhf rm` and `rlhf ppo` through the CLI on chat models shaped
like Qwen2.5-Instruct and Llama-3-Instruct (tests/chat_models.py) and TRL-style JSONL data.

For each family of :data:`tests.chat_models.FAMILIES` one module-scoped fixture builds the model directory
(random ``tiny`` weights, the family's tokenizer and chat template), writes the session's synthetic world
(``world_dir``) as ``messages`` / ``prompt``-``chosen``-``rejected`` JSONL (no pretraining kind:
``ppo.ptx_coef=0``), and runs the three stages once as subprocesses, each a driver joining the session's
Ray. The tests then read the outputs with plain transformers:

- the SFT model learned the replies in its *own* template: their mean NLL under the model's
  :class:`trainers.data.chat.ChatFormat` is below the NLL of the same replies in the world's
  ``<|user|>\\n…\\n<|assistant|>\\n`` format for nearly every held-out demonstration, and its greedy replies
  to held-out prompts end with the template's end-of-turn token;
- the saved SFT tokenizer renders conversations exactly as the original model's;
- PPO's responses end with a stop id (``rollout/eos_rate``) and the run's stop set is the family's;
- the RM, loaded with ``AutoModelForSequenceClassification``, scores chosen above rejected on the held-out
  pairs (``comparisons/valid``).

Observed on the shared 2-core machine (the session's world at ``SYNTH_SCALE`` 0.3: 900 demonstrations,
360 comparisons, 45 held-out pairs; SFT 112 steps, RM 45 steps, PPO 2 iterations of 32 responses):

==============================  ===================  =======================
metric                          qwen2.5              llama3
==============================  ===================  =======================
reply NLL own / world template  1.459 / 1.728        1.237 / 1.679
rows with own < world           95%                  98%
greedy replies ending in EOT    100%                 100%
PPO stop ids                    im_end, endoftext    end_of_text, eom, eot
PPO rollout/eos_rate            1.0, 1.0             0.969, 1.0
RM accuracy (chosen > rejected) 0.978                0.956
==============================  ===================  =======================

The whole file, alone on a quiet machine: 5.8 min (qwen2.5 150 s, llama3 198 s: SFT, RM and PPO as drivers
of the session's Ray; the stage fixtures came from a cache).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.chat_models import FAMILIES, ChatFamily, world_texts, write_trl_data
from tests.conftest import REPO, TINY_CONFIG, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

SFT_OVERRIDES = ["sft.epochs=4", "sft.lr=3e-3"]
"""The base model is random, not pretrained: a pretraining-sized learning rate and a few more epochs
(tiny.yaml's 5e-4 x 2 epochs leaves the reply loss near 5.4 nats)."""
RM_OVERRIDES = ["rm.epochs=2", "rm.lr=5e-4"]
PPO_ITERATIONS = 2
PPO_OVERRIDES = [
    f"ppo.iterations={PPO_ITERATIONS}",
    "ppo.prompts_per_iteration=16",
    "ppo.samples_per_prompt=2",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=4",
    "ppo.ptx_coef=0",  # the data has no pretraining kind
    "rollout.max_new_tokens=48",
]
"""A short PPO run: 2 iterations of 32 responses, one policy and one critic worker as tiny.yaml has."""
STAGE_TIMEOUT_S = 600
HELD_OUT = 40
"""Held-out rows each check reads (demonstrations, prompts)."""


@dataclass
class OwnModelRun:
    """The three stage runs of one family: its original model directory, data and output directories."""

    family: ChatFamily
    base: Path
    data: Path
    sft: Path
    rm: Path
    ppo: Path
    ppo_stdout: str
    """What `rlhf ppo` printed (its start-up lines name the stop ids)."""


def run_cli(stage: str, out: Path, address: str, *overrides: str) -> str:
    """``python -m trainers.cli STAGE --config tiny.yaml OVERRIDES --out OUT`` joining the Ray at ``address``
    (``cluster.ray_address``, as a user's driver joins a running cluster); its stdout. A failed stage fails
    the test with the end of its stderr."""
    args = [sys.executable, "-m", "trainers.cli", stage, "--config", str(TINY_CONFIG), *overrides]
    proc = subprocess.run(
        [*args, f"cluster.ray_address={address}", "--out", str(out)],
        env=subprocess_env(own_ray=True),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=STAGE_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"rlhf {stage} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def trl_data(world_dir, tmp_path_factory) -> Path:
    """The session's world as TRL-style JSONL: demonstrations, comparisons and prompts."""
    out = tmp_path_factory.mktemp("trl_data")
    return write_trl_data(world_dir, out, kinds=("demonstrations", "comparisons", "prompts"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def own_run(request, ray_local, trl_data, tmp_path_factory) -> OwnModelRun:
    """One family's model built, then SFT -> RM -> PPO on ``trl_data`` through the CLI, each command a
    driver of the session's Ray (a Ray of its own per command cost ~10 s of start-up and idle workers)."""
    address = ray_local.get_runtime_context().gcs_address
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name.replace(".", "_"))
    base = family.build(root / "base", world_texts())
    data = f"data.dir={trl_data}"
    sft, rm, ppo = root / "sft", root / "rm", root / "ppo"
    run_cli("sft", sft, address, data, f"model.path={base}", *SFT_OVERRIDES)
    run_cli("rm", rm, address, data, f"model.path={sft / 'model'}", *RM_OVERRIDES)
    models = [f"model.path={sft / 'model'}", f"reward.path={rm / 'model'}"]
    stdout = run_cli("ppo", ppo, address, data, *models, *PPO_OVERRIDES)
    return OwnModelRun(family, base, trl_data, sft, rm, ppo, stdout)


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    """The first ``n`` records of a JSONL file (all when None)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def chat_format(model_dir: Path):
    """The model directory's tokenizer (plain ``AutoTokenizer``) and its ChatFormat."""
    from transformers import AutoTokenizer

    from trainers.data.chat import ChatFormat

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok, ChatFormat.from_tokenizer(tok, model_dir)


@torch.no_grad()
def reply_nll(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Per-token NLL of ``reply`` after ``prompt`` under a causal LM, shape (len(reply),)."""
    ids = torch.tensor([prompt + reply])  # (1, T)
    logprobs = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)  # (R, V)
    return -logprobs.gather(-1, ids[0, len(prompt) :, None])[:, 0]


def template_nlls(model, tok, fmt, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Mean reply-text NLL of each demonstration under the model's own template and under the world's
    format (``BOS`` if the tokenizer adds one, ``<|user|>\\n{prompt}\\n<|assistant|>\\n``, then the reply's
    tokens), both encoded with ``tok``. The end-of-turn token is left out: the world's format has none."""
    from trainers.data.tokenizer import format_prompt

    own, world = [], []
    for row in rows:
        turns, reply = row["messages"][:-1], row["messages"][-1]["content"]
        prompt, reply_ids = fmt.reply_ids(turns, reply)
        own.append(reply_nll(model, prompt, reply_ids)[:-1].mean().item())
        world_prompt = tok.encode(format_prompt(turns[-1]["content"]), add_special_tokens=True)
        world_reply = tok.encode(reply, add_special_tokens=False)
        world.append(reply_nll(model, world_prompt, world_reply).mean().item())
    return own, world


@torch.no_grad()
def greedy_replies(model, fmt, prompts: list[list[dict]], max_new_tokens: int = 48) -> list[list[int]]:
    """Greedy continuations of each prompt in the model's template (one left-padded batch), each cut after
    its first stop id (a reply that hit ``max_new_tokens`` keeps all its tokens)."""
    from transformers import GenerationConfig

    encoded = [fmt.prompt_ids(messages) for messages in prompts]
    pad = fmt.pad_id if fmt.pad_id is not None else fmt.stop_ids[0]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in encoded])  # (B, P), left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in encoded])  # (B, P)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(fmt.stop_ids), pad_token_id=pad
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]  # (B, N)
    replies = []
    for row in out.tolist():
        ends = [i for i, token in enumerate(row) if token in fmt.stop_ids]
        replies.append(row[: ends[0] + 1] if ends else row)
    return replies


def test_sft_learned_its_own_template_and_to_end_the_turn(own_run):
    """SFT trained in the model's template: the replies are likelier there than after the world's
    ``<|user|>``/``<|assistant|>`` wrapping (false if SFT still rendered the world's format), and greedy replies
    end with the template's end-of-turn token (false if the targets left it out)."""
    from transformers import AutoModelForCausalLM

    model_dir = own_run.sft / "model"
    tok, fmt = chat_format(model_dir)
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids(own_run.family.end_of_turn)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    own, world = template_nlls(
        model, tok, fmt, read_jsonl(own_run.data / "demonstrations/valid.jsonl", HELD_OUT)
    )
    own_mean, world_mean = sum(own) / len(own), sum(world) / len(world)
    below = sum(o < w for o, w in zip(own, world)) / len(own)
    prompts = [r["messages"] for r in read_jsonl(own_run.data / "prompts/valid.jsonl", HELD_OUT)]
    replies = greedy_replies(model, fmt, prompts)
    ended = sum(bool(r) and r[-1] == fmt.end_of_turn_id for r in replies) / len(replies)
    print(
        f"{own_run.family.name}: reply NLL own {own_mean:.3f} world {world_mean:.3f}; own below world on "
        f"{below:.0%} of rows; greedy replies ending with the end-of-turn token {ended:.0%}"
    )
    assert own_mean < world_mean - 0.15 and below >= 0.8, (own_mean, world_mean, below)
    assert ended >= 0.8, [tok.decode(r) for r in replies]


def test_saved_sft_tokenizer_renders_as_the_original(own_run):
    """The SFT model directory keeps the model's chat template and vocabulary: with and without the
    generation prompt, with the template's default system turn and with an explicit one."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(str(own_run.base))
    saved = AutoTokenizer.from_pretrained(str(own_run.sft / "model"))
    conversations = [r["messages"] for r in read_jsonl(own_run.data / "demonstrations/valid.jsonl", 5)]
    conversations.append([{"role": "system", "content": "Be brief."}, *conversations[0]])
    for messages in conversations:
        for generation_prompt, turns in ((False, messages), (True, messages[:-1])):
            kwargs = {"tokenize": False, "add_generation_prompt": generation_prompt}
            assert saved.apply_chat_template(turns, **kwargs) == original.apply_chat_template(turns, **kwargs)
    assert saved.get_vocab() == original.get_vocab()


def test_ppo_responses_end_with_the_familys_stop_ids(own_run):
    """PPO stops on the family's whole stop set (its start-up line: Qwen's two ids, Llama-3's three) and its
    responses end with one of them (``rollout/eos_rate``, counted with that set)."""
    from trainers.runs.metrics import read_metrics

    tok = chat_format(own_run.sft / "model")[0]
    family_stops = sorted(set(tok.convert_tokens_to_ids([*own_run.family.stop_tokens, own_run.family.eos])))
    started = re.search(r"^ppo: \d+ prompts, stop ids \[([\d, ]*)\]", own_run.ppo_stdout, re.MULTILINE)
    assert started, own_run.ppo_stdout[-3000:]
    assert [int(i) for i in started.group(1).split(",")] == family_stops
    records = read_metrics(own_run.ppo / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, PPO_ITERATIONS + 1))
    rates = [r["rollout/eos_rate"] for r in records]
    print(f"{own_run.family.name}: stop ids {family_stops}, rollout/eos_rate {rates}")
    assert min(rates) >= 0.8, rates
    assert (own_run.ppo / "model" / "model.safetensors").is_file()


@torch.no_grad()
def test_rm_orders_chosen_above_rejected_with_plain_transformers(own_run):
    """The saved RM is a plain ``*ForSequenceClassification`` directory: scored on prompt + reply in the
    model's template (through the end-of-turn token, where the RM was trained to read its score), chosen
    beats rejected on the held-out pairs. Ordering needs no ``reward_bias`` (it shifts every score)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = own_run.rm / "model"
    _, fmt = chat_format(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def score(prompt: list[dict], reply: list[dict]) -> float:
        ids = fmt.conversation_ids([*prompt, *reply])[0]  # prompt + reply through its end-of-turn token
        return model(torch.tensor([ids])).logits[0, 0].item()

    pairs = read_jsonl(own_run.data / "comparisons/valid.jsonl")
    wins = [score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in pairs]
    accuracy = sum(wins) / len(wins)
    print(f"{own_run.family.name}: RM accuracy on {len(pairs)} held-out pairs {accuracy:.3f}")
    assert accuracy >= 0.75, accuracy
