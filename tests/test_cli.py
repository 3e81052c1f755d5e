"""The `trl-rw` console script, run in-process on the tiny offline models (plus one real subprocess `--help`)."""

import errno
import json
import math
import shutil
import subprocess
import sys

import pytest
from datasets import Dataset

from trl_rewardweighted import cli, pipeline, shards
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


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, positions as an editor shows them
# ----------------------------------------------------------------------------------------------------------------------


def _fails(argv, capsys, code=2) -> str:
    """Run the CLI, expect exit status ``code``; return the error: the last line of stderr (before it, at most the
    progress bars of `datasets`), with no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.endswith("\n") and "Traceback" not in err, err
    return err.splitlines()[-1]


def _rows_lines(n, start=0):
    return [
        json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "reward": float(i)}) for i in range(start, start + n)
    ]


def _convert_args(source, output, *extra, to="groups"):
    return ["convert", "--input", source, "--to", to, "--output", output, *extra]


def test_malformed_jsonl_deep_in_the_file_names_file_and_line(tmp_path, capsys):
    lines = _rows_lines(2) + [""] + _rows_lines(4997, start=2)  # a blank line counts: the bad line is line 5001
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "\n".join(lines + ['{"prompt": "p", "completion": "c", "reward": 1.0,}'] + _rows_lines(3)) + "\n"
    )
    err = _fails(_convert_args(source, tmp_path / "out.jsonl"), capsys)
    assert err == (
        f"trl-rw convert: error: {source}:5001: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 50)."
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_non_object_and_non_utf8_lines_name_the_line(tmp_path, capsys):
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(_rows_lines(3) + ["[1, 2]"]) + "\n")
    err = _fails(_convert_args(source, tmp_path / "o.jsonl"), capsys)
    assert err == f"trl-rw convert: error: {source}:4: expected a JSON object (one row), got a list."
    source.write_bytes(b'{"prompt": "a", "completion": "x", "reward": 1}\n\n{"prompt": "caf\xe9"}\n')
    err = _fails(_convert_args(source, tmp_path / "o.jsonl"), capsys)
    assert err == f"trl-rw convert: error: {source}:3: not UTF-8 text; save the file as UTF-8."


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_input_file_is_no_rows(tmp_path, capsys, content):
    source = tmp_path / "rows.jsonl"
    source.write_text(content)
    assert _fails(_convert_args(source, tmp_path / "o.jsonl"), capsys) == f"trl-rw convert: error: {source}: no rows"


def test_empty_prompt_files_are_no_rows(tmp_path, tiny_model_path, capsys):
    for name in ("prompts.txt", "prompts.jsonl"):
        prompts = tmp_path / name
        prompts.write_text("\n\n   \n")
        err = _fails(_generate_args(tiny_model_path, prompts, tmp_path / "o.jsonl"), capsys)
        assert err == f"trl-rw generate: error: {prompts}: no rows"


def test_mixed_string_and_chat_prompts_name_the_first_line_that_differs(tmp_path, tiny_model_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"question {i}"}) for i in range(4999)] + [""]
    lines += [json.dumps({"prompt": [{"role": "user", "content": "hi"}]}), json.dumps({"prompt": "last"})]
    prompts.write_text("\n".join(lines) + "\n")
    err = _fails(_generate_args(tiny_model_path, prompts, tmp_path / "o.jsonl"), capsys)
    assert err == (
        f"trl-rw generate: error: {prompts}:5001: `prompt` is a message list, but the prompt at {prompts}:1 is a "
        "string; use one kind for the whole file (all strings, or all message lists)."
    )
    # the same check for a dataset given to `convert`, and a chat prompt first
    rows = tmp_path / "rows.jsonl"
    chat = [{"role": "user", "content": "hi"}]
    rows.write_text(
        json.dumps({"prompt": chat, "completion": "a", "reward": 1})
        + "\n"
        + json.dumps({"prompt": "hi", "completion": "b", "reward": 0})
        + "\n"
    )
    err = _fails(_convert_args(rows, tmp_path / "o.jsonl"), capsys)
    assert err == (
        f"trl-rw convert: error: {rows}:2: `prompt` is a string, but the prompt at {rows}:1 is a message list; use "
        "one kind for the whole file (all strings, or all message lists)."
    )


@pytest.mark.parametrize("to", ["rows", "groups", "pairs"])
@pytest.mark.parametrize("bad", ["0.5", True])
def test_rows_with_string_or_bool_rewards_are_refused_with_the_row(tmp_path, capsys, to, bad):
    jsonl = tmp_path / "rows.jsonl"
    rows = [{"prompt": "p", "completion": "a", "reward": 1.0}, {"prompt": "p", "completion": "b", "reward": bad}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _fails(_convert_args(jsonl, tmp_path / "o.jsonl", to=to), capsys)
    assert (
        err
        == f"trl-rw convert: error: {jsonl}:2: `reward` {bad!r} ({type(bad).__name__}) is not a number; give a float."
    )
    # Parquet stores one type per column: a whole column of strings / booleans
    parquet = tmp_path / "rows.parquet"
    Dataset.from_dict({"prompt": ["p", "p"], "completion": ["a", "b"], "reward": [bad, bad]}).to_parquet(str(parquet))
    err = _fails(_convert_args(parquet, tmp_path / "o.jsonl", to=to), capsys)
    what = "`reward`" if to == "rows" else "reward"
    assert err == f"trl-rw convert: error: Row 0: {what} {bad!r} ({type(bad).__name__}) is not a number; give a float."


def test_unreadable_parquet_is_a_user_error(tmp_path, capsys):
    source = tmp_path / "rows.parquet"
    source.write_bytes(b"not parquet at all")
    err = _fails(_convert_args(source, tmp_path / "o.jsonl"), capsys)
    assert err.startswith(f"trl-rw convert: error: {source}: not a readable Parquet file (") and "magic bytes" in err


def string_scorer(prompts, completions):
    """A `module:function` scorer that returns numbers as text (refused)."""
    return [str(len(c)) for c in completions]


def test_scorer_returning_strings_is_a_user_error(tmp_path, capsys):
    groups = tmp_path / "groups.jsonl"
    groups.write_text(json.dumps({"prompt": "p", "completions": ["ab", "c"]}) + "\n")
    err = _fails(
        [
            "score",
            "--input",
            groups,
            "--scorer",
            "tests.test_cli:string_scorer",
            "--output",
            tmp_path / "o.jsonl",
            "--no-progress",
        ],
        capsys,
    )
    assert err == "trl-rw score: error: Scorer output for completion 0: score '2' (str) is not a number; give a float."
    assert not (tmp_path / "o.jsonl").exists()


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(_rows_lines(2)) + "\n")

    def buggy(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(pipeline, "convert_dataset", buggy)
    with pytest.raises(KeyError, match="a bug, not bad input"):
        cli.main([str(a) for a in _convert_args(source, tmp_path / "o.jsonl")])


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: refused when they exist, replaced atomically with --overwrite
# ----------------------------------------------------------------------------------------------------------------------

OUTPUT_NAMES = ["out.jsonl", "out.json", "out.parquet", "out_dir"]


def _snapshot(path):
    """The bytes of a file, or of every file in a folder."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


@pytest.fixture
def two_inputs(tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(_rows_lines(2)) + "\n")
    second.write_text("\n".join(_rows_lines(3, start=10)) + "\n")
    return first, second


@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_existing_output_is_refused_unless_overwrite(tmp_path, two_inputs, capsys, name):
    first, second = two_inputs
    output = tmp_path / "data" / name
    cli.main(_convert_args(str(first), str(output), to="rows"))
    before = _snapshot(output)
    err = _fails(_convert_args(second, output, to="rows"), capsys)
    assert err == f"trl-rw convert: error: {output} already exists; pass --overwrite to replace it."
    assert _snapshot(output) == before
    cli.main(_convert_args(str(second), str(output), "--overwrite", to="rows"))
    assert load_dataset_any(output)["prompt"] == ["p10", "p11", "p12"]
    assert sorted(p.name for p in output.parent.iterdir()) == [name]  # no temporary left behind


def _partial_writer(fmt, exc):
    """A stand-in for the dataset writer of ``fmt`` that writes part of its output, then raises ``exc``."""

    def write(self, path, *args, **kwargs):
        from pathlib import Path

        path = Path(path)
        if fmt == "disk":
            path.mkdir(parents=True, exist_ok=True)
            (path / "data-00000-of-00001.arrow").write_bytes(b"partial")
        else:
            path.write_bytes(b'{"prompt": "p10", "completion": "c10", "reward": 10.0}\n' if fmt == "json" else b"PAR1")
        raise exc

    return write


@pytest.mark.parametrize("name", OUTPUT_NAMES)
@pytest.mark.parametrize(
    "exc, code, message",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            2,
            "trl-rw convert: error: [Errno 28] No space left on device",
        ),
        (KeyboardInterrupt(), 130, "trl-rw convert: interrupted"),
    ],
)
def test_failed_write_keeps_the_previous_output_and_leaves_no_temporary(
    tmp_path, two_inputs, capsys, monkeypatch, name, exc, code, message
):
    first, second = two_inputs
    output = tmp_path / "data" / name
    cli.main(_convert_args(str(first), str(output), to="rows"))
    before = _snapshot(output)
    fmt = {"out.jsonl": "json", "out.json": "json", "out.parquet": "parquet", "out_dir": "disk"}[name]
    writer = {"json": "to_json", "parquet": "to_parquet", "disk": "save_to_disk"}[fmt]
    monkeypatch.setattr(Dataset, writer, _partial_writer(fmt, exc))
    err = _fails(_convert_args(second, output, "--overwrite", to="rows"), capsys, code=code)
    assert err == message
    assert _snapshot(output) == before
    assert sorted(p.name for p in output.parent.iterdir()) == [name]
    monkeypatch.undo()
    assert load_dataset_any(output)["prompt"] == ["p0", "p1"]


def test_sample_checks_every_output_before_generating(tmp_path, prompts_txt, tiny_model_path, capsys, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation must not start")

    monkeypatch.setattr(shards, "run_chunks", no_generation)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("previous\n")
    argv = [
        "sample",
        "--model",
        tiny_model_path,
        "--prompts",
        prompts_txt,
        "--scorer",
        "tests.test_sampling:length_reward",
    ]
    argv += ["--output-groups", tmp_path / "groups.jsonl", "--output-pairs", pairs]
    err = _fails(argv, capsys)
    assert err == f"trl-rw sample: error: {pairs} already exists; pass --overwrite to replace it."
    argv[-3:] = [tmp_path / "groups.jsonl", "--output-rows", tmp_path / "groups.jsonl"]
    err = _fails(argv, capsys)
    assert err == (
        f"trl-rw sample: error: --output-groups and --output-rows are the same path {tmp_path / 'groups.jsonl'}; give "
        "each output its own path."
    )
    assert pairs.read_text() == "previous\n" and not (tmp_path / "groups.jsonl").exists()


def test_overwrite_refuses_to_replace_a_folder_of_other_files(tmp_path, two_inputs, capsys):
    first, _ = two_inputs
    folder = tmp_path / "mydocs"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    err = _fails(_convert_args(first, folder, "--overwrite", to="rows"), capsys)
    assert err == (
        f"trl-rw convert: error: {folder} is a folder that was not written by save_to_disk; it is not replaced. Give "
        "another output path."
    )
    assert (folder / "notes.txt").read_text() == "keep me"


def test_console_script_help():
    exe = shutil.which("trl-rw")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "trl_rewardweighted.cli", "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("generate", "score", "convert", "sample"):
        assert command in result.stdout


def test_prompt_files_skip_comment_lines_everywhere(tmp_path, tiny_model_path, capsys):
    """One reader (data.convert.read_prompts) for generate / sample / eval / compare / iterate: lines as written,
    blank lines and '#' comment lines skipped."""
    from trl_rewardweighted.data.convert import read_prompts
    from trl_rewardweighted.quickstart import read_prompts as packaged_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nHello there\n   # an indented comment\n\n  Tell me a story.  \n")
    assert read_prompts(prompts)["prompt"] == ["Hello there", "  Tell me a story.  "]
    assert packaged_prompts(prompts) == ["Hello there", "  Tell me a story.  "]
    output = tmp_path / "groups.jsonl"
    assert cli.main(_generate_args(tiny_model_path, prompts, output, "--n", "1")) == 0
    assert [r["prompt"] for r in _read_jsonl(output)] == ["Hello there", "  Tell me a story.  "]
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing but\n# comments\n")
    err = _fails(_generate_args(tiny_model_path, only_comments, tmp_path / "o.jsonl"), capsys)
    assert err == f"trl-rw generate: error: {only_comments}: no rows"


@pytest.mark.parametrize("flag", ["--output", "--work-dir"])
def test_a_path_under_a_file_names_the_flag_and_the_path_given(tmp_path, prompts_txt, tiny_model_path, capsys, flag):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder\n")
    bad = notes / "out.jsonl"
    output = bad if flag == "--output" else tmp_path / "groups.jsonl"
    extra = ["--work-dir", str(bad)] if flag == "--work-dir" else []
    err = _fails(_generate_args(tiny_model_path, prompts_txt, output, *extra), capsys)
    assert err == f"trl-rw generate: error: {flag} {bad}: {notes} is a file, not a folder; give another path."
    assert notes.read_text() == "not a folder\n"
