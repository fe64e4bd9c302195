"""The int8 student (#26 item 6): its weight format, its loader everywhere a student is loaded, its own threshold, and
`moekd quantize` on a real pipeline run (registered, scored through the pyfunc, `moekd predict` and an attack)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from servers import save_tiny_student


def test_int8_weights_round_trip_within_half_a_step_per_row():
    from moekd_ray.int8 import SCALE, dequantize_weights, quantize_weights

    torch.manual_seed(0)
    state = {"emb": torch.randn(50, 16) * torch.linspace(0.01, 3, 50)[:, None], "bias": torch.randn(16)}
    stored = quantize_weights(state)
    assert stored["emb"].dtype == torch.int8 and int(stored["emb"].abs().max()) == 127  # each row's max uses the range
    assert torch.equal(stored["bias"], state["bias"])  # vectors stay float32
    back = dequantize_weights(stored)
    assert set(back) == set(state)
    step = stored["emb" + SCALE][:, None]
    assert bool(((back["emb"] - state["emb"]).abs() <= step / 2 + 1e-7).all())
    assert not torch.equal(back["emb"], state["emb"])  # it is a rounding, not a copy


def test_int8_student_is_smaller_runs_int8_and_scores_like_the_float_one(tmp_path):
    from moekd_ray.config import ArchConfig
    from moekd_ray.int8 import save_int8
    from moekd_ray.models import build_model, load_model, save_float32

    # the default job's student shape: embeddings hold most of the weights
    arch = ArchConfig(vocab_size=2000, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128, max_length=128)
    model = build_model(arch, 0).eval()
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(200)  # spread the scores (random init: all near 0.5)
    save_float32(model, tmp_path / "float", model.state_dict())
    save_int8(model, tmp_path / "int8")
    float_mb = (tmp_path / "float" / "model.safetensors").stat().st_size
    int8_mb = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert float_mb / int8_mb >= 3, (float_mb, int8_mb)
    int8 = load_model(tmp_path / "int8")
    ids = torch.randint(3, 2000, (32, 128))
    with torch.no_grad():
        p_float = torch.softmax(model(input_ids=ids).logits, -1)[:, 1]
        p_int8 = torch.softmax(int8(input_ids=ids).logits, -1)[:, 1]
        # a function's score is its own: alone or beside other functions, the same (torch's dynamic quantisation
        # scaled activations per batch, so a score moved with its batch mates)
        alone = torch.softmax(int8(input_ids=ids[:1]).logits, -1)[0, 1]
        beside = torch.softmax(int8(input_ids=ids).logits, -1)[0, 1]
    assert float(p_float.std()) > 0.05  # spread, so the closeness below says something
    assert float((p_float - p_int8).abs().max()) < 0.05
    assert not torch.equal(p_float, p_int8)
    assert abs(float(alone) - float(beside)) < 1e-6


def test_int8_threshold_is_chosen_on_its_own_scores_and_moved_exactly_into_its_bias(tmp_path):
    from moekd_ray.config import load_config
    from moekd_ray.models import load_model
    from moekd_ray.recipes.quantize import quantize_student
    from moekd_ray.tokenization import encode, load_tokenizer
    from moekd_ray.train_loop import predict_logits, probs1

    model_dir, tok_dir = save_tiny_student(tmp_path, head_scale=300)
    code = [f"int g{i}(int *p, int n) {{ int s = {i}; while (n--) s += p[n] * {i % 7}; return s; }}" for i in range(64)]
    enc = encode(load_tokenizer(tok_dir), code, 64)
    student = load_model(model_dir)
    labels = np.arange(64) % 2
    # first the int8 model's own scores at 0.5, to fix a threshold that splits them
    cfg = load_config(None, ["eval.threshold=0.5"])
    quantize_student(cfg, student, tmp_path / "probe", enc, labels)
    before = probs1(predict_logits(load_model(tmp_path / "probe"), enc, 16))
    cut = float(np.quantile(before, 0.3))
    decision = quantize_student(load_config(None, [f"eval.threshold={cut}"]), student, tmp_path / "int8", enc, labels)
    after = probs1(predict_logits(load_model(tmp_path / "int8"), enc, 16))
    assert decision["threshold"] == pytest.approx(cut)
    assert 0 < (before >= cut).mean() < 1
    np.testing.assert_array_equal(after >= 0.5, before >= cut)  # the cut now sits at 0.5
    assert json.loads((tmp_path / "int8" / "moekd_threshold.json").read_text())["threshold"] == pytest.approx(cut)
    assert student.classifier.out_proj.bias.tolist() == load_model(model_dir).classifier.out_proj.bias.tolist()


def test_damaged_int8_folder_is_one_line(tmp_path):
    from moekd_ray.config import ArchConfig
    from moekd_ray.int8 import save_int8
    from moekd_ray.models import build_model, load_model

    arch = ArchConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=64)
    save_int8(build_model(arch, 0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "intermediate_size": 96}))
    with pytest.raises(ValueError) as err:
        load_model(tmp_path)
    assert len(str(err.value).splitlines()) == 1 and "moekd quantize" in str(err.value)


@pytest.mark.parametrize("case, words", [("nothing", "neither a run folder nor an MLflow run id"),
                                         ("unfinished", "--resume"), ("ngram", "cannot be quantised to int8")])
def test_bad_quantize_source_is_one_line(tmp_path, capsys, case, words):
    from moekd_ray.cli import main
    from moekd_ray.config import dump_yaml, load_config

    from moekd_ray import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.connect(uri, "moekd")  # the store made first: MLflow's lines about creating it are not the command's
    capsys.readouterr()
    run = tmp_path / "run"
    if case != "nothing":  # a run folder whose run stopped before its student was saved
        run.mkdir()
        (run / "config.yaml").write_text(dump_yaml(load_config(None).model_dump(mode="json")))
    if case == "ngram":  # ... or whose student is an n-gram bag
        from moekd_ray.config import NgramConfig
        from moekd_ray.models import build_model

        build_model(NgramConfig(buckets=64, dim=8), 0).save_pretrained(run / "student")
    assert main(["quantize", str(run), f"mlflow.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekd: error:") and words in err, err


def test_quantize_registers_an_int8_student_the_pyfunc_predict_and_attacks_use(tiny_pipeline, tmp_path):
    import mlflow

    from moekd_ray.data import load_devign
    from moekd_ray.models import load_model
    from moekd_ray.recipes.attack import run_attack
    from moekd_ray.recipes.quantize import run_quantize
    from moekd_ray.scoring import Scorer
    from moekd_ray.tokenization import load_tokenizer

    cfg, pipeline = tiny_pipeline
    name = "tiny-int8"  # not the run's registered name: the other tests' versions stay as they are
    lines = []
    result = run_quantize(str(pipeline.run_dir), [f"mlflow.registered_model={name}"], log=lines.append)
    float_row, int8_row = result.rows
    assert int8_row["disk_mb"] * 2 < float_row["disk_mb"] and int8_row["params"] == float_row["params"]
    assert result.model_uri == f"models:/{name}/1" and any("student-int8: test acc" in x for x in lines)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    tags = client.get_model_version(name, "1").tags
    assert tags["moekd.quantized"] == "int8" and "moekd.threshold" in tags
    assert float(tags["metric.test_accuracy"]) == pytest.approx(int8_row["test_accuracy"])

    # the pyfunc serves the int8 model: its scores are the folder's, through the one Scorer
    test = load_devign(cfg.data, cfg.seed)["test"]
    funcs = list(test["func"][:16])
    served = mlflow.pyfunc.load_model(result.model_uri)
    expected = Scorer(load_model(result.folder), load_tokenizer(pipeline.run_dir / "tokenizers" / "student"))(funcs)
    np.testing.assert_allclose(served.predict(funcs)["probability"].to_numpy(), expected, atol=1e-6)
    model = served.unwrap_python_model().scorer.model  # the int8 weights, not the float student's
    stored = load_model(pipeline.run_dir / "student")
    assert not torch.equal(model.classifier.dense.weight, stored.classifier.dense.weight)

    # `moekd predict` with that version, as a user types it
    func = "int copy(char *s) { char b[8]; strcpy(b, s); return 0; }"
    (tmp_path / "scan.c").write_text(func + "\n")
    done = subprocess.run([sys.executable, "-m", "moekd_ray.cli", "predict", "scan.c", "--model", result.model_uri,
                           "--tracking-uri", cfg.mlflow.tracking_uri, "--format", "json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout)
    assert row["probability"] == pytest.approx(float(served.predict([func])["probability"][0]), abs=1e-6)

    # an attack by its URI queries the int8 model: its clean scores are the int8 folder's
    report = run_attack(cfg.with_values({"attack.n": 4, "attack.query_budget": 20, "attack.workers": 1,
                                         "attack.method": "wir-random"}), result.model_uri, log=lambda *_: None)
    attacked = [test["func"][r["index"]] for r in report.rows]
    p_true = [p if r["label"] == 1 else 1 - p for r, p in zip(report.rows, expected_of(result, pipeline, attacked))]
    assert [r["p_true"] for r in report.rows] == pytest.approx(p_true, abs=1e-5)


def expected_of(result, pipeline, funcs):
    from moekd_ray.models import load_model
    from moekd_ray.scoring import Scorer
    from moekd_ray.tokenization import load_tokenizer

    return Scorer(load_model(result.folder), load_tokenizer(pipeline.run_dir / "tokenizers" / "student"))(funcs)
