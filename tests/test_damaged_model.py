"""A registered student whose files were damaged in the artifact store after registration (weights truncated, a
byte of the tokenizer flipped, a file deleted or added, the manifest itself lost) is refused wherever it is loaded:
mlflow.pyfunc.load_model, `moekd predict`, the attacks' victim and `mlflow models serve`, each with one line naming
the file. An untouched model, and one logged before checksums were recorded, load and predict as before.
Real MLflow sqlite store; a tiny student logged with the pipeline's own log_student_model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from moekd_ray.checksums import DamagedModel
from moekd_ray.cli import main
from servers import LOOPBACK, free_port, registered_tiny_student, start_group, wait_http

NAME = "damaged-test"
FUNCS = ["int f(char *buf, int n) { int k = 3; if (n > k) memcpy(buf, \"x\", n); return k; }",
         "void g(void) { free(p); free(p); }"]


@pytest.fixture
def student(tmp_path, one_thread, monkeypatch):
    """A tiny student registered as damaged-test v1 in a sqlite store of its own; `files` is its artifact folder in
    the store (what a damaged store would damage)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOEKD_DEBUG", raising=False)
    with registered_tiny_student(tmp_path, NAME, head_scale=1e4) as (uri, tracking_uri, model_dir, tok_dir):
        [files] = (tmp_path / "artifacts").glob("models/*/artifacts/artifacts")
        yield SimpleNamespace(uri=uri, tracking_uri=tracking_uri, files=files, model_dir=model_dir, tok_dir=tok_dir)


def truncate_weights(files: Path) -> Path:
    path = files / "student" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def flip_tokenizer_byte(files: Path) -> Path:
    """One bit of the id of the vocabulary entry `buf` (267 -> 266): the file stays valid and loads, but `buf` is
    then read as another token (test_a_flipped_tokenizer_byte_alone_goes_unnoticed)."""
    path = files / "tokenizer" / "tokenizer.json"
    text = path.read_bytes()
    at = text.index(b",", text.index(b'"buf": ')) - 1  # the last digit of its id
    path.write_bytes(text[:at] + bytes([text[at] ^ 1]) + text[at + 1:])
    return path


def delete_tokenizer_config(files: Path) -> Path:
    path = files / "tokenizer" / "tokenizer_config.json"
    path.unlink()
    return path


def add_tokenizer_file(files: Path) -> Path:
    """A file that was not there at registration (added tokens change what the tokenizer produces)."""
    path = files / "tokenizer" / "added_tokens.json"
    path.write_text(json.dumps({"strcpy": 299}))
    return path


def lose_manifest(files: Path) -> Path:
    path = files / "checksums.json"
    path.write_text("")
    return path


DAMAGES = [truncate_weights, flip_tokenizer_byte, delete_tokenizer_config, add_tokenizer_file, lose_manifest]


def one_line_naming(message: str, damaged: Path, files: Path) -> None:
    """The refusal: one line naming the damaged file (by its path inside the model: artifacts/...) and the fix."""
    assert len(message.strip().splitlines()) == 1, message
    assert f"/artifacts/{damaged.relative_to(files).as_posix()} " in message, message
    assert "re-register the model from its run" in message, message


def test_untouched_model_loads_and_predicts_as_before(student):
    """The manifest holds every file of the student and tokenizer folders, and verifying it changes nothing: the
    registered model gives exactly the scorer's probabilities for the folders it was logged from."""
    from moekd_ray.models import load_model
    from moekd_ray.scoring import Scorer
    from moekd_ray.tokenization import load_tokenizer

    recorded = json.loads((student.files / "checksums.json").read_text())["files"]
    expected_keys = {f"model/{p.name}" for p in student.model_dir.iterdir()} | \
                    {f"tokenizer/{p.name}" for p in student.tok_dir.iterdir()} | {"config"}
    assert set(recorded) == expected_keys
    served = mlflow.pyfunc.load_model(student.uri).predict(FUNCS)["probability"].to_numpy()
    direct = Scorer(load_model(student.model_dir), load_tokenizer(student.tok_dir))(FUNCS)
    assert np.array_equal(served, direct.astype(np.float64))


def test_a_flipped_tokenizer_byte_alone_goes_unnoticed(student):
    """Why the checksums: the altered tokenizer loads without complaint and reads `buf` as another token."""
    from transformers import AutoTokenizer

    before = AutoTokenizer.from_pretrained(str(student.files / "tokenizer"))("char *buf")["input_ids"]
    flip_tokenizer_byte(student.files)
    after = AutoTokenizer.from_pretrained(str(student.files / "tokenizer"))("char *buf")["input_ids"]
    assert len(after) == len(before) and after != before


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_damaged_model_is_refused_naming_the_file(student, damage):
    damaged = damage(student.files)
    with pytest.raises(DamagedModel) as refused:
        mlflow.pyfunc.load_model(student.uri)
    one_line_naming(str(refused.value), damaged, student.files)


@pytest.mark.parametrize("damage", [truncate_weights, flip_tokenizer_byte], ids=lambda f: f.__name__)
def test_predict_and_attack_refuse_a_damaged_model(student, damage, tmp_path, capsys):
    """`moekd predict` exits 2 with one line naming the model and the file, before scoring anything; the attacks'
    victim (a registered model downloaded, then loaded) is refused the same way."""
    from moekd_ray.attacks.victim import load_victim, resolve_victim

    damaged = damage(student.files)
    (tmp_path / "a.c").write_text(FUNCS[0] + "\n")
    capsys.readouterr()
    code = main(["predict", str(tmp_path / "a.c"), "--model", student.uri, "--tracking-uri", student.tracking_uri])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    one_line_naming(err, damaged, student.files)
    assert err.startswith(f"moekd: error: --model {student.uri}: model file ")
    with pytest.raises(DamagedModel) as refused:
        load_victim(resolve_victim(student.uri, tmp_path / "victim"))
    one_line_naming(str(refused.value), damaged, student.files)


@pytest.mark.slow  # starts `mlflow models serve`
def test_mlflow_models_serve_refuses_a_damaged_model(student, tmp_path):
    """Nothing is served: the scoring server exits (it never answers /ping), its log naming the file."""
    damaged = truncate_weights(student.files)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_group(["mlflow", "models", "serve", "-m", student.uri, "--env-manager", "local", "-h", LOOPBACK,
                        "-p", str(port)], log, MLFLOW_TRACKING_URI=student.tracking_uri)
    try:
        with pytest.raises(AssertionError, match="no answer"):
            wait_http(f"http://{LOOPBACK}:{port}/ping", proc, log, timeout_s=300)
        assert proc.wait(timeout=30) != 0
    finally:
        from servers import end_group

        end_group(proc)
    refusals = [line for line in log.read_text().splitlines() if "DamagedModel: " in line]
    assert refusals, log.read_text()[-3000:]
    one_line_naming(refusals[0].split("DamagedModel: ", 1)[1], damaged, student.files)


def test_model_logged_without_checksums_still_loads(student, tmp_path):
    """A student logged before checksums were recorded (no `checksums` artifact) loads unverified and predicts."""
    from moekd_ray.tracking import CHECKSUMS_CODE, PYFUNC_CODE, SCORING_CODE, _requirements

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=student.uri, dst_path=str(tmp_path / "local")))
    artifacts = {name: str(local / "artifacts" / sub) for name, sub in
                 (("model", "student"), ("tokenizer", "tokenizer"), ("config", "config.yaml"))}
    old = tmp_path / "old"
    mlflow.pyfunc.save_model(str(old), python_model=str(PYFUNC_CODE), artifacts=artifacts,
                             code_paths=[str(SCORING_CODE), str(CHECKSUMS_CODE)],
                             pip_requirements=_requirements())  # as logged: inferring them costs ~2 min
    assert set(mlflow.models.Model.load(str(old)).flavors["python_function"]["artifacts"]) == set(artifacts)
    expected = mlflow.pyfunc.load_model(student.uri).predict(FUNCS)["probability"].to_numpy()
    assert np.array_equal(mlflow.pyfunc.load_model(str(old)).predict(FUNCS)["probability"].to_numpy(), expected)
