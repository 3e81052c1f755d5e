"""Per-row sample weights (issue 18): WeightedSFTTrainer, WeightedDPOTrainer, and the `sample_weight` column of
VCBTrainer and RewardAugmentedDPOTrainer.

The contract, tested for each trainer on one optimizer step of the tiny model:

- all weights 1 gives TRL's own loss and gradient (WeightedSFT / WeightedDPO against SFTTrainer / DPOTrainer; VCB and
  reward-augmented DPO against the same trainer without the column);
- the loss is the weighted mean over the whole optimizer step (tokens for SFT, pairs for DPO, valid groups for VCB), so
  the gradient does not depend on how the step is split over accumulation micro-batches and processes;
- the loss is a weighted *mean*, so a row (pair, group) of weight 2 gives exactly the loss and gradient of the same
  data with that row duplicated, in one step;
- negative, NaN, infinite, missing and all-zero weights are refused naming the rows.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, cpu_args
from tests.distributed.weighted_grad_layout import KINDS, WEIGHTS, first_loss, rows_of, run_layout

SCRIPT = Path(__file__).parent / "distributed" / "weighted_grad_layout.py"


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def duplicated_first(rows, times=2):
    """The rows with the first one repeated (`times` copies in all)."""
    return {key: [values[0]] * (times - 1) + list(values) for key, values in rows.items()}


@pytest.fixture(scope="module")
def single_process(tiny_model_path, tmp_path_factory):
    """Per kind: the weighted gradient and loss of the whole step in one micro-batch (4 rows; RA: 2 pairs = 4 rows)."""
    out = {}
    for kind in KINDS:
        grad, trainer = run_layout(kind, tiny_model_path, str(tmp_path_factory.mktemp(kind)), 4, 1)
        out[kind] = grad, first_loss(trainer)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# All weights 1: TRL's loss and gradient
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [(4, 1), (2, 2)], ids=["bs4", "bs2xga2"])
@pytest.mark.parametrize("extra", [{}, {"padding_free": True, "max_length": None}], ids=["padded", "padding_free"])
def test_sft_weight_one_is_trl(tiny_model_path, tmp_path, layout, extra):
    bs, ga = layout
    trl_grad, trl_trainer = run_layout(
        "trl_sft", tiny_model_path, str(tmp_path / "trl"), bs, ga, rows_of("sft", None), **extra
    )
    grad, trainer = run_layout("sft", tiny_model_path, str(tmp_path / "w"), bs, ga, rows_of("sft", [1.0] * 4), **extra)
    assert first_loss(trainer) == first_loss(trl_trainer)
    assert float((grad - trl_grad).abs().max()) <= 1e-6 * float(trl_grad.abs().max())


DPO_VARIANTS = {
    "sigmoid": {},
    "sigmoid+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "wpo": {"use_weighting": True},
    "ipo": {"loss_type": "ipo"},
}


@pytest.mark.parametrize("variant", list(DPO_VARIANTS))
def test_dpo_weight_one_is_trl(tiny_model_path, tmp_path, variant):
    extra = DPO_VARIANTS[variant]
    for bs, ga in ((4, 1), (2, 2)):
        trl_grad, trl_trainer = run_layout(
            "trl_dpo", tiny_model_path, str(tmp_path / f"trl{bs}"), bs, ga, rows_of("dpo", None), **extra
        )
        grad, trainer = run_layout(
            "dpo", tiny_model_path, str(tmp_path / f"w{bs}"), bs, ga, rows_of("dpo", [1.0] * 4), **extra
        )
        assert first_loss(trainer) == pytest.approx(first_loss(trl_trainer), rel=1e-6, abs=0)
        assert float((grad - trl_grad).abs().max()) <= 1e-6 * float(trl_grad.abs().max())


@pytest.mark.parametrize("kind", ["vcb", "ra"])
def test_weight_one_column_changes_nothing(tiny_model_path, tmp_path, kind):
    plain_grad, plain = run_layout(kind, tiny_model_path, str(tmp_path / "plain"), 4, 1, rows_of(kind, None))
    grad, trainer = run_layout(kind, tiny_model_path, str(tmp_path / "w"), 4, 1, rows_of(kind, [1.0] * 4))
    assert first_loss(trainer) == first_loss(plain)
    assert torch.equal(grad, plain_grad)


# ----------------------------------------------------------------------------------------------------------------------
# The step-wide normaliser: no dependence on the accumulation layout
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_accumulation_layout_does_not_change_the_gradient(tiny_model_path, tmp_path, single_process, kind):
    reference, reference_loss = single_process[kind]
    grad, trainer = run_layout(kind, tiny_model_path, str(tmp_path), 1, 4)
    # Reward-augmented twins cancel most of each other's gradient (|g| is 1e-2 of its parts): float32 noise shows more.
    assert rel_diff(grad, reference) < (1e-4 if kind == "ra" else 1e-5)
    assert first_loss(trainer) == pytest.approx(reference_loss, rel=1e-5)


def test_sft_per_micro_batch_normaliser_would_differ(tiny_model_path, tmp_path, single_process, monkeypatch):
    """Sensitivity check: weighted means per micro-batch (divided by the accumulation steps) give another gradient."""
    from trl_rewardweighted import WeightedSFTTrainer

    def per_micro_batch(self, epoch_iterator, num_batches, device):
        batches, _ = super(WeightedSFTTrainer, self).get_batch_samples(epoch_iterator, num_batches, device)
        return batches, None

    monkeypatch.setattr(WeightedSFTTrainer, "get_batch_samples", per_micro_batch)
    grad, _ = run_layout("sft", tiny_model_path, str(tmp_path), 1, 4)
    assert rel_diff(grad, single_process["sft"][0]) > 1e-2


def test_sft_padding_free_matches_padded(tiny_model_path, tmp_path, single_process):
    """Padding-free batches concatenate the rows: each token keeps its own row's weight."""
    reference, reference_loss = single_process["sft"]
    grad, trainer = run_layout("sft", tiny_model_path, str(tmp_path), 4, 1, padding_free=True, max_length=None)
    assert rel_diff(grad, reference) < 1e-5
    assert first_loss(trainer) == pytest.approx(reference_loss, rel=1e-5)


def test_weights_change_the_gradient(tiny_model_path, tmp_path, single_process):
    """The weights of the fixtures act: the weighted step differs from the unweighted one."""
    grad, _ = run_layout("sft", tiny_model_path, str(tmp_path), 4, 1, rows_of("sft", [1.0] * 4))
    assert rel_diff(grad, single_process["sft"][0]) > 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# A weight-2 row is that row twice (the loss is a weighted mean over the step)
# ----------------------------------------------------------------------------------------------------------------------


def test_sft_weight_two_is_a_duplicate_row(tiny_model_path, tmp_path):
    grad, trainer = run_layout("sft", tiny_model_path, str(tmp_path / "w"), 4, 1, rows_of("sft", [2.0, 1.0, 1.0, 1.0]))
    dup = duplicated_first(rows_of("sft", None))
    dup_grad, dup_trainer = run_layout("trl_sft", tiny_model_path, str(tmp_path / "dup"), 5, 1, dup)
    assert first_loss(trainer) == pytest.approx(first_loss(dup_trainer), rel=1e-6)
    assert rel_diff(grad, dup_grad) < 1e-5


def _perturbed_reference(model_path):
    """A reference that differs from the policy, so that the pairs' DPO losses differ (not all log 2)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return ref.requires_grad_(False).eval()


def test_dpo_weight_two_is_a_duplicate_pair(tiny_model_path, tmp_path):
    """With a reference unlike the policy the pairs' losses differ, so the loss value checks the weighted mean too."""
    from trl import DPOConfig, DPOTrainer

    from trl_rewardweighted import WeightedDPOConfig, WeightedDPOTrainer

    def run(trainer_cls, config_cls, rows, bs, name):
        args = config_cls(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=bs,
            max_steps=1,
            max_grad_norm=0.0,
            **cpu_args(),
        )
        trainer = trainer_cls(
            model=tiny_model_path,
            ref_model=_perturbed_reference(tiny_model_path),
            args=args,
            train_dataset=Dataset.from_dict(rows),
        )
        trainer.train()
        return first_loss(trainer)

    weighted = run(WeightedDPOTrainer, WeightedDPOConfig, rows_of("dpo", [2.0, 1.0, 1.0, 1.0]), 4, "w")
    dup = run(DPOTrainer, DPOConfig, duplicated_first(rows_of("dpo", None)), 5, "dup")
    plain = run(DPOTrainer, DPOConfig, rows_of("dpo", None), 4, "plain")
    assert weighted == pytest.approx(dup, rel=1e-6)
    assert abs(weighted - plain) > 1e-3  # the pairs' losses differ: the weight shows in the value


def test_dpo_weighted_loss_value(tiny_model_path, tmp_path):
    """The loss is sum_i w_i l_i / sum_i w_i with l_i = -log sigmoid(beta * (logratio_chosen - logratio_rejected)),
    computed here from the policy / reference log-probs of each pair."""
    from trl_rewardweighted import WeightedDPOConfig, WeightedDPOTrainer

    weights = [3.0, 0.5, 1.0, 0.0]
    args = WeightedDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, max_grad_norm=0.0, **cpu_args()
    )
    trainer = WeightedDPOTrainer(
        model=tiny_model_path,
        ref_model=_perturbed_reference(tiny_model_path),
        args=args,
        train_dataset=Dataset.from_dict(rows_of("dpo", weights)),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["sample_weights"].tolist() == weights
    loss = trainer.compute_loss(trainer.model, dict(batch))  # one micro-batch: its weighted mean
    logps = []
    for model in (trainer.model, trainer.ref_model):
        with torch.no_grad():
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            token = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[
                ..., 0
            ]
            logps.append((token * batch["completion_mask"][:, 1:]).sum(-1))
    margin = (logps[0] - logps[1])[:4] - (logps[0] - logps[1])[4:]
    per_pair = -torch.nn.functional.logsigmoid(args.beta * margin)
    w = torch.tensor(weights)
    assert float(loss.detach()) == pytest.approx(float((w * per_pair).sum() / w.sum()), rel=1e-5)


@pytest.mark.parametrize("kind", ["vcb", "ra"])
def test_weight_two_is_a_duplicate_group_or_pair(tiny_model_path, tmp_path, kind):
    rows = rows_of(kind, None)
    n = len(rows["prompt"])
    bs = 4 if kind == "vcb" else 2 * n  # RA: two goal-conditioned rows per pair
    grad, trainer = run_layout(
        kind, tiny_model_path, str(tmp_path / "w"), bs, 1, rows_of(kind, [2.0] + [1.0] * (n - 1))
    )
    dup_bs = bs + (1 if kind == "vcb" else 2)
    dup_grad, dup = run_layout(kind, tiny_model_path, str(tmp_path / "dup"), dup_bs, 1, duplicated_first(rows))
    assert first_loss(trainer) == pytest.approx(first_loss(dup), rel=1e-6)
    assert rel_diff(grad, dup_grad) < (1e-4 if kind == "ra" else 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_processes_match_single_process(tiny_model_path, tmp_path, single_process):
    """2 processes x bs 1 x GA 2 (the step split over processes and accumulation at once): DDP all-reduces, both
    ranks hold the bs-4 gradient, and log the step's loss."""
    accelerate_two_processes(SCRIPT, tiny_model_path, tmp_path, "1x2")
    for kind in KINDS:
        reference, reference_loss = single_process[kind]
        for layout in ("1x2",):
            for rank in (0, 1):
                result = torch.load(tmp_path / f"{kind}_{layout}_rank{rank}.pt")
                assert rel_diff(result["grad"], reference) < (1e-4 if kind == "ra" else 1e-5), (kind, layout, rank)
                assert result["loss"] == pytest.approx(reference_loss, rel=1e-5), (kind, layout, rank)


# ----------------------------------------------------------------------------------------------------------------------
# Weights carried through relabeling and conversions
# ----------------------------------------------------------------------------------------------------------------------


def test_relabeled_twins_keep_their_pair_weight():
    from trl_rewardweighted import reward_augment_dataset

    pairs = Dataset.from_dict({**rows_of("ra", None), "sample_weight": [2.0, 0.5]})
    augmented = reward_augment_dataset(pairs)
    assert augmented["goal_side"] == ["chosen", "rejected", "chosen", "rejected"]
    assert augmented["sample_weight"] == [2.0, 2.0, 0.5, 0.5]


def test_group_weight_reaches_rows_and_pairs():
    from trl_rewardweighted import groups_to_pairs, groups_to_rows

    groups = Dataset.from_dict(
        {"prompt": ["p", "q"], "completions": [["a", "b", "c"], ["d", "e"]], "rewards": [[1, 0, 2], [0, 1]],
         "sample_weight": [3.0, 0.5]}
    )  # fmt: skip
    assert groups_to_rows(groups)["sample_weight"] == [3.0, 3.0, 3.0, 0.5, 0.5]
    assert groups_to_pairs(groups, strategy="all_pairs")["sample_weight"] == [3.0, 3.0, 3.0, 0.5]


@pytest.mark.filterwarnings("ignore:.*skipped:UserWarning", "ignore:.*dropped:UserWarning")
def test_adapters_carry_the_weight_of_each_input_row():
    from tests.test_adapters import HH, ultrafeedback, ultrafeedback_binarized
    from trl_rewardweighted.data import adapters

    uf = ultrafeedback().add_column("sample_weight", [1.0, 2.0, 3.0])  # Q1 keeps 3 scored completions, Q2 has 2
    assert adapters.ultrafeedback_groups(uf)["sample_weight"] == [1.0, 2.0, 3.0]
    rows = adapters.ultrafeedback_rows(uf)
    assert rows["sample_weight"] == [1.0] * 4 + [2.0] * 4 + [3.0] * 2
    pairs = adapters.ultrafeedback_pairs(uf, strategy="best_worst")
    assert pairs["sample_weight"] == [1.0, 2.0, 3.0]
    ufb = ultrafeedback_binarized()["train_prefs"].add_column("sample_weight", [0.5, 1.5, 2.5])  # row 2 is skipped
    assert adapters.ultrafeedback_binarized_pairs(ufb)["sample_weight"] == [0.5, 1.5]
    assert adapters.ultrafeedback_binarized_rows(ufb)["sample_weight"] == [0.5, 0.5, 1.5, 1.5]
    hh = Dataset.from_dict({"chosen": HH, "sample_weight": [float(i) for i in range(len(HH))]})
    assert adapters.hh_rlhf_sft(hh)["sample_weight"] == [0.0, 1.0, 2.0]  # rows 3-5 are malformed or empty
    assert "sample_weight" not in adapters.ultrafeedback_groups(ultrafeedback()).column_names


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------

FIX = "Sample weights must be finite numbers >= 0 (column `sample_weight` of the train dataset)."
BAD_WEIGHTS = {
    "negative": ([1.0, -1.0, 0.5, -2.0], f"Rows [1, 3] have a negative sample weight ([-1.0, -2.0]). {FIX}"),
    "nan_inf": (
        [1.0, math.nan, math.inf, 1.0],
        f"Rows [1, 2] have a NaN or infinite sample weight ([nan, inf]). {FIX}",
    ),
    "none": ([1.0, None, 1.0, 1.0], f"Rows [1] have no sample weight (None). {FIX}"),
    "all_zero": (
        [0.0, 0.0, 0.0, 0.0],
        "Every sample weight of the train dataset is 0 (4 rows in `sample_weight`): nothing would be trained. Give at "
        "least one row a weight > 0.",
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_are_refused_naming_the_rows(tiny_model_path, tmp_path, kind, case):
    weights, message = BAD_WEIGHTS[case]
    if kind == "ra":  # 2 pairs
        weights = {"negative": [1.0, -1.0], "nan_inf": [math.nan, 1.0], "none": [None, 1.0], "all_zero": [0.0, 0.0]}[
            case
        ]
        message = {
            "negative": f"Rows [1] have a negative sample weight ([-1.0]). {FIX}",
            "nan_inf": f"Rows [0] have a NaN or infinite sample weight ([nan]). {FIX}",
            "none": f"Rows [0] have no sample weight (None). {FIX}",
            "all_zero": message.replace("(4 rows", "(2 rows"),
        }[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        run_layout(kind, tiny_model_path, str(tmp_path), 4, 1, rows_of(kind, weights))


def test_bad_eval_weights_are_refused(tiny_model_path, tmp_path):
    from trl_rewardweighted import WeightedSFTConfig, WeightedSFTTrainer

    with pytest.raises(ValueError, match=re.escape("Rows [0] have a negative sample weight ([-1.0]). Sample weights must be finite numbers >= 0 (column `sample_weight` of the eval dataset 'held_out').")):  # fmt: skip
        WeightedSFTTrainer(
            model=tiny_model_path,
            args=WeightedSFTConfig(str(tmp_path), **cpu_args()),
            train_dataset=Dataset.from_dict(rows_of("sft")),
            eval_dataset={"held_out": Dataset.from_dict(rows_of("sft", [-1.0, 1.0, 1.0, 1.0]))},
        )


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_weighted_trainers_need_the_column(tiny_model_path, tmp_path, kind):
    rows = rows_of(kind, None)
    with pytest.raises(ValueError, match=re.escape(f"The train dataset has no `sample_weight` column (columns: {list(rows)}). Add one finite number >= 0 per row, or set `sample_weight_column` to the name of your weight column.")):  # fmt: skip
        run_layout(kind, tiny_model_path, str(tmp_path), 4, 1, rows)


@pytest.mark.parametrize("kind", ["vcb", "ra"])
def test_a_named_weight_column_must_exist(tiny_model_path, tmp_path, kind):
    rows = rows_of(kind, None)
    with pytest.raises(ValueError, match=re.escape("The train dataset has no `w` column")):
        run_layout(kind, tiny_model_path, str(tmp_path), 4, 1, rows, sample_weight_column="w")


def test_a_named_weight_column_is_read(tiny_model_path, tmp_path, single_process):
    rows = rows_of("sft", None)
    rows["w"] = list(WEIGHTS)
    grad, _ = run_layout("sft", tiny_model_path, str(tmp_path), 4, 1, rows, sample_weight_column="w")
    assert rel_diff(grad, single_process["sft"][0]) < 1e-6


def test_streamed_bad_weight_is_refused_in_the_collator():
    from trl_rewardweighted.trainers.weighted_dpo_trainer import DataCollatorWithSampleWeights
    from trl_rewardweighted.trainers.weighted_sft_trainer import DataCollatorWithTokenWeights

    with pytest.raises(ValueError, match=re.escape("Column `sample_weight`, row 1 of a batch: sample weight -1.0 is not a finite number >= 0.")):  # fmt: skip
        DataCollatorWithSampleWeights(lambda examples: {})([{"sample_weight": 1.0}, {"sample_weight": -1}])
    with pytest.raises(ValueError, match=re.escape("Column `sample_weight`, row 0 of a batch: sample weight nan is not a finite number >= 0.")):  # fmt: skip
        DataCollatorWithTokenWeights(lambda examples: {})([{"input_ids": [1], "sample_weight": math.nan}])


def test_token_weights_follow_padding_and_padding_free():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trl_rewardweighted.trainers.weighted_sft_trainer import DataCollatorWithTokenWeights

    examples = [{"input_ids": [1, 2, 3], "sample_weight": 2.0}, {"input_ids": [4, 5], "sample_weight": 0.5}]
    padded = DataCollatorWithTokenWeights(DataCollatorForLanguageModeling(pad_token_id=0))(examples)
    assert padded["token_weights"].tolist() == [[2.0, 2.0, 2.0], [0.5, 0.5, 0.0]]
    flat = DataCollatorWithTokenWeights(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))(examples)
    assert flat["token_weights"].tolist() == [[2.0, 2.0, 2.0, 0.5, 0.5]]
    # An example without the field (an evaluation dataset without the column) weighs 1.
    plain = DataCollatorWithTokenWeights(DataCollatorForLanguageModeling(pad_token_id=0))([{"input_ids": [7, 8]}])
    assert plain["token_weights"].tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("sft", {"packing": True}, "`packing=True` is not supported by WeightedSFTTrainer: packing keeps only"),
        ("sft", {"loss_type": "dft"}, "`loss_type='dft'` is not supported by WeightedSFTTrainer: the DFT loss"),
        (
            "sft",
            {"label_smoothing_factor": 0.1},
            "`label_smoothing_factor=0.1` is not supported by WeightedSFTTrainer",
        ),
        ("sft", {"average_tokens_across_devices": False}, "`average_tokens_across_devices=False` is not supported"),
        (
            "dpo",
            {"loss_type": "aot"},
            "`loss_type=['aot']` is not supported with sample weights by WeightedDPOTrainer",
        ),
    ],
)
def test_config_refusals(config, overrides, message):
    from trl_rewardweighted import WeightedDPOConfig, WeightedSFTConfig

    cls = WeightedSFTConfig if config == "sft" else WeightedDPOConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        cls("out", **cpu_args(), **overrides)


def test_ra_dpo_refuses_sorted_loss_types_only_with_weights(tiny_model_path, tmp_path):
    message = "`loss_type=['aot_unpaired']` is not supported with sample weights by RewardAugmentedDPOTrainer"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_layout("ra", tiny_model_path, str(tmp_path), 4, 1, loss_type="aot_unpaired")


def test_public_names():
    import trl_rewardweighted
    import trl_rewardweighted.trainers as trainers
    from trl_rewardweighted.trainers.weighted_dpo_trainer import WeightedDPOTrainer
    from trl_rewardweighted.trainers.weighted_sft_trainer import WeightedSFTTrainer

    assert trl_rewardweighted.WeightedSFTTrainer is trainers.WeightedSFTTrainer is WeightedSFTTrainer
    assert trl_rewardweighted.WeightedDPOTrainer is trainers.WeightedDPOTrainer is WeightedDPOTrainer
    assert WeightedSFTTrainer._name == "Weighted SFT" and "sample-weights" in WeightedDPOTrainer._tag_names
