"""Verdicts over several seeds: the two-level bootstrap (`metrics.pooled_paired_diff`), the pooled evaluation summary
(`evaluation.pool_results`), and `trl-rw compare --seeds N` (one resumable comparison per seed, then pooled), with
`var` (per-prompt normaliser) and `var_step` (the step normaliser) as separate methods."""

import json

import numpy as np
import pytest

from trl_rewardweighted import compare
from trl_rewardweighted.evaluation import pairwise_table, pool_results, pooled_markdown_table
from trl_rewardweighted.metrics import paired_bootstrap_diff, pooled_paired_diff

from .test_compare_config import compare_argv, run

# ----------------------------------------------------------------------------------------------------------------------
# The two-level bootstrap
# ----------------------------------------------------------------------------------------------------------------------


def test_pooled_estimate_is_the_mean_of_the_seeds_means():
    a = [[1.0, 2.0, 4.0], [3.0, 3.0, 6.0]]
    b = [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    d = pooled_paired_diff(a, b)
    assert d.per_seed == pytest.approx((5 / 3, 3.0))  # (1+1+3)/3, (2+2+5)/3
    assert d.diff == pytest.approx((5 / 3 + 3.0) / 2)
    assert d.low <= d.diff <= d.high


def test_one_seed_is_the_paired_bootstrap_over_prompts():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1, 16), rng.normal(0, 1, 16)
    pooled = pooled_paired_diff([a], [b], n_resamples=500, seed=7)
    paired = paired_bootstrap_diff(a, b, n_resamples=500, seed=7)
    assert tuple(pooled[:4]) == tuple(paired) and pooled.per_seed == (paired.diff,)


def test_seeds_that_disagree_widen_the_interval():
    """The same prompts' differences shifted by seed: the interval over seeds and prompts holds the spread between
    seeds, wider than the interval of the seeds' prompts taken together as one sample."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, 16)
    a = [noise + shift for shift in (0.6, 0.0, -0.3)]
    zeros = [np.zeros(16)] * 3
    pooled = pooled_paired_diff(a, zeros, n_resamples=4000)
    flat = paired_bootstrap_diff(np.concatenate(a), np.zeros(48), n_resamples=4000)
    assert pooled.diff == pytest.approx(flat.diff)
    assert pooled.high - pooled.low > 3 * (flat.high - flat.low)
    assert pooled.low < 0 < pooled.high  # one seed's +0.6 does not carry the pooled verdict
    # Identical seeds: no spread between seeds; every resampled seed is the same sample.
    same = pooled_paired_diff([a[0]] * 3, zeros, n_resamples=4000)
    assert same.low > 0.5


def test_zero_width_when_every_difference_is_the_same():
    d = pooled_paired_diff([[2.0, 2.0], [2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]])
    assert (d.diff, d.low, d.high, d.frac_le_zero) == (1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([[1.0]], [], "`a_by_seed` has 1 seeds and `b_by_seed` 0"),
        ([[1.0, 2.0]], [[1.0]], "Seed 0: `a` has 2 values but `b` has 1"),
        ([[1.0, float("nan")]], [[1.0, 1.0]], "a_by_seed[0]"),
    ],
)
def test_pooled_refuses_bad_input(a, b, message):
    with pytest.raises(ValueError) as err:
        pooled_paired_diff(a, b)
    assert message in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# Pooling evaluations
# ----------------------------------------------------------------------------------------------------------------------


def _results(shift: float, prompts=("p1", "p2", "p3")) -> dict:
    """A minimal `eval.json`: the reference and one model with a reward shift, two samples per prompt."""
    ref_rewards = [[0.0, 0.2], [0.1, 0.1], [-0.2, 0.0]]
    logps = [[-3.0, -2.0], [-4.0, -4.0], [-1.0, -3.0]]
    ref_logps = [[-3.5, -2.5], [-4.0, -5.0], [-1.0, -3.0]]
    model = {
        "summary": {"vs": "reference"},
        "samples": {"rewards": [[r + shift for r in g] for g in ref_rewards], "logps": logps, "ref_logps": ref_logps},
    }
    reference = {"summary": {}, "samples": {"rewards": ref_rewards, "logps": ref_logps, "ref_logps": ref_logps}}
    return {"prompts": list(prompts), "models": {"reference": reference, "m": model}}


def test_pool_results_per_seed_estimates_and_pooled_verdicts():
    pooled = pool_results([_results(0.3), _results(0.1)], seeds=[0, 1], n_resamples=500)
    m = pooled["models"]["m"]
    assert pooled["seeds"] == [0, 1] and pooled["num_prompts"] == 3
    assert m["vs"] == "reference"
    assert m["reward_diff"]["per_seed"] == pytest.approx([0.3, 0.1])
    assert m["reward_diff"]["mean"] == pytest.approx(0.2)
    # KL per prompt: mean log pi - mean log pi_ref = 0.5, 0.5, 0 -> 1/3 in both seeds.
    assert m["kl"]["per_seed"] == pytest.approx([1 / 3, 1 / 3]) and m["kl"]["mean"] == pytest.approx(1 / 3)
    assert pooled["models"]["reference"]["kl"]["mean"] == 0.0
    table = pooled_markdown_table(pooled)
    assert "| m | " in table and "+0.300 / +0.100" in table and "| + |" in table
    assert "+0.200 [+0.100, +0.300] +" in pairwise_table([_results(0.3), _results(0.1)], ["m", "reference"])


def test_pool_results_refuses_other_prompts_or_models():
    with pytest.raises(ValueError, match="seeds are pooled only over the same models and prompts"):
        pool_results([_results(0.3), _results(0.1, prompts=("p1", "p2", "x"))], seeds=[0, 1])
    with pytest.raises(ValueError, match="Got 1 evaluations for 2 seeds"):
        pool_results([_results(0.3)], seeds=[0, 1])


# ----------------------------------------------------------------------------------------------------------------------
# compare --seeds, var and var_step
# ----------------------------------------------------------------------------------------------------------------------


def test_var_and_var_step_plan_their_normalisers(tmp_path):
    from trl_rewardweighted.cli import build_parser

    opts = build_parser().parse_args(["compare", "--output-dir", str(tmp_path)])
    plan = compare.plan_training(opts, ["var", "var_step"], tmp_path)
    assert plan["var"]["method"] == plan["var_step"]["method"] == "var"
    assert plan["var"]["recipe"]["values"]["z_scope"] == "prompt"
    assert plan["var_step"]["recipe"]["values"]["z_scope"] == "step"
    assert "var_step" in compare.DEFAULT_METHODS.split(",")


def test_compare_seeds_pools_resumable_seed_runs(tiny_model_path, tmp_path, capsys, monkeypatch):
    from trl_rewardweighted.scripts import train_phase

    out = tmp_path / "out"
    argv = compare_argv(tiny_model_path, out, "--methods", "var,var_step", "--seeds", "2", "--seed", "5")
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "compare.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["methods"] == ["var", "var_step"]
    for seed in (5, 6):
        run_json = json.loads((out / f"seed_{seed}" / "run.json").read_text())
        assert run_json["settings"]["seed"] == seed
        per_seed = summary["per_seed"][str(seed)]["models"]["var"]["reward_diff"]["mean"]
        assert summary["pooled"]["var"]["reward_diff"]["per_seed"][seed - 5] == pytest.approx(per_seed)
    text = (out / "compare.md").read_text()
    assert "# Comparison over 2 seeds" in text and "| var_step |" in text
    assert (out / "pooled.json").is_file()
    # The training data of the two seeds were sampled with their own seeds.
    assert (out / "seed_5" / "train_groups.jsonl").read_text() != (out / "seed_6" / "train_groups.jsonl").read_text()

    # Rerunning resumes every finished phase; a seed's folder is the run `--seed 6 --output-dir seed_6` resumes.
    total = summary["per_seed"]["5"]["timings"]["total_this_run"]
    calls = []
    monkeypatch.setattr(train_phase, "run_phase", lambda f: calls.append(f))
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert calls == []
    assert printed.count("var: trained in an earlier run, skipped") == 2
    after = json.loads((out / "seed_5" / "compare.json").read_text())["timings"]["total_this_run"]
    assert after == total  # the rerun that ran nothing keeps the run's own time
    single = compare_argv(tiny_model_path, out / "seed_6", "--methods", "var,var_step", "--seed", "6")
    code, printed, err = run(single, capsys)
    assert code == 0, err
    assert calls == [] and "3/3 evaluation: done in an earlier run" in printed


def test_eval_seeds_pools_one_evaluation_per_sampling_seed(tiny_model_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nName a colour.\nCount to three.\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"same={tiny_model_path}", "--reference", tiny_model_path, "--prompts", str(prompts)]
    argv += ["--reward", "tests.test_evaluation:word_reward", "--output-dir", str(out), "--num-samples", "2"]
    argv += ["--max-new-tokens", "6", "--no-progress", "--seeds", "2", "--seed", "3"]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["seeds"] == [3, 4] and not (out / "eval.json").exists() and not (out / ".parts").exists()
    for k, seed in enumerate((3, 4)):
        results = json.loads((out / f"seed_{seed}" / "eval.json").read_text())
        assert results["config"]["seed"] == seed
        for name in ("reference", "same"):
            assert pooled["models"][name]["reward"]["per_seed"][k] == pytest.approx(
                results["models"][name]["summary"]["reward"]["mean"]
            )
            assert pooled["models"][name]["kl"]["per_seed"][k] == pytest.approx(
                results["models"][name]["summary"]["kl"]["mean"], abs=1e-9
            )
    assert "Pooled over seeds 3, 4 x 3 prompts" in (out / "pooled.md").read_text()
    code, _, err = run(argv, capsys)  # the pooled report exists
    assert code == 2 and err.strip().endswith("pooled.json exists; pass --overwrite to replace it.")


def test_iterate_takes_a_packaged_recipe_by_name(tmp_path, monkeypatch):
    from argparse import Namespace

    from trl_rewardweighted.iterate import resolve_options

    monkeypatch.chdir(tmp_path)
    options = resolve_options(Namespace(config="quickstart/iterate_var", rounds=1))
    assert options.method == "var" and options.rounds == 1
    with pytest.raises(FileNotFoundError, match="--config quickstart/nothing: no such file"):
        resolve_options(Namespace(config="quickstart/nothing"))
