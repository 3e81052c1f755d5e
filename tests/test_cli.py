"""The `trl-rw` console script, run in-process on the tiny offline models (plus one real subprocess `--help`)."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from trl_rewardweighted import cli
from trl_rewardweighted.data.convert import load_dataset_any

PROMPTS = ["Hello there", "Tell me a short story.", "Why is the sky blue?"]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is skipped
    return path


def _generate_args(model, prompts, output, *extra):
    return ["generate", "--model", model, "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "6"] + [
        "--no-progress",
        "--output",
        str(output),
        *extra,
    ]


def test_generate_score_convert_pipeline(tmp_path, prompts_txt, tiny_model_path, tiny_reward_model_path, capsys):
    groups = tmp_path / "out" / "groups.jsonl"
    assert cli.main(_generate_args(tiny_model_path, prompts_txt, groups)) == 0
    assert f"wrote 3 prompts x 3 completions to {groups}" in capsys.readouterr().out
    rows = _read_jsonl(groups)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(len(r["completions"]) == 3 for r in rows)

    scored = tmp_path / "scored.parquet"
    cli.main(["score", "--input", str(groups), "--scorer", tiny_reward_model_path, "--output", str(scored)])
    out = capsys.readouterr().out
    assert out.startswith(f"score: wrote 3 rows to {scored}; mean reward ") and "over 9 completions" in out
    ds = load_dataset_any(scored)
    assert ds.column_names == ["prompt", "completions", "rewards"]
    assert all(len(r) == 3 and all(math.isfinite(x) for x in r) for r in ds["rewards"])

    rows_path = tmp_path / "rows.jsonl"
    cli.main(["convert", "--input", str(scored), "--to", "rows", "--output", str(rows_path)])
    assert "convert: wrote 9 rows" in capsys.readouterr().out
    flat = _read_jsonl(rows_path)
    assert [(r["prompt"], r["completion"], r["reward"]) for r in flat] == [
        (p, c, pytest.approx(r))
        for p, cs, rs in zip(ds["prompt"], ds["completions"], ds["rewards"])
        for c, r in zip(cs, rs)
    ]

    pairs_path = tmp_path / "pairs_dir"
    cli.main(
        ["convert", "--input", str(scored), "--to", "pairs", "--strategy", "all_pairs", "--output", str(pairs_path)]
    )
    pairs = load_dataset_any(pairs_path)
    assert pairs.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    assert 0 < len(pairs) <= 9
    assert all(r["score_chosen"] > r["score_rejected"] for r in pairs)

    # rows convert back to groups, and to pairs through groups
    back = tmp_path / "groups_again.jsonl"
    cli.main(["convert", "--input", str(rows_path), "--to", "groups", "--output", str(back)])
    assert [r["completions"] for r in _read_jsonl(back)] == list(ds["completions"])


def test_generate_from_jsonl_keeps_conversational_prompts_and_extra_columns(tmp_path, tiny_model_path):
    source = tmp_path / "prompts.jsonl"
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    source.write_text("\n".join(json.dumps({"prompt": c, "id": i}) for i, c in enumerate(chats)) + "\n")
    output = tmp_path / "groups.jsonl"
    cli.main(_generate_args(tiny_model_path, source, output, "--seed", "5", "--temperature", "0.7"))
    rows = _read_jsonl(output)
    assert [r["prompt"] for r in rows] == chats
    assert [r["id"] for r in rows] == [0, 1]


def test_generate_with_goal_score(tmp_path, prompts_txt, tiny_model_path):
    relabel = pytest.importorskip("trl_rewardweighted.data.relabel")
    from transformers import AutoTokenizer

    output = tmp_path / "goal.jsonl"
    cli.main(_generate_args(tiny_model_path, prompts_txt, output, "--goal-score", "10"))
    rows = _read_jsonl(output)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert [r["prompt"] for r in rows] == PROMPTS
    expected = [relabel.build_goal_prompt(p, score=10.0, tokenizer=tokenizer, system_role="auto") for p in PROMPTS]
    assert [r["generation_prompt"] for r in rows] == expected
    assert all(g != p for g, p in zip(expected, PROMPTS))


def test_sample_writes_all_three_shapes(tmp_path, prompts_txt, tiny_model_path, capsys):
    outs = {shape: tmp_path / f"{shape}.jsonl" for shape in ("groups", "rows", "pairs")}
    argv = ["sample", "--model", tiny_model_path, "--prompts", str(prompts_txt), "--n", "2", "--max-new-tokens", "5"]
    argv += ["--scorer", "tests.test_sampling:length_reward", "--strategy", "best_vs_rest", "--ties", "keep"]
    argv += ["--no-progress"] + [a for shape, p in outs.items() for a in (f"--output-{shape}", str(p))]
    cli.main(argv)
    summary = capsys.readouterr().out
    assert summary.startswith("sample: 3 prompts x 2 completions, mean reward ")
    groups = _read_jsonl(outs["groups"])
    assert all(r["rewards"] == [float(len(c)) for c in r["completions"]] for r in groups)
    assert len(_read_jsonl(outs["rows"])) == 6
    assert len(_read_jsonl(outs["pairs"])) == 3  # best vs the one other completion, ties kept


def test_errors_exit_2_with_a_clean_message(tmp_path, tiny_model_path, capsys):
    missing = tmp_path / "nope.txt"
    with pytest.raises(SystemExit) as exc:
        cli.main(_generate_args(tiny_model_path, missing, tmp_path / "o.jsonl"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"trl-rw generate: error: Prompt file not found: {missing}"

    no_prompt = tmp_path / "bad.jsonl"
    no_prompt.write_text('{"text": "hi", "id": 1}\n')
    with pytest.raises(SystemExit) as exc:
        cli.main(_generate_args(tiny_model_path, no_prompt, tmp_path / "o.jsonl"))
    assert exc.value.code == 2
    assert "has no `prompt` column; columns found: ['text', 'id']" in capsys.readouterr().err

    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--input", str(csv), "--to", "rows", "--output", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 2
    assert "Unknown dataset format" in capsys.readouterr().err

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 0}\n')
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--input", str(pairs), "--to", "rows", "--output", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 2 and "Cannot convert pairs to rows" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:  # argparse: unknown choice
        cli.main(["convert", "--input", str(pairs), "--to", "triples", "--output", "x"])
    assert exc.value.code == 2


def test_console_script_help():
    exe = shutil.which("trl-rw")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "trl_rewardweighted.cli", "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("generate", "score", "convert", "sample"):
        assert command in result.stdout
