"""Chunked, resumable, multi-process `trl-rw generate` / `score` / `sample`, and several judges (tiny offline models).

The 2-process test launches tests/distributed/sample_shards.py once (several runs in one launch) and compares its
outputs with a one-process run of the same command.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, stand_in_vllm
from trl_rewardweighted import cli, shards
from trl_rewardweighted.data.convert import load_dataset_any
from trl_rewardweighted.sampling import (
    RewardModelScorer,
    combine_rewards,
    generate_completions,
    name_judges,
    score_completions,
    score_with_judges,
)

PROMPTS = ["Hello there", "Tell me a short story.", "Why is the sky blue?", "Good morning", "Name a colour."]


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _main(argv, capsys=None):
    """Run `trl-rw` in-process; return (exit code, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, (capsys.readouterr().err if capsys is not None else "")


def _sample_args(model, prompts, output, *extra):
    return [
        "sample", "--model", model, "--prompts", prompts, "--n", "2", "--max-new-tokens", "4", "--seed", "3",
        "--batch-size", "2", "--chunk-size", "2", "--scorer", "tests.test_sampling:length_reward", "--no-progress",
        "--output-groups", output, *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one 2-process launch: about 35-50 s on 2 shared CPU cores (imports dominate)
def test_two_processes_match_one_process_and_repeat_exactly(tmp_path, tiny_model_path, tiny_reward_model_path):
    """2 CPU processes (gloo): the merged output is the one-process output, byte for byte (same prompts in the same
    order, n completions each, same columns); the same command twice gives the same file; a process with no chunk is
    fine; an error on one process stops both with a message naming it (no hang)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).parent / "distributed" / "sample_shards.py"
    accelerate_two_processes(script, tiny_model_path, tiny_reward_model_path, prompts, out, timeout=400)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["a"]["code"] == report["b"]["code"] == report["one"]["code"] == 0, report

    # The same command in one process (in-process, no launcher).
    from tests.distributed.sample_shards import sample_args

    single = tmp_path / "single.jsonl"
    assert _main(sample_args(tiny_model_path, tiny_reward_model_path, prompts, single))[0] == 0
    rows = _read_jsonl(out / "a.jsonl")
    assert [r["prompt"] for r in rows] == PROMPTS
    assert list(rows[0]) == ["prompt", "completions", "rewards_len", "rewards_rm", "rewards"]
    assert all(len(r["completions"]) == 2 and len(r["rewards"]) == 2 for r in rows)
    assert (out / "a.jsonl").read_bytes() == (out / "b.jsonl").read_bytes() == single.read_bytes()
    assert not (out / "a.jsonl.parts").exists() and not (out / "b.jsonl.parts").exists()
    assert len(_read_jsonl(out / "one.jsonl")) == 1

    # One process failed: both stopped with exit code 2; the other one names it.
    assert ranks[1]["fail"]["code"] == 2 and "scorer exploded on process 1" in ranks[1]["fail"]["errors"][0]
    assert ranks[0]["fail"]["code"] == 2
    assert (
        "1 of 2 processes failed (process 1: ValueError: scorer exploded on process 1)"
        in ranks[0]["fail"]["errors"][0]
    )
    assert not (out / "fail.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Chunks and resuming (one process)
# ----------------------------------------------------------------------------------------------------------------------


def test_chunk_seeds_make_chunks_independent_of_their_process(tmp_path, prompts_txt, tiny_model_path):
    """Chunk k is sampled with chunk_seed(seed, k): the file equals per-chunk calls, whatever ran them. Chunk 0 gets
    the seed itself, so a one-chunk run samples what `generate_completions(..., seed=seed)` samples."""
    assert shards.chunk_seed(3, 0) == 3 and shards.chunk_seed(3, 1) == 3 + 2**32
    output = tmp_path / "groups.jsonl"
    assert _main(_sample_args(tiny_model_path, prompts_txt, output))[0] == 0
    expected = []
    for k, (start, end) in enumerate(shards.chunk_ranges(len(PROMPTS), 2)):
        chunk = generate_completions(
            tiny_model_path, PROMPTS[start:end], n=2, max_new_tokens=4, batch_size=2,
            seed=shards.chunk_seed(3, k), progress=False,
        )  # fmt: skip
        expected += chunk["completions"]
    assert [r["completions"] for r in _read_jsonl(output)] == expected
    assert len(set(map(tuple, expected))) > 1  # chunks are not copies of each other


class _Interrupt:
    """A `shards._after_chunk` hook that simulates Ctrl-C after `after` chunks."""

    def __init__(self, after):
        self.after, self.seen = after, []

    def __call__(self, stage, index):
        self.seen.append((stage, index))
        if len(self.seen) == self.after:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_uninterrupted_output(
    tmp_path, prompts_txt, tiny_model_path, monkeypatch, capsys
):
    full = tmp_path / "full.jsonl"
    assert _main(_sample_args(tiny_model_path, prompts_txt, full))[0] == 0

    output = tmp_path / "groups.jsonl"
    parts = tmp_path / "groups.jsonl.parts"
    hook = _Interrupt(after=2)
    monkeypatch.setattr(shards, "_after_chunk", hook)
    code, err = _main(_sample_args(tiny_model_path, prompts_txt, output), capsys)
    assert code == 130 and "trl-rw sample: interrupted" in err
    # Ctrl-C lost nothing that was finished: 2 generation chunks on disk, no output, no temporary.
    assert hook.seen == [("generate", 0), ("generate", 1)]
    assert not output.exists()
    assert sorted(p.name for p in (parts / "generate").iterdir()) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["command"] == "sample" and manifest["settings"]["--seed"] == 3
    assert manifest["chunks"] == [[0, 2], [2, 4], [4, 5]]

    # A changed argument is refused, naming it; the finished chunks stay.
    code, err = _main(_sample_args(tiny_model_path, prompts_txt, output, "--temperature", "0.5"), capsys)
    assert code == 2
    assert (
        f"trl-rw sample: error: {parts} holds an unfinished run of another command or input: --temperature was 1.0, now 0.5."
        in err
    )
    assert "--restart" in err
    assert len(list((parts / "generate").iterdir())) == 2

    # The same command continues after the finished chunks and gives the uninterrupted output.
    hook = _Interrupt(after=None)
    monkeypatch.setattr(shards, "_after_chunk", hook)
    code, err = _main(_sample_args(tiny_model_path, prompts_txt, output), capsys)
    assert code == 0 and "resuming" in err and "2 of 6 chunk(s) already done" in err
    assert hook.seen == [
        ("generate", 2),
        ("score-length_reward", 0),
        ("score-length_reward", 1),
        ("score-length_reward", 2),
    ]
    assert output.read_bytes() == full.read_bytes()
    assert not parts.exists()


def test_changed_input_is_refused_and_restart_starts_over(tmp_path, prompts_txt, tiny_model_path, monkeypatch, capsys):
    output = tmp_path / "groups.jsonl"
    monkeypatch.setattr(shards, "_after_chunk", _Interrupt(after=1))
    assert _main(_sample_args(tiny_model_path, prompts_txt, output), capsys)[0] == 130
    monkeypatch.setattr(shards, "_after_chunk", None)
    prompts_txt.write_text("\n".join(PROMPTS[::-1]) + "\n")
    code, err = _main(_sample_args(tiny_model_path, prompts_txt, output), capsys)
    assert code == 2 and f"--prompts {prompts_txt} has changed since the run started" in err
    code, err = _main(_sample_args(tiny_model_path, prompts_txt, output, "--restart"), capsys)
    assert code == 0 and "resuming" not in err
    assert [r["prompt"] for r in _read_jsonl(output)] == PROMPTS[::-1]


def test_a_foreign_work_folder_is_not_touched(tmp_path, prompts_txt, tiny_model_path, capsys):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    argv = _sample_args(tiny_model_path, prompts_txt, tmp_path / "g.jsonl", "--work-dir", work, "--restart")
    code, err = _main(argv, capsys)
    assert code == 2 and "is not a trl-rw work folder" in err
    assert (work / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------------
# Several judges
# ----------------------------------------------------------------------------------------------------------------------


def test_score_with_two_judges_and_combine(tmp_path, tiny_reward_model_path, capsys):
    groups = tmp_path / "groups.jsonl"
    data = {"prompt": ["a", "bb", "c"], "completions": [["x", "yyy"], ["zz", "w", "vvvv"], ["u"]]}
    groups.write_text("".join(json.dumps({k: data[k][i] for k in data}) + "\n" for i in range(3)))
    single = score_completions(Dataset.from_dict(data), tiny_reward_model_path, progress=False)["rewards"]
    length = [[float(len(c)) for c in group] for group in data["completions"]]

    out = tmp_path / "scored.jsonl"
    argv = ["score", "--input", groups, "--scorer", "len=tests.test_sampling:length_reward"]
    argv += ["--scorer", f"rm={tiny_reward_model_path}", "--chunk-size", "2", "--batch-size", "2", "--output", out]
    assert _main(argv, capsys)[0] == 0
    ds = load_dataset_any(out)
    assert ds.column_names == ["prompt", "completions", "rewards_len", "rewards_rm", "rewards"]
    assert ds["rewards_len"] == length
    assert ds["rewards_rm"] == [pytest.approx(r, abs=1e-5) for r in single]
    assert ds["rewards"] == [pytest.approx([(a + b) / 2 for a, b in zip(x, y)]) for x, y in zip(length, single)]

    chosen = tmp_path / "chosen.jsonl"
    assert _main(argv[:-1] + [chosen, "--combine", "len"], capsys)[0] == 0
    assert load_dataset_any(chosen)["rewards"] == length
    code, err = _main(argv[:-1] + [tmp_path / "x.jsonl", "--combine", "median"], capsys)
    assert code == 2 and "--combine must be 'mean' or one of the judges ['len', 'rm'], got 'median'" in err


def test_sample_rows_get_each_judge(tmp_path, prompts_txt, tiny_model_path):
    rows = tmp_path / "rows.jsonl"
    argv = _sample_args(tiny_model_path, prompts_txt, tmp_path / "g.jsonl", "--output-rows", rows)
    argv += ["--scorer", "twice=tests.test_sampling_shards:twice_length"]
    assert _main(argv)[0] == 0
    for row in _read_jsonl(rows):
        assert row["reward_length_reward"] == len(row["completion"]) and row["reward_twice"] == 2 * len(
            row["completion"]
        )
        assert row["reward"] == pytest.approx(1.5 * len(row["completion"]))


def twice_length(prompts, completions):
    return [2.0 * len(c) for c in completions]


def test_score_with_judges_api_and_names():
    ds = Dataset.from_dict({"prompt": ["a"], "completions": [["xy", "z"]]})
    one = score_with_judges(ds, ["tests.test_sampling:length_reward"], progress=False)
    assert one.column_names == ["prompt", "completions", "rewards"]  # one judge: the single-judge layout
    two = score_with_judges(ds, {"a": twice_length, "b": "tests.test_sampling:length_reward"}, progress=False)
    assert two["rewards_a"] == [[4.0, 2.0]] and two["rewards_b"] == [[2.0, 1.0]] and two["rewards"] == [[3.0, 1.5]]
    assert name_judges(["x=m:f", "pkg.mod:fn", "/models/rm-7b/", twice_length]) == [
        ("x", "m:f"), ("fn", "pkg.mod:fn"), ("rm-7b", "/models/rm-7b/"), ("twice_length", twice_length)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="Two scorers are named 'fn'"):
        name_judges(["a.b:fn", "c.d:fn"])
    nan = combine_rewards({"a": [[1.0, math.nan]], "b": [[3.0, 1.0]]})
    assert nan[0][0] == 2.0 and math.isnan(nan[0][1])


# ----------------------------------------------------------------------------------------------------------------------
# Scoring throughput: length-sorted batches, float32 head
# ----------------------------------------------------------------------------------------------------------------------


def test_reward_model_batches_hold_similar_lengths(tiny_reward_model_path, monkeypatch):
    scorer = RewardModelScorer.from_pretrained(tiny_reward_model_path)
    widths = []
    forward = scorer._forward
    monkeypatch.setattr(scorer, "_forward", lambda ids: widths.append(sorted(map(len, ids))) or forward(ids))
    completions = ["a", "a b c d e f g h i j k l", "b", "c d e f g h i j k l m n", "d"]
    scores = score_completions(
        Dataset.from_dict({"prompt": ["p"], "completions": [completions]}), scorer, batch_size=2, progress=False
    )["rewards"][0]
    assert widths[0][0] > widths[-1][-1]  # the two long texts first, together
    assert scores == [pytest.approx(scorer(["p"], [c])[0], abs=1e-5) for c in completions]  # in the dataset's order


def test_half_precision_reward_model_gets_a_float32_head(tiny_reward_model_path):
    full = RewardModelScorer.from_pretrained(tiny_reward_model_path)
    half = RewardModelScorer.from_pretrained(tiny_reward_model_path, model_kwargs={"dtype": torch.bfloat16})
    assert half.model.score.weight.dtype == torch.float32
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    prompts, completions = ["Hello", "Why?"], ["Sure, here you go.", "Because."]
    assert half(prompts, completions) == pytest.approx(full(prompts, completions), abs=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# vLLM: one engine per process, per-prompt seeds by global index (stand-in module)
# ----------------------------------------------------------------------------------------------------------------------


def test_vllm_engine_is_built_once_and_seeds_follow_the_global_prompt_index(
    tmp_path, prompts_txt, tiny_model_path, monkeypatch
):
    from transformers import AutoTokenizer

    engines, params = stand_in_vllm(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_path))
    output = tmp_path / "groups.jsonl"
    argv = ["generate", "--model", tiny_model_path, "--prompts", prompts_txt, "--n", "2", "--seed", "10"]
    argv += ["--backend", "vllm", "--chunk-size", "2", "--vllm-kwargs", '{"max_model_len": 512}', "--no-progress"]
    assert _main(argv + ["--output", output])[0] == 0
    assert engines == [{"model": tiny_model_path, "seed": 10, "max_model_len": 512}]
    assert [p["seed"] for p in params] == [10, 11, 12, 13, 14]
    assert [r["completions"] for r in _read_jsonl(output)] == [[f"s{10 + i}-0", f"s{10 + i}-1"] for i in range(5)]
