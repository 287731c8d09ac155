"""trainers/ppo/batch.py: the rollout layout, the cut at the first stop id, truncation flags, and the typed
batches' row operations."""

from __future__ import annotations

import pickle

import pytest
import torch
from ray import cloudpickle

from trainers.data.collate import position_ids_from_mask
from trainers.ppo import batch
from trainers.ppo.batch import Experience, Rollout, TokenBatch

PAD, EOS = 0, 2
STOPS = (EOS,)
EOT = 9  # a second stop id, e.g. a chat template's end-of-turn token


def test_cut_at_stop_keeps_first_stop_and_drops_the_rest():
    assert batch.cut_at_stop([5, 6, EOS, 7, EOS], STOPS) == [5, 6, EOS]
    assert batch.cut_at_stop([5, 6, 7], STOPS) == [5, 6, 7]
    assert batch.cut_at_stop([EOS, 5], STOPS) == [EOS]


def test_cut_at_stop_ends_at_the_first_of_any_stop_id():
    """docs/ppo_details.md item 28: whichever stop id comes first ends the response."""
    assert batch.cut_at_stop([5, EOT, 6, EOS], (EOS, EOT)) == [5, EOT]
    assert batch.cut_at_stop([5, EOS, 6, EOT], (EOT, EOS)) == [5, EOS]
    assert batch.cut_at_stop([5, EOT, 6], STOPS) == [5, EOT, 6]  # EOT is not a stop id here


def test_rollout_batch_left_pads_prompts_right_pads_responses():
    prompts = [[11, 12, 13], [21]]
    responses = [[31, EOS, 99], [41, 42, 43]]  # the 99 after EOS must disappear
    b = batch.build_rollout_batch(
        prompts, responses, PAD, STOPS, vllm_logprobs=[[-1.0, -2.0, -9.0], [-3.0, -4.0, -5.0]]
    )
    # P = 3, R = 3 (second response, no EOS: truncated at max_new_tokens, kept whole)
    assert b.tokens.sequences.tolist() == [[11, 12, 13, 31, EOS, PAD], [PAD, PAD, 21, 41, 42, 43]]
    assert b.tokens.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.tokens.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.vllm_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert b.tokens.responses().tolist() == [[31, EOS, PAD], [41, 42, 43]]
    assert len(b) == 2 and b.tokens.response_len == 3
    assert b.tokens.sequences.dtype == torch.long and b.vllm_logprobs.dtype == torch.float32
    # the position ids every model pass computes from this mask (trainers.runtime.models.forward_logits)
    # start at 0 on each row's first real token (docs/ppo_details.md item 1)
    assert position_ids_from_mask(b.tokens.attention_mask).tolist() == [
        [0, 1, 2, 3, 4, 4],
        [0, 0, 0, 1, 2, 3],
    ]


def test_rollout_batch_with_pad_equal_eos_masks_by_length():
    """docs/ppo_details.md item 2: PAD == EOS is fine, the EOS that ends a response stays a real token."""
    b = batch.build_rollout_batch([[5, 6], [7]], [[8, EOS, 3], [9, 4]], pad_id=EOS, stop_ids=STOPS)
    assert b.tokens.sequences.tolist() == [[5, 6, 8, EOS], [EOS, 7, 9, 4]]
    assert b.tokens.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert b.tokens.response_mask.tolist() == [[1, 1], [1, 1]]  # the final EOS is counted


def test_rollout_batch_marks_truncated_responses_from_finish_reasons():
    """docs/ppo_details.md item 29: finish reason 'length' and no stop id = truncated."""
    responses = [[5, EOS], [5, 6, 7], [5, EOT], [6, 6, 6], [EOS]]
    reasons = ["stop", "length", "stop", "stop", "length"]
    b = batch.build_rollout_batch([[1]] * 5, responses, PAD, (EOS, EOT), finish_reasons=reasons)
    # row 3 stopped for another reason (no stop id, not 'length'); row 4 hit the limit on a stop id
    assert b.truncated.tolist() == [False, True, False, False, False]
    assert b.truncated.dtype == torch.bool
    assert b.rows(torch.tensor([1, 0])).truncated.tolist() == [True, False]  # a row field like the others
    assert batch.build_rollout_batch([[1]], [[5]], PAD, STOPS).truncated is None


def test_rollout_batch_rejects_unpaired_lists_and_no_stop_ids():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        batch.build_rollout_batch([[1], [1]], [[3]], PAD, STOPS)
    with pytest.raises(ValueError, match="1 responses but 2 finish reasons"):
        batch.build_rollout_batch([[1]], [[3]], PAD, STOPS, finish_reasons=["stop", "stop"])
    with pytest.raises(ValueError, match="no stop ids"):
        batch.build_rollout_batch([[1]], [[3]], PAD, ())


def test_rollout_batch_empty_responses_keep_one_masked_column():
    b = batch.build_rollout_batch([[5]], [[]], PAD, STOPS)
    assert b.tokens.response_mask.tolist() == [[0]]
    assert b.tokens.sequences.shape == (1, 2)
    assert b.vllm_logprobs is None


def _tokens() -> TokenBatch:
    return TokenBatch(
        sequences=torch.arange(12).view(3, 4),
        attention_mask=torch.ones(3, 4, dtype=torch.long),
        response_mask=torch.tensor([[7, 1], [8, 1], [9, 0]]),
    )


def test_rows_selects_every_tensor_also_nested_ones():
    out = _tokens().rows(torch.tensor([2, 0]))
    assert out.sequences.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert out.response_mask.tolist() == [[9, 0], [7, 1]]
    lp = torch.tensor([[0.5, 0.0], [1.5, 0.0], [2.5, 0.0]])
    exp = Experience(_tokens(), old_logprobs=lp, advantages=-lp, values=lp * 2, returns=lp * 3)
    picked = exp.rows(torch.tensor([1]))
    assert picked.tokens.sequences.tolist() == [[4, 5, 6, 7]]
    assert [picked.old_logprobs.tolist(), picked.advantages.tolist()] == [[[1.5, 0.0]], [[-1.5, -0.0]]]
    assert [picked.values.tolist(), picked.returns.tolist()] == [[[3.0, 0.0]], [[4.5, 0.0]]]
    rollout = Rollout(_tokens(), None).rows(torch.tensor([0]))
    assert rollout.vllm_logprobs is None and rollout.tokens.response_mask.tolist() == [[7, 1]]


def test_micro_batches_are_consecutive_pieces():
    pieces = _tokens().micro_batches(2)
    assert [p.sequences.tolist() for p in pieces] == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11]]]
    assert [p.response_mask.tolist() for p in pieces] == [[[7, 1], [8, 1]], [[9, 0]]]
    with pytest.raises(ValueError, match="positive"):
        _tokens().micro_batches(0)


def test_to_moves_every_tensor_and_keeps_the_type():
    moved = Rollout(_tokens(), torch.zeros(3, 2)).to("cpu")
    assert isinstance(moved, Rollout) and isinstance(moved.tokens, TokenBatch)
    assert moved.tokens.sequences.device.type == "cpu" and torch.equal(
        moved.tokens.sequences, _tokens().sequences
    )


@pytest.mark.parametrize("dumps,loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)])
def test_batches_pickle_with_shapes_dtypes_and_values(dumps, loads):
    """What Ray does to every argument (cloudpickle; the integration test test_ppo_policy sends them for
    real)."""
    lp = torch.tensor([[0.25, 0.0], [1.0, -1.0], [0.0, 0.0]], dtype=torch.float32)
    exp = Experience(_tokens(), old_logprobs=lp, advantages=lp, values=lp, returns=lp)
    back = loads(dumps(exp))
    assert isinstance(back, Experience) and isinstance(back.tokens, TokenBatch)
    for name in ("sequences", "attention_mask", "response_mask"):
        sent, got = getattr(exp.tokens, name), getattr(back.tokens, name)
        assert got.dtype == sent.dtype == torch.long and got.shape == sent.shape and torch.equal(got, sent)
    assert back.old_logprobs.dtype == torch.float32 and torch.equal(back.returns, lp)
