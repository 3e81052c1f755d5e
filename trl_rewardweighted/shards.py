"""Chunked, resumable, multi-process runs: the engine under `trl-rw generate`, `score` and `sample`.

A run splits its input rows into fixed chunks of `chunk_size` rows (chunk `k` holds rows `k * chunk_size` to
`(k + 1) * chunk_size - 1`, whatever the number of processes) and runs one or more *stages* over them, in order
(generation, then each judge). Every finished `(stage, chunk)` is written to its own Parquet file in a work folder,
atomically (a temporary, then `os.replace`), next to a small `manifest.json` that records the command, the settings
that decide the output, fingerprints of the inputs and the chunk ranges:

```
groups.jsonl.parts/
  manifest.json
  generate/chunk-000000.parquet, chunk-000001.parquet, ...
  score-rm_a/chunk-000000.parquet, ...
```

- Several processes (`accelerate launch`): chunk `k` goes to worker `k % num_workers`; each worker writes its own
  chunk files and the main process merges them in chunk order. A worker is one process, or one group of
  `group_size` consecutive processes that share one engine (vLLM tensor parallel): they run the same chunks and the
  first of them writes.
- Resuming: running the same command again skips the chunks whose files exist. A different command, changed
  settings or changed inputs are refused, naming what differs ([`compare_manifests`]).
- Errors: every process reports how its work ended in a status file; each waits for all the others (polling the
  folder, so a slow process does not run into a collective's timeout), and when any failed all of them raise. The
  work folder must therefore be on a filesystem that every process sees (on several nodes: a shared one).

`run_chunks` returns, on the main process, the chunk datasets of every stage in chunk order; the caller merges them,
writes its outputs atomically and then calls [`remove_work_dir`].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.utils import write_json

__all__ = [
    "Stage",
    "Layout",
    "launched_processes",
    "partial_state",
    "local_device",
    "use_local_device",
    "process_layout",
    "chunk_ranges",
    "chunk_seed",
    "chunk_path",
    "read_chunk",
    "content_fingerprint",
    "model_fingerprint",
    "compare_manifests",
    "run_chunks",
    "remove_work_dir",
    "PeerFailed",
]

FORMAT = "trl-rw-chunks/1"
MANIFEST = "manifest.json"
STATUS = "status"
# Transformers generation is seeded per chunk: chunk k gets `seed + k * SEED_STRIDE` (chunk 0 gets `seed` itself, so a
# one-chunk run samples exactly what `generate_completions(..., seed=seed)` samples).
SEED_STRIDE = 2**32

# Test hook: called as `_after_chunk(stage_name, chunk_index)` after each chunk file is written.
_after_chunk: Callable[[str, int], None] | None = None


class PeerFailed(ValueError):
    """Another process of the launch failed; this one stops too (its own work up to here is kept)."""


@dataclass
class Stage:
    """One pass over the chunks.

    Args:
        name (`str`):
            The stage's folder in the work folder (`generate`, `score-<judge>`).
        setup (`Callable[[], Any]`):
            `() -> context` (loads the model); called once per process, and only when the process has chunks of this
            stage left to do, unless `collective_setup`.
        run (`Callable[[Any, int, int, int], datasets.Dataset]`):
            `(context, chunk_index, start, end) -> Dataset`: the stage's output for rows `start..end - 1`.
        teardown (`Callable[[Any], None]`, *optional*):
            `(context) -> None`, releases the model.
        collective_setup (`bool`, *optional*, defaults to `False`):
            Every process must call `setup`, even with nothing to do (a vLLM engine built over the launch's process
            group).
        whole_group (`bool`, *optional*, defaults to `False`):
            Every process of a worker group runs the chunks (they share one engine); otherwise only the group's
            first process does.
    """

    name: str
    setup: Callable[[], Any]
    run: Callable[[Any, int, int, int], Any]
    teardown: Callable[[Any], None] | None = None
    collective_setup: bool = False
    whole_group: bool = False


@dataclass
class Layout:
    """Where this process stands: `process_index` of `num_processes`, in worker group `worker` of `num_workers`.

    Args:
        process_index (`int`):
            This process's rank in the launch.
        num_processes (`int`):
            The number of processes of the launch.
        worker (`int`):
            This process's worker group (`process_index // group_size`).
        num_workers (`int`):
            The number of worker groups (`num_processes // group_size`).
        writer (`bool`):
            Whether this process writes its group's chunk files (the first process of the group does).
        is_main (`bool`):
            Whether this is the main process (it prepares the work folder and merges the chunks).
        state (`accelerate.PartialState`, *optional*):
            The launch's state; `None` for one plain process.
    """

    process_index: int
    num_processes: int
    worker: int
    num_workers: int
    writer: bool
    is_main: bool
    state: Any = None

    def barrier(self) -> None:
        """Wait for every process of the launch (a no-op in one process)."""
        if self.num_processes > 1:
            self.state.wait_for_everyone()


def launched_processes() -> int:
    """The number of processes of this launch.

    Returns:
        `int`: `WORLD_SIZE`, set by `accelerate launch` / `torchrun`; `1` otherwise.
    """
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def partial_state():
    """accelerate's `PartialState` of a launch of several processes.

    Returns:
        `accelerate.PartialState` or `None`: the state (gloo on CPU: `ACCELERATE_USE_CPU=1` or no GPU), or `None` for
        one plain process (no process group is set up then).
    """
    if launched_processes() == 1:
        return None
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def local_device():
    """The device this process loads its model on.

    Returns:
        `torch.device`: its local rank's GPU, the (current) GPU, or the CPU.
    """
    import torch

    state = partial_state()
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_local_device():
    """Make this process's device the current one, so that models loaded without a `device_map` land there.

    Returns:
        `torch.device`: [`local_device`]; with a GPU, it is also made the current CUDA device (its local rank's GPU
        under `accelerate launch`).
    """
    import torch

    device = local_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def process_layout(group_size: int = 1) -> Layout:
    """This process's place in the launch (`accelerate launch` / `torchrun`, or one plain process).

    Args:
        group_size (`int`, *optional*, defaults to `1`):
            Consecutive processes per worker (vLLM tensor parallel over the launch's processes).

    Returns:
        [`Layout`]: this process's rank, worker group, and whether it writes and merges.

    Raises:
        `ValueError`: `group_size` is not `1` in one plain process, or does not divide the number of processes.
    """
    state = partial_state()
    if state is None:
        if group_size != 1:
            raise ValueError(
                f"A tensor-parallel size of {group_size} over the launch's processes needs `accelerate launch` with "
                "a multiple of it as the number of processes; in one process vLLM parallelises by itself."
            )
        return Layout(0, 1, 0, 1, writer=True, is_main=True)
    if group_size < 1 or state.num_processes % group_size:
        raise ValueError(
            f"The number of processes ({state.num_processes}) must be a multiple of the tensor-parallel size "
            f"({group_size})."
        )
    return Layout(
        process_index=state.process_index,
        num_processes=state.num_processes,
        worker=state.process_index // group_size,
        num_workers=state.num_processes // group_size,
        writer=state.process_index % group_size == 0,
        is_main=state.is_main_process,
        state=state,
    )


def chunk_ranges(num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive chunks of `chunk_size` rows (the last one may be shorter).

    Args:
        num_rows (`int`):
            The number of input rows.
        chunk_size (`int`):
            Rows per chunk, `>= 1`.

    Returns:
        `list[tuple[int, int]]`: `[(start, end), ...]`, `end` excluded.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The transformers generation seed of a chunk.

    Args:
        seed (`int`):
            The run's seed.
        chunk_index (`int`):
            The chunk's index.

    Returns:
        `int`: `seed + chunk_index * 2**32` (`seed` for chunk 0).
    """
    return seed + chunk_index * SEED_STRIDE


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints and the manifest
# ----------------------------------------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []


def content_fingerprint(path) -> str:
    """A fingerprint of a data file or folder.

    Args:
        path (`str` or `os.PathLike`):
            A file, or a folder (every file in it whose name does not start with `.`, recursively).

    Returns:
        `str`: the hex SHA-256 of the file's bytes, or of every file of the folder (relative names and bytes).
    """
    path = Path(path)
    digest = hashlib.sha256()
    for file in _files(path) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(spec) -> str:
    """A cheap fingerprint of a model.

    Args:
        spec (`str` or `os.PathLike`):
            A local folder, a Hub id, or a `module:function`.

    Returns:
        `str`: for a local folder, the hex SHA-256 of the names, sizes and modification times of its files (the
        weights are not read); otherwise the string itself.
    """
    path = Path(str(spec))
    if not path.is_dir():
        return str(spec)
    digest = hashlib.sha256()
    for file in _files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_manifests(old: dict, new: dict) -> list[str]:
    """What differs between the manifest of an unfinished run and the one of this command.

    Args:
        old (`dict`):
            The stored manifest of the unfinished run.
        new (`dict`):
            The manifest of this command.

    Returns:
        `list[str]`: one line per difference (format, command, each setting, each changed input, then the number of
        rows and the stages); empty when the run can continue.
    """
    if old.get("format") != new.get("format"):
        return [f"the folder was written by another version ({old.get('format')!r}, this one writes {FORMAT!r})"]
    if old.get("command") != new.get("command"):
        return [f"the command was `{old.get('command')}`, now `{new.get('command')}`"]
    lines = []
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in list(new_settings) + [k for k in old_settings if k not in new_settings]:
        if old_settings.get(key) != new_settings.get(key):
            lines.append(f"{key} was {_show(old_settings.get(key))}, now {_show(new_settings.get(key))}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        before, after = old_inputs.get(key) or {}, new_inputs.get(key) or {}
        if before.get("fingerprint") != after.get("fingerprint"):
            what = after.get("path", before.get("path"))
            lines.append(f"{key} {what} has changed since the run started")
    if not lines and old.get("num_rows") != new.get("num_rows"):
        lines.append(f"the input had {old.get('num_rows')} rows, now {new.get('num_rows')}")
    if not lines and old.get("stages") != new.get("stages"):
        lines.append(f"the stages were {old.get('stages')}, now {new.get('stages')}")
    return lines


def chunk_path(work_dir: Path, stage: str, index: int) -> Path:
    """The file of one chunk of a stage.

    Args:
        work_dir (`Path`):
            The run's work folder.
        stage (`str`):
            The stage's name.
        index (`int`):
            The chunk's index.

    Returns:
        `Path`: `work_dir/<stage>/chunk-<index, 6 digits>.parquet`.
    """
    return work_dir / stage / f"chunk-{index:06d}.parquet"


def _write_chunk(ds, path: Path) -> None:
    """Write one chunk atomically: the file appears complete or not at all."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = ds.with_format("arrow")[:]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_chunk(path: Path):
    """Read one chunk file.

    Args:
        path (`Path`):
            A chunk file (see [`chunk_path`]).

    Returns:
        `datasets.Dataset`: the chunk, with its features (they are stored in the Parquet schema).
    """
    import pyarrow.parquet as pq
    from datasets import Dataset

    return Dataset(pq.read_table(path))


def _prepare(work_dir: Path, manifest: dict, restart: bool, num_chunks: int) -> dict:
    """On the main process: check or create the work folder and its manifest; return what every process needs."""
    manifest_path = work_dir / MANIFEST
    if work_dir.exists() and not work_dir.is_dir():
        return {
            "error": f"{work_dir} (the run's work folder) exists and is not a folder; remove it or give --work-dir."
        }
    if work_dir.is_dir() and restart:
        if not manifest_path.is_file() and any(work_dir.iterdir()):
            return {"error": f"{work_dir} is not a trl-rw work folder (no {MANIFEST}); it is not removed."}
        shutil.rmtree(work_dir)
    resumed = False
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        differences = compare_manifests(old, manifest)
        if differences:
            return {
                "error": f"{work_dir} holds an unfinished run of another command or input: "
                + "; ".join(differences)
                + ". Rerun with the same arguments and inputs to continue it, or pass --restart to discard it."
            }
        resumed = True
    elif work_dir.is_dir() and any(work_dir.iterdir()):
        return {
            "error": f"{work_dir} exists and is not a trl-rw work folder (no {MANIFEST}); give another --work-dir."
        }
    work_dir.mkdir(parents=True, exist_ok=True)
    if not resumed:
        write_json(manifest_path, manifest, indent=2)
    for stale in work_dir.rglob(".*.tmp-*"):  # temporaries of a process that was killed mid-write
        stale.unlink(missing_ok=True)
    shutil.rmtree(work_dir / STATUS, ignore_errors=True)
    (work_dir / STATUS).mkdir()
    done = {
        stage: sorted(k for k in range(num_chunks) if chunk_path(work_dir, stage, k).is_file())
        for stage in manifest["stages"]
    }
    return {"error": None, "launch": uuid.uuid4().hex[:12], "done": done, "resumed": resumed}


def _broadcast(layout: Layout, payload):
    if layout.num_processes == 1:
        return payload
    from accelerate.utils import broadcast_object_list

    box = [payload if layout.is_main else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _wait_for_peers(layout: Layout, status_dir: Path, launch: str, own_error: BaseException | None, poll: float):
    """Write this process's status, wait for every other process's status, raise when any of them failed."""
    status = {"ok": own_error is None, "error": None if own_error is None else _describe(own_error)}
    write_json(status_dir / f"{launch}-{layout.process_index}.json", status, indent=2)
    if own_error is not None:
        raise own_error
    if layout.num_processes == 1:
        return
    paths = [status_dir / f"{launch}-{rank}.json" for rank in range(layout.num_processes)]
    while not all(p.is_file() for p in paths):
        time.sleep(poll)
    failed = []
    for rank, path in enumerate(paths):
        peer = json.loads(path.read_text())
        if not peer["ok"]:
            failed.append(f"process {rank}: {peer['error']}")
    if failed:
        raise PeerFailed(
            f"{len(failed)} of {layout.num_processes} processes failed ({'; '.join(failed)}); finished chunks are "
            "kept: rerun the same command to continue."
        )
    # Every process has seen every status: only now may the main process merge and remove the work folder.
    layout.barrier()


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_chunks(
    work_dir,
    manifest: dict,
    num_rows: int,
    chunk_size: int,
    stages: Sequence[Stage],
    *,
    restart: bool = False,
    group_size: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    poll_seconds: float = 0.5,
) -> dict[str, list] | None:
    """Run `stages` over the chunks of `num_rows` rows, resuming an unfinished run in `work_dir`.

    Args:
        work_dir (`str` or `os.PathLike`):
            The run's folder (created; it must be visible to every process of the launch).
        manifest (`dict`):
            `{"command": ..., "settings": {option: value}, "inputs": {option: {"path", "fingerprint"}}}`; the format,
            the chunk ranges, `num_rows`, `chunk_size` and the stage names are added here. On resume it must match
            the stored one (see [`compare_manifests`]).
        num_rows (`int`):
            The number of input rows.
        chunk_size (`int`):
            Rows per chunk.
        stages (`Sequence[Stage]`):
            The stages, run in order; a stage may read the chunk files of an earlier one (same chunk index: the same
            worker wrote it).
        restart (`bool`, *optional*, defaults to `False`):
            Discard an unfinished run in `work_dir` and start over.
        group_size (`int`, *optional*, defaults to `1`):
            Processes per worker (vLLM tensor parallel over the launch's processes).
        progress (`bool`, *optional*, defaults to `True`):
            A progress bar over this process's chunks (main process only).
        log (`Callable[[str], None]` or `None`, *optional*, defaults to `print`):
            Where the main process reports resuming; `None`: silent.
        poll_seconds (`float`, *optional*, defaults to `0.5`):
            How often (in seconds) a process that is done looks for the others' status.

    Returns:
        `dict[str, list[datasets.Dataset]]` or `None`: on the main process, `{stage name: [chunk Dataset, ...]}` in
        chunk order; `None` on the others.

    Raises:
        `ValueError`: `work_dir` is not a folder, is not a trl-rw work folder, cannot be prepared, or holds an
        unfinished run of another command or input.
        [`PeerFailed`]: another process of the launch failed (a stage's own error is raised as it is).
        `FileNotFoundError`: chunk files are missing after every process finished (a work folder that not every
        node sees).
    """
    from tqdm.auto import tqdm

    work_dir = Path(work_dir)
    layout = process_layout(group_size)
    chunks = chunk_ranges(num_rows, chunk_size)
    manifest = {
        "format": FORMAT,
        **manifest,
        "num_rows": num_rows,
        "chunk_size": chunk_size,
        "stages": [s.name for s in stages],
        "chunks": [list(c) for c in chunks],
    }
    payload = None
    if layout.is_main:
        try:
            payload = _prepare(work_dir, manifest, restart, len(chunks))
        except OSError as err:
            payload = {"error": _describe(err)}
    payload = _broadcast(layout, payload)
    if payload["error"]:
        raise ValueError(payload["error"])
    done = {stage: set(indices) for stage, indices in payload["done"].items()}
    if payload["resumed"] and layout.is_main and log is not None:
        finished = sum(len(v) for v in done.values())
        log(f"resuming {work_dir}: {finished} of {len(chunks) * len(stages)} chunk(s) already done")

    mine = [k for k in range(len(chunks)) if k % layout.num_workers == layout.worker]
    error = None
    try:
        for stage in stages:
            if not (layout.writer or stage.whole_group):
                continue
            todo = [k for k in mine if k not in done[stage.name]]
            if not todo and not stage.collective_setup:
                continue
            context = stage.setup()
            try:
                bar = tqdm(todo, desc=stage.name, unit="chunk", disable=not (progress and layout.is_main))
                for k in bar:
                    start, end = chunks[k]
                    out = stage.run(context, k, start, end)
                    if layout.writer:
                        _write_chunk(out, chunk_path(work_dir, stage.name, k))
                    if _after_chunk is not None:
                        _after_chunk(stage.name, k)
            finally:
                if stage.teardown is not None:
                    stage.teardown(context)
                del context
    except BaseException as err:  # noqa: BLE001 - reported to the other processes, then re-raised
        error = err
    _wait_for_peers(layout, work_dir / STATUS, payload["launch"], error, poll_seconds)
    if not layout.is_main:
        return None
    missing = [
        str(chunk_path(work_dir, s.name, k)) for s in stages for k in range(len(chunks))
        if not chunk_path(work_dir, s.name, k).is_file()
    ]  # fmt: skip
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} chunk file(s) are missing after every process finished, e.g. {missing[0]}. On several "
            "nodes the work folder must be on a filesystem that all of them share (give --work-dir)."
        )
    return {s.name: [read_chunk(chunk_path(work_dir, s.name, k)) for k in range(len(chunks))] for s in stages}


def remove_work_dir(work_dir) -> None:
    """Delete a finished run's work folder (after its outputs are written).

    Args:
        work_dir (`str` or `os.PathLike`):
            The run's work folder. Errors are ignored (a missing folder is fine).
    """
    shutil.rmtree(work_dir, ignore_errors=True)
