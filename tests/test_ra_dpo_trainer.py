"""RewardAugmentedDPOTrainer on the tiny model: the goal-conditioned optimum (docs/algorithms.md#optimum-ra), eval handling,
model card, config parsing, recipes, and IRA end to end."""

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from tests._helpers import accelerate_two_processes, cpu_args
from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer, build_goal_prompt
from trl_rewardweighted.data.relabel import reward_augment_dataset
from trl_rewardweighted.ira import _tokenize_pair, implicit_reward_relabel
from trl_rewardweighted.model_utils import sequence_logps
from trl_rewardweighted.sampling import generate_with_goal

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "trl_rewardweighted" / "recipes" / "reward_augmented_dpo"
PRECOMPUTE_SCRIPT = ROOT / "tests" / "distributed" / "ra_dpo_precompute.py"


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


PROMPTS = ["Name a colour.", "Say hello.", "Pick a fruit.", "Count to two."]
CHOSEN = ["Blue.", "Hello there!", "An apple.", "One, two."]
REJECTED = ["A car.", "Go away.", "A chair.", "Five."]
SCORE_C = [9.0, 8.0, 9.0, 7.0]
SCORE_R = [2.0, 3.0, 4.0, 1.0]


def pairs(scores=True):
    data = {"prompt": [U(p) for p in PROMPTS], "chosen": [A(c) for c in CHOSEN], "rejected": [A(r) for r in REJECTED]}
    if scores:
        data.update(score_chosen=SCORE_C, score_rejected=SCORE_R)
    return Dataset.from_dict(data)


def config(out, **overrides):
    base = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, max_length=None, beta=0.1)
    base.update(overrides)
    return RewardAugmentedDPOConfig(str(out), **cpu_args(**base))


def pair_logp_margin(model, tokenizer, prompt, chosen, rejected):
    """log π(chosen|prompt) − log π(rejected|prompt), tokenised like DPOTrainer."""
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [_tokenize_pair(tokenizer, prompt, chosen, rejected)]
    )
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    return float(logps[0] - logps[1])


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    out = tmp_path_factory.mktemp("ra-dpo")
    args = config(out, max_steps=20, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0)
    trainer = RewardAugmentedDPOTrainer(tiny_model_path, args=args, train_dataset=pairs(), processing_class=tokenizer)
    trainer.train()
    return trainer, tokenizer


def test_goal_conditioned_margins_after_training(trained, tiny_model_path):
    """docs/algorithms.md#optimum-ra: under the chosen goal the chosen response gains log-prob over the rejected one relative to the
    reference; under the rejected goal, the opposite."""
    trainer, tokenizer = trained
    assert len(trainer.train_dataset) == 8
    assert trainer.augmentation_stats["train"]["rows_out"] == 8
    first_log = trainer.state.log_history[0]
    assert first_log["augment/pairs_in"] == 4 and first_log["augment/rows_out"] == 8
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    policy = trainer.model.eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    add_fused_lm_head(reference)
    for p, c, r, sc, sr in zip(PROMPTS, CHOSEN, REJECTED, SCORE_C, SCORE_R):
        for goal, sign in ((sc, 1.0), (sr, -1.0)):
            goal_prompt = build_goal_prompt(U(p), goal, tokenizer)
            assert goal_prompt == trainer.build_goal_prompt(U(p), goal)
            implicit = pair_logp_margin(policy, tokenizer, goal_prompt, A(c), A(r)) - pair_logp_margin(
                reference, tokenizer, goal_prompt, A(c), A(r)
            )
            assert sign * implicit > 1.0, (p, goal, implicit)


def test_generate_with_goal(trained):
    trainer, tokenizer = trained
    texts = generate_with_goal(trainer.model, tokenizer, [U("Say hello."), U("Pick a fruit.")], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert len(generate_with_goal(trainer.model, tokenizer, U("Say hello."), max_new_tokens=2, do_sample=False)) == 1


def test_save_model_and_model_card(trained, tmp_path):
    trainer, _ = trained
    trainer.args.output_dir = str(tmp_path)
    trainer.save_model(str(tmp_path))
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "reward-augmented-dpo" in card and "trl-rewardweighted" in card
    assert "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs" in card
    assert "2410.08067" in card
    assert "reward-augmented-dpo" in trainer.model.model_tags
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None


def _spy_prepare(monkeypatch):
    seen = []
    original = DPOTrainer._prepare_dataset

    def spy(self, dataset, processing_class, args, dataset_name):
        seen.append((dataset_name, len(dataset), "goal_text" in dataset.column_names))
        return original(self, dataset, processing_class, args, dataset_name)

    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", spy)
    return seen


@pytest.mark.parametrize("augment_eval", [False, True])
def test_eval_datasets_follow_augment_eval(tiny_model_path, tiny_tokenizer, tmp_path, monkeypatch, augment_eval):
    seen = _spy_prepare(monkeypatch)
    eval_ds = pairs().select(range(3))
    trainer = RewardAugmentedDPOTrainer(
        tiny_model_path,
        args=config(tmp_path, max_steps=1, augment_eval=augment_eval),
        train_dataset=pairs(),
        eval_dataset={"train": eval_ds, "other": eval_ds.select(range(2))},  # an eval key named "train" is eval
        processing_class=tiny_tokenizer,
    )
    n_eval = 6 if augment_eval else 3
    assert seen == [("train", 8, True), ("train", n_eval, augment_eval), ("other", 2 * n_eval // 3, augment_eval)]
    assert len(trainer.eval_dataset["train"]) == n_eval
    if not augment_eval:
        assert trainer.eval_dataset["train"]["prompt"][0] == U(PROMPTS[0])  # untouched
    seen.clear()
    metrics = trainer.evaluate(pairs())  # a dataset given later follows the same rule
    assert seen == [("eval", 8 if augment_eval else 4, augment_eval)]
    assert math.isfinite(metrics["eval_loss"])
    seen.clear()
    trainer.evaluate(trainer.eval_dataset["other"])  # already prepared: not augmented twice
    assert seen[0][1] == len(trainer.eval_dataset["other"])
    # an already augmented training set is used as is
    seen.clear()
    augmented = reward_augment_dataset(pairs(), tiny_tokenizer)
    RewardAugmentedDPOTrainer(
        tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=augmented, processing_class=tiny_tokenizer
    )
    assert seen == [("train", 8, True)]


def test_eval_goal_score_conditions_eval_prompts(tiny_model_path, tiny_tokenizer, tmp_path):
    trainer = RewardAugmentedDPOTrainer(
        tiny_model_path,
        args=config(tmp_path, max_steps=1, eval_goal_score=10, augment_mode="chosen_only"),
        train_dataset=pairs(),
        eval_dataset=pairs(scores=False),
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 4  # RA+
    assert len(trainer.eval_dataset) == 4
    assert trainer.eval_dataset[0]["prompt"] == build_goal_prompt(U(PROMPTS[0]), 10, tiny_tokenizer)


def test_ultrafeedback_binarized_layout(tiny_model_path, tiny_tokenizer, tmp_path):
    """A string `prompt` next to full conversations (HuggingFaceH4/ultrafeedback_binarized) works for training and
    for the un-augmented evaluation set (plain TRL DPOTrainer fails on this layout)."""
    uf = Dataset.from_dict(
        {
            "prompt": PROMPTS,
            "chosen": [U(p) + A(c) for p, c in zip(PROMPTS, CHOSEN)],
            "rejected": [U(p) + A(r) for p, r in zip(PROMPTS, REJECTED)],
            "messages": [U(p) + A(c) for p, c in zip(PROMPTS, CHOSEN)],
            "score_chosen": SCORE_C,
            "score_rejected": SCORE_R,
        }
    )
    trainer = RewardAugmentedDPOTrainer(
        tiny_model_path,
        args=config(tmp_path, max_steps=1),
        train_dataset=uf,
        eval_dataset=uf,
        processing_class=tiny_tokenizer,
    )
    assert trainer.train_dataset[1]["prompt"] == build_goal_prompt(U(PROMPTS[0]), SCORE_R[0], tiny_tokenizer)
    assert trainer.train_dataset[1]["chosen"] == A(REJECTED[0])
    assert trainer.eval_dataset[0]["prompt"] == U(PROMPTS[0]) and trainer.eval_dataset[0]["chosen"] == A(CHOSEN[0])
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_half_ra_and_prefix_string_data(tiny_model_path, tiny_tokenizer, tmp_path):
    data = Dataset.from_dict(
        {
            "prompt": PROMPTS,
            "chosen": CHOSEN,
            "rejected": REJECTED,
            "score_chosen": [0.9, 0.8, 0.9, 0.7],
            "score_rejected": [0.2, 0.3, 0.4, 0.1],
        }
    )
    trainer = RewardAugmentedDPOTrainer(
        tiny_model_path,
        args=config(tmp_path, max_steps=2, augment_fraction=0.5, score_range="0,1", round_digits=1),
        train_dataset=data,
        processing_class=tiny_tokenizer,
    )
    assert len(trainer.train_dataset) == 4
    assert trainer.train_dataset[1]["prompt"] == build_goal_prompt(PROMPTS[0], 2.8)  # 1 + 9 * 0.2
    assert trainer.train_dataset[1]["chosen"] == REJECTED[0] + tiny_tokenizer.eos_token
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_config_parsing_and_errors(tiny_model_path, tiny_tokenizer, tmp_path):
    cfg = config(tmp_path, score_range="auto", attribute_columns='{"Helpfulness": ["hc", "hr"]}')
    assert cfg.score_range == "auto" and cfg.attribute_columns == {"Helpfulness": ("hc", "hr")}
    assert config(tmp_path, score_range="-1,1").score_range == (-1.0, 1.0)
    assert config(tmp_path, score_range=[0, 5]).augment_options().score_range == (0.0, 5.0)
    # the config validates through AugmentOptions: the same message as reward_augment_dataset
    mode_error = re.escape("`mode` (config: `augment_mode`) must be one of ('both', 'chosen_only')")
    with pytest.raises(ValueError, match=mode_error):
        config(tmp_path, augment_mode="RA+")
    with pytest.raises(ValueError, match=mode_error):
        reward_augment_dataset(pairs(), mode="RA+")
    with pytest.raises(
        ValueError, match=re.escape("`fraction` (config: `augment_fraction`) must be a number in (0, 1]")
    ):
        config(tmp_path, augment_fraction=1.5)
    with pytest.raises(ValueError, match=re.escape("`score_range` names unknown attribute(s) ['Honesty']")):
        config(tmp_path, attribute_columns='{"Helpfulness": ["hc", "hr"]}', score_range={"Honesty": (0, 1)})
    with pytest.raises(TypeError, match="must be a RewardAugmentedDPOConfig"):
        RewardAugmentedDPOTrainer(tiny_model_path, args=DPOConfig(str(tmp_path), **cpu_args()), train_dataset=pairs())
    stream = IterableDataset.from_generator(lambda: iter(pairs()))
    with pytest.raises(TypeError, match="needs a map-style"):
        RewardAugmentedDPOTrainer(
            tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=stream, processing_class=tiny_tokenizer
        )
    with pytest.raises(ValueError, match="no `score_chosen` column"):
        RewardAugmentedDPOTrainer(
            tiny_model_path,
            args=config(tmp_path, max_steps=1),
            train_dataset=pairs(scores=False),
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize("recipe", ["config_full.yaml", "config_qlora.yaml"])
def test_recipes_parse(recipe, tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    path = RECIPES / "smollm2-135m" / recipe
    text = path.read_text().replace("output_dir: ", f"output_dir: {tmp_path}/ #")
    local = tmp_path / recipe
    local.write_text(text)
    parser = TrlParser((ScriptArguments, RewardAugmentedDPOConfig, ModelConfig))
    script, cfg, model_cfg = parser.parse_args_and_config(
        ["--config", str(local), "--bf16", "false", "--use_cpu", "true"], fail_with_unknown_args=False
    )
    lr = 5e-6 if recipe == "config_qlora.yaml" else 5e-7  # the paper's 5e-7 is for full fine-tuning
    assert cfg.beta == 0.01 and cfg.learning_rate == lr and cfg.lr_scheduler_type == "cosine"
    assert cfg.warmup_steps == 0.1 and cfg.seed == 42 and cfg.num_train_epochs == 1
    assert cfg.augment_mode == "both" and cfg.ties == "drop"
    assert model_cfg.dtype is not None
    assert (model_cfg.use_peft and model_cfg.load_in_4bit) == (recipe == "config_qlora.yaml")


def test_ira_end_to_end(tiny_model_path, tiny_tokenizer, tmp_path):
    """Plain DPO a few steps → implicit-reward scores in [1, 10] → reward-augmented DPO trains (finite loss)."""
    dpo_args = DPOConfig(
        str(tmp_path / "dpo"),
        **cpu_args(
            max_steps=8,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_length=None,
        ),
    )
    binarized = pairs(scores=False)
    dpo = DPOTrainer(tiny_model_path, args=dpo_args, train_dataset=binarized, processing_class=tiny_tokenizer)
    dpo.train()
    scored = implicit_reward_relabel(
        binarized, dpo.model, ref_model=tiny_model_path, tokenizer=tiny_tokenizer, beta=0.1, batch_size=3
    )
    cols = scored[:]
    assert cols["chosen"] == binarized[:]["chosen"] and cols["rejected"] == binarized[:]["rejected"]  # order kept
    values = cols["score_chosen"] + cols["score_rejected"]
    assert min(values) == 1.0 and max(values) == 10.0 and all(1.0 <= v <= 10.0 for v in values)
    raw = cols["implicit_reward_chosen"] + cols["implicit_reward_rejected"]
    for r, s in zip(raw, values):  # the min/max map, rounded to 2 decimals
        assert s == round(1 + 9 * (r - min(raw)) / (max(raw) - min(raw)), 2)
    # DPO pushed chosen above rejected on its own training pairs
    assert sum(c > r for c, r in zip(cols["implicit_reward_chosen"], cols["implicit_reward_rejected"])) >= 3
    # the raw reward is beta * (log pi - log pi_ref), as computed by hand
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    add_fused_lm_head(reference)
    dpo.model.eval()
    by_hand = 0.1 * (
        pair_logp_margin(dpo.model, tiny_tokenizer, U(PROMPTS[0]), A(CHOSEN[0]), A(REJECTED[0]))
        - pair_logp_margin(reference, tiny_tokenizer, U(PROMPTS[0]), A(CHOSEN[0]), A(REJECTED[0]))
    )
    assert by_hand == pytest.approx(cols["implicit_reward_chosen"][0] - cols["implicit_reward_rejected"][0], abs=1e-4)

    augmented = reward_augment_dataset(scored, tiny_tokenizer, ties="keep")
    own_goal = augmented.filter(lambda row: row["goal_side"] == "chosen")
    assert [m[0]["content"] for m in own_goal[:]["chosen"]] == CHOSEN  # the original chosen wins under its own goal

    ra = RewardAugmentedDPOTrainer(
        tiny_model_path,
        args=config(tmp_path / "ra", max_steps=3, learning_rate=1e-3, ties="keep"),
        train_dataset=scored,
        processing_class=tiny_tokenizer,
    )
    ra.train()
    assert len(ra.train_dataset) == 8
    assert all(math.isfinite(h["loss"]) for h in ra.state.log_history if "loss" in h)


def test_ira_peft_reference_is_adapters_off(tiny_model_path, tiny_tokenizer):
    """With a PEFT model and ref_model=None the reference is the base model: a fresh LoRA (B = 0) gives zero rewards."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(ValueError, match="Every implicit reward equals 0"):
        implicit_reward_relabel(pairs(scores=False), model, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="`ref_model` is required"):
        implicit_reward_relabel(
            pairs(scores=False), AutoModelForCausalLM.from_pretrained(tiny_model_path), tokenizer=tiny_tokenizer
        )


# ------------------------------------------------------------------------------------------------ hardening (issue 7)


def test_beta_must_be_positive(tmp_path):
    for beta in (0.0, -0.1):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"beta must be a finite number > 0 (the DPO KL coefficient; the paper uses 0.01), got {beta}"
            ),
        ):
            config(tmp_path, beta=beta)
    assert config(tmp_path, beta=0.01).beta == 0.01


def test_empty_datasets_are_named(tiny_model_path, tiny_tokenizer, tmp_path):
    empty = pairs().select([])
    with pytest.raises(ValueError, match=re.escape("The train dataset is empty (0 rows).")):
        RewardAugmentedDPOTrainer(
            tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=empty, processing_class=tiny_tokenizer
        )
    with pytest.raises(ValueError, match=re.escape("The eval dataset is empty (0 rows).")):
        RewardAugmentedDPOTrainer(
            tiny_model_path,
            args=config(tmp_path, max_steps=1),
            train_dataset=pairs(),
            eval_dataset=empty,
            processing_class=tiny_tokenizer,
        )
    with pytest.raises(ValueError, match=re.escape("The eval dataset 'held_out' is empty (0 rows).")):
        RewardAugmentedDPOTrainer(
            tiny_model_path,
            args=config(tmp_path, max_steps=1),
            train_dataset=pairs(),
            eval_dataset={"ok": pairs(), "held_out": empty},
            processing_class=tiny_tokenizer,
        )
    stream = IterableDataset.from_generator(lambda: iter([]))
    with pytest.raises(ValueError, match=re.escape("The train dataset is empty (0 rows).")):
        RewardAugmentedDPOTrainer(
            tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=stream, processing_class=tiny_tokenizer
        )
    trainer = RewardAugmentedDPOTrainer(
        tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=pairs(), processing_class=tiny_tokenizer
    )
    with pytest.raises(ValueError, match=re.escape("The eval dataset is empty (0 rows).")):
        trainer.evaluate(empty)


def _long_prompt_pairs():
    """4 pairs; the last two have long prompts."""
    prompts = PROMPTS[:2] + [p + " and more" * 20 for p in PROMPTS[2:]]
    data = {"prompt": [U(p) for p in prompts], "chosen": [A(c) for c in CHOSEN], "rejected": [A(r) for r in REJECTED]}
    return Dataset.from_dict({**data, "score_chosen": SCORE_C, "score_rejected": SCORE_R})


def test_rows_pushed_past_max_length_are_counted(tiny_model_path, tiny_tokenizer, tmp_path, caplog):
    """DPO drops rows whose (goal-conditioned) prompt fills max_length: counted, warned with rows and the max_length
    that keeps them, logged as augment/dropped_too_long; nothing left is a clear error naming max_length."""
    full = RewardAugmentedDPOTrainer(
        tiny_model_path, args=config(tmp_path, max_steps=1), train_dataset=_long_prompt_pairs(),
        processing_class=tiny_tokenizer,
    )  # fmt: skip
    lengths = [len(ids) for ids in full.train_dataset["prompt_ids"]]
    assert len(lengths) == 8 and full.augmentation_stats["train"].get("dropped_too_long") is None
    short, long = max(lengths[:4]), min(lengths[4:])
    assert short + 5 < long  # rows 4-7 (the long prompts, both goals) are the long ones
    max_length = short + 5
    with caplog.at_level(logging.WARNING, logger="trl_rewardweighted.trainers.ra_dpo_trainer"):
        trainer = RewardAugmentedDPOTrainer(
            tiny_model_path,
            args=config(tmp_path, max_steps=1, max_length=max_length),
            train_dataset=_long_prompt_pairs(),
            processing_class=tiny_tokenizer,
        )
    assert len(trainer.train_dataset) == 4
    assert trainer.train_dataset["prompt_ids"] == full.train_dataset["prompt_ids"][:4]
    stats = trainer.augmentation_stats["train"]
    assert stats["dropped_too_long"] == 4 and stats["max_length_to_keep"] == max(lengths) + 1
    assert (
        f"4 of 8 rows of the train dataset have a tokenised prompt of at least max_length={max_length} tokens and "
        f"are dropped (no completion token would be left): rows [4, 5, 6, 7], prompt lengths {lengths[4:]}. "
        f"max_length={max(lengths) + 1} would keep them"
    ) in caplog.text
    trainer.train()
    assert trainer.state.log_history[0]["augment/dropped_too_long"] == 4.0
    # nothing left: a clear error naming max_length (not torch's num_samples=0)
    with pytest.raises(ValueError) as err:
        RewardAugmentedDPOTrainer(
            tiny_model_path,
            args=config(tmp_path, max_steps=1, max_length=min(lengths)),
            train_dataset=_long_prompt_pairs(),
            processing_class=tiny_tokenizer,
        )
    assert str(err.value).startswith(
        f"Every row of the train dataset (8) has a tokenised prompt of at least max_length={min(lengths)} tokens "
        f"(longest {max(lengths)}), so DPO's truncation would leave no completion token and drop them all."
    )
    assert f"Raise `max_length` above {max(lengths)}" in str(err.value)


@pytest.fixture
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a post-processor that adds a BOS token to plain-text input, and a chat template that
    writes BOS itself."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.add_bos_token = True
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    assert tok("Hi").input_ids[0] == tok.bos_token_id
    return tok


def test_generate_with_goal_tokenises_like_training(trained, bos_tokenizer):
    """The ids passed to `model.generate` are the prompt ids DPO training builds for the goal-conditioned prompt, BOS
    included, for string and conversational prompts (left-padded)."""
    trainer, _ = trained
    model = trainer.model
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append((kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()))
        return original(**kwargs)

    prompts = ["Say hello.", "Pick a fruit, any fruit you like."]
    conversations = [U(p) for p in prompts]
    for batch in (prompts, conversations):
        goal_prompts = [build_goal_prompt(p, 10, bos_tokenizer) for p in batch]
        conversational = isinstance(batch[0], list)
        chosen, rejected = (A("x"), A("y")) if conversational else ("x", "y")
        rows = Dataset.from_dict({"prompt": goal_prompts, "chosen": [chosen] * 2, "rejected": [rejected] * 2})
        expected = DPOTrainer._prepare_dataset(trainer, rows, bos_tokenizer, trainer.args, "probe")["prompt_ids"]
        assert all(ids[0] == bos_tokenizer.bos_token_id for ids in expected)
        seen.clear()
        model.generate = spy
        try:
            texts = generate_with_goal(model, bos_tokenizer, batch, max_new_tokens=2, do_sample=False)
        finally:
            del model.generate
        assert len(texts) == 2
        ((input_ids, attention_mask),) = seen
        got = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids, attention_mask)]
        assert got == expected
        width = max(map(len, expected))
        assert [mask.index(1) for mask in attention_mask] == [width - len(ids) for ids in expected]  # left padding


def test_ref_model_given_as_model_id(tiny_model_path, tiny_tokenizer, tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = RewardAugmentedDPOTrainer(
        policy,
        ref_model=tiny_model_path,
        args=config(tmp_path, max_steps=1),
        train_dataset=pairs(),
        processing_class=tiny_tokenizer,
    )
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert isinstance(ref, torch.nn.Module) and ref is not policy
    before = {name: p.detach().clone() for name, p in ref.named_parameters()}
    for (name, p), q in zip(policy.named_parameters(), ref.parameters()):  # loaded from the id: the same weights
        torch.testing.assert_close(p.detach(), q.detach(), msg=name)
    trainer.args.learning_rate = 1e-2
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    for name, p in ref.named_parameters():  # the reference stays fixed while the policy moves
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p.detach(), before[name]) for name, p in policy.named_parameters())


def test_precompute_matches_trl(tiny_model_path, tiny_tokenizer, tmp_path):
    """The sharded precompute gives DPO's own precompute values (TRL's `_precompute_ref_logps`), train and eval."""
    from tests.distributed.ra_dpo_precompute import build_trainer

    trainer = build_trainer(tiny_model_path, str(tmp_path), processing_class=tiny_tokenizer)
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        ours = torch.tensor([dataset["ref_chosen_logps"], dataset["ref_rejected_logps"]])
        bare = dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
        theirs = DPOTrainer._precompute_ref_logps(trainer, bare, "check", 3)
        expected = torch.tensor([theirs["ref_chosen_logps"], theirs["ref_rejected_logps"]])
        assert torch.isfinite(ours).all() and (ours < 0).all()
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert trainer._precompute_ref_logps(trainer.train_dataset, "again", 2) is trainer.train_dataset  # idempotent
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.distributed
def test_precompute_two_processes_in_memory(tiny_model_path, tiny_tokenizer, tmp_path):
    """`precompute_ref_log_probs=True` with an in-memory dataset on 2 processes: both ranks finish (TRL's precompute
    fails on rank 1 with FileNotFoundError) and hold the single-process values."""
    from tests.distributed.ra_dpo_precompute import build_trainer

    accelerate_two_processes(PRECOMPUTE_SCRIPT, tiny_model_path, tmp_path, timeout=600)
    single = build_trainer(tiny_model_path, str(tmp_path / "single"), processing_class=tiny_tokenizer)
    results = [json.loads((tmp_path / f"ref_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {k: results[0][k] for k in ("train", "eval")} == {k: results[1][k] for k in ("train", "eval")}
    for result in results:
        assert result["num_processes"] == 2 and all(math.isfinite(x) for x in result["losses"])
        for split, dataset in (("train", single.train_dataset), ("eval", single.eval_dataset)):
            assert result[split]["prompt"] == dataset["prompt"]  # same rows, same order
            for column in ("ref_chosen_logps", "ref_rejected_logps"):
                torch.testing.assert_close(
                    torch.tensor(result[split][column]), torch.tensor(dataset[column]), rtol=0, atol=1e-5
                )


def test_num_tokens_continues_after_resume(tiny_model_path, tmp_path):
    """DPO's cumulative `num_tokens` lives on the trainer: it is saved with each checkpoint and restored on resume."""
    common = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=2, logging_steps=1)
    first = RewardAugmentedDPOTrainer(
        tiny_model_path, args=config(tmp_path, max_steps=2, **common), train_dataset=pairs()
    )
    first.train()
    tokens = [h["num_tokens"] for h in first.state.log_history if "loss" in h]
    assert len(tokens) == 2 and 0 < tokens[0] < tokens[1]
    assert (tmp_path / "checkpoint-2" / "trl_rewardweighted_counters.json").is_file()
    resumed = RewardAugmentedDPOTrainer(
        tiny_model_path, args=config(tmp_path, max_steps=4, **common), train_dataset=pairs()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    new = [h["num_tokens"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert len(new) == 2 and new[0] > tokens[1] and new[1] > new[0]
