"""cluster/ and mlflow/: the deployment files parse, carry what Ray / KubeRay need, name jobs that validate, and
keep the dashboard and MLflow on 127.0.0.1. No Ray is started; one test starts the MLflow server script."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from moekd_ray.config import load_config
from servers import (LOOPBACK, START_SERVER, end_group, free_port, group_alive, listening_addresses, other_address,
                     server_env, start_group, wait_http)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCS = [CLUSTER / "README.md", ROOT / "mlflow" / "README.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
EXPECTED = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-cluster.yaml"]
RUNTIME_ENV_EXCLUDES = {".git", ".venv", "runs/", "mlruns*", "data/"}


def cluster_yamls() -> list[Path]:
    return sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")])


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in cluster_yamls() for doc in documents(path)]


def of_kind(kind: str) -> list[dict]:
    found = [doc for _, doc in all_documents() if isinstance(doc, dict) and doc.get("kind") == kind]
    assert found, f"no {kind} in cluster/"
    return found


def launcher_config() -> dict:
    (doc,) = documents(CLUSTER / "ray-cluster.yaml")
    return doc


def strings(node) -> list[str]:
    """Every string value in a parsed YAML tree (commands, entrypoints, env values...)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def header(job: Path) -> str:
    """A job file's leading comment lines, without their `#`."""
    lines = job.read_text().splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "\n".join(line[1:] for line in lines[:end])


def code_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```[^\n]*\n(.*?)```", markdown.read_text(), flags=re.S)


def container_limits(container: dict) -> dict:
    return (container.get("resources") or {}).get("limits") or {}


# ------------------------------------------------------------------------------------------------ parsing, keys
def test_expected_files_exist():
    assert set(EXPECTED) <= {p.name for p in cluster_yamls()}
    assert (CLUSTER / "README.md").is_file() and START_SERVER.is_file() and DOCS[1].is_file()


@pytest.mark.parametrize("path", cluster_yamls(), ids=lambda p: p.name)
def test_cluster_yaml_parses(path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    assert "# SET:" in path.read_text(), f"{path.name}: mark the values a user must set with `# SET:`"


def test_launcher_config_keys_and_rays_own_schema():
    cfg = launcher_config()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"):
        assert key in cfg, f"ray-cluster.yaml: missing {key}"
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head is the CPU node"
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types)
    # The checks `ray up` runs before it talks to AWS: defaults merged in, Ray's JSON schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))
    setup = " ".join(cfg["setup_commands"])
    assert "-e ~/moekd-ray" in setup and "^torch==" in setup, "install the repo with the AMI's torch, not the CPU pin"
    assert "RAY_AUTH_MODE=token" in setup
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], f"{where}: head has no containers"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: reach the head with kubectl port-forward"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token authentication is off"
    groups = spec["workerGroupSpecs"]
    gpus = [int(container_limits(c).get("nvidia.com/gpu", 0))
            for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(n >= 1 for n in gpus), f"{where}: no worker group with an nvidia.com/gpu limit"
    for group in groups:
        assert group["minReplicas"] <= group["maxReplicas"]


def test_raycluster_has_head_and_gpu_workers():
    for doc in of_kind("RayCluster"):
        assert doc["apiVersion"] == "ray.io/v1"
        check_ray_cluster_spec(doc["spec"], f"RayCluster {doc['metadata']['name']}")


def test_rayjob_has_entrypoint_cluster_and_small_upload():
    for doc in of_kind("RayJob"):
        spec = doc["spec"]
        assert doc["apiVersion"] == "ray.io/v1"
        assert spec["entrypoint"].startswith("moekd run jobs/")
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["submissionMode"] == "SidecarMode", "the submitter must reach the loopback dashboard"
        check_ray_cluster_spec(spec["rayClusterSpec"], f"RayJob {doc['metadata']['name']}")
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] and runtime_env["env_vars"]
        assert RUNTIME_ENV_EXCLUDES <= set(runtime_env["excludes"])


# ------------------------------------------------------------------------------------------------ jobs named
MOEKD_COMMAND = re.compile(
    r"moekd\s+(?:run|validate|tune|attack|benchmark|search-student)\s+(jobs/[\w./-]+\.ya?ml)([^\n;&|]*)")


def named_jobs() -> list[tuple[str, str, list[str]]]:
    """(where, config path, key=value overrides) of every `moekd <command> jobs/...` command in the parsed
    cluster files, the READMEs' code blocks and the job files' headers."""
    texts = [(f"{path.name}", s) for path, doc in all_documents() for s in strings(doc)]
    texts += [(doc.name, block) for doc in DOCS for block in code_blocks(doc)]
    texts += [(job.name, header(job)) for job in JOBS]
    found = []
    for where, text in texts:
        for match in MOEKD_COMMAND.finditer(text.replace("\\\n", " ")):
            words = shlex.split(match.group(2), comments=True)
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            found.append((where, match.group(1), overrides))
    return found


def test_commands_name_jobs_that_validate():
    jobs = named_jobs()
    assert any(where == "kuberay-rayjob.yaml" for where, _, _ in jobs)
    assert any(overrides for _, _, overrides in jobs), "the override form is not exercised"
    for where, path, overrides in jobs:
        assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
        load_config(ROOT / path, overrides)  # raises ConfigError with every problem


def test_every_jobs_path_mentioned_exists():
    for path in [*cluster_yamls(), *DOCS, START_SERVER, *JOBS]:
        for job in re.findall(r"jobs/[\w./-]+\.ya?ml", path.read_text()):
            assert (ROOT / job).is_file(), f"{path.name} names {job}, which does not exist"


def test_every_submit_keeps_the_upload_small():
    """Each `ray job submit --working-dir` shown in the READMEs and the job headers passes the excludes that keep
    .git, environments, data and run outputs out of the upload (Ray honours .gitignore, but not for .git)."""
    texts = [(doc.name, block) for doc in DOCS for block in code_blocks(doc)]
    texts += [(job.name, header(job)) for job in JOBS]
    submits = 0
    for where, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            if "ray job submit" not in line or "--working-dir" not in line:
                continue
            words = shlex.split(line, comments=True)
            assert "--runtime-env-json" in words, f"{where}: {line.strip()} uploads without excludes"
            runtime_env = json.loads(words[words.index("--runtime-env-json") + 1])
            assert RUNTIME_ENV_EXCLUDES <= set(runtime_env["excludes"]), f"{where}: {line.strip()}"
            submits += 1
    assert submits >= 6  # docs/ (GPU, local pipeline and attack, benchmark), cluster/README, the GPU job headers


# ------------------------------------------------------------------------------------------------ loopback only
DASHBOARD_HOST = re.compile(r"dashboard[-_]host[\"']?\s*[:= ]\s*[\"']?([^\s\"',}`]+)")


def test_every_dashboard_host_is_loopback():
    cfg = launcher_config()
    heads = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert heads and all(re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", c) for c in heads)
    for spec in [d["spec"] for d in of_kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in of_kind("RayJob")]:
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == LOOPBACK
    for path in [*cluster_yamls(), CLUSTER / "README.md"]:
        text = path.read_text()
        hosts = DASHBOARD_HOST.findall(text)
        assert hosts and set(hosts) == {LOOPBACK}, f"{path.name}: dashboard hosts {hosts}"
        assert "0.0.0.0" not in text or path.suffix == ".md", f"{path.name} binds something to all interfaces"


def test_no_service_exposed_and_mlflow_sidecars_on_loopback():
    for _, doc in all_documents():
        for key in ("serviceType", "type"):
            assert not {"LoadBalancer", "NodePort"} & set(_values_of(doc, key))
        for container in _containers(doc):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "MLFLOW_HOST" in env:
                assert env["MLFLOW_HOST"] == LOOPBACK
            if "start_server.sh" in " ".join(container.get("command", [])):
                assert env.get("MLFLOW_HOST", LOOPBACK) == LOOPBACK
    assert "MLFLOW_HOST" not in (CLUSTER / "ray-cluster.yaml").read_text()  # the head's server keeps the default


def _values_of(node, key: str) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values_of(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values_of(v, key)]
    return []


def _containers(node) -> list[dict]:
    return [c for cs in _values_of(node, "containers") for c in cs]


# ------------------------------------------------------------------------------------------------ start_server.sh
def dry_run(**extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_SERVER), "--dry-run"], env=server_env(**extra), capture_output=True,
                          text=True, timeout=30, check=True)


def test_start_server_script_defaults(tmp_path):
    text = START_SERVER.read_text()
    assert "set -euo pipefail" in text
    assert os.access(START_SERVER, os.X_OK)
    assert re.search(r'host="\$\{MLFLOW_HOST:-127\.0\.0\.1\}"', text)
    out = dry_run(MOEKD_MLFLOW_DIR=str(tmp_path))
    command = shlex.split(out.stdout.splitlines()[-1])
    assert command[command.index("--host") + 1] == LOOPBACK
    assert command[command.index("--port") + 1] == "5000"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")
    assert "--serve-artifacts" in command
    assert f"MLFLOW_BACKEND_STORE_URI=sqlite:///{tmp_path}/mlflow.db" in out.stdout
    assert "WARNING" not in out.stderr
    # Every flag is one the installed `mlflow server` has.
    from mlflow.cli import server

    options = {opt for param in server.params for opt in param.opts}
    assert {w for w in command if w.startswith("--")} <= options


def test_start_server_warns_off_loopback_and_hides_db_password(tmp_path):
    out = dry_run(MOEKD_MLFLOW_DIR=str(tmp_path), MLFLOW_HOST="0.0.0.0",
                  MLFLOW_BACKEND_STORE_URI="postgresql://moekd:s3cret@db.internal:5432/mlflow")
    assert "WARNING" in out.stderr and "0.0.0.0" in out.stderr
    assert "s3cret" not in out.stdout
    bad = subprocess.run(["bash", str(START_SERVER), "--dry-run"], env=server_env(MLFLOW_PORT="http"),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "MLFLOW_PORT" in bad.stderr


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net")
def test_start_server_answers_health_on_loopback_only(tmp_path):
    port = free_port()
    proc = start_group(["bash", str(START_SERVER)], tmp_path / "server.log",
                       MOEKD_MLFLOW_DIR=str(tmp_path / "store"), MLFLOW_PORT=str(port))
    try:
        assert wait_http(f"http://{LOOPBACK}:{port}/health", proc, tmp_path / "server.log").strip() == "OK"
        assert listening_addresses(port) == {LOOPBACK}
        if (address := other_address()) is not None:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
        assert (tmp_path / "store" / "mlflow.db").is_file(), "the backend store is not the SQLite default"
        assert (tmp_path / "store" / "artifacts").is_dir()
    finally:
        end_group(proc)
    assert not group_alive(proc.pid), "a process of the server's group outlived SIGKILL"
    assert not listening_addresses(port)
