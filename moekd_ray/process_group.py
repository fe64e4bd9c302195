"""Servers that moekd's tests and benchmark scripts start (`mlflow server`, `mlflow models serve`): a free loopback
port, waiting for the first answer, and ending the whole process group (mlflow starts uvicorn and helper
processes, and a signal to mlflow alone leaves them behind); environment variables set only for a block."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

LOOPBACK = "127.0.0.1"  # servers bind here by default: nothing outside the machine reaches them


@contextlib.contextmanager
def environment(**values: str):
    """os.environ with `values` set inside the block (read by what it starts or loads), restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """The body of the first successful GET of `url`; None if `proc` exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    return None


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
