"""VCBTrainer vs TRL's DPOTrainer, side by side: cost per completion and peak memory.

    python benchmarks/bench_vcb.py                      # tiny offline Qwen2 (bigger config: 4 layers, hidden 256)
    python benchmarks/bench_vcb.py --model smollm2      # real SmolLM2-135M-Instruct (needs `make install-demo`)
    python benchmarks/bench_vcb.py --model PATH         # any local causal LM folder

Both trainers see exactly the same sequences: each prompt has ``n`` completions (n even); VCB trains on groups of
``n``, DPO on the ``n/2`` pairs (c0, c1), (c2, c3), ... of the same prompt. A VCB micro-batch of G prompts and a DPO
batch of G*n/2 pairs therefore forward the same G*n sequences, so the step-time ratio is the cost-per-completion ratio
(VCB time per completion / DPO time per completion, a DPO pair counting as 2 completions).

Two reference set-ups, each for both trainers: a live reference model (one extra no-grad forward per step), and
``precompute_ref_log_probs=True`` (the reference pass runs once at init and is not timed). Step times are measured in
interleaved rounds within one process (every round runs a few steps of every trainer, alternating the order; the first
step of each round is a warm-up and is discarded): machine noise hits all trainers alike. The median is reported.
Peak memory: on CUDA, ``max_memory_allocated`` per trainer; on CPU, the peak RSS (VmHWM) of a fresh subprocess per
trainer, which includes the Python runtime, the model(s), the optimizer state and the activations, and the peak RSS
increase during ``train()`` (what the trainer adds on top of the loaded model).

Both trainers use the fused LM head exactly as DPOTrainer patches it (VCB leaves the patch to DPO). Goal: ≤ 1.10×.
"""

from __future__ import annotations

import argparse
import os
import resource
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
    train_peak_memory,
    write_json,
)
from datasets import Dataset  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_rewardweighted.data.utils import dumps_json  # noqa: E402

KINDS = ("dpo_live", "vcb_live", "dpo_pre", "vcb_pre")
LABELS = {
    "dpo_live": "DPOTrainer, live reference",
    "vcb_live": "VCBTrainer, live reference",
    "dpo_pre": "DPOTrainer, precomputed ref",
    "vcb_pre": "VCBTrainer, precomputed ref",
}
WORDS = (
    "the a good bad happy sad day night river star light dark we you they run see make find love hate old new big "
    "small red blue green cold warm sun moon tree sea rain wind"
).split()


def model_path(name: str) -> str:
    if name == "smollm2":
        from trl_rewardweighted.offline import smollm2_path

        return smollm2_path()
    if name != "tiny":
        return name
    # The tiny test model's tokenizer with a bigger (still CPU-friendly) network: 4 layers, hidden 256.
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from trl_rewardweighted.testing import build_tiny_model, tiny_model_kwargs

    target = os.path.join(tempfile.gettempdir(), "trl_rw_bench_vcb_tiny_big")
    stamp = os.path.join(target, ".stamp")
    if os.path.exists(stamp):
        return target
    tokenizer = AutoTokenizer.from_pretrained(
        build_tiny_model(os.path.join(tempfile.gettempdir(), "trl_rw_bench_tiny"))
    )
    kwargs = tiny_model_kwargs(len(tokenizer))
    kwargs.update(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8)
    config = Qwen2Config(**kwargs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    open(stamp, "w").write("ok")
    return target


def make_groups(n_prompts: int, n: int, words: int) -> dict:
    """`n_prompts` prompts with `n` completions each, all completions `words` words long (similar token lengths)."""
    rows = {"prompt": [], "completions": [], "rewards": []}
    for i in range(n_prompts):
        prompt = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(max(words // 2, 1)))
        rows["prompt"].append(f"Write about {prompt}:")
        rows["completions"].append(
            [
                " " + " ".join(WORDS[(i * 3 + k * 11 + j * 5) % len(WORDS)] for j in range(words)) + "."
                for k in range(n)
            ]
        )
        rows["rewards"].append([((i * 37 + k * 13) % 11) / 10.0 - 0.5 for k in range(n)])
    return rows


def groups_to_pairs(groups: dict) -> dict:
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, completions in zip(groups["prompt"], groups["completions"], strict=True):
        for k in range(0, len(completions), 2):
            pairs["prompt"].append(prompt)
            pairs["chosen"].append(completions[k])
            pairs["rejected"].append(completions[k + 1])
    return pairs


def build_trainer(kind: str, path: str, opts, timer: StepTimer, steps: int):
    from trl import DPOConfig, DPOTrainer

    from trl_rewardweighted import VCBConfig, VCBTrainer

    groups = make_groups(opts.prompts, opts.n, opts.words)
    pairs_per_group = opts.n // 2
    common = bench_args(
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        max_steps=steps,
        max_length=opts.max_length,
        bf16=opts.bf16,
        precompute_ref_log_probs=kind.endswith("_pre"),
    )
    out = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    if kind.startswith("dpo"):
        args = DPOConfig(output_dir=out, per_device_train_batch_size=opts.groups * pairs_per_group, **common)
        dataset = Dataset.from_dict(groups_to_pairs(groups))
        trainer = DPOTrainer(model=path, args=args, train_dataset=dataset, callbacks=[timer])
    else:
        args = VCBConfig(output_dir=out, per_device_train_batch_size=opts.groups, **common)
        trainer = VCBTrainer(model=path, args=args, train_dataset=Dataset.from_dict(groups), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no per-run log dicts on stdout
    return trainer


def run_timing(opts) -> tuple[dict, dict]:
    """Median step time (s) and real tokens per second (policy forward) of every trainer."""
    path = model_path(opts.model)
    kinds = opts.kinds
    timers = {k: StepTimer() for k in kinds}
    trainers = {
        k: timers[k].count_tokens(build_trainer(k, path, opts, timers[k], opts.steps_per_round)) for k in kinds
    }
    medians = interleaved_step_medians(trainers, timers, opts.rounds)
    return medians, {k: timers[k].tokens_per_second(medians[k]) for k in kinds}


def _peak_rss_mib() -> float:
    """Peak RSS of this process image (VmHWM). Not `ru_maxrss`: Linux carries it over from the parent across
    fork + exec, so a child started by a big parent reports the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_memory_child(opts, kind: str) -> dict:
    """Peak memory (MiB) of one trainer.

    CUDA: ``max_memory_allocated`` during ``train()``. CPU: the peak RSS of this fresh process (VmHWM: runtime,
    model(s), data, optimizer, activations) and, sampled every 2 ms from /proc, the peak RSS increase during
    ``train()`` over the RSS before it (optimizer state + activations + reference forward: what the trainer adds).
    """
    path = model_path(opts.model)
    trainer = build_trainer(kind, path, opts, StepTimer(), opts.memory_steps)
    result = train_peak_memory(trainer)
    if not torch.cuda.is_available():
        result["peak_mib"] = _peak_rss_mib()  # whole-process peak (VmHWM); train_mib is what train() added
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a local model path")
    parser.add_argument("--n", type=int, default=4, help="completions per prompt (even; DPO uses n/2 pairs)")
    parser.add_argument("--groups", type=int, default=4, help="prompts per VCB micro-batch (DPO: groups*n/2 pairs)")
    parser.add_argument("--words", type=int, default=24, help="words per completion (prompt: half)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the dataset")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the measured numbers here (read by benchmarks/run_all.py)")
    parser.add_argument("--_memory_child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ref", choices=("both", "live", "pre"), default="both", help="reference set-ups to time (default: both)"
    )
    opts = parser.parse_args(argv)
    if opts.n < 2 or opts.n % 2:
        parser.error("--n must be even and >= 2")
    opts.kinds = tuple(k for k in KINDS if opts.ref == "both" or k.endswith("_" + opts.ref))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if opts._memory_child:
        print(dumps_json(run_memory_child(opts, opts._memory_child)))
        return

    device = device_name()
    seqs = opts.groups * opts.n
    print(
        f"model={opts.model} device={device} n={opts.n} VCB groups/batch={opts.groups} DPO pairs/batch="
        f"{opts.groups * opts.n // 2} -> {seqs} sequences per step, words/completion={opts.words} "
        f"max_length={opts.max_length} bf16={opts.bf16}"
    )
    times, tokens_per_s = run_timing(opts)
    memory = {} if opts.no_memory else memory_in_children(__file__, argv, opts.kinds)
    cuda = torch.cuda.is_available()
    header = f"{'trainer':<30}{'median step (s)':>16}{'s/completion':>14}{'cost ratio':>12}"
    if memory:
        header += f"{'peak MiB':>10}{'mem ratio':>11}" + ("" if cuda else f"{'train +MiB':>12}{'ratio':>8}")
    print(header)
    for kind in opts.kinds:
        baseline = "dpo_live" if kind.endswith("_live") else "dpo_pre"
        ratio = times[kind] / times[baseline]  # same number of completions per step
        line = f"{LABELS[kind]:<30}{times[kind]:>16.4f}{times[kind] / seqs:>14.5f}{ratio:>11.3f}x"
        if kind in memory:
            mem, base = memory[kind], memory[baseline]
            line += f"{mem['peak_mib']:>10.0f}{mem['peak_mib'] / base['peak_mib']:>10.3f}x"
            if not cuda:
                line += f"{mem['train_mib']:>12.0f}{mem['train_mib'] / max(base['train_mib'], 1e-9):>7.2f}x"
        print(line)
    print("cost ratio = (VCB s/completion) / (DPO s/completion), same sequences and reference set-up.")
    memory_kind = (
        "CUDA max_memory_allocated"
        if cuda
        else "memory (CPU): peak MiB = peak RSS of a fresh process per trainer (VmHWM, includes the runtime and "
        "model); train +MiB = peak RSS increase during train() over the RSS before it (sampled every 2 ms)"
    )
    if memory:
        print(memory_kind)
    write_json(opts.json, json_results(opts, device, times, tokens_per_s, memory, memory_kind if memory else None))


def json_results(opts, device: str, times: dict, tokens_per_s: dict, memory: dict, memory_kind: str | None) -> dict:
    """The measured numbers in the schema of `_common.write_json`."""
    rows = []
    for kind in opts.kinds:
        baseline = "dpo_live" if kind.endswith("_live") else "dpo_pre"
        group = "live reference" if kind.endswith("_live") else "precomputed reference"
        name = None if kind == baseline else LABELS[baseline]
        rows.append(
            compared_row(
                LABELS[kind],
                group,
                name,
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
        sequences_per_step=opts.groups * opts.n,
        memory=memory_kind,
    )
    goal = {"time_ratio": 1.10}
    return {
        "benchmark": "bench_vcb",
        "goal": "VCB cost per completion <= 1.10x DPOTrainer's (same sequences per step; time ratio = cost ratio), "
        "live and precomputed reference",
        "goals": {"live reference": goal, "precomputed reference": goal},
        "settings": settings,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
