"""The console of `moekd`: its own lines and a live status line on the terminal (plain progress lines into a file or
pipe), everything else in the log file;
and, end to end, a real `moekd run` whose console is short and whose MLflow runs a person can read."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from moekd_ray import progress
from moekd_ray.console import Console


def test_console_shows_its_lines_and_progress_and_logs_the_rest(tmp_path):
    screen = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)  # made before the capture, as Ray's are at import
    noisy = logging.getLogger("some.library")
    noisy.addHandler(handler)
    try:
        with Console(stream=screen, redraw_every=0) as console:
            print("Reporting training result 1: TrainingReport(checkpoint=...)")
            noisy.warning("a library warning")
            progress.stage("experts", 3, 7)
            progress.report("expert_0", 30, 100, note="epoch 1/2")
            progress.report("expert_0", 60, 100, note="epoch 2/2")
            status = console.status_line()
            console.say("expert_0: epoch 2 of 2 kept")
            console.attach_log(tmp_path / "moekd.log")  # what came before goes into it too
            print("(RayTrainWorker pid=1) a later line")
    finally:
        noisy.removeHandler(handler)
    shown, logged = screen.getvalue(), (tmp_path / "moekd.log").read_text()
    assert "expert_0: epoch 2 of 2 kept\n" in shown
    assert status.startswith("[3/7] experts | expert_0 epoch 2/2 60% ETA ")
    for noise in ("TrainingReport", "a library warning", "a later line", progress.MARKER):
        assert noise not in shown and noise in logged, noise
    assert "expert_0: epoch 2 of 2 kept" in logged
    assert handler.stream is sys.stderr  # given back


def test_verbose_console_shows_everything(capsys):
    screen = io.StringIO()
    with Console(verbose=True, stream=screen, redraw_every=0):
        print("a Ray worker line")
        progress.report("student", 1, 4)
    assert "a Ray worker line" in capsys.readouterr().out  # where it was written: the real stdout
    assert progress.MARKER not in screen.getvalue()


def test_a_finished_task_leaves_the_status_line():
    with Console(stream=io.StringIO(), redraw_every=0) as console:
        progress.report("router", 5, 10, "epochs")
        assert "router" in console.status_line()
        progress.report("router", 10, 10, "epochs")
        assert "router" not in console.status_line()


def test_outside_a_terminal_progress_is_plain_periodic_lines():
    """Into a file or pipe (`moekd run ... > log`, CI, `ray job submit`): no carriage return or escape sequence, a
    progress line (the time since the start, the stage, each task's share and ETA) every `progress_every` seconds,
    even while no marker arrives, each line at most 120 characters, the tasks wrapped whole across lines."""
    log = io.StringIO()  # not a terminal
    with Console(stream=log, progress_every=0.2) as console:
        progress.stage("experts", 3, 7)
        for fold in range(4):  # four tasks with long names: one status too long for one line
            progress.report(f"expert_{fold % 2}_fold_{fold // 2}", 10, 100, note="epoch 1/3, val auc 0.69")
        time.sleep(0.01)
        for fold in range(4):
            progress.report(f"expert_{fold % 2}_fold_{fold // 2}", 20, 100, note="epoch 1/3, val auc 0.69")
        console.say("expert_0: epoch 2 of 3 kept")
        time.sleep(0.7)  # no marker meanwhile: progress lines still come
    shown = log.getvalue()
    assert "\r" not in shown and "\x1b" not in shown
    lines = shown.splitlines()
    assert "expert_0: epoch 2 of 3 kept" in lines
    assert all(len(line) <= 120 for line in lines), lines
    starts = [i for i, line in enumerate(lines) if line.startswith("progress ")]
    assert len(starts) >= 2, lines  # every 0.2 s over 0.7 s
    first = [lines[starts[0]]]  # one report: its first line, then the lines it wrapped to
    first += [line for line in lines[starts[0] + 1:starts[1]] if line.startswith("  | ")]
    assert len(first) > 1, first
    head, *tasks = (first[0] + "".join(line[1:] for line in first[1:])).split(" | ")
    assert re.fullmatch(r"progress \d+s: \[3/7\] experts", head), first
    assert [t.split()[0] for t in tasks] == ["expert_0_fold_0", "expert_1_fold_0", "expert_0_fold_1", "expert_1_fold_1"]
    assert all(re.fullmatch(r"\S+ epoch 1/3, val auc 0\.69 20% ETA \w+", t) for t in tasks), tasks


def test_on_a_terminal_the_status_line_redraws_in_place():
    """Through a real pseudo-terminal: one status line, redrawn with a carriage return, cleared before moekd's own
    lines; no progress lines."""
    import os
    import select

    main_fd, term_fd = os.openpty()
    term = os.fdopen(term_fd, "w")
    try:
        assert term.isatty()
        with Console(stream=term, redraw_every=0, progress_every=0.05):
            progress.stage("distil", 5, 7)
            progress.report("student", 1, 8, note="epoch 1/8")
            progress.report("student", 2, 8, note="epoch 1/8")
            time.sleep(0.2)
            print("a worker line")  # to the log only: it redraws the line
            progress.report("student", 3, 8, note="epoch 1/8")
        term.flush()
        shown = b""
        while select.select([main_fd], [], [], 0.5)[0]:  # a pty hands its output over in pieces
            shown += os.read(main_fd, 65536)
        shown = shown.decode()
    finally:
        term.close()
        os.close(main_fd)
    status = "[5/7] distil | student epoch 1/8 38% ETA "
    assert status in shown and re.search(r"\r +\r", shown)  # drawn, then blanked and drawn anew
    assert shown.count("[5/7] distil") >= 2 and "progress " not in shown and "a worker line" not in shown


def test_ticker_reports_from_rank_0_only_and_always_the_last_step(capsys):
    progress.Ticker("student", 10, enabled=False)(10)
    assert capsys.readouterr().out == ""
    tick = progress.Ticker("student", 10, every=3600)
    for i in range(1, 11):
        tick(i)
    reports = [progress.parse(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["done"] for r in reports] == [1, 10]  # the first, then nothing for an hour but the last


@pytest.mark.timeout(900)
def test_moekd_run_console_is_short_and_its_mlflow_runs_readable(ray_cluster, tmp_path):
    """A real `moekd run` (tiny) into a pipe: at most 40 console lines besides the progress lines (no carriage
    return, at least one a minute), none over 200 characters outside the table, no traceback or object dump, the
    noise in the run's log file; through MLflow's REST API the parent run carries
    the headline metrics, each expert run spans its training, and no run plots timestamps as metrics."""
    import os
    import subprocess

    import mlflow
    import yaml

    from servers import LOOPBACK, end_group, free_port, start_group, wait_http

    tiny = {"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "max_length": 32}
    store = tmp_path / "mlruns.db"
    tree = {"name": "console", "output_dir": str(tmp_path / "runs"), "data": {"train_rows": 128, "eval_rows": 32},
            "experts": {"k": 2, "model": tiny, "schedule": {"epochs": 2, "batch_size": 16}},
            "router": {"epochs": 5}, "distill": {"student_arch": tiny, "schedule": {"epochs": 1, "batch_size": 16}},
            # no model of this size reaches validation F1 1.0: the run itself flags its student degenerate
            "eval": {"min_val_f1": 1.0},
            "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
            "mlflow": {"tracking_uri": f"sqlite:///{store}", "registered_model": "console-student"}}
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump(tree))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "moekd_ray.cli", "run", str(path)], capture_output=True,
                          timeout=800, env={**os.environ, "PYTHONWARNINGS": "default"})
    seconds = time.monotonic() - started
    shown = (done.stdout + done.stderr).decode()  # bytes: text mode would turn a "\r" into a line break
    assert done.returncode == 0, shown[-4000:]
    assert "\r" not in shown and "\x1b" not in shown, shown  # a pipe: plain progress lines, no redraws
    lines = shown.splitlines()
    progress_lines = [x for x in lines if x.startswith(("progress ", "  | "))]
    final = [x for x in lines if x not in progress_lines]
    # a degenerate model's warning is said after the evaluation and again under the table: here all five are
    assert len([x for x in final if " is degenerate: it " not in x]) <= 40, shown
    assert all(len(x) <= 120 for x in progress_lines), progress_lines
    assert sum(x.startswith("progress ") for x in progress_lines) >= (seconds - 60) // 60, (seconds, shown)
    table = final.index(next(x for x in final if x.startswith("model ")))
    assert all(len(x) <= 200 for x in final[:table]), shown
    for noise in ("Traceback", "TrainingReport", "Warning", "pid=", progress.MARKER):
        assert noise not in shown, noise
    # the table and its verdict come last: the degenerate student is registered, tagged, and not made @champion
    assert final[-1].startswith("student model: models:/console-student/1 (not @champion: degenerate model"), final
    assert "warning: student is degenerate: it " in shown
    tags = mlflow.MlflowClient(f"sqlite:///{store}").get_model_version("console-student", "1").tags
    assert tags["moekd.degenerate"] == "true" and tags["moekd.degenerate_reason"], tags
    # and `moekd registry promote`, as a user types it, refuses it in one line; --force would be recorded
    refused = subprocess.run([sys.executable, "-m", "moekd_ray.cli", "registry", "promote", "--name", "console-student",
                              "--version", "1", f"mlflow.tracking_uri=sqlite:///{store}"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "degenerate" in refused.stderr, refused.stdout + refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert not mlflow.MlflowClient(f"sqlite:///{store}").get_registered_model("console-student").aliases
    log_path = Path(next(x for x in final if x.startswith("full log: ")).removeprefix("full log: "))
    logged = log_path.read_text()
    assert "TrainingReport" in logged and progress.MARKER in logged and "student model:" in logged

    port = free_port()
    server = start_group([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                          "--host", LOOPBACK, "--port", str(port), "--workers", "1"], tmp_path / "server.log")
    try:
        api = f"http://{LOOPBACK}:{port}/api/2.0/mlflow"
        wait_http(f"http://{LOOPBACK}:{port}/health", server, tmp_path / "server.log")

        def post(endpoint: str, body: dict) -> dict:
            request = urllib.request.Request(f"{api}/{endpoint}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        experiment = json.loads(urllib.request.urlopen(
            f"{api}/experiments/get-by-name?experiment_name=moekd", timeout=30).read())["experiment"]["experiment_id"]
        runs = post("runs/search", {"experiment_ids": [experiment], "max_results": 500})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        metrics = {r["info"]["run_id"]: {m["key"]: m["value"] for m in r["data"].get("metrics", [])} for r in runs}

        def children(parent_id: str) -> dict:
            return {r["info"]["run_name"]: r for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId")
                    == parent_id}

        parent = next(r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]])
        assert parent["info"]["status"] == "FINISHED"
        assert {"student_test_accuracy", "student_test_f1", "mixture_test_accuracy", "best_expert_test_accuracy",
                "reference_test_accuracy", "student_size_mb", "student_functions_per_s"} <= set(
                    metrics[parent["info"]["run_id"]])
        stages = children(parent["info"]["run_id"])
        for name in ("expert_0", "expert_1"):
            info = stages[name]["info"]
            query = urllib.parse.urlencode({"run_id": info["run_id"], "metric_key": "train_seconds"})
            with urllib.request.urlopen(f"{api}/metrics/get-history?{query}", timeout=30) as response:
                history = json.loads(response.read())["metrics"]
            assert len(history) == 2  # the expert's two epochs
            assert (int(info["end_time"]) - int(info["start_time"])) / 1000 >= sum(m["value"] for m in history), name
        clocks = {"started_at", "finished_at", "run_finished_at", "resumed_from", "world_size", "zero_stage"}
        assert not any(clocks & set(m) for m in metrics.values()), metrics
        models = children(stages["evaluate"]["info"]["run_id"])  # one run per model, the same metric names
        assert {"expert_0", "expert_1", "mixture", "student", "tfidf-lr"} <= set(models)
        assert all({"test_accuracy", "test_f1"} <= set(metrics[r["info"]["run_id"]]) for r in models.values())
    finally:
        end_group(server)
