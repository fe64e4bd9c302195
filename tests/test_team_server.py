"""The team tracking server for real: a PostgreSQL server from the machine's own binaries (initdb in a temporary
folder, 127.0.0.1), `mlflow/start_server.sh` on it as a team starts it, then a tiny `moekd run`, a `moekd tune`
search of 2 trials at once while 3 other processes log runs to the same server, and a gated `moekd registry
promote`, all against it. Checked in the database itself: every run, metric point, artifact and registered version
arrived exactly once. Then the same server with MLflow's basic-auth app: a client without credentials, or with a
wrong password, is refused with one line naming the settings (`moekd run` included, before any work); a user with
MLFLOW_TRACKING_USERNAME/PASSWORD and the permission an admin granted promotes the run's student and scores a file
with it, a user without that permission is refused. The run shows its final table as its description and test
accuracy against size as a plot, as a person reads it in the MLflow UI.

Needs PostgreSQL's server binaries (Debian: the postgresql package) and the `team` extra (`pip install -e
".[team]"`: psycopg, Flask-WTF); without them it skips with one line naming the fix. Runs before the session's
shared Ray cluster (own_cluster): each `moekd` command here starts and stops its own local Ray."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import TINY_ARCH
from servers import (LOOPBACK, PG_FIX, ROOT, START_SERVER, end_group, free_port, postgres,
                     postgres_bin, server_env, start_group, wait_http)

# The first test waits for the whole fixture: 3 to 10 minutes on 2 busy cores.
pytestmark = [pytest.mark.own_cluster, pytest.mark.timeout(1800)]

MISSING = [name for name, module in (("psycopg", "psycopg"), ("Flask-WTF", "flask_wtf"))
           if importlib.util.find_spec(module) is None]
if MISSING:
    pytest.skip(f"{', '.join(MISSING)} not installed: pip install -c constraints.txt -e '.[team]'",
                allow_module_level=True)
if not (postgres_bin("initdb") and postgres_bin("pg_ctl")):
    pytest.skip(PG_FIX, allow_module_level=True)

EXPERIMENT, MODEL = "team", "team-student"
WRITERS, RUNS_PER_WRITER, STEPS = 3, 8, 5
ADMIN_PASSWORD = "admin-" + os.urandom(6).hex()


def moekd(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`moekd ARGS` in its own process group (its Ray with it), output to `log`."""
    return start_group([sys.executable, "-m", "moekd_ray.cli", *args], log, **env)


RAY_SLOW_START = "The current node timed out during startup"


def moekd_done(args: list[str], log: Path, timeout_s: float = 900, tries: int = 3, **env: str) -> None:
    """`moekd ARGS` to its end, started again (up to `tries` times) when its local Ray did not come up: Ray waits a
    fixed 30 s for its raylet, too short on a loaded 2-core machine (as test_cluster_run found). Both `moekd run` and
    `moekd tune` start Ray before their first MLflow write, so a failed start leaves nothing in the store."""
    for attempt in range(1, tries + 1):
        proc = moekd(args, log, **env)
        try:
            proc.wait(timeout_s)
        finally:
            end_group(proc)
        if proc.returncode == 0 or attempt == tries or RAY_SLOW_START not in log.read_text():
            break
        log.rename(log.with_suffix(f".attempt{attempt}.log"))
    assert proc.returncode == 0, f"{args[:2]} exited {proc.returncode}:\n{log.read_text()[-4000:]}"


def base_config(tmp: Path, uri: str) -> dict:
    return {
        "name": "team", "output_dir": str(tmp / "runs"), "data": {"train_rows": 192, "eval_rows": 48},
        "experts": {"model": TINY_ARCH, "schedule": {"batch_size": 16, "epochs": 1}},
        "router": {"epochs": 5},
        "distill": {"student_arch": TINY_ARCH, "schedule": {"epochs": 1, "batch_size": 8}, "zero_stage": 2,
                    "resources": {"num_workers": 2}},
        "mlflow": {"tracking_uri": uri, "experiment": EXPERIMENT, "registered_model": MODEL},
        "ray": {"num_cpus": 2},
    }


WRITER = """
import sys, tempfile, time, mlflow
from pathlib import Path
uri, writer, runs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from moekd_ray import tracking
tracking.connect(uri, "team-writers")  # as moekd does; all writers create the experiment at once
start = time.time()
for i in range(runs):
    with mlflow.start_run(run_name=f"w{writer}-{i}"):
        mlflow.log_params({"writer": writer, "i": i})
        for step in range(steps):
            mlflow.log_metrics({"loss": 1.0 / (step + 1), "step_x10": step * 10.0}, step=step)
        mlflow.log_text(f"writer {writer} run {i}", "note.txt")
print(start, time.time())
"""


@pytest.fixture(scope="module")
def pg():
    with postgres() as port:
        import psycopg

        with psycopg.connect(f"postgresql://moekd@{LOOPBACK}:{port}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow_auth")  # basic-auth's users and permissions, beside the runs
        yield port


def sql(port: int, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"postgresql://moekd@{LOOPBACK}:{port}/postgres") as db:
        return db.execute(query).fetchall()


def start_server(tmp: Path, pg_port: int, log_name: str, *options: str, **env: str):
    """mlflow/start_server.sh on the PostgreSQL store (artifacts under tmp/store), as README tells a team."""
    port = free_port()
    log = tmp / log_name
    proc = start_group(["bash", str(START_SERVER), *options], log, MOEKD_MLFLOW_DIR=str(tmp / "store"),
                       MLFLOW_PORT=str(port),
                       MLFLOW_BACKEND_STORE_URI=f"postgresql://moekd@{LOOPBACK}:{pg_port}/postgres",
                       **env)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        # A fresh PostgreSQL store runs MLflow's whole migration chain before answering: over 120 s seen here while
        # the suite and a benchmark shared the 2 cores (a sqlite server needs far less).
        wait_http(f"{uri}/health", proc, log, timeout_s=480)
    except BaseException:
        end_group(proc)
        raise
    return proc, uri


@pytest.fixture(scope="module")
def team(pg, tmp_path_factory):
    """Against the PostgreSQL-backed server: a tiny `moekd run`; then `moekd tune` (2 trials at once, starting from
    that run) while WRITERS processes log RUNS_PER_WRITER runs each; then a gated promotion of the search's student."""
    tmp = tmp_path_factory.mktemp("team")
    proc, uri = start_server(tmp, pg, "server.log")
    try:
        base = base_config(tmp, uri)
        (tmp / "run.yaml").write_text(yaml.safe_dump(base))
        started = time.time()
        moekd_done(["run", str(tmp / "run.yaml")], tmp / "run.log")
        seconds = {"run": time.time() - started}
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        (pipeline,) = client.search_runs([experiment], "tags.`moekd.run_dir` != ''", max_results=10)

        search = json.loads(json.dumps(base))
        search["name"] = "team-search"
        search["distill"]["schedule"]["epochs"] = 2
        search["distill"]["resources"] = {"num_workers": 1, "cpus_per_worker": 0.45}  # 2 x (0.45 + 0.01) <= 2
        search["tune"] = {"from_run": pipeline.info.run_id, "num_samples": 2, "max_concurrent": 2, "scheduler": "fifo",
                          "metric": "val_loss",
                          "space": {"distill.temperature": {"dist": "choice", "values": [1, 4]},
                                    "distill.schedule.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}}}
        (tmp / "tune.yaml").write_text(yaml.safe_dump(search))
        started = time.time()
        failed = []

        def tune():
            try:
                moekd_done(["tune", str(tmp / "tune.yaml")], tmp / "tune.log")
            except BaseException as exc:  # re-raised below, in the fixture
                failed.append(exc)

        tuner = threading.Thread(target=tune)
        tuner.start()
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(w), str(RUNS_PER_WRITER), str(STEPS)],
                                    env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for w in range(WRITERS)]
        spans = []
        for w in writers:
            out, err = w.communicate(timeout=600)
            assert w.returncode == 0, err[-3000:]
            spans.append(tuple(map(float, out.split()[-2:])))
        tuner.join()
        if failed:
            raise failed[0]
        seconds["tune"] = time.time() - started
        seconds["writers"] = max(e for _, e in spans) - min(s for s, _ in spans)

        from moekd_ray.cli import main

        old = mlflow.get_tracking_uri()
        try:  # the search's student (v2): gated against the run's champion (v1), then to an alias of its own
            refused = main(["registry", "promote", "--name", MODEL, "--version", "2", "--alias", "candidate",
                            f"mlflow.tracking_uri={uri}", "registry.gates.max_size_mb=0.000001"])
            promoted = main(["registry", "promote", "--name", MODEL, "--version", "2", "--alias", "candidate",
                             f"mlflow.tracking_uri={uri}"])
        finally:
            mlflow.set_tracking_uri(old)
        yield {"uri": uri, "client": client, "tmp": tmp, "pipeline": pipeline, "experiment": experiment,
               "seconds": seconds, "promotions": (refused, promoted), "pg": pg}
    finally:
        end_group(proc)


def all_runs(client, experiment_ids: list[str]) -> list:
    return client.search_runs(experiment_ids, max_results=5000)


def test_every_run_arrived_once(team):
    client, pipeline = team["client"], team["pipeline"]
    runs = all_runs(client, [team["experiment"]])
    by_id = {r.info.run_id: r for r in runs}
    assert len(by_id) == len(runs)
    assert all(r.info.status == "FINISHED" for r in runs), {r.info.run_name: r.info.status for r in runs}
    # Under each parent, one run per name (a retried create would show twice).
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r.info.run_name)
    for parent, names in children.items():
        assert len(names) == len(set(names)), (parent, sorted(names))
    tops = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert len(tops) == 2 and "team" in tops, tops  # the moekd run and the search
    search = next(r for r in runs if "moekd.search" in r.data.tags)
    trials = sorted(n for n in children[search.info.run_id] if n.startswith("trial_"))
    assert len(trials) == 2 and int(float(search.data.metrics["trials"])) == 2
    assert len(children[pipeline.info.run_id]) >= 4, children[pipeline.info.run_id]  # stages and experts
    # The database holds exactly these runs (nothing the API hides, no second copy).
    (count,), = sql(team["pg"], f"SELECT count(*) FROM runs WHERE experiment_id = {team['experiment']}")
    assert count == len(runs)
    # Nothing spooled: every write of the run reached the server.
    assert not (Path(pipeline.data.tags["moekd.run_dir"]) / "mlflow_spool.jsonl").exists()


def test_every_metric_point_arrived_once(team):
    """No (run, key, step) twice in the metrics table, and each trial's history has one point per epoch."""
    dupes = sql(team["pg"], "SELECT r.name, m.key, m.step, count(*) FROM metrics m JOIN runs r ON r.run_uuid = "
                            "m.run_uuid GROUP BY r.name, m.run_uuid, m.key, m.step HAVING count(*) > 1")
    assert dupes == []
    client = team["client"]
    search = next(r for r in all_runs(client, [team["experiment"]]) if "moekd.search" in r.data.tags)
    for trial in client.search_runs([team["experiment"]], f"tags.mlflow.parentRunId = '{search.info.run_id}'"):
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_loss")] == [1, 2]


def test_trials_ran_at_once(team):
    """Epoch metrics carry the time Tune received them: both trials' spans overlap (2 x 0.46 CPU <= 2)."""
    client = team["client"]
    search = next(r for r in all_runs(client, [team["experiment"]]) if "moekd.search" in r.data.tags)
    spans = []
    for trial in client.search_runs([team["experiment"]], f"tags.mlflow.parentRunId = '{search.info.run_id}'"):
        end = max(m.timestamp for m in client.get_metric_history(trial.info.run_id, "val_loss")) / 1000
        spans.append((end - trial.data.metrics["trial_seconds"], end))
    (s1, e1), (s2, e2) = spans
    assert s1 - 1 < e2 and s2 - 1 < e1, spans


def artifact_files(client, run_id: str, path: str | None = None) -> dict[str, int]:
    files = {}
    for info in client.list_artifacts(run_id, path):
        files.update(artifact_files(client, run_id, info.path) if info.is_dir else {info.path: info.file_size})
    return files


def test_every_artifact_arrived_once(team):
    """What the server lists for each run is on its artifact store with the same size, and the store holds no run
    folder the database does not know (an upload retried into a second run) and no model logged twice."""
    client, store = team["client"], team["tmp"] / "store" / "artifacts"
    runs = all_runs(client, [team["experiment"]])
    listed = 0
    for run in runs:
        for path, size in artifact_files(client, run.info.run_id).items():
            on_disk = store / team["experiment"] / run.info.run_id / "artifacts" / path
            assert on_disk.is_file() and on_disk.stat().st_size == size, on_disk
            listed += 1
    folders = {p.name for p in (store / team["experiment"]).iterdir()}
    assert listed and folders <= {r.info.run_id for r in runs} | {"models"}, folders
    parent = artifact_files(client, team["pipeline"].info.run_id)
    assert "config.yaml" in parent
    # Logged models, from the database: one per registered version (its source models:/<model id>), each with one
    # artifact folder. (A version's model_id comes back None from this server, hence its source.)
    models = [m for (m,) in sql(team["pg"], "SELECT model_id FROM logged_models WHERE experiment_id = "
                                            f"{team['experiment']}")]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    sources = [v.source.removeprefix("models:/") for v in versions]
    assert sorted(models) == sorted(sources) and len(set(models)) == len(models), (models, sources)
    on_disk = {p.name for p in (store / team["experiment"] / "models").iterdir()}
    assert on_disk == set(models)


def test_registered_versions_and_promotion(team):
    client = team["client"]
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert len({v.run_id for v in versions}) == 2
    rows = sql(team["pg"], f"SELECT version FROM model_versions WHERE name = '{MODEL}' ORDER BY version")
    assert rows == [(1,), (2,)]
    aliases = client.get_registered_model(MODEL).aliases
    assert team["promotions"] == (2, 0)
    assert aliases.get("candidate") == "2"
    from moekd_ray.registry import promotion_records

    records = promotion_records(client.get_model_version(MODEL, "2").tags)
    assert [r["result"] for _, r in records] == ["refused", "promoted"], records


def test_concurrent_writers_arrived_once(team):
    """WRITERS processes logging at once, while the search ran: each run once, each metric point once."""
    client = team["client"]
    experiment = client.get_experiment_by_name("team-writers").experiment_id
    runs = all_runs(client, [experiment])
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{w}-{i}" for w in range(WRITERS)
                                                           for i in range(RUNS_PER_WRITER))
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(STEPS))
        assert artifact_files(client, run.info.run_id) == {"note.txt": len(f"writer {run.data.params['writer']} run "
                                                                          f"{run.data.params['i']}")}
    total = WRITERS * RUNS_PER_WRITER
    print(f"\n{total} runs ({STEPS} steps x 2 metrics, 1 artifact each) from {WRITERS} processes in "
          f"{team['seconds']['writers']:.1f} s = {total / team['seconds']['writers']:.2f} runs/s while the search "
          f"ran; moekd run {team['seconds']['run']:.0f} s, moekd tune {team['seconds']['tune']:.0f} s")


# ------------------------------------------------------------------------------------------------ basic-auth
@pytest.fixture(scope="module")
def auth_server(team):
    """A second server on the same store with `--app-name basic-auth`, its users in PostgreSQL too (mlflow's
    default would be ./basic_auth.db of the folder it starts in)."""
    tmp, pg_port = team["tmp"], team["pg"]
    ini = tmp / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = postgresql://moekd@{LOOPBACK}:{pg_port}/mlflow_auth\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    proc, uri = start_server(tmp, pg_port, "auth-server.log", "--app-name", "basic-auth",
                             MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                             MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
    try:
        yield uri
    finally:
        end_group(proc)


def one_line_error(args: list[str], capsys) -> str:
    from moekd_ray.cli import main

    old = mlflow.get_tracking_uri()
    try:
        assert main(args) == 2
    finally:
        mlflow.set_tracking_uri(old)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_login_refused_with_one_line(auth_server, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    args = ["registry", "list", f"mlflow.tracking_uri={auth_server}"]
    err = one_line_error(args, capsys)
    assert "requires a login (401)" in err and "MLFLOW_TRACKING_USERNAME" in err and "MLFLOW_TRACKING_PASSWORD" in err
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    err = one_line_error(args, capsys)
    assert "refused the login of user 'admin' (401)" in err and "not-the-password" not in err
    # `moekd run` without credentials stops before any work, with the same line.
    log = tmp_path / "run.log"
    proc = moekd(["run", str(ROOT / "jobs" / "quickstart.yaml"), f"mlflow.tracking_uri={auth_server}",
                  f"output_dir={tmp_path}"], log)
    proc.wait(300)
    end_group(proc)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("moekd: error: MLflow tracking server") and \
        "requires a login" in lines[-1], lines[-5:]
    assert not list(tmp_path.glob("*/config.yaml")), "a run folder was made before the login was checked"


def test_run_reads_well_in_the_ui(team):
    """What the MLflow UI shows a person first: the final table as the run's description, test accuracy against
    size as a plot, and the registered version's description comparing the student with the reference."""
    client, run = team["client"], team["client"].get_run(team["pipeline"].info.run_id)
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("| model | test acc |") and "| **student** |" in description
    assert "| tfidf-lr |" in description and "student vs tfidf-lr reference" in description
    assert "accuracy_vs_size.png" in artifact_files(client, run.info.run_id)
    assert "Against the tfidf-lr reference" in client.get_model_version(MODEL, "1").description


def test_user_with_login_promotes_and_predicts(team, auth_server, monkeypatch, tmp_path):
    """The admin adds a user and grants her EDIT on the team's registered model (default_permission READ lets her
    read only); with MLFLOW_TRACKING_USERNAME/PASSWORD she promotes v1 and scores a file with it, through the
    basic-auth server (registry writes, and the model's artifacts downloaded with her login)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    from mlflow.server import get_app_client

    admin = get_app_client("basic-auth", tracking_uri=auth_server)
    password = "alice-" + os.urandom(6).hex()
    admin.create_user("alice", password)
    admin.grant_user_permission("alice", "registered_model", MODEL, "EDIT")

    alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": password}
    log = tmp_path / "promote.log"
    moekd_done(["registry", "promote", "--name", MODEL, "--version", "1", "--alias", "alice-pick",
                f"mlflow.tracking_uri={auth_server}"], log, timeout_s=300, **alice)
    assert "is now @alice-pick" in log.read_text()
    source = tmp_path / "f.c"
    source.write_text("int f(char *s) { char b[8]; strcpy(b, s); return 0; }\n")
    log = tmp_path / "predict.log"
    moekd_done(["predict", str(source), "--model", f"models:/{MODEL}@alice-pick", "--tracking-uri", auth_server,
                "--format", "json", "--output", str(tmp_path / "out.json")], log, timeout_s=600, **alice)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert 0 <= row["probability"] <= 1, row

    client = team["client"]
    assert client.get_registered_model(MODEL).aliases["alice-pick"] == "1"
    assert sql(team["pg"], f"SELECT count(*) FROM model_versions WHERE name = '{MODEL}'") == [(2,)]
    # A user without EDIT (bob: the default READ) is refused the write, and nothing changes.
    admin.create_user("bob", password)
    log = tmp_path / "bob.log"
    proc = moekd(["registry", "promote", "--name", MODEL, "--version", "2", "--alias", "alice-pick",
                  f"mlflow.tracking_uri={auth_server}"], log, MLFLOW_TRACKING_USERNAME="bob",
                 MLFLOW_TRACKING_PASSWORD=password)
    proc.wait(300)
    end_group(proc)
    assert proc.returncode == 2 and client.get_registered_model(MODEL).aliases["alice-pick"] == "1", log.read_text()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith(f"moekd: error: MLflow tracking server {auth_server} lets user 'bob' in but refused ") \
        and "(403)" in lines[-1] and "Traceback" not in log.read_text(), lines[-5:]  # one line, no REST traceback
