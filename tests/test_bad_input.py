"""The bad-input corpus: each kind of bad input to `moekd` gives exit code 2 and one `moekd: error:` line naming
the input, the problem and the fix, with no traceback, and leaves what an earlier run wrote untouched."""

import hashlib
import json
from pathlib import Path

import pytest

from moekd_ray.cli import main

GOOD = json.dumps({"func": "int f(int a) { return a + 1; }", "target": 0, "project": "p"})
TINY = '{"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "max_length": 32}'


def data_dir(tmp_path: Path, train: bytes | None) -> Path:
    """valid/test fine; train.jsonl holds `train` (None: a folder where the file should be)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("valid", "test"):
        (folder / f"{split}.jsonl").write_text(GOOD + "\n")
    if train is None:
        (folder / "train.jsonl").mkdir()
    else:
        (folder / "train.jsonl").write_bytes(train)
    return folder


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode()


DATA_CASES = {
    "malformed JSON line": (lines(GOOD, '{"func": "int x;", "target": 0'), "malformed JSON"),
    "missing field": (lines(GOOD, '{"func": "int x;"}'), "missing field 'target'"),
    "label 2": (lines(GOOD, '{"func": "int x;", "target": 2}'), "'target' must be 0 or 1"),
    "label yes": (lines(GOOD, '{"func": "int x;", "target": "yes"}'), "'target' must be 0 or 1"),
    "empty function": (lines(GOOD, '{"func": "", "target": 1}'), "'func' is empty"),
    "invalid UTF-8": (lines(GOOD) + b'{"func": "int \xff x;", "target": 0}\n', "not valid UTF-8"),
    "BOM inside the file": (lines(GOOD, "\ufeff" + GOOD), "malformed JSON"),
    "empty file": (b"", "no rows"),
    "directory instead of file": (None, "is a folder"),
}

CONFIG_CASES = {
    "unknown config key": (["experts.modle={}"], "experts.modle"),
    "negative T": (["distill.temperature=-1"], "distill.temperature"),
    "K = 0": (["experts.k=0"], "experts.k"),
    "top-k > K": (["experts.k=2", "router.top_k=3"], "top_k"),
    "unknown preset": (["distill.student=7mb"], "unknown student preset"),
    "override without =": (["experts.k"], "key=value"),
    "missing data folder": (["data.dir=/nonexistent/devign"], "data.dir=/nonexistent/devign"),
    "unreachable tracking server": (["mlflow.tracking_uri=http://127.0.0.1:9"], "unreachable"),
    "warm-up out of range": (["experts.schedule.warmup_ratio=0.9"], "experts.schedule.warmup_ratio"),
    "unknown decay": (["distill.schedule.decay=step"], "distill.schedule.decay"),
    "patience without a metric": (["distill.schedule.patience=2", "distill.schedule.keep_best_by=last"],
                                  "patience needs a validation metric"),
    "threshold out of range": (["eval.threshold=1.5"], "eval.threshold"),
    "guard out of range": (["eval.degenerate_share=0.3"], "eval.degenerate_share"),
    "unknown expert family": (["experts.models=[{source: lstm}, {source: ngram}]"], "experts.models.0"),
}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path):
    """What an earlier run left: a run folder with a checkpoint and a config; must not change."""
    runs = tmp_path / "runs"
    (runs / "old-run").mkdir(parents=True)
    (runs / "old-run" / "model.safetensors").write_bytes(b"weights")
    (runs / "old-run" / "config.yaml").write_text("name: old\n")
    return runs


def check(capsys, code: int, words: list[str]) -> str:
    """Exit code 2 and one error line, the last thing printed (progress bars and Ray's start-up notice may come
    before it); no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if "moekd: error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert all(w in errors[0] for w in words), err
    return errors[0]


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data(kind, tmp_path, earlier_run, capsys):
    content, expect = DATA_CASES[kind]
    folder = data_dir(tmp_path, content)
    before = snapshot(earlier_run)
    code = main(["run", "jobs/quickstart.yaml", f"data.dir={folder}", f"output_dir={earlier_run}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"])
    check(capsys, code, [expect, "train.jsonl"])
    assert snapshot(earlier_run) == before and not any(earlier_run.glob("quickstart-*"))
    assert not (tmp_path / "mlruns.db").exists()  # not even the tracking store: every row is checked first


@pytest.mark.parametrize("kind", list(CONFIG_CASES))
def test_bad_config(kind, tmp_path, earlier_run, capsys):
    overrides, expect = CONFIG_CASES[kind]
    before = snapshot(earlier_run)
    code = main(["run", "jobs/quickstart.yaml", f"output_dir={earlier_run}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides])
    check(capsys, code, [expect])
    assert snapshot(earlier_run) == before and not any(earlier_run.glob("quickstart-*"))


def test_yaml_syntax_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: {k: 2\n")
    check(capsys, main(["validate", str(bad)]), ["not valid YAML", str(bad)])
    check(capsys, main(["validate", str(tmp_path / "nope.yaml")]), ["not found"])


def test_model_that_cannot_be_loaded_offline(tmp_path, earlier_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(earlier_run)
    code = main(["run", "jobs/quickstart.yaml", f"output_dir={earlier_run}", "data.train_rows=50",
                 "data.eval_rows=20", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
                 'experts.models=[{"source": "pretrained", "name_or_path": "microsoft/codebert-base"}, '
                 '{"source": "pretrained", "name_or_path": "microsoft/codebert-base"}]'])
    check(capsys, code, ["microsoft/codebert-base", "cannot be loaded"])
    assert snapshot(earlier_run) == before and not any(earlier_run.glob("quickstart-*"))
    assert not (tmp_path / "mlruns.db").exists()


def test_checkpoint_of_another_architecture(tmp_path, earlier_run, capsys):
    import transformers

    from moekd_ray.config import ArchConfig
    from moekd_ray.models import build_model
    from moekd_ray.tokenization import train_bpe

    small = json.loads(TINY)
    folder = tmp_path / "model"
    build_model(ArchConfig(**small), 0).save_pretrained(str(folder))
    build_model(ArchConfig(**{**small, "hidden_size": 64}), 0).config.save_pretrained(str(folder))  # wrong config
    train_bpe(["int f(int a) { return a; }"] * 20, 300, 32).save_pretrained(str(folder))
    # transformers' own report of the mismatch goes to the stderr its handler captured in an earlier test.
    transformers.logging.set_verbosity_error()
    capsys.readouterr()
    before = snapshot(earlier_run), snapshot(folder)
    code = main(["attack", "--model", str(folder), "--n", "2", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                 "attack.workers=1", f"output_dir={earlier_run}"])
    check(capsys, code, [str(folder), "cannot be loaded"])
    assert (snapshot(earlier_run), snapshot(folder)) == before


def test_pretrained_weights_that_are_not_safetensors(tmp_path, earlier_run, capsys):
    """A pickled pytorch_model.bin could run code when unpickled: only safetensors weights are loaded."""
    import torch

    from moekd_ray.config import ArchConfig
    from moekd_ray.models import build_model
    from moekd_ray.tokenization import train_bpe

    folder = tmp_path / "model"
    model = build_model(ArchConfig(**json.loads(TINY)), 0)
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what older checkpoints on the hub hold
    train_bpe(["int f(int a) { return a; }"] * 20, 300, 32).save_pretrained(str(folder))
    before = snapshot(earlier_run), snapshot(folder)
    code = main(["run", "jobs/quickstart.yaml", f"output_dir={earlier_run}", "data.train_rows=50", "data.eval_rows=20",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
                 f'experts.models=[{{"source": "pretrained", "name_or_path": "{folder}"}}]', "experts.k=1"])
    check(capsys, code, [str(folder), "safetensors"])
    assert (snapshot(earlier_run), snapshot(folder)) == before and not any(earlier_run.glob("quickstart-*"))


CLI_CASES = {
    "unknown subcommand": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "unknown flag": (["run", "jobs/quickstart.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    "bad value for a typed flag": (["attack", "--model", "x", "--n", "abc"], "argument --n: invalid int value: 'abc'"),
}


@pytest.mark.parametrize("kind", list(CLI_CASES))
def test_bad_command_line(kind):
    """The installed entry point's own process: argparse's usage block is not printed, only the one line."""
    import subprocess
    import sys

    args, expect = CLI_CASES[kind]
    done = subprocess.run([sys.executable, "-m", "moekd_ray.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("moekd: error: "), done.stderr
    assert expect in done.stderr and "--help" in done.stderr


@pytest.mark.parametrize("stage, worker, wrong", [
    ("experts", "expert_worker", {"schedule": {"epochs": 0}}),
    ("distill", "distill_worker", {"temperature": -1}),
    ("pretrain", "pretrain_worker", {"mask_prob": 1.5}),
])
def test_a_worker_validates_the_config_it_receives(stage, worker, wrong):
    """A Ray Train worker checks its job before any training: a wrong value fails naming the field (here called
    directly: validation is the worker's first step, before it touches Ray)."""
    import importlib

    from pydantic import ValidationError

    from moekd_ray.config import ArchConfig, Schedule

    module = importlib.import_module(f"moekd_ray.stages.{stage}")
    arch = ArchConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, max_length=32)
    job = {"name": "x", "seed": 0, "threads": 1, "eval_batch_size": 8, "train": None, "valid": None,
           "fault_marker": "/tmp/x", "schedule": Schedule().model_dump()}
    job |= {"experts": {"model": arch.model_dump()},
            "distill": {"arch": arch.model_dump(), "ds_config": {}, "cpu_shm_comm": False, "temperature": 2.0,
                        "alpha": 0.0, "task": "student"},
            "pretrain": {"arch": arch.model_dump(), "ds_config": {}, "cpu_shm_comm": False, "vocab_size": 100,
                         "mask_prob": 0.15}}[stage]
    field = next(iter(wrong))
    with pytest.raises(ValidationError, match=field):
        getattr(module, worker)({**job, **wrong})
    with pytest.raises(ValidationError, match="temprature"):  # an option this version does not know
        getattr(module, worker)({**job, "temprature": 2.0})
