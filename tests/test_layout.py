"""The package's layering, checked from the import statements (no import is executed).

cli -> compare / iterate -> scripts / quickstart / evaluation -> methods -> trainers -> (losses, model_utils, data);
sampling and ira sit beside the trainers and use model_utils and data. Nothing imports upward, `data/` is model-free and `losses` imports only torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trl_rewardweighted import _LAZY

PACKAGE = Path(__file__).resolve().parents[1] / "trl_rewardweighted"

# Rank of each top-level part of the package; a module may import only parts of a strictly lower rank (or its own).
RANKS = {
    "data": 0,
    "losses": 0,
    "testing": 0,
    "offline": 0,
    "rewards": 1,
    "metrics": 0,
    "launch": 0,  # builds `accelerate launch` command lines; imports nothing of the package
    "packaged": 0,  # the packaged recipes by name (list, copy, resolve); imports nothing of the package
    "model_utils": 1,
    "trainers": 2,
    "sampling": 2,
    "shards": 2,
    "ira": 2,
    "pipeline": 2.7,  # the sampling pipeline of trl-rw generate / score / sample / convert: above sampling and shards
    "methods": 2.5,  # the table of methods and the trainer builder: above the trainers, below everything that trains
    "evaluation": 3,
    "quickstart": 3,
    "scripts": 3,
    "compare": 4,
    "iterate": 4,
    "cli": 5,
}


def _part(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    """Top-level parts of `trl_rewardweighted` imported by the module at ``path`` (absolute or relative imports)."""
    tree = ast.parse(path.read_text())
    rel_parts = path.relative_to(PACKAGE).parts
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:
                base = list(rel_parts[:-1])[: len(rel_parts) - node.level]  # package of the module, minus levels-1
                names = [".".join(["trl_rewardweighted", *base, node.module or ""]).rstrip(".")]
                if not node.module:
                    names = [".".join(["trl_rewardweighted", *base, alias.name]) for alias in node.names]
                    if not base:  # `from . import Name` at the top: the public API, resolved through its table
                        names = [_LAZY.get(alias.name, f"trl_rewardweighted.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "trl_rewardweighted" and len(bits) > 1:
                parts.add(bits[1])
    return parts


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    own = _part(path)
    assert own in RANKS, f"{own} has no rank in tests/test_layout.py: place it in the layering"
    upward = {p for p in _imported_parts(path) if p != own and RANKS.get(p, 99) >= RANKS[own]}
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports {sorted(upward)}, which are not below it"


def test_data_layer_is_model_free():
    for path in (PACKAGE / "data").rglob("*.py"):
        text = path.read_text()
        for banned in ("import torch", "from torch", "AutoModel", "from_pretrained("):
            assert banned not in text, f"{path.relative_to(PACKAGE)} uses {banned!r}: data/ must stay model-free"


def test_losses_imports_only_torch():
    tree = ast.parse((PACKAGE / "losses.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "math", "typing", "collections"}, imported


def test_one_file_pair_per_method():
    trainers = PACKAGE / "trainers"
    for method in ("var", "vcb", "ra_dpo", "online_var"):
        assert (trainers / f"{method}_config.py").is_file()
        assert (trainers / f"{method}_trainer.py").is_file()
        config_src = (trainers / f"{method}_config.py").read_text()
        assert "Trainer(" not in config_src.replace("[`", ""), f"{method}_config.py should hold the config only"


def test_no_citation_outside_the_repository():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "docs").rglob("*.md"), root / "README.md", root / "Makefile"]
    files += [p for p in (root / "tests").rglob("*.py") if p.name != "test_layout.py"]
    files += [*(PACKAGE / "recipes").rglob("*"), *(PACKAGE / "accelerate_configs").rglob("*")]
    files += [*(root / "benchmarks").rglob("*")]
    files = [p for p in files if p.is_file()]
    for path in files:
        text = path.read_text()
        for banned in ("ALGORITHMS.md", "TRL_NOTES", "OFFLINE.md", "../shared"):
            assert banned not in text, f"{path.relative_to(root)} cites {banned}: cite files of this repository"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_import_from_another_module(path):
    """A module uses another module's public names only: a helper two modules need is made public where it lives."""
    tree = ast.parse(path.read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("trl_rewardweighted")
        ):
            private += [
                f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
            ]
    assert not private, (
        f"{path.relative_to(PACKAGE)} imports private names {private}: make them public where they live"
    )


def test_version_is_the_installed_metadata():
    """The version is kept once (pyproject.toml); the package reads it from its installed metadata."""
    from importlib.metadata import version

    import tomllib

    import trl_rewardweighted

    declared = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["version"]
    assert trl_rewardweighted.__version__ == version("trl-rewardweighted") == declared
    assert f'"{declared}"' not in (PACKAGE / "__init__.py").read_text()  # not kept by hand a second time


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_json_files_are_written_through_write_json(path):
    """Every JSON file goes through `data.utils.write_json` (standard JSON: `null`, never the bare token `NaN`)."""
    text = path.read_text()
    assert "json.dump(" not in text and "write_text(json.dumps" not in text, (
        f"{path.relative_to(PACKAGE)} writes JSON itself: use trl_rewardweighted.data.utils.write_json"
    )
