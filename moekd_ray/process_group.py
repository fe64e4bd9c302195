"""Ending a process group that moekd or its tests started (`mlflow server`, `mlflow models serve`): mlflow starts
uvicorn and helper processes, and a signal to mlflow alone leaves them behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the group `proc` leads (started with start_new_session=True), SIGKILL if any member is left
    after 20 s."""
    for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if not group_alive(proc.pid):
            return
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie leader keeps the group alive
            if not group_alive(proc.pid):
                return
            time.sleep(0.2)
