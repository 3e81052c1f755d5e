"""JSON reading in `load_dataset_any`: `datasets` parses well-formed JSON lines; the line-by-line reader names the
line of a bad one and reads what Arrow would change."""

import json
import math
import re

import pytest
from datasets import Dataset, List, Value

from trl_rewardweighted.data.convert import load_dataset_any

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def from_json_calls(monkeypatch):
    calls = []
    real = Dataset.from_json

    def spy(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "from_json", spy)
    return calls


def _write(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_well_formed_json_lines_are_parsed_by_datasets(tmp_path, from_json_calls):
    groups = _write(
        tmp_path / "groups.jsonl",
        [
            {"prompt": CHAT, "completions": ["a", "b"], "rewards": [1, None], "id": 0},
            {"prompt": CHAT, "completions": ["c"], "rewards": [0.5], "id": 1},
        ],
    )
    ds = load_dataset_any(groups)
    assert from_json_calls == [str(groups)]
    assert ds.features == {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "completions": List(Value("string")),
        "rewards": List(Value("float64")),  # integers and null read as floats, null as NaN
        "id": Value("int64"),
    }
    assert ds["rewards"][0][0] == 1.0 and math.isnan(ds["rewards"][0][1]) and ds["rewards"][1] == [0.5]
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": None}],
    )
    ds = load_dataset_any(pairs)
    assert len(from_json_calls) == 2
    assert ds.features["score_chosen"] == ds.features["score_rejected"] == Value("float64")
    assert ds[0]["score_chosen"] == 3.0 and math.isnan(ds[0]["score_rejected"])


def test_what_arrow_would_change_is_read_as_written(tmp_path, from_json_calls):
    """Date-like strings stay strings (Arrow would infer timestamps); NaN tokens, arrays and column objects are read
    by the Python reader."""
    dates = _write(tmp_path / "dates.jsonl", [{"prompt": "2024-01-01", "when": "2024-01-01 10:00:00"}])
    ds = load_dataset_any(dates)
    assert from_json_calls == [str(dates)]  # tried first, its timestamps refused
    assert ds.features == {"prompt": Value("string"), "when": Value("string")}
    assert ds.to_list() == [{"prompt": "2024-01-01", "when": "2024-01-01 10:00:00"}]
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"prompt": "p", "completion": "a", "reward": NaN}\n')
    assert math.isnan(load_dataset_any(nan)["reward"][0])
    array = tmp_path / "rows.json"
    array.write_text('[\n {"prompt": "p", "reward": 1},\n {"prompt": "q", "reward": null}\n]\n')
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": ["p", "q"], "reward": [1, None]}, indent=2))
    for path in (array, columns):
        ds = load_dataset_any(path)
        assert ds["prompt"] == ["p", "q"] and ds["reward"][0] == 1.0 and math.isnan(ds["reward"][1])
    assert len(from_json_calls) == 2  # neither an array nor an object of columns goes through datasets


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'{"prompt": "a", "reward": 1}\n\n{"prompt": "caf\xe9"}\n',
            "{path}:3: not UTF-8 text; save the file as UTF-8.",
        ),
        (
            b'{"prompt": "p", "reward": 1}\n{"prompt": "q", "reward": "high"}\n',
            "{path}:2: `reward` 'high' (str) is not a number; give a float.",
        ),
        (
            b'{"prompt": "p", "completion": "a"}\n{"prompt": null, "completion": "b"}\n',
            "{path}:2: `prompt` is null; expected a string or a list of {{'role': ..., 'content': ...}} messages.",
        ),
        (
            b'{"prompt": []}\n',
            "{path}:1: `prompt` is a list; expected a string or a list of {{'role': ..., 'content': ...}} messages.",
        ),
    ],
)
def test_what_datasets_accepts_but_the_checks_refuse_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(path=path))}$"):
        load_dataset_any(path)
