"""Serving under load (docs/serve_bench.py): `mlflow models serve` of a tiny registered student, bound to 127.0.0.1,
answers concurrent clients, every answer the pyfunc's own; and the answer check catches wrong answers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from servers import LOOPBACK, group_alive, listening_addresses, registered_tiny_student
from synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


bench = load_script("serve_bench")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny student whose probabilities differ from function to function, registered as serve-test v1 in a sqlite
    store; and 12 functions of a synthetic test split read as the benchmark reads Devign's.

    Its output layer is scaled by 100: enough to spread its probabilities (by ~4e-4) far beyond the 1e-6 tolerance,
    not so much that it blows float rounding up past it. (This process keeps torch's default thread count, as the
    server does: scaled by 1e4, one thread here against two there already gave answers 9e-6 apart.)"""
    tmp = tmp_path_factory.mktemp("serving")
    with registered_tiny_student(tmp, "serve-test", head_scale=100) as (uri, tracking_uri, _, _):
        funcs = bench.sample_functions(str(write_dataset(tmp / "data", n_train=8, n_eval=40)), "test", 12, seed=0)
        yield uri, tracking_uri, funcs


def test_served_student_answers_concurrent_clients_exactly(served, tmp_path):
    uri, tracking_uri, funcs = served
    seen = {}

    def on_ready(port: int, pid: int) -> None:
        seen.update(port=port, pid=pid, addresses=listening_addresses(port))

    result = bench.benchmark(uri, tracking_uri, funcs, requests=30, concurrency=4, batch=2, time_limit_s=120,
                             log=tmp_path / "serve.log", on_ready=on_ready)
    assert seen["addresses"] == {LOOPBACK}, seen  # from /proc/net/tcp*
    assert result.listening == {LOOPBACK}  # as the script reports it (psutil)
    assert not group_alive(seen["pid"]), "the server's process group outlived the benchmark"
    assert (result.failed, result.wrong, result.not_sent) == (0, 0, 0), result.problems
    assert (result.sent, len(result.latencies), result.functions) == (30, 30, 60)
    assert 0 < result.rss_idle_mib <= result.rss_peak_mib
    import mlflow

    expected = mlflow.pyfunc.load_model(uri).predict(funcs)["probability"].to_numpy()
    assert np.ptp(expected) > 100 * 1e-6, expected  # answers that differ from function to function: a mix-up shows
    args = argparse.Namespace(model=uri, requests=30, batch=2, concurrency=4, sample=12, split="test",
                              format="inputs", workers=1, time_limit=120)
    assert "failed 0; wrong 0" in bench.report(result, args)


def answer(probs) -> bytes:
    return json.dumps({"predictions": [{"probability": p} for p in probs]}).encode()


@pytest.mark.parametrize(("served_probs", "why"), [
    ([0.2, 0.7], None),
    ([0.2 + 5e-7, 0.7], None),  # within the tolerance
    ([0.2 + 2e-6, 0.7], "probability differs at row 0"),
    ([0.2, 0.49], "label differs at row 1"),
    ([0.2], "1 predictions for 2 functions"),
])
def test_answer_check_catches_wrong_answers(served_probs, why):
    problem, _ = bench.check_answer(answer(served_probs), np.array([0.2, 0.7]), 1e-6)
    assert problem == why or (why is not None and problem.startswith(why)), problem


def test_answer_check_reads_only_predictions():
    problem, _ = bench.check_answer(b'{"error_code": "BAD_REQUEST"}', np.array([0.2]), 1e-6)
    assert problem.startswith("unreadable answer")
