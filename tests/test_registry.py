"""The registry against a real MLflow tracking server (mlflow/start_server.sh on 127.0.0.1, started here): two
student versions with their evidence, signature, input example and artifacts, gated promotion (one passes, one is
refused naming its gate, --force is recorded), the champion loaded by alias, `moekd predict` through the server
giving the pyfunc's probabilities, and `mlflow models serve` answering a real HTTP request."""

import json
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.models import Model
from mlflow.types import DataType
from transformers import AutoTokenizer

from moekd_ray import tracking
from moekd_ray.cli import main
from moekd_ray.config import GatesConfig, MoEKDConfig, load_config
from moekd_ray.registry import PromotionRefused, list_versions, promote, promotion_records
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
        # head_scale: probabilities that differ from function to function far beyond the comparisons' 1e-6
        model_dir, tok_dir = save_tiny_student(tmp / f"s{seed}", seed, head_scale=100.0)
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
    assert "Input: C function sources" in mlflow.MlflowClient().get_registered_model(NAME).description


def test_versions_carry_signature_input_example_and_artifacts(versions, tmp_path):
    """What the MLflow UI shows of a version: its signature (an unnamed string column in, so a plain list of
    sources passes; `probability` out), an input example, and the student's tokenizer and resolved config as
    artifacts (and the checksums of every artifact file)."""
    cfg, uris = versions
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uris[0], dst_path=str(tmp_path)))
    model = Model.load(str(folder))
    assert not model.signature.inputs.has_input_names()
    assert model.signature.inputs.input_types() == [DataType.string]
    assert model.signature.outputs.input_names() == ["probability"]
    assert model.signature.outputs.input_types() == [DataType.double]
    example = model.load_input_example(str(folder))
    assert list(example) == [example[0]] and "strcpy" in example[0]  # a plain list of one source, as documented
    assert Model.load(uris[0]).signature == model.signature  # the same through the registry URI
    artifacts = model.flavors["python_function"]["artifacts"]
    assert set(artifacts) == {"model", "tokenizer", "config", "checksums"}  # checksums: tests/test_damaged_model.py
    tokenizer = AutoTokenizer.from_pretrained(str(folder / artifacts["tokenizer"]["path"]))
    assert tokenizer("int f(void) { return 0; }")["input_ids"]
    assert (folder / artifacts["model"]["path"] / "model.safetensors").is_file()
    config = yaml.safe_load((folder / artifacts["config"]["path"]).read_text())
    assert MoEKDConfig.model_validate(config).digest() == cfg.digest()


def test_promotion_records_sort_numerically():
    tags = {f"promotion.{n}": json.dumps({"n": n}) for n in (10, 2, 1, 11)} | {"promotion.x": "{}", "metric.f1": "1"}
    assert [(n, r["n"]) for n, r in promotion_records(tags)] == [(1, 1), (2, 2), (10, 10), (11, 11)]


def test_gated_promotion(versions, capsys):
    cfg, _ = versions
    client = mlflow.MlflowClient()
    gates = GatesConfig(min_test_f1=0.5, max_size_mb=1.0)
    assert promote(client, NAME, "1", "champion", gates) == []
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    (n, record), = promotion_records(client.get_model_version(NAME, "1").tags)
    assert n == 1 and client.get_model_version(NAME, "1").tags["promotion.1"]
    assert (record["alias"], record["result"], record["force"], record["forced"]) == ("champion", "promoted", False, False)
    assert record["failed_gates"] == [] and record["gates"]["min_test_f1"] == 0.5 and record["previous_holder"] is None

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
    records = promotion_records(client.get_model_version(NAME, "2").tags)
    assert [(n, r["result"], r["force"], r["forced"]) for n, r in records] == \
        [(1, "refused", False, False), (2, "refused", False, False), (3, "promoted", True, True)]
    assert records[-1][1]["previous_holder"] == "1"

    # --force on a version that passes the gates: promoted, and the flag is recorded although it overrode nothing
    assert main(["registry", "promote", "--name", NAME, "--version", "1", "--force",
                 f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]) == 0  # the champion back for the tests below
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    n, record = promotion_records(client.get_model_version(NAME, "1").tags)[-1]
    assert (n, record["result"], record["force"], record["forced"], record["failed_gates"]) == \
        (3, "promoted", True, False, [])
    capsys.readouterr()

    main(["registry", "list", "--name", NAME, f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"])
    out = capsys.readouterr().out
    assert "champion" in out and "0.610" in out


def test_predict_through_the_server_matches_the_pyfunc(versions, tmp_path, capsys):
    """`moekd predict` on a small C tree with models:/NAME@champion resolved by the tracking server gives the
    probabilities of the loaded pyfunc called on the same function sources."""
    cfg, _ = versions
    promote(mlflow.MlflowClient(), NAME, "1", "champion", GatesConfig())
    (tmp_path / "src" / "lib").mkdir(parents=True)
    (tmp_path / "src" / "a.c").write_text(f"{FUNCS[0]}\n\n{FUNCS[1]}\n")
    (tmp_path / "src" / "lib" / "b.h").write_text("static int h(int *p)\n{\n    return p[0] + p[1];\n}\n")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "src"), "--model", f"models:/{NAME}@champion",
                 "--tracking-uri", cfg.mlflow.tracking_uri, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(r["file"], r["function"]) for r in rows] == [("a.c", "f"), ("a.c", "g"), ("lib/b.h", "h")], err
    sources = [*FUNCS, "static int h(int *p)\n{\n    return p[0] + p[1];\n}"]
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"func": sources}))
    assert expected["probability"].max() - expected["probability"].min() > 100 * 1e-6  # a mix-up would show
    assert [r["probability"] for r in rows] == pytest.approx(list(expected["probability"]), abs=1e-6)


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
            f"http://{LOOPBACK}:{port}/invocations", data=json.dumps({"inputs": FUNCS}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        end_group(proc)
    served = [row["probability"] for row in answer["predictions"]]
    assert expected["probability"].max() - expected["probability"].min() > 100 * 1e-6
    assert served == pytest.approx(list(expected["probability"]), abs=1e-6)


def test_degenerate_version_is_refused_unless_forced(versions, tmp_path, capsys):
    """A version the pipeline tagged moekd.degenerate=true (one class, or validation F1 under the floor) is refused
    by promote even with no gates configured; --force promotes it and the override is recorded."""
    cfg, _ = versions
    client = mlflow.MlflowClient()
    model_dir, tok_dir = save_tiny_student(tmp_path / "useless", 5)
    with mlflow.start_run():
        uri = tracking.log_student_model(model_dir, tok_dir, cfg.model_dump(mode="json"), NAME,
                                         {"test_f1": 0.0, "test_accuracy": 0.54, "size_mb": 0.09},
                                         tags={"moekd.degenerate": "true",
                                               "moekd.degenerate_reason": "labels 100.0% of the validation functions safe"})
    version = uri.rsplit("/", 1)[1]
    capsys.readouterr()  # the logging's progress bars
    args = ["registry", "promote", "--name", NAME, "--version", version, "--alias", "useless",
            f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}", "registry.gates.max_f1_drop=null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "degenerate" in err and "100.0%" in err
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "useless")
    assert main([*args, "--force"]) == 0
    assert client.get_model_version_by_alias(NAME, "useless").version == version
    n, record = promotion_records(client.get_model_version(NAME, version).tags)[-1]
    assert (record["result"], record["forced"]) == ("promoted", True) and "degenerate" in record["failed_gates"][0]


@pytest.mark.parametrize("refuse, expect", [
    # Bob is logged in with the default READ: he reads the registry, the record of his promotion (a version tag)
    # is refused.
    ({"model-versions/set-tag": 403}, ["lets user 'bob' in but refused model-versions/set-tag (403)", "EDIT"]),
    ({"experiments/search": 403}, ["lets user 'bob' in but refused experiments/search (403)", "READ"]),
    ({"": 401}, ["refused the login of user 'bob' (401)", "MLFLOW_TRACKING_PASSWORD"]),
])
def test_login_app_refusal_is_one_line(refuse, expect, monkeypatch, capsys):
    """A basic-auth server that refuses a request (401: no or a wrong login; 403: logged in, not permitted), at
    moekd's first read or at a later write, gives one line naming what was refused and the fix, not a REST
    traceback. A stand-in for the login app (tests/test_team_server.py runs the real one): it answers what a READ
    user may do and refuses the rest as MLflow's basic-auth app does (plain-text body)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    version = {"name": NAME, "version": "1", "creation_timestamp": 1, "current_stage": "None", "status": "READY",
               "source": "models:/m-1", "tags": []}
    answers = {"experiments/search": {"experiments": []}, "model-versions/get": {"model_version": version},
               "registered-models/get": {"registered_model": {"name": NAME}}}  # (no alias: a 404 below)

    class LoginApp(BaseHTTPRequestHandler):
        def do_GET(self):
            endpoint = self.path.split("?")[0].removeprefix("/api/2.0/mlflow/")
            status = next((s for e, s in refuse.items() if endpoint.startswith(e)), 200)
            if self.path == "/health":
                status = 200
            elif status == 200 and endpoint not in answers:
                status = 404
            body = (b"OK" if self.path == "/health" else json.dumps(answers.get(endpoint, {})).encode()) \
                if status == 200 else {401: b"You are not authenticated.", 403: b"Permission denied",
                                       404: b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}'}[status]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), LoginApp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://{LOOPBACK}:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bobs-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    old = mlflow.get_tracking_uri()
    try:
        code = main(["registry", "promote", "--name", NAME, "--version", "1", f"mlflow.tracking_uri={uri}"])
    finally:
        mlflow.set_tracking_uri(old)
        server.shutdown()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"moekd: error: MLflow tracking server {uri} "), err
    for text in expect:
        assert text in err, err
    assert "bobs-password" not in err
