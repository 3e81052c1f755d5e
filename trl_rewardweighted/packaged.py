"""The recipes that ship inside the package, by name: `trl-rw recipes list / copy / path`, and `--config NAME` for
`trl-rw train` and `trl-rw check-recipe`.

A packaged recipe is a YAML file under `trl_rewardweighted/recipes/`, named by its path there without `.yaml`:
`quickstart/var`, `var/qwen2.5-1.5b/config_full`; a folder of them is named the same way (`var/qwen2.5-1.5b`, `var`).
A relative path in a packaged recipe that names a file shipped next to it (the quickstart's `dataset_name:
quickstart/data/rows.jsonl`) is relative to the recipes folder: run by name, it is given as an absolute path
([`packaged_overrides`]); `trl-rw recipes copy NAME DIR` writes the recipe and those files under `DIR` at the same
relative paths, so that the copy runs from `DIR`.

This module reads files only (no model, no TRL); it imports nothing else of the package.
"""

from __future__ import annotations

import difflib
import os
import shutil
from importlib import resources
from pathlib import Path, PurePosixPath

__all__ = [
    "RECIPE_SUFFIX",
    "copy_recipe",
    "find_recipe",
    "is_packaged",
    "packaged_overrides",
    "recipe_files",
    "recipe_model",
    "recipe_names",
    "recipe_references",
    "recipes_root",
    "resolve_recipe",
]

RECIPE_SUFFIX = ".yaml"


def recipes_root() -> Path:
    """The folder of the packaged recipes (`trl_rewardweighted/recipes/` where the package is installed)."""
    return Path(str(resources.files("trl_rewardweighted") / "recipes"))


def _name(path: Path, root: Path) -> str:
    return PurePosixPath(path.relative_to(root).as_posix()).with_suffix("").as_posix()


def recipe_names() -> list[str]:
    """Every packaged recipe's name, sorted: `quickstart/var`, `var/qwen2.5-1.5b/config_full`, ..."""
    root = recipes_root()
    return sorted(_name(p, root) for p in root.rglob(f"*{RECIPE_SUFFIX}"))


def find_recipe(name: str) -> Path | None:
    """The packaged recipe file (`NAME.yaml`) or folder named `name` (a trailing `.yaml` or `/` is allowed), `None`
    when there is none (or the name leaves the recipes folder)."""
    text = str(name).strip().rstrip("/")
    if not text or os.path.isabs(text) or ".." in PurePosixPath(text).parts:
        return None
    root = recipes_root()
    stem = text.removesuffix(RECIPE_SUFFIX)
    if (root / f"{stem}{RECIPE_SUFFIX}").is_file():
        return root / f"{stem}{RECIPE_SUFFIX}"
    if text == stem and (root / stem).is_dir() and any((root / stem).rglob(f"*{RECIPE_SUFFIX}")):
        return root / stem
    return None


def recipe_files(path: Path) -> list[Path]:
    """The recipes in a packaged folder (every `*.yaml` below it, sorted), or `[path]` for a file."""
    return sorted(path.rglob(f"*{RECIPE_SUFFIX}")) if path.is_dir() else [path]


def is_packaged(path: str | os.PathLike) -> bool:
    """Whether `path` lies in the packaged recipes folder."""
    try:
        Path(path).resolve().relative_to(recipes_root().resolve())
    except ValueError:
        return False
    return True


def resolve_recipe(value: str | os.PathLike, option: str = "--config", folders: bool = False) -> list[Path]:
    """The recipe file(s) that `value` names: an existing file (or, with `folders`, a folder) as it is, else a
    packaged recipe or folder by name.

    Args:
        value (`str` or `os.PathLike`):
            A path, or a packaged name such as `"quickstart/var"` or `"var/qwen2.5-1.5b"` (see [`recipe_names`]).
        option (`str`, *optional*, defaults to `"--config"`):
            The flag the value came from, for the messages.
        folders (`bool`, *optional*, defaults to `False`):
            Whether a folder (a local one, or a packaged folder by name) may be given, for its recipes. Without it, a
            packaged folder is refused with the names of the recipes in it.

    Returns:
        `list[Path]`: the file (one), or with `folders` the given folder as it is / the packaged recipes of a folder.

    Raises:
        `FileNotFoundError`: neither a path nor a packaged name (the closest names are suggested), a packaged folder
        without `folders`, or a packaged name that a local `NAME.yaml` shadows (which one was meant is not guessed).
    """
    text = os.fspath(value)
    local = Path(text)
    if local.is_file() or (folders and local.is_dir()):
        return [local]
    found = find_recipe(text)
    if found is not None and Path(f"{text}{RECIPE_SUFFIX}").is_file():
        raise FileNotFoundError(
            f"{option} {text}: both the packaged recipe {text} and the file {text}{RECIPE_SUFFIX} here match; give "
            f"{text}{RECIPE_SUFFIX} for your file, or run from another folder for the packaged one."
        )
    if found is not None and found.is_dir() and not folders:
        inside = ", ".join(_name(p, recipes_root()) for p in recipe_files(found))
        raise FileNotFoundError(f"{option} {text}: a folder of packaged recipes; name one of them: {inside}.")
    if found is not None:
        return recipe_files(found)
    raise _not_found(text, option, "no such file, and not")


def _not_found(text: str, option: str, what: str) -> FileNotFoundError:
    close = difflib.get_close_matches(text.removesuffix(RECIPE_SUFFIX), recipe_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return FileNotFoundError(
        f"{option} {text}: {what} the name of a packaged recipe (`trl-rw recipes list` names them).{hint}"
    )


def _load(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def recipe_references(path: Path) -> dict[str, str]:
    """The files a packaged recipe names by a path relative to the recipes folder: `{key: relative path}` for each
    top-level string value that is such a file (the quickstart's `dataset_name`); empty for a recipe elsewhere."""
    if not is_packaged(path):
        return {}
    root = recipes_root()
    refs = {}
    for key, value in _load(Path(path)).items():
        if isinstance(key, str) and isinstance(value, str) and not os.path.isabs(value):
            if ".." not in PurePosixPath(value).parts and (root / value).is_file():
                refs[key] = value
    return refs


def packaged_overrides(path: Path) -> list[str]:
    """Command-line overrides that give a packaged recipe's own files as absolute paths (`["--dataset_name",
    "/.../recipes/quickstart/data/rows.jsonl"]`), so that it runs by name from any folder; empty for a recipe
    elsewhere."""
    root = recipes_root()
    return [arg for key, rel in recipe_references(path).items() for arg in (f"--{key}", str(root / rel))]


def copy_recipe(name: str, dest: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Copy the packaged recipe or folder `name` under `dest`, at its path in the recipes folder, with the files it
    names (for a folder: every file in it), so that it runs from `dest`.

    Args:
        name (`str`):
            A packaged recipe or folder name (see [`recipe_names`]).
        dest (`str` or `os.PathLike`):
            The folder to copy into (created when missing).
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether existing files may be replaced.

    Returns:
        `list[Path]`: the files written, sorted.

    Raises:
        `FileNotFoundError`: `name` is no packaged recipe or folder. `FileExistsError`: a file to write exists and
        `overwrite` is off (nothing is written); it names the files.
    """
    found = find_recipe(name)
    if found is None:
        raise _not_found(str(name), "recipes copy", "not")
    root = recipes_root()
    if found.is_dir():
        sources = sorted(p for p in found.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    else:
        sources = [found, *(root / rel for rel in recipe_references(found).values())]
    targets = {Path(dest) / p.relative_to(root): p for p in dict.fromkeys(sources)}
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"recipes copy: {', '.join(existing)} already exist(s); pass --overwrite to replace.")
    for target, source in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return sorted(targets)


def recipe_model(path: Path) -> str | None:
    """The model a recipe trains (`model_name_or_path`, or `model` for a `trl-rw iterate` recipe), `None` if unset."""
    data = _load(path)
    model = data.get("model_name_or_path", data.get("model"))
    return None if model is None else str(model)
