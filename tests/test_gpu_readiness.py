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

# A DeepSpeed bf16 engine in one gloo process (DeepSpeed's bf16 runs on CPU), a few steps, then deepspeed_engine's
# own gathered_state + save_deepspeed per ZeRO stage. A subprocess: the process group and DeepSpeed's globals stay
# out of the test process.
BF16_DISTILL = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from moekd_ray.config import ArchConfig, DistillConfig, Schedule
    from moekd_ray.models import build_model
    from moekd_ray import deepspeed_engine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
    deepspeed_engine._skip_cpu_shm_build()
    import deepspeed
    arch = ArchConfig.model_validate_json(sys.argv[3])
    for stage in (0, 2, 3):
        cfg = DistillConfig(bf16=True, zero_stage=stage, schedule=Schedule(batch_size=4, lr=1e-2),
                            resources={"num_workers": 1})
        model = build_model(arch, 0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=deepspeed_engine.deepspeed_config(cfg))
        assert next(engine.module.parameters()).dtype == torch.bfloat16  # it really trains in bf16
        for _ in range(3):
            ids = torch.randint(3, arch.vocab_size, (4, arch.max_length))
            logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            engine.backward(torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 0, 1])))
            engine.step()
        deepspeed_engine.save_deepspeed(engine, f"{sys.argv[2]}/zero{stage}", 0, deepspeed_engine.gathered_state(engine, 0))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # DeepSpeed in a subprocess, 3 ZeRO stages
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
    from moekd_ray.deepspeed_engine import deepspeed_config

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


GPU_JOBS = ["devign_gpu.yaml", "benchmark_gpu.yaml", "tune_gpu.yaml"]


@pytest.mark.parametrize("job", GPU_JOBS)
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
    with pytest.raises(ValueError, match=r"^experts.models\[1\].name_or_path: on node [\d.]+, where expert workers "
                                         r"may run: model '.*not-on-this-node' .* every such node must reach it \(a "
                                         r"folder: on storage all nodes mount") as refused:
        fetch_on_worker_nodes(load_config(None, [f"experts.models={json_.dumps([model, missing])}"]))
    assert "\n" not in str(refused.value)  # item 9: one line, before any worker starts


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


# ----------------------------------------------------------------------------------- item 8: ray.storage_path
FUNCS = ["int f(int a) { return a + 1; }", "void g(char *p) { strcpy(p, \"x\"); }",
         "static int h(int *v, int n) { int s = 0; for (int i = 0; i < n; i++) s += v[i]; return s; }"]


def test_storage_join_keeps_uris_whole():
    """Item 8: a URI storage path is joined as a string (Path() makes s3://b/x into s3:/b/x)."""
    from moekd_ray.ray_runtime import storage_join

    assert storage_join("s3://bucket/moekd/", "run-expert_0") == "s3://bucket/moekd/run-expert_0"
    assert storage_join("s3://b/ray?region=eu-west-1", "x", "y") == "s3://b/ray/x/y?region=eu-west-1"
    assert storage_join("/mnt/shared/ray", "x") == "/mnt/shared/ray/x"


def test_victim_and_resume_find_the_experts_under_ray_storage_path(ray_cluster, tmp_path):
    """Item 8: an expert trained with ray.storage_path elsewhere (here a file:// URI, read through pyarrow as s3://
    would be) is found by the victim (`moekd attack --target expert_0`, the robust-adv copies' "uniform") and by
    --resume, from the storage the run's config.yaml names. Before: only <run folder>/ray/ was searched (Path() of
    a URI for resume)."""
    from moekd_ray.attacks.victim import load_victim
    from moekd_ray.config import dump_yaml, load_config
    from moekd_ray.stages.context import finished_members
    from moekd_ray.stages.experts import train_experts
    from moekd_ray.tokenization import encode, train_bpe

    storage = tmp_path / "shared-storage"
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"ray.storage_path=file://{storage}", "experts.k=1",
                             f"experts.model={TINY.model_dump_json()}", "experts.schedule.epochs=1",
                             "experts.schedule.batch_size=8"])
    run_dir = tmp_path / "runs" / "tiny-run"
    (run_dir / "tokenizers").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    tok = train_bpe(FUNCS * 8, TINY.vocab_size, TINY.max_length)
    tok.save_pretrained(str(run_dir / "tokenizers" / "expert_0"))
    enc = {s: encode(tok, FUNCS * 8, TINY.max_length) for s in ("train", "valid")}
    labels = {s: np.array([0, 1, 1] * 8) for s in ("train", "valid")}
    train_experts(cfg, [enc], labels, np.zeros(24, dtype=np.int64), run_dir)

    assert (storage / "tiny-run-expert_0").is_dir() and not (run_dir / "ray").exists()
    p = load_victim(run_dir, "expert_0")(FUNCS)
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    assert load_victim(run_dir, "uniform")(FUNCS) == pytest.approx(p)
    assert list(finished_members(cfg, run_dir)) == ["expert_0"]
    # the storage unreachable from here: one line naming ray.storage_path, not an empty model list
    moved = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"ray.storage_path=file://{tmp_path / 'gone'}",
                               "experts.k=1", f"experts.model={TINY.model_dump_json()}"])
    (run_dir / "config.yaml").write_text(dump_yaml(moved.model_dump(mode="json")))
    with pytest.raises(ValueError, match=r"--target expert_0: no expert checkpoints of tiny-run in file://.*gone "
                                         r"\(the run's ray.storage_path"):
        load_victim(run_dir, "expert_0")


# ------------------------------------------------------------------- item 9: one decision for every rank
# Two gloo processes whose validation figures differ (as each rank's own arithmetic may): rank 1 alone would keep
# epoch 2 and stop after epoch 4, rank 0 keeps epoch 3 and stops after epoch 5.
BEST_EPOCH_RANKS = textwrap.dedent("""
    import json, sys, torch.distributed as dist
    from moekd_ray.train_loop import BestEpoch
    port, rank = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    f1 = {0: [0.5, 0.6, 0.7, 0.65, 0.64, 0.63], 1: [0.5, 0.6, 0.59, 0.58, 0.57, 0.56]}[rank]
    best, seen = BestEpoch("f1", patience=2), []
    for epoch, value in enumerate(f1, 1):
        better, stop = best.decide(epoch, {"val_f1": value})
        seen.append([better, stop, best.epoch, best.value])
        if stop:
            break
    print(json.dumps(seen), flush=True)
    dist.barrier()
    dist.destroy_process_group()  # else gloo's threads may outlive the interpreter: "terminate called" (seen in CI)
""")


def test_rank_0_decides_best_epoch_and_early_stop_for_every_rank():
    """Item 9: with several workers (ZeRO-3's gather is a collective) every rank takes rank 0's best epoch and
    early stop, broadcast (gloo here, NCCL on GPUs). Before: each rank decided alone from its own validation
    figures, and ranks that disagreed hung in the next collective."""
    from moekd_ray.train_loop import BestEpoch

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BEST_EPOCH_RANKS, str(port), str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    rank0, rank1 = (json.loads(out) for out, _ in outs)
    assert rank0 == rank1
    assert [row[:3] for row in rank0] == [[1, 0, 1], [1, 0, 2], [1, 0, 3], [0, 0, 3], [0, 1, 3]]
    alone = BestEpoch("f1", patience=2)  # rank 1's own figures, undecided by rank 0: another epoch, another stop
    assert [(alone.update(e, {"val_f1": v}), alone.stop(e)) for e, v in enumerate([0.5, 0.6, 0.59, 0.58], 1)][-1] \
        == (False, True)


# --------------------------------------------------------------------- item 9: bf16 on a GPU without it
def test_bf16_on_a_gpu_without_it_is_one_line_naming_the_key():
    """Item 9: the refusal names the stage's bf16 key, the GPU and the fix (torch.cuda.is_bf16_supported() False:
    a V100 or T4); a GPU with bf16 passes."""
    from moekd_ray.ray_runtime import bf16_problem

    line = bf16_problem("distill.bf16", "Tesla V100-SXM2-16GB on node 10.0.0.7", supported=False)
    assert line.startswith("distill.bf16: Tesla V100-SXM2-16GB on node 10.0.0.7 has no bf16") and "\n" not in line
    assert "set distill.bf16=false" in line
    assert bf16_problem("experts.bf16", "NVIDIA H100 80GB HBM3", supported=True) is None


def test_gpu_jobs_are_checked_for_bf16_on_their_nodes_before_training(ray_cluster, monkeypatch):
    """Item 9: before any training, each node that a bf16 stage's GPU workers may use is asked whether its GPU has
    bf16 (here a stand-in probe answers for this CPU node as a V100 would): one ConfigError line naming the key.
    A CPU cluster has no such node: nothing to check. Before: DeepSpeed or autocast failed in the workers."""
    from moekd_ray import ray_runtime
    from moekd_ray.config import load_config
    from moekd_ray.errors import ConfigError

    cfg = load_config(REPO / "jobs" / "devign_gpu.yaml")
    ray_runtime.check_bf16(cfg, ("experts", "distill"))  # no GPU node here
    v100 = ray_cluster.remote(num_cpus=0)(lambda: ("Tesla V100-SXM2-16GB", False))
    monkeypatch.setattr(ray_runtime, "worker_nodes", lambda res: [n for n in ray_cluster.nodes() if n["Alive"]])
    with pytest.raises(ConfigError, match=r"^experts.bf16: Tesla V100-SXM2-16GB on node [\d.]+ has no bf16"):
        ray_runtime.check_bf16(cfg, ("experts", "distill"), probe=v100)
    with pytest.raises(ConfigError, match=r"^distill.bf16: "):
        ray_runtime.check_bf16(cfg, ("distill",), probe=v100)
    ray_runtime.check_bf16(cfg.with_values({"distill.bf16": False}), ("distill",), probe=v100)  # not asked for


# ---------------------------------------------------------------- the GPU jobs: what they need, what they cost
def test_every_gpu_job_says_what_it_needs_and_what_it_costs():
    """Done means: every job that asks for a GPU (a GPU tune job among them, beside the CPU tune_devign.yaml) says
    in its header which GPUs, hub access or a checkpoint path, whether a CUDA toolchain is needed, and an estimated
    time; and runs under `ray job submit` (tests/test_cluster_files.py validates its command)."""
    from test_cluster_files import header

    from moekd_ray.config import load_config

    on_gpu = [job.name for job in sorted((REPO / "jobs").glob("*.yaml"))
              if any(getattr(load_config(job), stage).resources.use_gpu for stage in ("experts", "distill"))]
    assert on_gpu == sorted(GPU_JOBS)
    assert not load_config(REPO / "jobs" / "tune_devign.yaml").distill.resources.use_gpu
    for job in GPU_JOBS:
        text = " ".join(header(REPO / "jobs" / job).split())
        assert "ray job submit" in text and "Needs:" in text, job
        assert "GPUs" in text and "no cuda toolchain" in text.lower(), job
        assert "hub access" in text.lower(), job
        assert "estimated (never run on a GPU)" in text and " min" in text, job
