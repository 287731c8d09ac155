"""Pure helpers of the PPO driver: rollout batches, data positions, seeds, shards."""

from __future__ import annotations

import pytest
import torch

from trainers.ppo import batch, schedule

PAD, EOS = 0, 2


def test_cut_at_eos_keeps_first_eos_and_drops_the_rest():
    assert batch.cut_at_eos([5, 6, EOS, 7, EOS], EOS) == [5, 6, EOS]
    assert batch.cut_at_eos([5, 6, 7], EOS) == [5, 6, 7]
    assert batch.cut_at_eos([EOS, 5], EOS) == [EOS]


def test_rollout_batch_left_pads_prompts_right_pads_responses():
    prompts = [[11, 12, 13], [21]]
    responses = [[31, EOS, 99], [41, 42, 43]]  # the 99 after EOS must disappear
    b = batch.build_rollout_batch(
        prompts, responses, PAD, EOS, vllm_logprobs=[[-1.0, -2.0, -9.0], [-3.0, -4.0, -5.0]]
    )
    # P = 3, R = 3 (second response, no EOS: truncated at max_new_tokens, kept whole)
    assert b.tokens.sequences.tolist() == [[11, 12, 13, 31, EOS, PAD], [PAD, PAD, 21, 41, 42, 43]]
    assert b.tokens.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.tokens.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.vllm_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    # position ids derived from the mask start at 0 on the first real token of each row (item 1)
    pos = (b.tokens.attention_mask.cumsum(-1) - 1).clamp(min=0)
    assert pos[1, 2].item() == 0 and pos[0, 0].item() == 0


def test_rollout_batch_rejects_pad_equal_eos():
    with pytest.raises(ValueError, match="PAD and EOS"):
        batch.build_rollout_batch([[1]], [[2]], pad_id=EOS, eos_id=EOS)


def test_rollout_batch_empty_responses_keep_one_masked_column():
    b = batch.build_rollout_batch([[5]], [[]], PAD, EOS)
    assert b.tokens.response_mask.tolist() == [[0]]
    assert b.tokens.sequences.shape == (1, 2)


def test_take_rows_crosses_epochs_and_is_resumable():
    n, seed = 5, 3
    first = schedule.take_rows(0, 4, n, seed)
    second = schedule.take_rows(4, 4, n, seed)
    stream = schedule.pass_order(n, seed, 0).tolist() + schedule.pass_order(n, seed, 1).tolist()
    assert first + second == stream[:8]
    assert sorted(stream[:5]) == list(range(5))
    assert schedule.pass_order(n, seed, 0).tolist() != schedule.pass_order(n, seed, 1).tolist() or n < 3


def test_derived_seeds_differ_per_engine_and_iteration():
    seeds = {schedule.derived_seed(0, it, e) for it in range(10) for e in range(4)}
    assert len(seeds) == 40
    assert schedule.derived_seed(1, 2, 3) == schedule.derived_seed(1, 2, 3)


def test_rows_selects_every_tensor():
    tokens = batch.TokenBatch(torch.arange(6).view(3, 2), torch.ones(3, 2), torch.tensor([[7], [8], [9]]))
    out = tokens.rows(torch.tensor([2, 0]))
    assert out.sequences.tolist() == [[4, 5], [0, 1]] and out.response_mask.tolist() == [[9], [7]]


def test_lm_label_count_skips_column_zero():
    labels = torch.tensor([[-100, 5, 6], [-100, -100, 7]])
    assert schedule.lm_label_count(labels) == 3
