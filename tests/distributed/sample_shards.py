"""`trl-rw sample` / `generate` / `score` on 2 CPU processes, several runs in one launch (one launcher start-up).

Launched by tests/test_sampling_shards.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... sample_shards.py MODEL REWARD_MODEL PROMPTS
OUT`. Each run is `trl_rewardweighted.cli.main` as `python -m trl_rewardweighted.cli` would run it:

1. `sample` with two judges, 5 prompts in chunks of 2 (3 chunks: 2 for process 0, 1 for process 1) -> OUT/a.jsonl;
2. the same command again -> OUT/b.jsonl (must be identical);
3. `generate` on one prompt (process 1 gets no chunk and loads no model) -> OUT/one.jsonl;
4. `score` with a scorer that fails on process 1 only: both processes must stop with an error (no hang).

Each process writes its exit codes and error lines to OUT/rank<r>.json.
"""

import contextlib
import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fail_on_rank_1(prompts, completions):
    """A `module:function` scorer that fails on process 1 only."""
    if os.environ.get("RANK") == "1":
        raise ValueError("scorer exploded on process 1")
    return [float(len(c)) for c in completions]


def sample_args(model, reward_model, prompts, output):
    return [
        "sample", "--model", model, "--prompts", prompts, "--n", "2", "--max-new-tokens", "4", "--seed", "3",
        "--batch-size", "2", "--chunk-size", "2", "--scorer", "len=tests.test_sampling:length_reward",
        "--scorer", f"rm={reward_model}", "--output-groups", output, "--no-progress",
    ]  # fmt: skip


def _run(argv) -> tuple[int, str]:
    import time

    from trl_rewardweighted import cli

    start = time.perf_counter()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    print(f"{argv[0]} took {time.perf_counter() - start:.1f} s (exit {code})", file=sys.stderr)
    return code, err.getvalue()


def main(model, reward_model, prompts, out):
    import torch

    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    results = {}
    for name in ("a", "b"):
        results[name] = _run(sample_args(model, reward_model, prompts, f"{out}/{name}.jsonl"))
    one = f"{out}/one.txt"
    if rank == "0":
        with open(one, "w") as f:
            f.write("Only one prompt here\n")
    from trl_rewardweighted.shards import process_layout

    process_layout().barrier()  # the prompt file exists before either process reads it
    results["one"] = _run(
        ["generate", "--model", model, "--prompts", one, "--n", "2", "--max-new-tokens", "3", "--no-progress",
         "--output", f"{out}/one.jsonl"]
    )  # fmt: skip
    results["fail"] = _run(
        ["score", "--input", f"{out}/a.jsonl", "--scorer", "tests.distributed.sample_shards:fail_on_rank_1",
         "--chunk-size", "2", "--output", f"{out}/fail.jsonl"]
    )  # fmt: skip
    report = {
        name: {"code": code, "errors": [line for line in err.splitlines() if line.startswith("trl-rw")]}
        for name, (code, err) in results.items()
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:5])
