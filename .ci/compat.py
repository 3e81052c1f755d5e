"""The compatibility matrix (`make test-compat`): the test suite against several TRL and transformers versions, each
in its own virtualenv.

Each cell is a fresh `python -m venv --system-site-packages` folder under `--work-dir` into which the cell's `trl` and
`transformers` are installed (they shadow the ones of the base environment; torch and the other dependencies come from
the base environment, so a cell costs two downloads, not a torch build), then this project with `--no-deps`. The
suite runs in the cell with `python -m pytest` (the default selection unless `--pytest-args` says otherwise). The
result of every cell — versions as imported inside the cell, passed / failed / skipped counts, wall time — is printed
as a Markdown table (paste it into the README's compatibility table) and written to `--json`.

    python .ci/compat.py                                   # the default matrix, the whole default suite
    python .ci/compat.py --cell trl==1.15.0,transformers==5.23.0 --pytest-args "tests/test_losses.py -x"
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The lowest and highest TRL minor the pin admits, crossed with the lowest and highest transformers it admits.
DEFAULT_CELLS = [
    "trl==1.15.0,transformers==5.23.0",
    "trl==1.15.0,transformers==5.25.0",
    "trl==1.16.0,transformers==5.23.0",
    "trl==1.16.0,transformers==5.25.0",
]
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?)")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kwargs)


def run_cell(cell: str, work_dir: Path, pytest_args: list[str]) -> dict:
    """Build the cell's virtualenv, install its versions and the project, run the tests; return the row."""
    name = re.sub(r"[^\w.]+", "_", cell)
    venv = work_dir / name
    python = venv / "bin" / "python"
    row = {"cell": cell, "status": "error"}
    start = time.time()
    if not python.exists():
        made = _run([sys.executable, "-m", "venv", "--system-site-packages", venv])
        if made.returncode:
            return {**row, "error": made.stderr[-2000:]}
    installed = _run([python, "-m", "pip", "install", "-q", *cell.split(",")])
    if installed.returncode:
        return {**row, "error": f"pip install {cell} failed: {installed.stderr[-2000:]}"}
    project = _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT])
    if project.returncode:
        return {**row, "error": f"installing the project failed: {project.stderr[-2000:]}"}
    probe = _run([python, "-c", "import trl, transformers, torch; print(trl.__version__, transformers.__version__, "
                                "torch.__version__)"])  # fmt: skip
    if probe.returncode:
        return {**row, "error": f"import failed: {probe.stderr[-2000:]}"}
    row["trl"], row["transformers"], row["torch"] = probe.stdout.split()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    tests = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, env=env)
    tail = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    counts = {"errors" if kind.startswith("error") else kind: int(n) for n, kind in SUMMARY.findall(tail)}
    row.update(counts, status="pass" if tests.returncode == 0 else "fail", wall_s=round(time.time() - start, 1))
    if tests.returncode:
        failed = [line for line in tests.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        row["failures"] = failed[:50]
    return row


def markdown(rows: list[dict], pytest_args: list[str]) -> str:
    lines = [
        f"Tested with `python .ci/compat.py` ({' '.join(pytest_args) or 'the default suite'}), {time.strftime('%Y-%m-%d')}:",
        "",
        "| TRL | transformers | torch | result | passed | failed | skipped | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "error":
            lines.append(
                f"| {r['cell']} | | | error: {r['error'].splitlines()[-1] if r.get('error') else '?'} | | | | |"
            )
            continue
        lines.append(
            f"| {r['trl']} | {r['transformers']} | {r['torch']} | {r['status']} | {r.get('passed', 0)} | "
            f"{r.get('failed', 0) + r.get('errors', 0)} | {r.get('skipped', 0)} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", action="append", help="'trl==X,transformers==Y' (repeatable; default: the matrix)")
    parser.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl_rw_compat"))
    parser.add_argument("--pytest-args", default="", help="arguments for pytest (default: the default suite)")
    parser.add_argument("--json", default=None, help="write the rows here")
    opts = parser.parse_args(argv)
    from trl_rewardweighted.data.utils import write_json

    work_dir = Path(opts.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    pytest_args = opts.pytest_args.split()
    rows = []
    for cell in opts.cell or DEFAULT_CELLS:
        print(f"[compat] {cell} ...", flush=True)
        rows.append(run_cell(cell, work_dir, pytest_args))
        print(f"[compat] {cell}: {rows[-1]['status']} {rows[-1].get('failures', '')}", flush=True)
        if opts.json:
            write_json(opts.json, rows)
    print(markdown(rows, pytest_args))
    return 0 if all(r["status"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
