"""Serving under load: `mlflow models serve` of a registered student answering concurrent clients on 127.0.0.1.
The figures in docs/registry.md "Serving under load" come from this script.

    python docs/serve_bench.py models:/moekd-student/1 --tracking-uri sqlite:///mlruns.db \
        --requests 400 --concurrency 4 --batch 1 --sample 200 --time-limit 300

It starts `mlflow models serve --env-manager local` on 127.0.0.1 and a free port, waits for /ping, sends one
untimed warm-up request, then `--concurrency` client threads send `--requests` POST /invocations of `--batch`
Devign functions each (cycling through a seeded sample of `--sample` functions of `--split`), until all are sent
or `--time-limit` seconds have passed. Every answer is compared with mlflow.pyfunc.load_model(URI)'s prediction for
the same functions, computed in this process: as many rows, the same label (P >= 0.5) and the probability within
`--tolerance`. It prints requests/s and functions/s, p50/p99 latency, failed requests (no 200 answer within
`--request-timeout`) and wrong answers, and the RSS of the server's process tree (the mlflow CLI and the uvicorn
server it starts), idle after loading and the peak sampled every 0.1 s under load. The server is stopped in all
cases.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekd_ray.config import DataConfig
from moekd_ray.data import read_jsonl, resolve_data_dir, split_file, take_subset
from moekd_ray.errors import ConfigError, DataError, TrackingError
from moekd_ray.recipes.predict import load_model
from moekd_ray.process_group import LOOPBACK, end_group, free_port

try:
    import psutil
except ImportError:  # /proc instead (Linux)
    psutil = None

FORMATS = ("inputs", "dataframe_split")  # the MLflow scoring protocols this model's unnamed string column accepts


@dataclass
class Result:
    sent: int = 0  # requests sent (the warm-up not counted)
    not_sent: int = 0  # left unsent when the time limit came
    functions: int = 0  # functions in the answered requests
    failed: int = 0  # no 200 answer: HTTP error, timeout, broken connection
    wrong: int = 0  # a 200 answer that differs from the pyfunc's prediction
    seconds: float = 0.0  # from the first request sent to the last answer
    start_seconds: float = 0.0  # from starting `mlflow models serve` to its first /ping answer
    latencies: list[float] = field(default_factory=list)  # seconds, of every 200 answer
    max_gap: float = 0.0  # the largest |P served - P pyfunc| seen in a readable answer
    rss_idle_mib: float = 0.0
    rss_peak_mib: float = 0.0
    listening: set[str] = field(default_factory=set)  # the addresses the server listened on
    load_average: tuple[float, float] = (0.0, 0.0)  # this machine's 1-minute load average as the load starts, ends
    problems: list[str] = field(default_factory=list)  # what went wrong, first few

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")


# ------------------------------------------------------------------------------------------ inputs and answers

def sample_functions(data_dir: str | None, split: str, n: int, seed: int) -> list[str]:
    """`n` functions of a Devign split, drawn at random with `seed` (data folder as for `moekd run`)."""
    folder = resolve_data_dir(DataConfig(dir=data_dir))
    if folder is None:
        raise DataError("no Devign data folder found; give --data-dir or set MOEKD_DATA_DIR")
    rows = read_jsonl(split_file(folder, split), DataConfig().max_chars)
    return [r["func"] for r in take_subset(rows, n, "random", seed)]


def request_rows(n_functions: int, requests: int, batch: int) -> list[list[int]]:
    """The sample rows of each request: consecutive rows, cycling through the sample."""
    return [[(i * batch + j) % n_functions for j in range(batch)] for i in range(requests)]


def payload(funcs: list[str], fmt: str) -> bytes:
    body = {"inputs": funcs} if fmt == "inputs" else {"dataframe_split": {"data": [[f] for f in funcs]}}
    return json.dumps(body).encode()


def check_answer(body: bytes, expected: np.ndarray, tolerance: float) -> tuple[str | None, float]:
    """Why the server's answer differs from the expected probabilities (None when it matches), and the largest
    probability gap (0 when the answer cannot be compared)."""
    try:
        probs = np.asarray([float(row["probability"]) for row in json.loads(body)["predictions"]])
    except (ValueError, KeyError, TypeError):
        return f"unreadable answer {body[:200]!r}", 0.0
    if len(probs) != len(expected):
        return f"{len(probs)} predictions for {len(expected)} functions", 0.0
    gap = np.abs(probs - expected)
    flipped = np.flatnonzero((probs >= 0.5) != (expected >= 0.5))
    if flipped.size:
        i = flipped[0]
        return f"label differs at row {i}: P={probs[i]:.7f} served, {expected[i]:.7f} from the pyfunc", float(gap.max())
    if gap.max() > tolerance:
        i = int(gap.argmax())
        return (f"probability differs at row {i} by {gap[i]:.2e}: {probs[i]:.9f} served, {expected[i]:.9f} "
                "from the pyfunc"), float(gap[i])
    return None, float(gap.max())


# ------------------------------------------------------------------------------------------ the server

def start_server(model_uri: str, tracking_uri: str, port: int, workers: int, timeout_s: int,
                 log: Path) -> subprocess.Popen:
    """`mlflow models serve` in its own process group (so that stop_server ends the uvicorn it starts too)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn, from this env
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", LOOPBACK, "--port", str(port), "--workers", str(workers), "--timeout", str(timeout_s)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ping(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout_s:.0f} s "
                       f"(--start-timeout):\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    end_group(proc)


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants."""
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    children, todo, total = _proc_children(), [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, ()))
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def listening(pid: int) -> set[str]:
    """The addresses the process tree of `pid` listens on (psutil only; empty without it)."""
    if psutil is None:
        return set()
    found = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class PeakRss(threading.Thread):
    """Samples the RSS of a process tree every `every_s` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self.done = pid, every_s, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.done.wait(self.every_s)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, tree_rss_bytes(self.pid))


# ------------------------------------------------------------------------------------------ the load

def load(port: int, bodies: list[bytes], expected: list[np.ndarray], concurrency: int, time_limit_s: float,
         request_timeout_s: float, tolerance: float, result: Result) -> None:
    """`concurrency` threads send the requests in order, each on its own kept-alive connection, until all are sent
    or the time limit has passed; the outcome of each goes into `result`."""
    lock, next_request = threading.Lock(), iter(range(len(bodies)))
    deadline = time.monotonic() + time_limit_s

    def take() -> int | None:
        with lock:
            if time.monotonic() >= deadline:
                return None
            i = next(next_request, None)
            result.sent += i is not None
            return i

    def record(ok: bool, seconds: float, n: int, problem: str | None, gap: float = 0.0) -> None:
        with lock:
            result.max_gap = max(result.max_gap, gap)
            if ok:
                result.latencies.append(seconds)
                result.functions += n
            if problem is not None:
                result.wrong += ok
                result.failed += not ok
                if len(result.problems) < 5:
                    result.problems.append(problem)

    def client() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=request_timeout_s)
        while (i := take()) is not None:
            start = time.perf_counter()
            try:
                conn.request("POST", "/invocations", bodies[i], {"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                record(False, 0.0, 0, f"request {i}: {type(exc).__name__}: {exc}")
                conn.close()  # a fresh connection for the next request
                continue
            seconds = time.perf_counter() - start
            if response.status != 200:
                record(False, seconds, 0, f"request {i}: HTTP {response.status}: {body[:300]!r}")
            else:
                problem, gap = check_answer(body, expected[i], tolerance)
                record(True, seconds, len(expected[i]), problem and f"request {i}: {problem}", gap)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    result.not_sent = len(bodies) - result.sent


def benchmark(model_uri: str, tracking_uri: str, funcs: list[str], requests: int = 200, concurrency: int = 4,
              batch: int = 1, fmt: str = "inputs", time_limit_s: float = 300, request_timeout_s: float = 120,
              start_timeout_s: float = 300, workers: int = 1, tolerance: float = 1e-6, log: Path | None = None,
              on_ready=None) -> Result:
    """Serve `model_uri`, load it with the requests, stop it. `on_ready(port, pid)` is called once /ping answers
    (tests check what the server listens on)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if min(requests, concurrency, batch) < 1 or not funcs:
        raise ConfigError("--requests, --concurrency, --batch and --sample must each be at least 1")
    # The pyfunc, loaded as docs/registry.md's "Using the student" does; a bad URI or store stops here, before any server starts
    # (and before MLflow could create an empty sqlite store for the server).
    model = load_model(model_uri, tracking_uri)
    rows = request_rows(len(funcs), requests, batch)
    bodies = [payload([funcs[j] for j in r], fmt) for r in rows]
    result, port = Result(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = log or Path(tmp) / "serve.log"
        started = time.perf_counter()
        proc = start_server(model_uri, tracking_uri, port, workers, int(request_timeout_s), log)
        try:
            probs = model.predict(funcs)["probability"].to_numpy(dtype=np.float64)  # while the server loads
            expected = [probs[r] for r in rows]
            wait_ping(port, proc, log, start_timeout_s)
            result.start_seconds = time.perf_counter() - started
            result.listening = listening(proc.pid)
            if on_ready is not None:
                on_ready(port, proc.pid)
            warmup = Result()
            load(port, bodies[:1], expected[:1], 1, request_timeout_s, request_timeout_s, tolerance, warmup)
            if warmup.failed or warmup.wrong:
                raise RuntimeError(f"the warm-up request failed: {warmup.problems[0]}\n{log.read_text()[-3000:]}")
            result.rss_idle_mib = tree_rss_bytes(proc.pid) / 2**20
            before = os.getloadavg()[0]  # (other jobs on the machine weigh on the figures: say how many)
            sampler = PeakRss(proc.pid)
            sampler.start()
            try:
                load(port, bodies, expected, concurrency, time_limit_s, request_timeout_s, tolerance, result)
            finally:
                result.rss_peak_mib = sampler.stop() / 2**20
                result.load_average = (before, os.getloadavg()[0])
        finally:
            stop_server(proc)
    return result


def report(r: Result, args: argparse.Namespace) -> str:
    answered = len(r.latencies)
    lines = [
        f"{args.model}: {args.requests} requests of {args.batch} function(s) from {args.concurrency} clients, "
        f"{args.sample} {args.split} functions cycled, --format {args.format}, {args.workers} uvicorn worker(s)",
        f"listening on: {', '.join(sorted(r.listening)) or 'unknown (no psutil)'}; answered /ping "
        f"{r.start_seconds:.0f} s after starting",
        f"sent {r.sent} (not sent at the {args.time_limit:g} s limit: {r.not_sent}); answered {answered}; "
        f"failed {r.failed}; wrong {r.wrong} (largest |P served - P pyfunc|: {r.max_gap:.1e})",
        f"throughput: {answered / r.seconds:.2f} requests/s, {r.functions / r.seconds:.2f} functions/s "
        f"over {r.seconds:.1f} s",
        f"latency: p50 {r.percentile_ms(50):.0f} ms, p99 {r.percentile_ms(99):.0f} ms, "
        f"max {max(r.latencies, default=float('nan')) * 1e3:.0f} ms",
        f"server RSS (process tree): {r.rss_idle_mib:.0f} MiB idle after loading, {r.rss_peak_mib:.0f} MiB peak "
        "under load",
        f"machine: {os.cpu_count()} CPUs; 1-minute load average {r.load_average[0]:.1f} as the load started, "
        f"{r.load_average[1]:.1f} as it ended",
    ]
    lines += [f"problem: {p}" for p in r.problems]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/<name>/<version>, models:/<name>@<alias> or runs:/<id>/student")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns.db", help="default: %(default)s")
    parser.add_argument("--requests", type=int, default=200, help="requests in all (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="functions per request (default: %(default)s)")
    parser.add_argument("--format", default="inputs", choices=FORMATS, help="request body (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=200, help="distinct functions (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="of the sample (default: %(default)s)")
    parser.add_argument("--data-dir", help="Devign folder (default: as moekd run finds it)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds of load at most (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds (default: %(default)s)")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds for /ping (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="on probabilities (default: %(default)s)")
    args = parser.parse_args()
    try:
        funcs = sample_functions(args.data_dir, args.split, args.sample, args.seed)
        result = benchmark(args.model, args.tracking_uri, funcs, args.requests, args.concurrency, args.batch,
                           args.format, args.time_limit, args.request_timeout, args.start_timeout, args.workers,
                           args.tolerance)
    except (ConfigError, DataError, TrackingError, RuntimeError) as exc:
        sys.exit(f"serve_bench: error: {exc}")
    print(report(result, args))
    sys.exit(1 if result.failed or result.wrong or not result.latencies else 0)


if __name__ == "__main__":
    main()
