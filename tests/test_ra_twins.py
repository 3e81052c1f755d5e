"""Twin batching for reward-augmented DPO (`keep_twins_together=True`): every micro-batch holds whole twin pairs, for
any even batch size, gradient accumulation and 2 processes, every epoch; pairs are reshuffled between epochs."""

import json
from collections import Counter
from pathlib import Path

import pytest

from tests._helpers import accelerate_two_processes, cpu_args
from tests.distributed.ra_twins import run
from trl_rewardweighted import RewardAugmentedDPOConfig
from trl_rewardweighted.data.relabel import twin_units
from trl_rewardweighted.trainers.ra_dpo_trainer import TwinPairSampler

SCRIPT = Path(__file__).parent / "distributed" / "ra_twins.py"


def test_twin_units_by_hand():
    sides = ["chosen", "rejected", "chosen", "rejected", "rejected", "chosen"]
    chosen = ["a", "b", "c", "x", "f", "g"]
    rejected = ["b", "a", "d", "c", "e", "h"]
    # rows 2 and 3 are not twins (responses not swapped): both stand alone; rows 4 and 5 are in the wrong order.
    assert twin_units(chosen, rejected, sides) == [(0, 1), (2,), (3,), (4,), (5,)]
    assert twin_units(chosen, rejected) == [(0, 1), (2,), (3,), (4,), (5,)]
    swapped_only = ["p", "q"], ["q", "p"]
    assert twin_units(*swapped_only) == [(0, 1)]
    assert twin_units(*swapped_only, ["rejected", "chosen"]) == [(0,), (1,)]
    assert twin_units([], []) == []


def test_sampler_keeps_twins_adjacent_and_reshuffles_every_epoch():
    units = [(2 * k, 2 * k + 1) for k in range(20)] + [(40,), (41,)]
    sampler = TwinPairSampler(units, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(42)) and len(sampler) == 42  # every row once
        assert all(order[i] // 2 == order[i + 1] // 2 for i in range(0, 40, 2))  # whole pairs first
        assert set(order[40:]) == {40, 41}  # the lone rows after all pairs
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # deterministic per (seed, epoch): resume and all processes agree


def test_config_refusals():
    with pytest.raises(
        ValueError, match=r"keep_twins_together=True needs an even per_device_train_batch_size \(got 3\)"
    ):
        RewardAugmentedDPOConfig("x", keep_twins_together=True, **cpu_args(per_device_train_batch_size=3))
    with pytest.raises(ValueError, match=r"keep_twins_together=True needs augment_mode='both'"):
        RewardAugmentedDPOConfig(
            "x", keep_twins_together=True, augment_mode="chosen_only", **cpu_args(per_device_train_batch_size=2)
        )


def pair_key(row):
    chosen, rejected = row
    return frozenset((tuple(chosen), tuple(rejected)))


def assert_whole_pairs(rows):
    """The rows of one micro-batch come as consecutive twins: (c, r) followed by (r, c)."""
    assert len(rows) % 2 == 0, rows
    for first, second in zip(rows[0::2], rows[1::2]):
        assert first[0] == second[1] and first[1] == second[0], (first, second)


@pytest.mark.parametrize("bs,ga", [(2, 1), (4, 2), (6, 1)])
def test_micro_batches_hold_whole_pairs_one_process(tiny_model_path, tmp_path, bs, ga):
    result = run(tiny_model_path, str(tmp_path), bs, ga, epochs=2)
    for epoch in (0, 1):
        batches = [r["rows"] for r in result["records"] if r["epoch"] == epoch]
        for rows in batches:
            assert_whole_pairs(rows)
        seen = Counter(pair_key(row) for rows in batches for row in rows)
        assert len(seen) == 7 and set(seen.values()) == {2}  # each pair's two twins, once per epoch
    first = [pair_key(row) for r in result["records"] if r["epoch"] == 0 for row in r["rows"]]
    second = [pair_key(row) for r in result["records"] if r["epoch"] == 1 for row in r["rows"]]
    assert first != second  # pairs reshuffled between epochs


def test_without_the_option_twins_are_split(tiny_model_path, tmp_path):
    """The default (the paper's code, TRL): rows are shuffled independently, so some micro-batch splits a pair."""
    result = run(tiny_model_path, str(tmp_path), 2, 1, epochs=1, keep=False)
    split = 0
    for record in result["records"]:
        first, second = record["rows"]
        split += not (first[0] == second[1] and first[1] == second[0])
    assert split > 0


@pytest.mark.distributed
def test_two_processes_hold_whole_pairs(tiny_model_path, tmp_path):
    accelerate_two_processes(SCRIPT, tiny_model_path, tmp_path, 2, 2, 2)
    ranks = [json.loads((tmp_path / f"twins_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for epoch in (0, 1):
        seen = Counter()
        for result in ranks:
            for record in (r for r in result["records"] if r["epoch"] == epoch):
                assert_whole_pairs(record["rows"])
                seen.update(pair_key(row) for row in record["rows"])
        # 14 rows over 2 processes x batch 2: 4 global batches, the last completed by accelerate with the first
        # pair of the epoch (a whole pair: the shortfall is even). Every pair appears, both twins each time.
        assert len(seen) == 7 and all(count in (2, 4) for count in seen.values()) and sum(seen.values()) == 16
