"""trainers/ppo/scoring.py without Ray: the text a reward function or endpoint is given for each response."""

from __future__ import annotations

import pytest

from trainers.data.tokenizer import load_tokenizer
from trainers.ppo.batch import build_rollout_batch
from trainers.ppo.scoring import response_texts


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def texts(tok, responses: list[list[int]], stop_ids: tuple[int, ...]) -> list[str]:
    rollout = build_rollout_batch([[1, 59]] * len(responses), responses, pad_id=0, stop_ids=stop_ids)
    return response_texts(rollout.tokens, stop_ids, tok)


def test_the_final_stop_id_is_dropped_and_special_tokens_skipped(tok):
    note = tok.encode("Write a short note about foxes.", add_special_tokens=False)
    eos = tok.eos_token_id
    assert eos == 2
    got = texts(
        tok,
        [
            note + [eos],  # stopped: the stop id is not part of the answer
            note,  # truncated (no stop id): kept whole
            [tok.bos_token_id] + note + [4, eos],  # special tokens inside are skipped too
            [eos],  # stopped at once: an empty answer
            note + [eos, 362, 92],  # what follows the first stop id was cut by the rollout batch
        ],
        (eos,),
    )
    assert got == ["Write a short note about foxes."] * 3 + ["", "Write a short note about foxes."]


def test_a_stop_id_that_is_an_ordinary_token_is_dropped_only_at_the_end(tok):
    """A run whose stop set includes '.' (id 18): the final '.' goes, every earlier token stays."""
    foxes = tok.encode(" foxes", add_special_tokens=False)  # [' fo', 'x', 'es']
    got = texts(tok, [foxes + [18], foxes], (2, 18))
    assert got == [" foxes", " foxes"]
    assert texts(tok, [[18]], (2, 18)) == [""]
    padded = build_rollout_batch([[1], [1, 59, 86]], [foxes + [2], [18]], pad_id=2, stop_ids=(2, 18))
    # PAD == a stop id: the mask, not the pad value, says where each response ends (docs/ppo_details.md item 2)
    assert response_texts(padded.tokens, (2, 18), tok) == [" foxes", ""]
