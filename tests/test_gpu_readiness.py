"""What the GPU jobs rely on, checked on CPU (issue 30): a bf16 student is saved and used as float32, every scorer
reads the length its model was trained on, ... Each test fails on the code before the fix it names."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moekd_ray.config import ArchConfig
from moekd_ray.models import build_model, load_model, num_params, shift_decision, size_mb
from moekd_ray.scoring import TRAINED_LENGTH, max_input_length

TINY = ArchConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=32)

# A DeepSpeed bf16 engine in one gloo process (DeepSpeed's bf16 runs on CPU), a few steps, then the distill stage's
# own gathered_state + save_deepspeed per ZeRO stage. A subprocess: the process group and DeepSpeed's globals stay
# out of the test process.
BF16_DISTILL = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from moekd_ray.config import ArchConfig, DistillConfig, Schedule
    from moekd_ray.models import build_model
    from moekd_ray.stages import distill
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
    distill._skip_cpu_shm_build()
    import deepspeed
    arch = ArchConfig.model_validate_json(sys.argv[3])
    for stage in (0, 2, 3):
        cfg = DistillConfig(bf16=True, zero_stage=stage, schedule=Schedule(batch_size=4, lr=1e-2),
                            resources={"num_workers": 1})
        model = build_model(arch, 0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=distill.deepspeed_config(cfg))
        assert next(engine.module.parameters()).dtype == torch.bfloat16  # it really trains in bf16
        for _ in range(3):
            ids = torch.randint(3, arch.vocab_size, (4, arch.max_length))
            logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            engine.backward(torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 0, 1])))
            engine.step()
        distill.save_deepspeed(engine, f"{sys.argv[2]}/zero{stage}", 0, distill.gathered_state(engine, 0))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bf16_distillation_saves_the_float32_student(tmp_path):
    """Item 1: the student of a bf16 DeepSpeed run (ZeRO 0, 2, 3) is saved as float32 (the optimizer's master
    weights, not bf16 values widened), recorded as float32, loaded as float32, with its full size and an exact
    threshold fold. Before: bf16 weights and `dtype: bfloat16`, loaded as bf16, half the size."""
    port = free_port()
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # what a launcher (Ray Train here) sets
    done = subprocess.run([sys.executable, "-c", BF16_DISTILL, str(port), str(tmp_path), TINY.model_dump_json()],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in (0, 2, 3):
        folder = tmp_path / f"zero{stage}"
        assert json.loads((folder / "config.json").read_text())["dtype"] == "float32", stage
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        floats = [w for w in weights.values() if w.is_floating_point()]
        assert {w.dtype for w in floats} == {torch.float32}, stage
        # master weights after lr 1e-2 steps are off bf16's grid; bf16 values widened to fp32 would all be on it
        assert any((w != w.to(torch.bfloat16).float()).any() for w in floats), stage
        model = load_model(folder)
        assert next(model.parameters()).dtype == torch.float32
        assert size_mb(model) == pytest.approx(num_params(model) * 4 / 1e6)
        assert_threshold_folds_exactly(model, 0.37)


def assert_threshold_folds_exactly(model, threshold: float) -> None:
    """P >= 0.5 after models.shift_decision is P >= threshold before, function by function."""
    ids = torch.randint(3, model.config.vocab_size, (64, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = torch.softmax(model.eval()(input_ids=ids).logits, -1)[:, 1]
        shift_decision(model, threshold)
        after = torch.softmax(model(input_ids=ids).logits, -1)[:, 1]
    clear = (before - threshold).abs() > 1e-6  # a tie within float rounding may fall either way
    assert torch.equal((after >= 0.5)[clear], (before >= threshold)[clear])


def test_a_folder_saved_in_bf16_loads_as_float32(tmp_path):
    """Item 1: a folder whose config.json says bfloat16 (a student saved before the fix) is read as float32, so its
    size, threshold and scores are the float32 model's. Before: transformers 5 loaded it in bf16."""
    model = build_model(TINY, 0).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    assert size_mb(loaded) == pytest.approx(num_params(loaded) * 4 / 1e6)


@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_needs_no_op_compiled_at_run_time(use_gpu):
    """Item 2: the student's (and pretraining's) optimizer is torch's AdamW on GPU too. Before: FusedAdam on GPU,
    compiled on first use (nvcc, ninja, CUDA_HOME), which a DS_BUILD_OPS=0 install lacks."""
    from moekd_ray.config import DistillConfig, PretrainConfig
    from moekd_ray.stages.distill import deepspeed_config

    for cfg in (DistillConfig(resources={"use_gpu": use_gpu}), PretrainConfig(resources={"use_gpu": use_gpu})):
        assert deepspeed_config(cfg)["optimizer"]["params"]["torch_adam"] is True


def hub_like_checkpoint(folder: Path, max_length: int) -> Path:
    """A RoBERTa checkpoint with positions for `max_length` tokens and no length of a moekd run (as a hub one)."""
    build_model(TINY.model_copy(update={"max_length": max_length}), 0).save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    del config[TRAINED_LENGTH]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_every_scorer_reads_the_length_the_model_was_trained_on(tmp_path):
    """Item 4: an expert trained on 40 tokens of a checkpoint with 64 positions (CodeBERT: 400 of 512) is scored on
    40 tokens by the saved folder alone (victims, benchmark, pyfunc: all use scoring.Scorer). Before: 64."""
    from moekd_ray.config import PretrainedConfig
    from moekd_ray.scoring import Scorer

    checkpoint = hub_like_checkpoint(tmp_path / "hub", 64)
    assert max_input_length(load_model(checkpoint)) == 64
    build_model(PretrainedConfig(name_or_path=str(checkpoint), max_length=40), 0).save_pretrained(str(tmp_path / "e"))
    assert json.loads((tmp_path / "e" / "config.json").read_text())[TRAINED_LENGTH] == 40
    assert Scorer(load_model(tmp_path / "e"), tokenizer=None).max_length == 40
    # a student (built from an architecture) records its length too
    build_model(TINY, 0).save_pretrained(str(tmp_path / "s"))
    assert max_input_length(load_model(tmp_path / "s")) == TINY.max_length


def test_max_length_beyond_the_checkpoint_positions_is_one_line_before_training(tmp_path):
    """Item 9: max_length above a checkpoint's positions is refused when the model is built (the pipeline builds
    each pretrained expert on the driver before anything starts), naming the key and the bound. Before: accepted,
    and the scorer cut at the positions instead."""
    from moekd_ray.config import PretrainedConfig

    checkpoint = hub_like_checkpoint(tmp_path / "hub", 64)
    with pytest.raises(ValueError, match=r"max_length=100 .* set that expert's max_length to at most 64"):
        build_model(PretrainedConfig(name_or_path=str(checkpoint), max_length=100), 0)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_ray_job_dir(tmp_path, monkeypatch) -> Path:
    """The working directory of a driver started by `ray job submit --working-dir .` (Ray's copy of the checkout)."""
    folder = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("overrides, key", [
    ([], "output_dir"),
    (["output_dir=/mnt/x/runs", "ray.storage_path=ray"], "ray.storage_path"),
    (["output_dir=/mnt/x/runs", "mlflow.tracking_uri=sqlite:///mlruns.db"], "mlflow.tracking_uri"),
])
def test_outputs_inside_rays_job_working_dir_are_one_line_before_anything(in_ray_job_dir, capsys, overrides, key):
    """Item 7: a relative output_dir (storage path, sqlite store) under `ray job submit` would be deleted with the
    job: one line naming the key and a persistent path, exit 2, nothing written. Before: the run went ahead there."""
    from moekd_ray.cli import main

    assert main(["run", str(REPO / "jobs" / "quickstart.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"moekd: error: {key}: ") and "persistent" in err, err
    assert list(in_ray_job_dir.iterdir()) == []


@pytest.mark.parametrize("job", ["devign_gpu.yaml", "benchmark_gpu.yaml"])
def test_gpu_jobs_write_to_persistent_storage(in_ray_job_dir, job):
    """Item 7: the GPU jobs set an absolute output_dir, so their run folders outlive `ray job submit`. Before: runs/
    in Ray's working-dir cache."""
    from moekd_ray.cli import check_outputs_persist
    from moekd_ray.config import load_config

    cfg = load_config(REPO / "jobs" / job)
    assert Path(cfg.output_dir).is_absolute()
    check_outputs_persist(cfg)


def test_pretrained_experts_load_on_every_worker_node_before_training(ray_cluster, tmp_path):
    """Item 6: each pretrained expert is built once on every node its workers may use, before any worker starts
    (a hub checkpoint is fetched into that node's cache there); one that cannot be is one line naming the node and
    the checkpoint. Before: only the driver checked, and each worker fetched (or failed) on its own."""
    import json as json_

    from moekd_ray.config import load_config
    from moekd_ray.stages.experts import fetch_on_worker_nodes

    checkpoint = hub_like_checkpoint(tmp_path / "hub", 64)
    model = {"source": "pretrained", "name_or_path": str(checkpoint), "max_length": 40}
    missing = {**model, "name_or_path": str(tmp_path / "not-on-this-node")}
    fetch_on_worker_nodes(load_config(None, [f"experts.models={json_.dumps([model, model])}"]))
    with pytest.raises(ValueError, match=r"^on node [\d.]+, where expert workers may run: model '.*not-on-this-node'"):
        fetch_on_worker_nodes(load_config(None, [f"experts.models={json_.dumps([model, missing])}"]))


def test_expert_bf16_autocast_is_a_switch_that_is_a_no_op_on_cpu():
    """Item 5: experts.bf16 (set by the GPU jobs) trains experts under bf16 autocast on GPU; on CPU the forward is
    the plain float32 one. Before: experts trained in fp32 only, with no switch."""
    from moekd_ray.config import load_config
    from moekd_ray.stages.experts import expert_forward
    from moekd_ray.train_loop import classifier_logits

    for job in ("devign_gpu.yaml", "benchmark_gpu.yaml"):
        assert load_config(REPO / "jobs" / job).experts.bf16
    model = build_model(TINY, 0).eval()
    batch = {"input_ids": torch.randint(3, 300, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    with torch.no_grad():
        logits = expert_forward(True)(model, batch, "cpu")
        assert logits.dtype == torch.float32 and torch.equal(logits, classifier_logits(model, batch, "cpu"))
