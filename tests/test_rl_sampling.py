"""Group advantages, overlong shaping and DAPO dynamic sampling (the group filter, the batch filled over rounds)."""

from __future__ import annotations

import numpy as np
import pytest

from sail_jax.rl import GroupBatch, fill_batch, filter_groups, group_advantages, overlong_penalty


def test_group_advantages_hand_computed():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0]
    groups = [7, 7, 7, 7, 3, 3, 9]  # non-contiguous ids; group 9 has one sample
    adv = group_advantages(rewards, groups, eps=1e-6)
    std = np.std([1, 0, 0, 1], ddof=1)  # = 1/sqrt(3)
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(adv[4:], [0.0, 0.0, 0.0])  # zero spread and a lone sample: 0, not NaN
    assert adv.dtype == np.float32
    dr = group_advantages(rewards, groups, scale_by_std=False)  # Dr.GRPO
    np.testing.assert_allclose(dr, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])


def test_group_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N\]"):
        group_advantages([1.0, 2.0], [0])
    assert group_advantages([], []).shape == (0,)


def test_overlong_penalty_in_tokens():
    # max_len 100, buffer 20: free up to 80 tokens, then -1/20 per token (x factor), -factor at 100 and beyond.
    pen = overlong_penalty([10, 80, 81, 90, 100, 110], max_len=100, buffer_len=20, factor=0.5)
    np.testing.assert_allclose(pen, [0.0, 0.0, -0.025, -0.25, -0.5, -0.75])
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], max_len=10, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], max_len=10, buffer_len=11)


def test_filter_groups_on_accuracy():
    acc = [1, 1, 0, 0, 1, 0, 0, 0, 1]
    ids = [5, 5, 2, 2, 8, 8, 4, 4, 6]  # 5: all right, 2: all wrong, 8: mixed, 4: all wrong, 6: lone right
    f = filter_groups(acc, ids)
    assert f.keep_groups == [8]
    assert f.keep.tolist() == [False] * 4 + [True, True] + [False] * 3
    assert (f.n_groups, f.all_correct, f.all_wrong, f.dropped) == (5, 2, 2, 4)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        filter_groups([2.0], [0])


def _fake_generator(rounds):
    """A rollout generator for tests: round k returns fixed per-sample accuracies, 2 samples per prompt group,
    group ids restarting at 0 each round (as a generator numbering its prompts would)."""

    def generate(k):
        acc = rounds[k]
        samples = [f"round{k}-sample{i}" for i in range(len(acc))]
        return samples, acc, [i // 2 for i in range(len(acc))]

    return generate


def test_fill_batch_across_rounds():
    rounds = [
        [1, 1, 0, 1, 0, 0],  # groups: all right, mixed, all wrong -> 1 kept
        [0, 0, 0, 0, 1, 1],  # nothing informative
        [1, 0, 0, 1, 1, 0],  # 3 mixed -> 2 fill the batch of 3, 1 surplus
        [0, 1, 0, 1, 0, 1],  # never generated
    ]
    batch = fill_batch(_fake_generator(rounds), target_groups=3, max_gen_rounds=4)
    assert batch.full and batch.rounds == 3
    assert batch.samples == ["round0-sample2", "round0-sample3", "round2-sample0", "round2-sample1",
                             "round2-sample2", "round2-sample3"]
    assert batch.group_ids == [0, 0, 1, 1, 2, 2]
    assert batch.accuracy == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert batch.stats() == {"gen_rounds": 3, "groups_seen": 9, "groups_kept": 3, "dropped_all_correct": 2,
                             "dropped_all_wrong": 3, "surplus_groups": 1, "batch_full": 1}


def test_fill_batch_stops_at_max_gen_rounds():
    rounds = [[1, 0, 1, 1]] * 5
    batch = fill_batch(_fake_generator(rounds), target_groups=4, max_gen_rounds=2)
    assert not batch.full and batch.rounds == 2 and batch.n_groups == 2
    assert batch.stats()["batch_full"] == 0 and batch.stats()["dropped_all_correct"] == 2


def test_group_batch_validates():
    with pytest.raises(ValueError, match="target_groups"):
        GroupBatch(0, 3)
    with pytest.raises(ValueError, match="2 samples but 3 accuracies"):
        GroupBatch(1, 1).add(["a", "b"], [0, 1, 1], [0, 0, 0])
