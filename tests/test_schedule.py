"""The data order: deterministic, independent of the process count, window-addressable."""

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.schedule import TrainingSchedule


def schedule(world=1, **overrides):
    cfg = load_config(None, {"per_device_train_batch_size": 4, "seed": 3, "num_train_epochs": 2, **overrides})
    return TrainingSchedule.from_config(cfg, range(0, 100, 2), world)  # 50 ids with gaps


def test_same_seed_same_order_other_seed_other_order():
    assert np.array_equal(schedule().step_ids(7), schedule().step_ids(7))
    assert not np.array_equal(schedule().step_ids(0), schedule(seed=4).step_ids(0))


def test_epochs_are_permutations_and_last_partial_batch_is_dropped():
    s = schedule()
    assert s.steps_per_epoch == 12 and s.num_steps == 24
    epoch0 = np.concatenate([s.step_ids(i) for i in range(12)])
    assert len(set(epoch0.tolist())) == 48 and set(epoch0.tolist()) <= set(range(0, 100, 2))
    assert not np.array_equal(s.step_ids(0), s.step_ids(12))
    with pytest.raises(IndexError):
        s.step_ids(24)


def test_global_batches_do_not_depend_on_the_process_split():
    one = schedule(world=1, gradient_accumulation_steps=2)
    two = schedule(world=2, gradient_accumulation_steps=1)
    for step in range(one.num_steps):
        assert np.array_equal(one.step_ids(step), two.step_ids(step))
        split_one = np.concatenate(one.micro_batches(step, 0, 1, 2))
        split_two = np.concatenate([two.micro_batches(step, r, 2, 1)[0] for r in range(2)])
        assert sorted(split_one.tolist()) == sorted(split_two.tolist()) == sorted(one.step_ids(step).tolist())


def test_window_ids_are_the_steps_of_the_window():
    s = schedule()
    assert np.array_equal(s.window_ids(2, 5), np.concatenate([s.step_ids(i) for i in (2, 3, 4)]))
    assert len(s.window_ids(20, 30)) == 4 * 4  # clipped at the schedule's end


def test_max_steps_wins_and_oversized_batch_is_refused():
    assert schedule(max_steps=5).num_steps == 5
    with pytest.raises(ConfigError, match="global batch"):
        schedule(per_device_train_batch_size=64)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_length_aware_bins_hold_the_global_batch_and_do_not_depend_on_the_process_count(packed):
    one = schedule(world=1, per_device_train_batch_size=8, gradient_accumulation_steps=4)
    two = schedule(world=2, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    rng = np.random.default_rng(0)
    lengths_of = dict(zip(range(0, 100, 2), rng.integers(10, 500, size=50).tolist(), strict=True))
    for step in range(one.num_steps):
        ids = one.step_ids(step)
        lengths = np.array([lengths_of[i] for i in ids])

        def pair_tokens(batch):
            return np.array([lengths_of[int(i)] for i in batch])

        bins_one = one.micro_batches(step, 0, 1, 4, pair_tokens, packed=packed)
        bins_two = [two.micro_batches(step, r, 2, 2, pair_tokens, packed=packed) for r in range(2)]
        # Bin a * world + r is rank r's micro-batch a: the same four bins, spread differently.
        assert [b.tolist() for b in bins_one] == [bins_two[a % 2][a // 2].tolist() for a in range(4)]
        assert sorted(np.concatenate(bins_one).tolist()) == sorted(ids.tolist())  # every pair once
        tokens = [sum(lengths_of[i] for i in b) for b in bins_one]
        if packed:  # balanced by tokens: no bin holds more than the mean plus its longest pair
            assert max(tokens) - min(tokens) <= max(lengths)
            weights = [one.pair_weight(len(b), 1, 4) for b in bins_one]
            assert sum(w / 4 for w in weights) == pytest.approx(1.0)  # DeepSpeed's mean of weighted means
        else:  # equal pair counts, grouped by length: each bin's longest is at most the next bin's shortest
            assert {len(b) for b in bins_one} == {8}
            spans = [(min(lengths_of[i] for i in b), max(lengths_of[i] for i in b)) for b in bins_one]
            assert all(spans[k][1] <= spans[k + 1][0] for k in range(3))
