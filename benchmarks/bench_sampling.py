"""`trl-rw sample` against a plain loop of `model.generate`, and `trl-rw sample` on 1 and 2 CPU processes.

    python benchmarks/bench_sampling.py                             # tiny Qwen2 (random weights), ~1-2 min on 2 cores
    python benchmarks/bench_sampling.py --model smollm2 --prompts 32 --max-new-tokens 48   # SmolLM2-135M-Instruct

Two comparisons, each side by side in one run, on the same model, prompts and sampling settings (`--n` completions
per prompt, temperature 1, top-p 1, no top-k, `--max-new-tokens`, `--batch-size` prompts per `generate` call):

1. In this process, interleaved over `--rounds` rounds after one warm-up: `trl-rw sample` (`cli.main`, chunks of
   `--chunk-size` prompts written to disk, merged, scored by `trl_rewardweighted.rewards`-style length scorer, the
   groups file written) against a plain loop: `from_pretrained`, then for each batch the chat template, left padding,
   `model.generate(num_return_sequences=n)` and decoding. Both load the model inside the timed region. Reported:
   completions/s, generated tokens/s (completion texts re-tokenized, the same count for both) and the ratio
   (sample / loop; 1.0 = no overhead).
2. `python -m trl_rewardweighted.cli sample` as 1 process against `accelerate launch --num_processes 2` (CPU, gloo),
   wall time of the whole command (process start-up and imports included, which is what a user waits for), and the
   speed-up. The two outputs must be byte-identical (checked).

The machine's load matters: the script prints the number of CPU cores and the load average before each part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _common import write_json  # noqa: E402

TOPICS = ["the sea", "a red bicycle", "Mondays", "an old library", "the first snow", "a lost key", "tea", "trains"]
ASKS = ["Write a short poem about {}.", "Describe {} in two sentences.", "What do you like about {}?",
        "Tell a story that starts with {}."]  # fmt: skip


def length_score(prompts, completions):
    """The scorer of the benchmark (negligible cost): the completion's length."""
    return [float(len(c)) for c in completions]


def make_prompts(count: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) + f" ({i})" for i in range(count)]


def model_path(name: str, folder: Path) -> str:
    if name == "smollm2":
        from trl_rewardweighted.offline import smollm2_path

        return smollm2_path()
    from trl_rewardweighted.testing import build_tiny_model

    return str(build_tiny_model(folder / "tiny"))


def plain_loop(path: str, prompts: list[str], args) -> list[list[str]]:
    """What one would write by hand: load, template, left-pad, generate, decode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            generated = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                num_return_sequences=args.n,
                pad_token_id=tokenizer.pad_token_id,
            )
            decoded = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(decoded[i * args.n : (i + 1) * args.n] for i in range(len(batch)))
    return out


def sample_argv(path: str, prompts_file: Path, output: Path, args) -> list[str]:
    return [
        "sample", "--model", path, "--prompts", str(prompts_file), "--n", str(args.n),
        "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--chunk-size", str(args.chunk_size), "--backend", "transformers",
        "--scorer", "bench_sampling:length_score", "--no-progress", "--output-groups", str(output),
    ]  # fmt: skip


def run_sample(path: str, prompts_file: Path, output: Path, args) -> list[list[str]]:
    from trl_rewardweighted import cli
    from trl_rewardweighted.data.convert import load_dataset_any

    output.unlink(missing_ok=True)
    cli.main(sample_argv(path, prompts_file, output, args))
    return list(load_dataset_any(output)["completions"])


def token_count(tokenizer, groups: list[list[str]]) -> int:
    flat = [c for group in groups for c in group]
    return sum(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, load average {load:.2f}"


def part_loop_vs_sample(path, prompts, prompts_file, folder, args):
    from contextlib import redirect_stdout
    from io import StringIO

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    times = {"plain loop": [], "trl-rw sample": []}
    counts = {}
    runners = {
        "plain loop": lambda: plain_loop(path, prompts, args),
        "trl-rw sample": lambda: run_sample(path, prompts_file, folder / "inproc.jsonl", args),
    }
    with redirect_stdout(StringIO()):
        for fn in runners.values():
            fn()  # warm-up (file cache, lazy imports)
    for r in range(args.rounds):
        for name in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            start = time.perf_counter()
            with redirect_stdout(StringIO()):
                groups = runners[name]()
            times[name].append(time.perf_counter() - start)
            counts[name] = (sum(len(g) for g in groups), token_count(tokenizer, groups))
    print(
        f"\n1. trl-rw sample vs a plain model.generate loop, in-process ({machine()}); median of {args.rounds} rounds"
    )
    print(f"{'':16s} {'seconds':>8s} {'completions/s':>14s} {'gen. tokens/s':>14s} {'tokens':>7s}")
    rates = {}
    for name in runners:
        seconds = statistics.median(times[name])
        completions, tokens = counts[name]
        rates[name] = (completions / seconds, tokens / seconds)
        print(f"{name:16s} {seconds:8.2f} {rates[name][0]:14.1f} {rates[name][1]:14.1f} {tokens:7d}")
    ratio = [rates["trl-rw sample"][i] / rates["plain loop"][i] for i in range(2)]
    print(f"{'ratio':16s} {'':8s} {ratio[0]:14.2f} {ratio[1]:14.2f}   (sample / loop; tokens differ: own RNG streams)")
    return [
        {
            "name": name,
            "group": "trl-rw sample vs a plain model.generate loop",
            "baseline": None if name == "plain loop" else "plain loop",
            "median_step_ms": 1000 * statistics.median(times[name]),
            "time_ratio": (
                None
                if name == "plain loop"
                else statistics.median(times[name]) / statistics.median(times["plain loop"])
            ),
            "tokens_per_s": rates[name][1],
            "completions_per_s": rates[name][0],
        }
        for name in runners
    ]


def part_processes(path, prompts_file, folder, args):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{Path(__file__).parent}", ACCELERATE_USE_CPU="1")
    commands = {
        1: [sys.executable, "-m", "trl_rewardweighted.cli"],
        2: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_rewardweighted.cli"],
    }  # fmt: skip
    print(f"\n2. trl-rw sample on 1 and 2 CPU processes, whole command ({machine()})")
    seconds, outputs = {}, {}
    for procs, prefix in commands.items():
        outputs[procs] = folder / f"procs{procs}.jsonl"
        outputs[procs].unlink(missing_ok=True)
        start = time.perf_counter()
        result = subprocess.run(
            prefix + sample_argv(path, prompts_file, outputs[procs], args), env=env, capture_output=True, text=True
        )
        seconds[procs] = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{procs} process(es) failed:\n{result.stderr[-3000:]}")
        print(f"{procs} process{'es' if procs > 1 else ''}: {seconds[procs]:6.1f} s")
    same = outputs[1].read_bytes() == outputs[2].read_bytes()
    print(f"speed-up 1 -> 2 processes: {seconds[1] / seconds[2]:.2f}x; outputs identical: {same}")
    if not same:
        raise SystemExit("The 1- and 2-process outputs differ.")
    return {
        "seconds_1_process": round(seconds[1], 1),
        "seconds_2_processes": round(seconds[2], 1),
        "speedup_1_to_2_processes": round(seconds[1] / seconds[2], 3),
        "outputs_identical": same,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per chunk (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default="1,2", help="which comparisons to run (default: 1,2)")
    parser.add_argument("--json", help="write the results here (the format benchmarks/run_all.py reads)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))  # `bench_sampling:length_score` for the in-process scorer
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = model_path(args.model, folder)
        prompts = make_prompts(args.prompts)
        prompts_file = folder / "prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n")
        print(
            f"model {args.model} ({path}); {args.prompts} prompts x {args.n} completions, max {args.max_new_tokens} "
            f"new tokens, batch {args.batch_size} prompts, chunks of {args.chunk_size}, torch threads 1"
        )
        parts = set(args.parts.split(","))
        results = {
            "benchmark": "bench_sampling",
            "goal": "trl-rw sample at least as fast as a plain model.generate loop (time ratio <= 1.05x); the "
            "speed-up from 1 to 2 CPU processes, with identical outputs",
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": [],
            "goals": {"trl-rw sample vs a plain model.generate loop": {"time_ratio": 1.05}},
        }
        if "1" in parts:
            results["rows"] = part_loop_vs_sample(path, prompts, prompts_file, folder, args)
        if "2" in parts:
            results["processes"] = part_processes(path, prompts_file, folder, args)
        write_json(args.json, results)


if __name__ == "__main__":
    main()
