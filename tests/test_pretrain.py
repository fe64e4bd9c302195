"""Masked-LM pretraining (`moekd pretrain`): dynamic masking, the corpus (extra code, never a validation or test
function), and a tiny real run through Ray Train + DeepSpeed ZeRO-2 on 2 workers and a sqlite MLflow store that
learns the synthetic code's regularities, is reused by digest, and is what a `source: pretrain` expert starts from."""

import json

import mlflow
import numpy as np
import pytest
import torch

from moekd_ray.cli import main
from moekd_ray.config import load_config
from moekd_ray.errors import ConfigError
from moekd_ray.stages.pretrain import (IGNORE, MaskedFunctions, build_corpus, encoder_folder, mlm_loss,
                                       predicted_logits)
from moekd_ray.tokenization import SPECIALS
from synthetic import write_dataset

ENCODER = {"vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "max_length": 64}


def test_masking_is_dynamic_seeded_and_spares_special_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(len(SPECIALS), 300, (50, 40))
    ids[:, 0], ids[:, 30], ids[:, 31:] = 0, 2, 1  # <s> ... </s> then padding
    mask = (ids != 1).astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": mask}
    first = [MaskedFunctions(arrays, 300, 0.15, seed=0, epoch=1)[i] for i in range(50)]
    again = [MaskedFunctions(arrays, 300, 0.15, seed=0, epoch=1)[i] for i in range(50)]
    later = [MaskedFunctions(arrays, 300, 0.15, seed=0, epoch=2)[i] for i in range(50)]
    labels = torch.stack([r["mlm_labels"] for r in first])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))  # seeded
    assert not torch.equal(labels, torch.stack([r["mlm_labels"] for r in later]))  # new masks each epoch
    predicted = labels != IGNORE
    assert not predicted[:, 0].any() and not predicted[:, 30:].any()  # never <s>, </s> or padding
    assert 0.10 < predicted[:, 1:30].float().mean() < 0.20
    assert torch.equal(labels[predicted], torch.as_tensor(ids)[predicted])  # the label is the original token
    shown = torch.stack([r["input_ids"] for r in first])[predicted]
    assert 0.7 < (shown == SPECIALS.index("<mask>")).float().mean() < 0.9
    none = {"mlm_labels": torch.full((2, 5), IGNORE)}
    assert float(mlm_loss(torch.zeros(0, 10), none)) == 0.0


def test_loss_at_predicted_positions_equals_transformers_masked_lm_loss():
    # The vocabulary head runs on the predicted tokens only: the loss must be the one over all positions.
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=40)).eval()
    ids = torch.randint(len(SPECIALS), 50, (3, 20))
    mask = torch.ones_like(ids)
    rows = MaskedFunctions({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, 50, 0.3, seed=0)
    batch = {k: torch.stack([rows[i][k] for i in range(3)]) for k in ("input_ids", "attention_mask", "mlm_labels")}
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["mlm_labels"]).loss
    ours = mlm_loss(predicted_logits(model, batch, "cpu"), batch)
    assert torch.allclose(ours, full, atol=1e-5)


def test_extra_corpus_never_holds_a_validation_or_test_function(tmp_path):
    data = {"train": {"func": ["int a(void) { return 1; }"]},
            "valid": {"func": ["int v(void) { return 2; }"]},
            "test": {"func": ["int t(int x) {\n  return x;\n}"]}}
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "lib.c").write_text("int t(int x) { return x; }\nint extra_one(void) { return 7; }\n")
    (tmp_path / "more.jsonl").write_text(json.dumps({"func": "int v(void)  {  return 2; }"}) + "\n"
                                         + json.dumps({"func": "int extra_two(void) { return 8; }"}) + "\n")
    cfg = load_config(None, [f"pretrain.extra_corpus={json.dumps([str(tmp_path / 'code'), str(tmp_path / 'more.jsonl')])}"])
    lines = []
    corpus = build_corpus(cfg, data, lines.append)
    assert corpus == ["int a(void) { return 1; }", "int extra_one(void) { return 7; }",
                      "int extra_two(void) { return 8; }"]
    assert lines == ["pretrain: extra corpus 4 functions from 2 files; dropped 2 equal to a validation or test function"]
    for bad, words in ((tmp_path / "missing", "neither a folder nor a .jsonl"), (tmp_path / "bad.jsonl", "not a JSON")):
        if bad.suffix:
            bad.write_text("{oops\n")
        cfg = load_config(None, [f"pretrain.extra_corpus={json.dumps([str(bad)])}"])
        with pytest.raises(ConfigError, match=words):
            build_corpus(cfg, data, lines.append)


def test_bad_pretrain_settings_are_one_line(tmp_path, capsys):
    for overrides, words in ((["pretrain.schedule.keep_best_by=auc"], ["pretrain.schedule.keep_best_by", "loss", "last"]),
                             (["pretrain.mask_prob=1.5"], ["pretrain.mask_prob"]),
                             ([f"experts.models={json.dumps([{'source': 'pretrain', 'max_length': 4096}, {'source': 'ngram'}])}"],
                              ["pretrain.arch.max_length"])):
        assert main(["validate", "jobs/quickstart.yaml", *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("moekd: error:") and all(w in err for w in words), err
    out = tmp_path / "runs"
    data = write_dataset(tmp_path / "data", n_train=20, n_eval=10)
    assert main(["pretrain", "jobs/quickstart.yaml", f"output_dir={out}", f"data.dir={data}",
                 f"pretrain.extra_corpus={json.dumps([str(tmp_path / 'nowhere')])}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pretrain.extra_corpus" in err and not out.exists()


@pytest.fixture(scope="module")
def pretrained(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    data = write_dataset(tmp / "data", n_train=400, n_eval=60)
    cfg = load_config(None, [
        "name=pretrain-test", f"output_dir={tmp / 'runs'}", f"data.dir={data}", f"pretrain.arch={json.dumps(ENCODER)}",
        "pretrain.schedule.epochs=8", "pretrain.schedule.lr=5e-3", "pretrain.schedule.batch_size=16",
        "pretrain.holdout=0.1", "pretrain.resources.num_workers=2", "pretrain.resources.cpus_per_worker=0.9",
        "ray.fault_injection=pretrain:30",  # rank 0 exits hard mid-epoch 3 (12 steps an epoch): Ray restarts it
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns.db'}",
        f"experts.models={json.dumps([{'source': 'pretrain'}, {'source': 'ngram', 'buckets': 1024}])}",
    ])
    from moekd_ray.stages.pretrain import pretrain_encoder

    lines = []
    return cfg, pretrain_encoder(cfg, lines.append), lines


def test_pretraining_learns_the_code_and_is_logged(pretrained):
    cfg, encoder, lines = pretrained
    assert encoder == encoder_folder(cfg) and (encoder / "model.safetensors").is_file()
    assert (encoder / "tokenizer.json").is_file() and not (encoder / "deepspeed").exists()
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                              "tags.`moekd.stage` = 'pretrain'")
    assert len(runs) == 1
    loss = [m.value for m in client.get_metric_history(runs[0].info.run_id, "val_mlm_loss")]
    accuracy = [m.value for m in client.get_metric_history(runs[0].info.run_id, "val_masked_accuracy")]
    assert len(loss) == 8 and loss[-1] < loss[0] - 1.0, loss  # the synthetic code is regular; measured 4.48 -> 3.02
    print("held-out masked-LM loss", loss, "masked-token accuracy", accuracy)
    assert accuracy[-1] > accuracy[0] + 0.1 and accuracy[-1] > 0.25, accuracy  # measured: 0.10 -> 0.31
    # the throughput is the run's own tokens over its own time: 8 epochs of the 90% of rows not held out
    assert 100 < runs[0].data.metrics["tokens_per_s"] < 1e7, runs[0].data.metrics
    # The killed worker's group restarted from the checkpoint of epoch 2 and finished the 8 epochs.
    assert (encoder.parent / f"{encoder.parent.name}.fault_injected").read_text() == "killed at step 30"
    assert runs[0].data.tags["moekd.resumed_from"] == "2"
    assert any("held out" in line for line in lines)


def test_second_pretrain_reuses_the_encoder_and_experts_start_from_it(pretrained):
    from transformers import RobertaForMaskedLM

    from moekd_ray.config import PretrainedConfig
    from moekd_ray.models import build_model
    from moekd_ray.stages.pretrain import pretrain_encoder, with_pretrained_encoder

    cfg, encoder, _ = pretrained
    stamp = (encoder / "model.safetensors").stat().st_mtime_ns
    lines = []
    assert pretrain_encoder(cfg, lines.append) == encoder
    assert len(lines) == 1 and lines[0].startswith("pretrain: reusing") and str(encoder) in lines[0]
    assert (encoder / "model.safetensors").stat().st_mtime_ns == stamp
    resolved = with_pretrained_encoder(cfg, lines.append)
    spec = resolved.experts.specs()[0]
    assert isinstance(spec, PretrainedConfig) and spec.name_or_path == str(encoder.resolve())
    assert spec.max_length == ENCODER["max_length"] and resolved.experts.specs()[1] == cfg.experts.specs()[1]
    from moekd_ray.tokenization import load_tokenizer

    code = "int f(char *buf) { strcpy(buf, src); return 0; }"
    tok = load_tokenizer(spec.name_or_path)  # what make_tokenizers gives a pretrained expert
    ids = tok(code)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 5 and max(ids) < len(tok)
    expert = build_model(spec, seed=1)
    mlm = RobertaForMaskedLM.from_pretrained(str(encoder), use_safetensors=True)
    assert torch.equal(expert.roberta.embeddings.word_embeddings.weight, mlm.roberta.embeddings.word_embeddings.weight)
    assert torch.equal(expert.roberta.encoder.layer[0].output.dense.weight, mlm.roberta.encoder.layer[0].output.dense.weight)
