"""The registry against a real MLflow tracking server (mlflow/start_server.sh on 127.0.0.1, started here): two
student versions with their evidence, gated promotion (one passes, one is refused naming its gate, --force is
recorded), the champion loaded by alias, and `mlflow models serve` answering a real HTTP request."""

import json
import urllib.request

import mlflow
import pandas as pd
import pytest

from moekd_ray import tracking
from moekd_ray.cli import main
from moekd_ray.config import GatesConfig, load_config
from moekd_ray.registry import PromotionRefused, list_versions, promote
from servers import LOOPBACK, START_SERVER, end_group, free_port, save_tiny_student, start_group, wait_http

NAME = "registry-test"
FUNCS = ["int f(char *s) { char b[8]; strcpy(b, s); return 0; }", "int g(int a, int b) { return a + b; }"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_group(["bash", str(START_SERVER)], tmp / "server.log", MOEKD_MLFLOW_DIR=str(tmp / "store"),
                       MLFLOW_PORT=str(port))
    uri = f"http://{LOOPBACK}:{port}"
    try:
        wait_http(f"{uri}/health", proc, tmp / "server.log")
        yield uri
    finally:
        end_group(proc)


@pytest.fixture(scope="module")
def versions(server, tmp_path_factory):
    """v1 (test F1 0.61) and v2 (test F1 0.40), both registered through the pipeline's own log_student_model."""
    tmp = tmp_path_factory.mktemp("students")
    cfg = load_config(None, [f"mlflow.tracking_uri={server}", "mlflow.experiment=registry"])
    tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    uris = []
    for seed, f1 in ((0, 0.61), (1, 0.40)):
        model_dir, tok_dir = save_tiny_student(tmp / f"s{seed}", seed)
        with mlflow.start_run():
            uris.append(tracking.log_student_model(model_dir, tok_dir, cfg.model_dump(mode="json"), NAME,
                                                   {"test_f1": f1, "test_accuracy": 0.6, "size_mb": 0.09},
                                                   tags={"moekd.data_hash": "abc123"}))
    return cfg, uris


def test_versions_carry_their_evidence_and_model_card(versions):
    cfg, uris = versions
    assert uris == [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    rows = {r["version"]: r for r in list_versions(mlflow.MlflowClient(), NAME)}
    assert rows[1]["test_f1"] == pytest.approx(0.61) and rows[2]["test_f1"] == pytest.approx(0.40)
    assert rows[1]["student"] == "3mb" and rows[1]["config_digest"] == cfg.digest()
    assert rows[1]["data_hash"] == "abc123" and len(rows[1]["source_run"]) == 32
    assert rows[1]["teachers"].startswith(f"{cfg.experts.k} x")
    mv = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert "| test_f1 | 0.61 |" in mv.description


def test_gated_promotion(versions, capsys):
    cfg, _ = versions
    client = mlflow.MlflowClient()
    gates = GatesConfig(min_test_f1=0.5, max_size_mb=1.0)
    assert promote(client, NAME, "1", "champion", gates) == []
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"

    # Through the CLI: refused, one line naming the failed gate, exit code 2, alias unchanged.
    args = ["registry", "promote", "--name", NAME, "--version", "2", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
            "registry.gates.min_test_f1=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "min_test_f1" in err and "v2" in err
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"

    # No absolute gate, but worse than the champion by more than the allowed drop.
    with pytest.raises(PromotionRefused, match="max_f1_drop"):
        promote(client, NAME, "2", "champion", GatesConfig(max_f1_drop=0.05))
    # An ASR gate on a version nobody attacked yet is refused, not waved through.
    with pytest.raises(PromotionRefused, match="unmeasured"):
        promote(client, NAME, "1", "robust", GatesConfig(max_asr=0.3))

    assert main([*args, "--force"]) == 0
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"
    records = [json.loads(v) for k, v in sorted(client.get_model_version(NAME, "2").tags.items())
               if k.startswith("promotion.")]
    assert [(r["result"], r["forced"]) for r in records] == [("refused", False), ("refused", False), ("promoted", True)]
    assert records[-1]["previous_holder"] == "1"
    promote(client, NAME, "1", "champion", GatesConfig())  # the champion back for the tests below

    main(["registry", "list", "--name", NAME, f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"])
    out = capsys.readouterr().out
    assert "champion" in out and "0.610" in out


def test_champion_loads_and_is_served_over_http(versions, tmp_path):
    cfg, _ = versions
    promote(mlflow.MlflowClient(), NAME, "1", "champion", GatesConfig())
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"func": FUNCS}))
    port = free_port()
    proc = start_group(["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                        "-h", LOOPBACK, "-p", str(port)], tmp_path / "serve.log",
                       MLFLOW_TRACKING_URI=cfg.mlflow.tracking_uri)
    try:
        wait_http(f"http://{LOOPBACK}:{port}/ping", proc, tmp_path / "serve.log")
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{port}/invocations", data=json.dumps({"inputs": {"func": FUNCS}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        end_group(proc)
    served = [row["probability"] for row in answer["predictions"]]
    assert served == pytest.approx(list(expected["probability"]), abs=1e-6)
