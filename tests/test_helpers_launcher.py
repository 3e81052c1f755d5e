"""`tests._helpers.run_launcher` leaves no rank behind when a launch times out."""

import os
import threading
import time

import pytest

from tests._helpers import accelerate_two_processes

RANK_SCRIPT = """
import os, sys, time
from pathlib import Path

rank = os.environ["RANK"]
Path(sys.argv[1], rank).write_text(f"{os.getpid()} {os.getpgid(0)}")
while True:
    time.sleep(60)
"""


def _alive(pid):
    """Whether `pid` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.distributed
def test_timeout_kills_every_rank(tmp_path):
    script = tmp_path / "sleep_forever.py"
    script.write_text(RANK_SCRIPT)
    marks = tmp_path / "ranks"
    marks.mkdir()
    recorded = {}

    def ranks():
        recorded.update({path.name: tuple(map(int, path.read_text().split())) for path in marks.iterdir()})
        return [pid for pid, _ in recorded.values()]

    # A rank left alive keeps the launcher's output pipes open, so a helper that misses one waits forever: this
    # watchdog kills the ranks itself (and the test then fails) instead of hanging the suite.
    reaped = []

    def reap():
        for pid in ranks():
            if _alive(pid):
                os.kill(pid, 9)
                reaped.append(pid)

    watchdog = threading.Timer(40, reap)
    watchdog.start()
    try:
        # The launcher starts each rank in its own session: the timeout must reach them too. The budget leaves time
        # for both ranks to start and write their pid before the kill (about 5 s on 2 busy CPU cores).
        with pytest.raises(pytest.fail.Exception, match="did not exit within 15 s"):
            accelerate_two_processes(script, marks, timeout=15)
    finally:
        watchdog.cancel()
    assert reaped == [], "ranks survived the timeout; the test's watchdog killed them"
    ranks()
    assert sorted(recorded) == ["0", "1"], "both ranks should have started before the timeout"
    # Each rank leads its own process group (torch's launcher starts it with start_new_session).
    assert all(pid == pgid for pid, pgid in recorded.values())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid, _ in recorded.values()):
        time.sleep(0.1)
    survivors = [pid for pid, _ in recorded.values() if _alive(pid)]
    for pid in survivors:  # never leave them running, even when the test fails
        os.kill(pid, 9)
    assert survivors == []
