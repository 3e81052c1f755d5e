"""Every number of `trl-rw eval`, recomputed independently from the samples it reports, for string prompts and for
the same prompts as one-user-message conversations (which must give identical results): the KL is taken on the
sampled token ids, inside the chat template the replies were generated in, from full logits here (not the fused LM
head the package uses); every interval is over prompts; `eval.json` is standard JSON."""

import json
import math

import numpy as np
import pytest
import torch

from trl_rewardweighted.evaluation import REFERENCE, EvalConfig, ModelSpec, evaluate_models, write_report
from trl_rewardweighted.metrics import bootstrap_ci

PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "Pick a fruit."]
N_RESAMPLES = 300


def word_reward(prompts, completions):
    return [len(c.split()) / 10.0 + 0.01 * len(c) for c in completions]


@pytest.fixture(scope="module")
def other_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with every weight perturbed: a policy with a non-zero KL to the tiny reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("tiny-other")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return str(path)


def _evaluate(tiny_model_path, other_model_path, prompts):
    config = EvalConfig(num_samples=3, max_new_tokens=8, progress=False, n_resamples=N_RESAMPLES, greedy=False)
    return evaluate_models([ModelSpec("other", other_model_path)], tiny_model_path, prompts, word_reward, config)


@pytest.fixture(scope="module")
def both_forms(tiny_model_path, other_model_path):
    as_strings = _evaluate(tiny_model_path, other_model_path, PROMPTS)
    as_messages = _evaluate(tiny_model_path, other_model_path, [[{"role": "user", "content": p}] for p in PROMPTS])
    return as_strings, as_messages


def _full_logits_logp(model, context: list[int], completion: list[int]) -> float:
    """log pi(completion | context) from the full logits of one unpadded forward."""
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return float(sum(logps[len(context) - 1 + k, tok] for k, tok in enumerate(completion)))


def _interval(values):
    est, low, high = bootstrap_ci(np.asarray(values, dtype=np.float64), n_resamples=N_RESAMPLES, seed=0)
    return est, low, high


def test_string_and_message_prompts_give_identical_numbers(both_forms):
    as_strings, as_messages = both_forms
    for name in (REFERENCE, "other"):
        a, b = as_strings["models"][name], as_messages["models"][name]
        assert a["samples"]["completion_ids"] == b["samples"]["completion_ids"]
        assert a["samples"]["prompt_ids"] == b["samples"]["prompt_ids"]
        assert a["samples"]["logps"] == b["samples"]["logps"]
        assert a["samples"]["ref_logps"] == b["samples"]["ref_logps"]
        assert a["summary"] == b["summary"]
    assert as_strings["models"]["other"]["summary"]["kl"]["mean"] > 0.01  # a real, non-zero KL was compared


def test_every_number_recomputed_independently(both_forms, tiny_model_path, other_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    models = {
        "other": AutoModelForCausalLM.from_pretrained(other_model_path).eval(),
        REFERENCE: AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(),
    }
    eos = tokenizer.eos_token_id
    for results in both_forms:
        ref_run = results["models"][REFERENCE]["samples"]
        run = results["models"]["other"]["samples"]
        summary = results["models"]["other"]["summary"]
        kl_per_prompt, len_per_prompt, reward_per_prompt, diff_per_prompt = [], [], [], []
        wins = ties = losses = 0
        mis = pairs = 0
        for i, prompt in enumerate(PROMPTS):
            # The context the reply was sampled in: the chat template with the generation prompt.
            context = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            assert run["prompt_ids"][i] == list(context)
            kls, lengths, logratios = [], [], []
            for j, ids in enumerate(run["completion_ids"][i]):
                assert len(ids) <= 8 and eos not in ids[:-1]  # the sampled ids, cut after the first EOS
                assert (
                    tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
                    == run["completions"][i][j]
                )
                lp = _full_logits_logp(models["other"], list(context), ids)
                lr = _full_logits_logp(models[REFERENCE], list(context), ids)
                assert run["logps"][i][j] == pytest.approx(lp, abs=2e-4)
                assert run["ref_logps"][i][j] == pytest.approx(lr, abs=2e-4)
                kls.append(lp - lr)
                logratios.append(lp - lr)
                lengths.append(len(ids) - (1 if ids and ids[-1] == eos else 0))
            assert run["token_lengths"][i] == lengths
            rewards = word_reward([prompt] * 3, run["completions"][i])
            assert run["rewards"][i] == pytest.approx(rewards)
            ref_rewards = ref_run["rewards"][i]
            kl_per_prompt.append(np.mean(kls))
            len_per_prompt.append(np.mean(lengths))
            reward_per_prompt.append(np.mean(rewards))
            diff_per_prompt.append(np.mean(rewards) - np.mean(ref_rewards))
            for a, b in zip(rewards, ref_rewards):
                wins, ties, losses = wins + (a > b), ties + (a == b), losses + (a < b)
            for j in range(3):
                for k in range(j + 1, 3):
                    if rewards[j] != rewards[k]:
                        pairs += 1
                        mis += np.sign(logratios[j] - logratios[k]) != np.sign(rewards[j] - rewards[k])
        # Means, and intervals over prompts (the bootstrap itself is tested in test_metrics.py).
        for key, per_prompt in (("kl", kl_per_prompt), ("reward", reward_per_prompt), ("length", len_per_prompt)):
            est, low, high = _interval(per_prompt)
            assert summary[key]["mean"] == pytest.approx(np.mean(per_prompt), abs=1e-4), key
            assert (summary[key]["low"], summary[key]["high"]) == pytest.approx((low, high), abs=1e-4), key
        assert summary["reward_diff"]["mean"] == pytest.approx(np.mean(diff_per_prompt), abs=1e-9)
        n = 3 * len(PROMPTS)
        assert summary["win_tie_loss"]["win_rate"] == pytest.approx(wins / n)
        assert summary["win_tie_loss"]["tie_rate"] == pytest.approx(ties / n)
        assert summary["win_tie_loss"]["loss_rate"] == pytest.approx(losses / n)
        assert summary["misalignment"] == {"rate": pytest.approx(mis / pairs), "pairs": pairs}
        flat = [c for group in run["completions"] for c in group]
        unigrams = [t for c in flat for t in c.split()]
        bigrams = [tuple(c.split()[k : k + 2]) for c in flat for k in range(len(c.split()) - 1)]
        assert summary["distinct_1"] == pytest.approx(len(set(unigrams)) / len(unigrams))
        assert summary["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
        gain, kl = summary["reward_diff"]["mean"], summary["kl"]["mean"]
        assert summary["reward_per_nat"] == pytest.approx(gain / kl)


def test_eval_json_is_standard_json(both_forms, tmp_path):
    as_strings, _ = both_forms
    paths = write_report(as_strings, tmp_path)
    text = open(paths["json"]).read()

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    loaded = json.loads(text, parse_constant=refuse)
    # The reference against itself: no KL, so no reward per nat; written as null, not NaN.
    assert "reward_per_nat" not in loaded["models"][REFERENCE]["summary"]
    summary = dict(as_strings["models"]["other"]["summary"], reward_per_nat=math.nan)
    patched = {**as_strings, "models": {"other": {"summary": summary, "samples": {}}}}
    from trl_rewardweighted.data.utils import dumps_json

    assert (
        json.loads(dumps_json(patched), parse_constant=refuse)["models"]["other"]["summary"]["reward_per_nat"] is None
    )
    assert (
        loaded["models"]["other"]["samples"]["completion_ids"]
        == as_strings["models"]["other"]["samples"]["completion_ids"]
    )
