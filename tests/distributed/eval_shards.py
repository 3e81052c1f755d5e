"""`trl-rw eval` on 2 CPU processes, two runs in one launch (one launcher start-up).

Launched by tests/test_eval_shards.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... eval_shards.py MODEL PROMPTS OUT`. Each run is
`trl_rewardweighted.cli.main` as `python -m trl_rewardweighted.cli` would run it:

1. `eval` from scratch -> OUT/a/ (3 prompts in chunks of 1: chunks 0 and 2 on process 0, chunk 1 on process 1);
2. the same command in OUT/b/, where the test left the work folder of a one-process run interrupted after 2 chunks:
   the 2 processes resume it.

Each process writes its exit codes and error lines to OUT/rank<r>.json.
"""

import contextlib
import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(model, prompts, out):
    import torch

    from tests.test_eval_shards import eval_args
    from trl_rewardweighted import cli

    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    report = {}
    for name in ("a", "b"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = cli.main(eval_args(model, prompts, f"{out}/{name}"))
            except SystemExit as exit_:
                code = exit_.code
        lines = err.getvalue().splitlines()
        report[name] = {"code": code, "errors": [line for line in lines if line.startswith("trl-rw")]}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
