"""`trl-rw eval` and `trl-rw compare` on the tiny offline model: the report files, paired samples, KL of a model
against itself, goal-conditioned prompts for reward-augmented models, matched training budgets."""

import json
from pathlib import Path

import pytest

from trl_rewardweighted.cli import main as cli_main
from trl_rewardweighted.evaluation import REFERENCE, EvalConfig, ModelSpec, evaluate_models, markdown_table

PROMPTS = [
    [{"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]


def word_reward(prompts, completions):
    return [len(c.split()) / 10.0 for c in completions]


def small_config(**kw):
    base = dict(num_samples=3, max_new_tokens=10, progress=False, n_resamples=200)
    base.update(kw)
    return EvalConfig(**base)


def test_evaluate_models_same_model_and_goal_prompts(tiny_model_path, monkeypatch):
    from trl_rewardweighted import sampling

    seen = []
    original = sampling.generate_completions

    def spy(model, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_completions", spy)
    models = [ModelSpec("same", tiny_model_path), ModelSpec("ra", tiny_model_path, goal_conditioned=True)]
    results = evaluate_models(
        models, tiny_model_path, PROMPTS, word_reward, small_config(), reference_responses=["hi", "blue", "one"]
    )
    entries = results["models"]
    assert list(entries) == [REFERENCE, REFERENCE + " + goal", "same", "ra"]
    ref, same, ra = entries[REFERENCE], entries["same"], entries["ra"]
    # The same weights and the same sampling seed: identical samples, rewards, and a KL of exactly 0.
    assert same["samples"]["completions"] == ref["samples"]["completions"]
    assert same["summary"]["kl"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert same["summary"]["reward_diff"]["mean"] == 0.0
    assert same["summary"]["win_tie_loss"]["tie_rate"] == 1.0
    assert len(same["samples"]["rewards"]) == 3 and all(len(r) == 3 for r in same["samples"]["rewards"])
    assert "win_tie_loss_vs_dataset" in same["summary"]
    # The reward-augmented model answered goal-conditioned prompts (a system message with the top goal) and is
    # compared with the reference under the same prompt; that entry is compared with the plain reference.
    goal_calls = [p for p in seen if p and p[0][0]["role"] == "system"]
    assert goal_calls and all("Overall score: 10." in p[0][0]["content"] for p in goal_calls)
    assert ra["summary"]["vs"] == REFERENCE + " + goal" and ra["summary"]["kl"]["mean"] == 0.0
    assert entries[REFERENCE + " + goal"]["summary"]["vs"] == REFERENCE
    table = markdown_table(results)
    assert table.count("\n") == 2 + 4 and "| ra | " in table


def test_eval_cli_writes_report(tiny_model_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nName a colour.\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"same={tiny_model_path}", "--reference", tiny_model_path, "--prompts", str(prompts)]
    argv += ["--reward", "tests.test_evaluation:word_reward", "--output-dir", str(out), "--num-samples", "2"]
    argv += ["--max-new-tokens", "6", "--no-progress"]
    assert cli_main(argv) == 0
    results = json.loads((out / "eval.json").read_text())
    assert set(results["models"]) == {REFERENCE, "same"}
    assert (out / "eval.md").read_text().startswith("| model |")
    assert (out / "reward_distribution.png").exists() and (out / "reward_vs_kl.png").exists()
    with pytest.raises(SystemExit) as err:  # an existing report needs --overwrite
        cli_main(argv)
    assert err.value.code == 2


def test_compare_end_to_end(tiny_model_path, tmp_path):
    """Every method with a training block of LoRA adapters and activation checkpointing (`--config`, one method's
    learning rate of its own): matched budgets, each method's adapter saved, the base weights unchanged, checkpointing
    on in every trainer, the report files."""
    import hashlib

    from safetensors.torch import load_file

    config = tmp_path / "lora.yaml"
    config.write_text(
        "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlora_target_modules: [all-linear]\n"
        "activation_checkpointing: true\nmethods:\n  dpo: {learning_rate: 1.0e-4}\n"
    )
    weights = sorted(Path(tiny_model_path).glob("*.safetensors"))
    digest = lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for p in weights]  # noqa: E731
    before = digest()
    out = tmp_path / "compare"
    argv = ["compare", "--model", tiny_model_path, "--reward", "tests.test_evaluation:word_reward"]
    argv += ["--reward-range", "0,2", "--num-train-prompts", "4", "--num-eval-prompts", "2", "--steps", "2"]
    argv += ["--eval-samples", "2", "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress"]
    argv += ["--config", str(config)]
    methods = ["sft", "dpo", "var", "vcb", "reward_augmented_dpo", "reward_augmented_dpo_twins", "online_var", "grpo"]
    assert cli_main(argv + ["--methods", ",".join(methods)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == methods
    # Matched budgets: the same optimizer steps, the same sequences per step (pairs count 2, VCB groups 4; the online
    # methods sample 2 prompts x 4 replies per step).
    per_row = {"dpo": 2, "reward_augmented_dpo": 2, "reward_augmented_dpo_twins": 2, "vcb": 4}
    for method in methods:
        budget = summary["budgets"][method]
        assert budget["steps"] == 2
        assert budget["batch_size"] * per_row.get(method, 1) == 8
        assert budget["learning_rate"] == (1e-4 if method == "dpo" else 2e-5)
        model = out / "models" / method
        assert (model / "adapter_config.json").exists() and not (model / "model.safetensors").exists(), method
        lora_b = [t for k, t in load_file(model / "adapter_model.safetensors").items() if "lora_B" in k]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b), method  # trained (B starts at zero)
        result = json.loads((out / "phases" / f"train_{method}.result.json").read_text())
        assert result["peft"] is True and result["activation_checkpointing"] is True, method
    assert digest() == before  # the base model's weights are unchanged
    assert set(summary["models"]) == {REFERENCE, REFERENCE + " + goal", *methods}
    text = (out / "compare.md").read_text()
    assert "## Pairwise" in text and "| reward_augmented_dpo_twins |" in text
    assert "| dpo | 2 | 4 | 4 x 1 x 1 | 8 | 0.0001 | float32 | LoRA | yes |" in text
    for name in ("eval.json", "eval.md", "reward_distribution.png", "reward_vs_kl.png"):
        assert (out / "eval" / name).exists(), name


def test_compare_refuses_bad_budgets_and_methods(tmp_path, capsys):
    base = ["compare", "--model", "tiny", "--output-dir", str(tmp_path / "c")]
    for extra, message in (
        (["--methods", "sft,ppo"], "trl-rw compare: error: --methods: unknown ['ppo']; choose from sft, dpo"),
        (["--sequences-per-step", "6"], "--sequences-per-step 6 must be a multiple of 4"),
    ):
        with pytest.raises(SystemExit) as err:
            cli_main(base + extra)
        assert err.value.code == 2
        assert message in capsys.readouterr().err
