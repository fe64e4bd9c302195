"""`ray job submit` against a real two-node local cluster started here: a head (`ray start --head`, dashboard and
Jobs API on 127.0.0.1, token authentication on) and a second node with a custom resource that the experts' workers
require, so the job's experts must be placed on the other node. The job is docs/cluster.md's command: the repository
root uploaded as the working dir with its runtime_env excludes, `moekd run jobs/quickstart.yaml` with overrides
that make it tiny. The test checks the upload is the small package those excludes give, the job SUCCEEDED, the
MLflow run and registered student exist, and that a failing job reports FAILED with moekd's one-line error in its
logs. The cluster is stopped through the processes this test started.

Runs before the rest of the suite (conftest orders it first): two Ray instances on one machine at once confuse
Ray Train's placement-group cleaner, and the session's shared cluster starts later.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import mlflow
import pytest

from conftest import DEVIGN_DIR, TINY_ARCH
from servers import LOOPBACK, ROOT, end_group, free_port, server_env, start_group

pytestmark = pytest.mark.own_cluster
RAY = str(Path(sys.executable).with_name("ray"))


def ray_env(temp_dir: str) -> dict:
    # Token authentication as on a real cluster (off by default for `ray start`); the token is this test's own.
    token = Path(temp_dir) / "auth_token"
    if not token.exists():
        token.write_text(os.urandom(24).hex())
    env = server_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    return env


def wait_ray(ready, proc, log: Path, timeout_s: float = 180) -> None:
    """Until `ready()` (the Jobs API answers with our token; the node shows up), or fail with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(2)
    raise AssertionError(f"Ray did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")


def own_ports() -> list[str]:
    """Free ports for a node's fixed-port services: left at Ray's defaults (dashboard agent 52365, client server
    10001, ...), a node dies or loses its job agent when another Ray instance on the machine holds them."""
    return [f"--{name}={free_port()}" for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                   "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                   "metrics-export-port")]


def kill_processes_of(folder: str) -> None:
    """Processes of one node or cluster only (they name its temp dir), never a broad `ray stop`."""
    for pid in subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-9", pid])


def raylet_log_tail(node_dir: Path) -> str:
    logs = node_dir / "session_latest" / "logs"
    return "".join(f"\n--- {f.name} (tail):\n{f.read_text(errors='replace')[-1500:]}"
                   for f in (logs / "raylet.out", logs / "raylet.err") if f.exists())


NODE_ATTEMPTS = 3


def start_worker_node(port: int, temp_dir: str, env: dict) -> subprocess.Popen:
    """The second node, with the custom resource the experts need. `ray start` waits a fixed 30 s for its raylet to
    register with the GCS and then exits ("The current node timed out during startup"); on a cold CI machine that
    happened once, so a node that exits is started again in a fresh folder, up to NODE_ATTEMPTS times, and a
    failure reports every attempt's log and raylet log."""
    failures = []
    for attempt in range(1, NODE_ATTEMPTS + 1):
        # Its own temp dir, as on a separate machine: sharing the head's, its runtime-env agent would delete the
        # job's working dir (the driver's cwd) when its own workers finish.
        node_dir, log = Path(temp_dir) / f"n{attempt}", Path(temp_dir) / f"node{attempt}.log"
        node = start_group([RAY, "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                            "--num-cpus=2", '--resources={"expert_node": 2}', f"--temp-dir={node_dir}",
                            *own_ports()], log, **env)
        try:
            wait_ray(lambda: "expert_node" in subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"],
                                                             env=env, capture_output=True, text=True).stdout,
                     node, log)
            return node
        except AssertionError as failed:
            exited = node.poll() is not None
            end_group(node)
            kill_processes_of(str(node_dir))
            failures.append(f"attempt {attempt}: {failed}{raylet_log_tail(node_dir)}")
            if not exited or attempt == NODE_ATTEMPTS:  # one that ran the whole wait would not fare better again
                break
            warnings.warn(f"the worker node exited during startup (attempt {attempt} of {NODE_ATTEMPTS}); "
                          f"starting it again:\n{log.read_text()[-500:]}")
    raise AssertionError("\n\n".join(failures))


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = ray_env(temp_dir)
    port, dash = free_port(), free_port()
    head_log = Path(temp_dir) / "head.log"
    head = start_group([RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        f"--temp-dir={temp_dir}", "--include-dashboard=true", *own_ports()], head_log, **env)
    node = None
    try:
        wait_ray(lambda: subprocess.run([RAY, "job", "list", f"--address=http://{LOOPBACK}:{dash}"], env=env,
                                        capture_output=True).returncode == 0, head, head_log)
        node = start_worker_node(port, temp_dir, env)
        yield {"address": f"http://{LOOPBACK}:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        for proc in (node, head):
            if proc is not None:
                end_group(proc)
        kill_processes_of(temp_dir)


def documented_excludes() -> list[str]:
    """The runtime_env excludes of docs/cluster.md's local `ray job submit` (the test uploads what a user uploads)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", (ROOT / "docs" / "cluster.md").read_text(), flags=re.S)
    local = next(block for block in blocks if "ray start --head" in block)
    return json.loads(re.search(r"--runtime-env-json '([^']*)'", local).group(1))["excludes"]


def submit(cluster, overrides: list[str]) -> tuple[str, str, str]:
    """`moekd run jobs/quickstart.yaml OVERRIDES` submitted as README shows it (the repository root uploaded with
    its excludes); returns (final status, job logs, `ray job submit`'s output)."""
    runtime_env = {"excludes": documented_excludes()}
    cmd = [RAY, "job", "submit", f"--address={cluster['address']}", "--working-dir=.",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--no-wait", "--",
           "moekd", "run", "jobs/quickstart.yaml", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    submitted = out.stdout + out.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)
    deadline = time.monotonic() + 600
    status = ""
    while time.monotonic() < deadline:
        # "Status for job '…': SUCCEEDED", or "Job '…' failed" / "… stopped" (on stderr, with the logs' tail).
        out = subprocess.run([RAY, "job", "status", f"--address={cluster['address']}", job_id],
                             env=cluster["env"], capture_output=True, text=True)
        status = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr).upper()  # without colour codes
        if re.search(rf"{job_id.upper()}'?:? (SUCCEEDED|FAILED|STOPPED)", status):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", f"--address={cluster['address']}", job_id], env=cluster["env"],
                          capture_output=True, text=True).stdout
    found = re.search(rf"{job_id.upper()}'?:? (SUCCEEDED|FAILED|STOPPED)", status)
    final = found.group(1) if found else status.strip()[-300:]
    return final, logs, submitted


def tiny_overrides(tmp_path) -> list[str]:
    """jobs/quickstart.yaml made tiny; absolute paths, as README says, since the job runs in Ray's copy."""
    return [
        "name=cluster-tiny", f"output_dir={tmp_path / 'runs'}", f"data.dir={DEVIGN_DIR}",
        "data.train_rows=256", "data.eval_rows=48",
        "experts.models=null", "experts.folds=1", f"experts.model={json.dumps(TINY_ARCH)}", "experts.schedule.epochs=1",
        'experts.resources={"num_workers": 1, "cpus_per_worker": 1, "custom": {"expert_node": 1}}',
        "router.epochs=10",
        f"distill.student_arch={json.dumps(TINY_ARCH)}", "distill.schedule.epochs=1",
        'distill.resources={"num_workers": 1, "cpus_per_worker": 1}',
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", "mlflow.registered_model=cluster-student",
        # The attack as the pipeline's last stage, small: its ASR becomes promotion evidence on the version.
        "attack.in_pipeline=true", "attack.n=6", "attack.query_budget=8", "attack.candidates=4", "attack.workers=1",
        "attack.vocab_rows=100",
    ]


def uploaded_package(tmp_path) -> tuple[str, int, list[str]]:
    """The URI, size and file names of the package `ray job submit` makes of the repository root with README's
    excludes, built by Ray's own packaging code."""
    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    zipped = tmp_path / "package.zip"
    create_package(str(ROOT), zipped, include_gitignore=True, excludes=documented_excludes())
    with zipfile.ZipFile(zipped) as z:
        names = z.namelist()
    return get_uri_for_directory(str(ROOT), True, excludes=documented_excludes()), zipped.stat().st_size, names


def test_submitted_pipeline_succeeds_and_is_tracked(cluster, tmp_path):
    status, logs, submitted = submit(cluster, tiny_overrides(tmp_path))
    assert status == "SUCCEEDED", logs[-3000:]
    # What went up: the package and jobs/, not history, environments, data or run outputs.
    uri, size, names = uploaded_package(tmp_path)
    assert uri in submitted, submitted[-2000:]
    assert size < 2 * 1024**2 and "jobs/quickstart.yaml" in names and "moekd_ray/cli.py" in names
    assert not [n for n in names if n.split("/")[0] in (".git", ".venv", "runs", "data", "mlruns", "mlruns.db")]
    assert "student model: models:/cluster-student/1" in logs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("moekd").experiment_id],
                              filter_string="tags.mlflow.runName = 'cluster-tiny'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = client.get_model_version("cluster-student", "1").tags
    assert tags["moekd.source_run"] == runs[0].info.run_id
    # the version carries the ASR the run measured on its student (a tag copied from elsewhere would differ)
    assert float(tags["metric.asr_mhm"]) == pytest.approx(runs[0].data.metrics["student_asr_mhm"])


def test_failing_job_reports_failed_with_one_line_error(cluster, tmp_path):
    status, logs, _ = submit(cluster, [*tiny_overrides(tmp_path), "distill.temperature=-1"])
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("moekd: error:")]
    assert len(errors) == 1 and "distill.temperature" in errors[0], logs[-2000:]
    assert "Traceback" not in logs


PROBE = """
import ray
from ray.train.v2._internal.state.util import is_actor_alive

from moekd_ray.config import load_config
from moekd_ray.ray_runtime import init_ray

init_ray(load_config(None, ["ray.num_cpus=1"]))


@ray.remote(num_cpus=0)
class Probe:
    def alive(self):  # the question Ray Train's placement-group cleaner asks, from a worker of this cluster
        return is_actor_alive(ray.get_runtime_context().get_actor_id(), timeout=10)


print("probe:", ray.get(Probe.remote().alive.remote()))
"""


def test_a_local_cluster_beside_another_reaches_its_own_state_api(cluster, tmp_path):
    """With this module's cluster running on the machine, a driver that starts its own local cluster (as `moekd run`
    does) still reaches that cluster's state API from its workers, as Ray Train's placement-group cleaner must to
    free a stopped run's CPUs (found by searching the machine, it fails: "Found multiple active Ray instances")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert "probe: True" in out.stdout, (out.stdout + out.stderr)[-3000:]
