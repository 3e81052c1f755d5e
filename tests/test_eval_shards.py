"""Chunked, resumable, multi-process `trl-rw eval` (tiny offline model, a function reward).

Chunk `k` of the prompts is sampled with `chunk_seed(seed, k)` for every model (sample `j` of a prompt stays paired
across models), so the report does not depend on the number of processes; a killed run resumes from its finished
chunks to the same `eval.json`; a changed setting is refused by name. The 2-process test launches
tests/distributed/eval_shards.py once and compares its reports with a one-process run, byte for byte.
"""

import json
from pathlib import Path

import pytest

from tests._helpers import accelerate_two_processes, stand_in_vllm
from trl_rewardweighted import cli, shards
from trl_rewardweighted.evaluation import REFERENCE, EvalConfig, ModelSpec, evaluate_models
from trl_rewardweighted.sampling import generate_completions

ROWS = [
    {"prompt": "Say hi.", "chosen": "hi there"},
    {"prompt": "Name a colour.", "chosen": "blue"},
    {"prompt": "Count to three.", "chosen": "one two three"},
]
# 4 rows (reference, reference + goal, same, ra) x 3 chunks of one prompt.
STAGES = ["eval-00-reference", "eval-01-reference_goal", "eval-02-same", "eval-03-ra"]


def word_reward(prompts, completions):
    return [len(c.split()) / 10.0 + 0.01 * len(c) for c in completions]


def eval_args(model, prompts, out, *extra):
    argv = ["eval", "--model", f"same={model}", "--goal-model", f"ra={model}", "--reference", model]
    argv += ["--prompts", prompts, "--reference-column", "chosen", "--reward", "tests.test_eval_shards:word_reward"]
    argv += ["--num-samples", "2", "--max-new-tokens", "4", "--chunk-size", "1", "--no-progress", "--output-dir", out]
    return [str(a) for a in [*argv, *extra]]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _main(argv, capsys=None):
    """Run `trl-rw` in-process; return (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, (capsys.readouterr().err if capsys is not None else "")


def _stop_after(monkeypatch, count):
    """Record the finished chunks (`shards._after_chunk`); simulate Ctrl-C after `count` of them (None: never)."""
    seen = []

    def hook(stage, index):
        seen.append((stage, index))
        if len(seen) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_after_chunk", hook)
    return seen


def _interrupted_run(model, prompts, out, monkeypatch, capsys, chunks):
    seen = _stop_after(monkeypatch, chunks)
    code, err = _main(eval_args(model, prompts, out), capsys)
    assert code == 130 and "trl-rw eval: interrupted" in err
    monkeypatch.setattr(shards, "_after_chunk", None)
    return seen


def test_interrupted_eval_resumes_to_the_same_report(tmp_path, prompts_file, tiny_model_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert _main(eval_args(tiny_model_path, prompts_file, full), capsys)[0] == 0
    report = json.loads((full / "eval.json").read_text())
    assert report["config"]["chunk_size"] == 1 and report["config"]["backend"] == "transformers"
    assert list(report["models"]) == [REFERENCE, REFERENCE + " + goal", "same", "ra"]
    assert not (full / ".parts").exists()

    out = tmp_path / "run"
    parts = out / ".parts"
    seen = _interrupted_run(tiny_model_path, prompts_file, out, monkeypatch, capsys, chunks=4)
    # Ctrl-C lost nothing that was finished: 4 chunk files, no report.
    assert seen == [(STAGES[0], 0), (STAGES[0], 1), (STAGES[0], 2), (STAGES[1], 0)]
    assert not (out / "eval.json").exists()
    assert sorted(p.name for p in (parts / STAGES[0]).iterdir()) == [f"chunk-00000{k}.parquet" for k in range(3)]
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["command"] == "eval" and manifest["stages"] == STAGES
    assert manifest["settings"]["--chunk-size"] == 1 and manifest["chunks"] == [[0, 1], [1, 2], [2, 3]]

    # A changed setting or prompt set is refused, naming it; the finished chunks stay.
    unfinished = f"trl-rw eval: error: {parts} holds an unfinished run of another command or input: "
    code, err = _main(eval_args(tiny_model_path, prompts_file, out, "--temperature", "0.5"), capsys)
    assert code == 2 and unfinished + "--temperature was 1.0, now 0.5. Rerun with the same arguments" in err
    code, err = _main(eval_args(tiny_model_path, prompts_file, out, "--limit", "2"), capsys)
    assert code == 2
    assert unfinished + "prompts (2 prompts, with reference responses) has changed since the run started." in err
    assert len(list(parts.glob("*/chunk-*.parquet"))) == 4

    # The same command continues after the finished chunks and writes the uninterrupted report.
    seen = _stop_after(monkeypatch, None)
    code, err = _main(eval_args(tiny_model_path, prompts_file, out), capsys)
    assert code == 0 and "trl-rw eval: resuming" in err and "4 of 12 chunk(s) already done" in err
    assert seen[0] == (STAGES[1], 1) and len(seen) == 8
    assert (out / "eval.json").read_bytes() == (full / "eval.json").read_bytes()
    assert (out / "eval.md").read_text() == (full / "eval.md").read_text()
    assert not parts.exists()

    # --restart discards an unfinished run (nothing resumed) and gives the same report.
    restarted = tmp_path / "restarted"
    _interrupted_run(tiny_model_path, prompts_file, restarted, monkeypatch, capsys, chunks=2)
    code, err = _main(eval_args(tiny_model_path, prompts_file, restarted, "--restart"), capsys)
    assert code == 0 and "resuming" not in err
    assert (restarted / "eval.json").read_bytes() == (full / "eval.json").read_bytes()


def test_chunks_are_seeded_by_index_and_paired_across_models(tiny_model_path):
    """Chunk k of every model is sampled with chunk_seed(seed, k): the same replies as a `generate_completions` call
    on that chunk, and the same for two models with the same weights (paired samples). One chunk samples what one
    call with the seed itself samples (the default chunk size covers small prompt sets)."""
    prompts = [row["prompt"] for row in ROWS]
    models = [ModelSpec("same", tiny_model_path)]

    def completions(chunk_size):
        config = EvalConfig(
            num_samples=2,
            max_new_tokens=4,
            seed=5,
            greedy=False,
            progress=False,
            n_resamples=10,
            chunk_size=chunk_size,
        )
        results = evaluate_models(models, tiny_model_path, prompts, word_reward, config, log=None)
        samples = [results["models"][name]["samples"]["completions"] for name in (REFERENCE, "same")]
        assert samples[0] == samples[1]
        return samples[0]

    def call(chunk, seed):
        kwargs = dict(n=2, max_new_tokens=4, batch_size=8, progress=False)
        return list(generate_completions(tiny_model_path, chunk, seed=seed, **kwargs)["completions"])

    assert completions(2) == call(prompts[:2], 5) + call(prompts[2:], shards.chunk_seed(5, 1))
    assert completions(64) == call(prompts, 5)


def test_vllm_backend_builds_one_engine_per_model_and_seeds_by_prompt(
    tmp_path, prompts_file, tiny_model_path, monkeypatch
):
    """`--backend vllm` (a stand-in module: vLLM needs a CUDA GPU): an engine per row, built from the model path and
    shut down before the next; prompt i is sampled with seed + i whatever its chunk; the rewards and log-probs of
    every row are computed afterwards, with transformers, on the ids vLLM sampled."""
    from transformers import AutoTokenizer

    engines, requests = stand_in_vllm(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_path))
    seen = _stop_after(monkeypatch, None)
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"same={tiny_model_path}", "--reference", tiny_model_path, "--prompts", prompts_file]
    argv += ["--reward", "tests.test_eval_shards:word_reward", "--num-samples", "2", "--seed", "10", "--backend"]
    argv += ["vllm", "--chunk-size", "2", "--vllm-kwargs", '{"max_model_len": 512}', "--no-progress"]
    assert _main([str(a) for a in [*argv, "--output-dir", out]])[0] == 0

    assert engines == [{"model": tiny_model_path, "seed": 10, "max_model_len": 512}] * 2
    sampled = [dict(n=2, temperature=1.0, top_p=1.0, max_tokens=64, seed=10 + i) for i in range(3)]
    greedy = [dict(n=1, temperature=0.0, top_p=1.0, max_tokens=64, seed=10 + i) for i in range(3)]
    one_model = sampled[:2] + greedy[:2] + sampled[2:] + greedy[2:]  # chunk 0 (prompts 0, 1), then chunk 1
    assert requests == one_model * 2
    stages = [f"{kind}-{row}" for kind in ("sample", "measure") for row in ("00-reference", "01-same")]
    assert seen == [(stage, k) for stage in stages for k in (0, 1)]
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["backend"] == "vllm" and report["config"]["vllm_kwargs"] == {"max_model_len": 512}
    for name in (REFERENCE, "same"):
        samples = report["models"][name]["samples"]
        assert samples["completions"] == [[f"s{10 + i}-0", f"s{10 + i}-1"] for i in range(3)]
        assert samples["greedy"] == [f"s{10 + i}-0" for i in range(3)]
        assert samples["rewards"] == [word_reward(None, group) for group in samples["completions"]]
        assert all(lp < 0 for group in samples["logps"] for lp in group)
    assert report["models"]["same"]["summary"]["kl"]["mean"] == 0.0


@pytest.mark.slow  # one 2-process launch: about 40-60 s on 2 shared CPU cores (imports dominate)
def test_two_processes_write_the_one_process_report(tmp_path, prompts_file, tiny_model_path, monkeypatch, capsys):
    """2 CPU processes (gloo): `eval.json` and `eval.md` are the one-process files, byte for byte, from scratch and
    when the 2 processes resume a one-process run that was interrupted after 2 chunks."""
    single = tmp_path / "single"
    assert _main(eval_args(tiny_model_path, prompts_file, single), capsys)[0] == 0
    out = tmp_path / "out"
    _interrupted_run(tiny_model_path, prompts_file, out / "b", monkeypatch, capsys, chunks=2)
    script = Path(__file__).parent / "distributed" / "eval_shards.py"
    accelerate_two_processes(script, tiny_model_path, prompts_file, out, timeout=400)
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["a"]["code"] == report["b"]["code"] == 0, report
    for run in ("a", "b"):
        assert (out / run / "eval.json").read_bytes() == (single / "eval.json").read_bytes(), run
        assert (out / run / "eval.md").read_bytes() == (single / "eval.md").read_bytes(), run
        assert not (out / run / ".parts").exists()
