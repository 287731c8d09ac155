"""The stages' tasks, pure parts: the RM's pair counts (which prompts count as loss units)."""

from __future__ import annotations

import torch

from trainers.stages.rm import pair_counts


def test_pair_counts_skip_ties_and_absent_responses():
    ranks = torch.tensor([[0, 1, 2, -1], [0, 0, 1, 1], [1, 1, -1, -1]])
    # row 0: 3 present, all distinct -> 3 pairs; row 1: two tied groups of 2 -> 4 pairs; row 2: tie -> 0
    assert pair_counts(ranks).tolist() == [3, 4, 0]
