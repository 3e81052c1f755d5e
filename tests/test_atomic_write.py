"""`data.utils.replace_atomically`: the one way the package replaces a file or a folder (JSON files, datasets)."""

import json
import os
import re

import pytest
from datasets import Dataset

from trl_rewardweighted.data import convert, utils
from trl_rewardweighted.data.utils import replace_atomically, write_json


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_file_and_folder_replaced_whole(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with replace_atomically(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and not tmp.exists()
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing changes before the block ends
    assert target.read_text() == "new" and _names(tmp_path) == ["out.txt"]

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a").write_text("old")
    with replace_atomically(folder) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert _names(folder) == ["b"] and _names(tmp_path) == ["ds", "out.txt"]


def test_failure_keeps_the_old_output_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with replace_atomically(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"a": 1} and _names(tmp_path) == ["out.json"]

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a").write_text("old")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):  # the new folder cannot be moved in: the old one is put back
        calls.append(src)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        with replace_atomically(folder) as tmp:
            tmp.mkdir()
            (tmp / "b").write_text("new")
    assert _names(folder) == ["a"] and _names(tmp_path) == ["ds", "out.json"]


def test_json_and_dataset_writers_share_it(tmp_path, monkeypatch):
    """`write_json` and `save_dataset` both go through `replace_atomically` (one atomic writer, not three)."""
    used = []

    def recording(path):
        used.append(os.path.basename(path))
        return replace_atomically(path)

    monkeypatch.setattr(utils, "replace_atomically", recording)
    monkeypatch.setattr(convert, "replace_atomically", recording)
    write_json(tmp_path / "report.json", {"x": float("nan")})
    rows = Dataset.from_dict({"prompt": ["p"], "completion": ["a"], "reward": [1.0]})
    convert.save_datasets([(rows, tmp_path / "rows.jsonl"), (rows, tmp_path / "rows_dir")])
    assert used == ["report.json", "rows.jsonl", "rows_dir"]
    assert (tmp_path / "report.json").read_text() == '{\n "x": null\n}\n'
    assert _names(tmp_path) == ["report.json", "rows.jsonl", "rows_dir"]
    # the rename itself is written once, in data.utils
    sources = {module.__name__: open(module.__file__).read() for module in (utils, convert)}
    assert {name: len(re.findall(r"os\.replace\(tmp, ", text)) for name, text in sources.items()} == {
        utils.__name__: 1,
        convert.__name__: 0,
    }
