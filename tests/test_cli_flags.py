"""Every option of every `trl-rw` subcommand is used or refused, never silently ignored (issue 16).

The parser is walked (`cli.build_parser()`), so a new option is checked as soon as it exists:

- `generate`, `score`, `sample`, `convert`, `eval` hand plain values to their implementation, which is stubbed here
  (no model is loaded). In each mode, every option is given with a value other than the mode's own: either the command
  refuses it (`... has no effect ...`), or what reaches the implementation changes, or the value itself is refused
  by a message that names it (it was read).
- `compare` and `iterate` hand the whole namespace to their implementation: each option that some methods do not use
  is refused for every other method, and every other option is read by the implementation's source.
- `train` and `check-recipe` pass their arguments on whole.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re

import pytest

import trl_rewardweighted.data.adapters as adapters
import trl_rewardweighted.data.convert as convert
import trl_rewardweighted.evaluation as evaluation
import trl_rewardweighted.sampling as sampling
from trl_rewardweighted import cli, compare, iterate, pipeline

FUNCTION = "tests.test_sampling:length_reward"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(command: str) -> list[argparse.Action]:
    return [a for a in _subparsers()[command]._actions if a.option_strings and a.dest != "help"]


def _other_value(action: argparse.Action, values: dict, tmp_path):
    """A value for `action` other than its default (None: a flag without a value)."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return None
    if flag in values:
        return values[flag]
    if action.choices:  # not the default, nor (when that is None) the first choice, the usual default
        return [c for c in action.choices if c != action.default][-1]
    if action.type is int:
        return str((action.default or 1) + 1)
    if action.type is float:
        return str((action.default or 0.0) + 0.5)
    return str(tmp_path / f"other-{action.dest}")


def _with(argv: list[str], flag: str, value) -> list[str]:
    """`argv` with `flag` given `value` (replacing the value of a flag given once, unless it is repeatable)."""
    argv = list(argv)
    if value is None:
        return argv + [flag]
    if flag in argv and flag not in ("--model", "--scorer", "--goal-model"):
        i = argv.index(flag)
        argv[i + 1] = value
        return argv
    return argv + [flag, value]


class _Recorder:
    """Stubs of the implementation that record what reaches them."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.monkeypatch = monkeypatch

    def stub(self, module, name, result=None, wrap=False):
        real = getattr(module, name)

        def fake(*args, **kwargs):
            self.calls.append((name, _plain(args), _plain(kwargs)))
            return real(*args, **kwargs) if wrap else (result(*args, **kwargs) if callable(result) else result)

        self.monkeypatch.setattr(module, name, fake)


def _plain(value):
    if hasattr(value, "to_dict") and hasattr(value, "column_names"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return repr(value)


@pytest.fixture(autouse=True)
def _hub_ids_pass(monkeypatch):
    """The `org/...` model ids these tests give pass the model check as Hub ids (offline, the check refuses an id
    with no cached copy: tested on its own below)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _walk(command, modes, values, tmp_path, capsys, monkeypatch, setup, skip=()):
    """For each mode (`name -> (argv, patch)`) and each option but `skip` (tested by the caller): refused, or the
    recorded calls change. Returns `{mode: [options refused as having no effect there]}`."""
    problems, refused = [], {}
    for mode, (argv, patch) in modes.items():
        recorder = _Recorder(monkeypatch)
        setup(recorder)
        if patch:
            patch(monkeypatch)
        code, err = _run([command, *argv], capsys)
        assert code == 0, f"{command} [{mode}] base run failed: {err}"
        base = recorder.calls
        refused[mode] = []
        for action in _options(command):
            flag = action.option_strings[0]
            if flag in skip:
                continue
            recorder.calls = []
            value = _other_value(action, values, tmp_path)
            code, err = _run([command, *_with(argv, flag, value)], capsys)
            if code == 2 and f"{flag} " in err and "no effect" in err:
                refused[mode].append(flag)
                continue  # refused in this mode
            if code == 2 and value is not None and value in err:
                continue  # read: this value is refused with a message of its own
            if code != 0:
                problems.append(f"[{mode}] {flag}: failed without saying it has no effect: {err.strip()}")
            elif recorder.calls == base:
                problems.append(f"[{mode}] {flag}: accepted, and nothing it controls changed (ignored)")
    assert not problems, "\n".join(problems)
    return refused


@pytest.fixture
def files(tmp_path):
    groups = [{"prompt": f"p{i}", "completions": ["a", "bb", "ccc"], "rewards": [1.0, 2.0, 2.0]} for i in range(2)]
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0}]
    out = {}
    for name, rows in (("groups", groups), ("groups2", groups[:1]), ("pairs", pairs)):
        out[name] = tmp_path / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["prompts"] = tmp_path / "prompts.jsonl"
    out["prompts"].write_text('{"prompt": "a", "chosen": "x"}\n{"prompt": "b", "chosen": "y"}\n')
    out["prompts2"] = tmp_path / "prompts2.txt"
    out["prompts2"].write_text("c\n")
    return out


VALUES = {
    "--model": "org/other-model",
    "--goal-model": "org/goal-model",
    "--scorer": "extra=org/reward-model",
    "--vllm-kwargs": '{"max_model_len": 8}',
    "--goal-template": "Goal {score}",
    "--combine": "a",
    "--reference-column": "chosen",
    "--limit": "1",
    "--adapter": "hh_rlhf_sft",
    "--adapter-kwargs": '{"conversational": false}',
}


def _vllm(monkeypatch):
    monkeypatch.setattr(sampling, "resolve_backend", lambda backend, model: "vllm")


def test_generate_score_sample_use_or_refuse_every_option(tmp_path, files, capsys, monkeypatch):
    values = {**VALUES, "--prompts": str(files["prompts2"]), "--input": str(files["groups2"])}
    model = ["--model", "org/model", "--prompts", files["prompts"]]
    out = ["--output", tmp_path / "out.jsonl"]
    setup = lambda r: [r.stub(pipeline, n) for n in ("run_generate", "run_score", "run_sample")]  # noqa: E731
    _walk(
        "generate",
        {"transformers": ([*model, *out], None), "vllm": ([*model, *out], _vllm)},
        values,
        tmp_path,
        capsys,
        monkeypatch,
        setup,
    )
    one_judge = ["--scorer", f"a={FUNCTION}"]
    two_judges = [*one_judge, "--scorer", "b=org/reward-model"]
    _walk(
        "score",
        {
            "one function": (["--input", files["groups"], *one_judge, *out], None),
            "two judges": (["--input", files["groups"], *two_judges, *out], None),
        },
        values,
        tmp_path,
        capsys,
        monkeypatch,
        setup,
    )
    refused = _walk(
        "sample",
        {
            "groups, one function, transformers": ([*model, *one_judge, "--output-groups", out[1]], None),
            "pairs, two judges, vllm": (
                [*model, *two_judges, "--score-batch-size", "4", "--output-pairs", out[1]],
                _vllm,
            ),
        },
        {**values, "--output-groups": str(tmp_path / "g.jsonl"), "--output-rows": str(tmp_path / "r.jsonl")},
        tmp_path,
        capsys,
        monkeypatch,
        setup,
    )
    # Every other option changed what reached the pipeline; these were refused as having no effect in that mode.
    assert refused == {
        "groups, one function, transformers": ["--combine", "--max-length", "--strategy", "--ties"],
        "pairs, two judges, vllm": ["--batch-size"],
    }


def test_convert_uses_or_refuses_every_option(tmp_path, files, capsys, monkeypatch):
    def setup(recorder):
        recorder.stub(convert, "load_dataset_any", wrap=True)
        recorder.stub(convert, "save_dataset", result=lambda ds, path, overwrite: str(path))
        recorder.stub(pipeline, "convert_dataset", wrap=True)
        recorder.stub(adapters, "load_source", result=lambda path, split: convert.load_dataset_any(files["groups"]))
        recorder.stub(adapters, "apply_adapter", result=lambda ds, name, kwargs: ds)

    out = ["--output", tmp_path / "out.jsonl"]
    groups = ["--input", files["groups"]]
    modes = {
        "groups to rows": ([*groups, "--to", "rows", *out], None),
        "groups to pairs": ([*groups, "--to", "pairs", *out], None),
        "pairs to pairs": (["--input", files["pairs"], "--to", "pairs", *out], None),
        "adapter": ([*groups, "--adapter", "ultrafeedback_groups", *out], None),
        "adapter to pairs": ([*groups, "--adapter", "ultrafeedback_groups", "--to", "pairs", *out], None),
    }
    values = {**VALUES, "--input": str(files["groups2"]), "--to": "groups"}
    refused = _walk("convert", modes, values, tmp_path, capsys, monkeypatch, setup)
    # Every other option changed what reached the conversion; these were refused as having no effect in that mode.
    pair_options, adapter_options = ["--strategy", "--ties", "--seed"], ["--adapter-kwargs", "--split"]
    assert refused == {
        "groups to rows": adapter_options + pair_options,
        "groups to pairs": adapter_options,
        "pairs to pairs": adapter_options + pair_options,
        "adapter": pair_options,
        "adapter to pairs": [],
    }


def test_eval_uses_or_refuses_every_option(tmp_path, files, capsys, monkeypatch):
    def setup(recorder):
        recorder.stub(evaluation, "evaluate_models", result=[])
        recorder.stub(evaluation, "summary_line", result="")

        def report(results, out):
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.md").write_text("")
            return {}

        recorder.stub(evaluation, "write_report", result=report)
        recorder.stub(evaluation, "pool_results", result={})

        def pooled_report(pooled, out):
            (out / "pooled.md").write_text("")
            return {}

        recorder.stub(evaluation, "write_pooled_report", result=pooled_report)

    base = ["--reference", "org/ref", "--prompts", files["prompts"], "--reward", FUNCTION]
    base += ["--output-dir", tmp_path / "eval"]
    modes = {"models": (["--model", "org/m", *base], None), "goal models": (["--goal-model", "org/g", *base], None)}
    values = {**VALUES, "--prompts": str(files["prompts2"]), "--reference": "org/other-ref", "--reward": "org/rm"}
    _walk("eval", modes, values, tmp_path, capsys, monkeypatch, setup, skip=["--overwrite"])
    # --overwrite decides whether an existing report is replaced
    (tmp_path / "eval" / "eval.json").write_text("{}")
    code, err = _run(["eval", *modes["models"][0]], capsys)
    assert code == 2 and err.strip().endswith("eval.json exists; pass --overwrite to replace it.")
    assert _run(["eval", *modes["models"][0], "--overwrite"], capsys)[0] == 0


METHOD_VALUES = {"--reward-range": "0,2", "--goal-score": "5", "--max-length": "128", "--gamma": "0.1"}
METHOD_VALUES.update({"--beta": "0.3", "--beta-dpo": "0.3", "--beta-var": "0.3"})


def _reads(source: str, dest: str) -> bool:
    return re.search(rf"(opts|args|options)\.{dest}\b|getattr\((opts|args), \"{dest}\"", source) is not None


@pytest.mark.parametrize(
    "command, module, table, methods",
    [
        ("compare", compare, cli._COMPARE_METHOD_OPTIONS, compare.METHODS),
        ("iterate", iterate, cli._ITERATE_METHOD_OPTIONS, iterate.METHODS),
    ],
)
def test_method_options_are_refused_for_the_other_methods(
    tmp_path, capsys, monkeypatch, command, module, table, methods
):
    calls = []
    monkeypatch.setattr(module, f"run_{command}", lambda args: calls.append(args))
    flag = "--methods" if command == "compare" else "--method"
    source = inspect.getsource(module)
    for action in _options(command):
        if action.dest not in table and action.dest != flag[2:]:
            assert _reads(source, action.dest), f"{command} {action.option_strings[0]} is never read"
    for method in methods:
        for dest, users in table.items():
            action = next(a for a in _options(command) if a.dest == dest)
            value = _other_value(action, METHOD_VALUES, tmp_path)
            option = [action.option_strings[0]] + ([] if value is None else [value])
            calls.clear()
            code, err = _run([command, flag, method, *option, "--output-dir", tmp_path], capsys)
            if method in users:
                assert code == 0 and len(calls) == 1, (method, dest, err)
            else:
                message = f"{action.option_strings[0]} has no effect with {flag} {method}."
                assert code == 2 and err.strip().endswith(message), (method, dest, err)


@pytest.mark.parametrize("command", ["train", "check-recipe"])
def test_pass_through_commands_hand_on_every_argument(command):
    handler = inspect.getsource({"train": cli._cmd_train, "check-recipe": cli._cmd_check_recipe}[command])
    for action in _subparsers()[command]._actions:
        if action.dest != "help":
            assert _reads(handler, action.dest), f"{command} {action.dest} is not handed on"


# ----------------------------------------------------------------------------------------------------------------------
# Model paths that do not exist are refused before anything loads, naming the flag and the path
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, flag",
    [
        ("generate", "--model"),
        ("sample", "--model"),
        ("sample", "--scorer"),
        ("score", "--scorer"),
        ("eval", "--model"),
        ("eval", "--goal-model"),
        ("eval", "--reference"),
        ("eval", "--reward"),
        ("compare", "--model"),
        ("compare", "--reward"),
        ("iterate", "--model"),
        ("iterate", "--reward"),
    ],
)
def test_missing_model_path_names_the_flag_before_loading(tmp_path, files, capsys, monkeypatch, command, flag):
    for module, name in ((sampling, "load_scorer"), (sampling, "load_causal_lm"), (evaluation, "evaluate_models")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(compare, "run_compare", lambda args: pytest.fail("compare started"))
    monkeypatch.setattr(iterate, "run_iterate", lambda args: pytest.fail("iterate started"))
    missing = tmp_path / "no-such-model"
    given = {"--model": "org/model", "--goal-model": "org/goal", "--reference": "org/ref"}
    given.update({"--scorer": FUNCTION, "--reward": FUNCTION, flag: missing})
    models = lambda *flags: [x for f in flags for x in (f, given[f])]  # noqa: E731
    prompts, out = ["--prompts", files["prompts"]], tmp_path / "out.jsonl"
    argv = {
        "generate": [*models("--model"), *prompts, "--output", out],
        "sample": [*models("--model", "--scorer"), *prompts, "--output-groups", out],
        "score": ["--input", files["groups"], *models("--scorer"), "--output", out],
        "eval": [*models("--model", "--goal-model", "--reference", "--reward"), *prompts, "--output-dir", tmp_path],
        "compare": [*models("--model", "--reward"), "--output-dir", tmp_path],
        "iterate": ["--method", "var", *models("--model", "--reward"), "--output-dir", tmp_path],
    }[command]
    code, err = _run([command, *argv], capsys)
    assert code == 2
    assert err.strip() == (
        f"trl-rw {command}: error: {flag} {missing}: the local path does not exist (a Hub model id is 'name' or "
        "'org/name')."
    )


def test_hub_ids_and_reward_functions_pass_the_model_check(monkeypatch):
    from huggingface_hub import constants

    from trl_rewardweighted.model_utils import check_model_source

    # Offline with no cached copy, a Hub-like id cannot load: refused with the reason.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert check_model_source("smollm2", "--model", builtin=("smollm2", "tiny")) == "builtin"
    with pytest.raises(FileNotFoundError) as err:
        check_model_source("out/var", "model_name_or_path")
    assert str(err.value) == (
        "model_name_or_path out/var: no such local folder, and the Hub is offline (HF_HUB_OFFLINE=1) with no cached "
        "copy of that model id. Give the path of a local model folder."
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online: a Hub id is left to transformers
    assert check_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", "--model") == "hub"
    assert check_model_source("gpt2", "--model") == "hub"
    assert check_model_source(FUNCTION, "--scorer") == "function"
    assert check_model_source(".", "--model") == "local"
    for value in ("./out/var", "../var", "~/var", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"--model {value}: the local path does not exist")):
            check_model_source(value, "--model")


def test_train_refuses_a_missing_model_path_before_loading(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {tmp_path}/missing\ndataset_name: {tmp_path}/data.jsonl\nuse_cpu: true\nbf16: false\n"
    )
    code, err = _run(["train", "var", "--config", recipe, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2
    assert f"model_name_or_path {tmp_path}/missing: the local path does not exist" in err


# ----------------------------------------------------------------------------------------------------------------------
# convert: the pair options with an adapter, and the success line
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_adapter_without_to_refuses_pair_options(tmp_path, files, capsys):
    argv = [
        "convert",
        "--input",
        files["groups"],
        "--adapter",
        "ultrafeedback_groups",
        "--output",
        tmp_path / "o.jsonl",
    ]
    code, err = _run([*argv, "--ties", "drop", "--seed", "3"], capsys)
    assert code == 2
    assert err.strip() == (
        "trl-rw convert: error: --ties and --seed have no effect without --to pairs (the adapter's own options go in "
        '--adapter-kwargs, e.g. \'{"ties": "drop"}\').'
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_convert_with_an_adapter_names_the_shape_written(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(adapters, "load_source", lambda path, split: convert.load_dataset_any(path))
    monkeypatch.setattr(adapters, "apply_adapter", lambda ds, name, kwargs: ds)  # the groups as they are
    output = tmp_path / "g.jsonl"
    argv = ["convert", "--input", files["groups"], "--adapter", "ultrafeedback_groups", "--output", output]
    assert cli.main([str(a) for a in argv]) == 0
    assert capsys.readouterr().out == f"convert: wrote 2 groups (ultrafeedback_groups) to {output} (from 2 rows)\n"
