"""DeepSpeed ZeRO stages 1 and 3 on CPU (gloo, two ranks) train the same student as stage 2: the same seeded model
and batches through each stage, then `deepspeed_engine.gathered_state` (the consolidated float32 weights a
run saves) compared. Stage 2 is what the pipeline tests run; 1 and 3 partition the optimizer state and (3) the
weights differently, and ZeRO-3's gather of the partitioned weights is the path a GPU cluster job takes."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from moekd_ray.config import ArchConfig
from moekd_ray.models import build_model

TINY = ArchConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, max_length=32)

# Each rank: the same initial weights (seed 0), its own batches (seed 100 + rank), a few AdamW steps per stage;
# rank 0 saves the gathered weights of each stage (every rank takes part in the gather).
ZERO_STAGES = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from moekd_ray.config import ArchConfig, DistillConfig, Schedule
    from moekd_ray.models import build_model
    from moekd_ray import deepspeed_engine

    def main(rank, port, out, arch_json):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        deepspeed_engine._skip_cpu_shm_build()
        import deepspeed
        arch = ArchConfig.model_validate_json(arch_json)
        for stage in (1, 2, 3):
            cfg = DistillConfig(zero_stage=stage, schedule=Schedule(batch_size=4, lr=1e-2),
                                resources={"num_workers": 2})
            model = build_model(arch, 0)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=deepspeed_engine.deepspeed_config(cfg))
            gen = torch.Generator().manual_seed(100 + rank)
            for _ in range(4):
                ids = torch.randint(3, arch.vocab_size, (4, arch.max_length), generator=gen)
                logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                engine.backward(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])))
                engine.step()
            state = deepspeed_engine.gathered_state(engine, rank)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/zero{stage}.safetensors")
            dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        import os
        rank = int(os.environ["RANK"])
        main(rank, sys.argv[1], sys.argv[2], sys.argv[3])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two DeepSpeed processes: ~1 min quiet, 4 on a busy machine
def test_zero_stages_1_and_3_train_the_same_student_as_stage_2(tmp_path):
    script = tmp_path / "zero_stages.py"
    script.write_text(ZERO_STAGES)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path), TINY.model_dump_json()],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    initial = build_model(TINY, 0).state_dict()
    states = {stage: load_file(str(tmp_path / f"zero{stage}.safetensors")) for stage in (1, 2, 3)}
    assert set(states[1]) == set(states[2]) == set(states[3])
    moved = [k for k, v in states[2].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert len(moved) > len(states[2]) // 2, "stage 2 barely trained: the comparison would prove nothing"
    for stage in (1, 3):
        for name, want in states[2].items():
            assert states[stage][name].dtype == torch.float32, (stage, name)
            torch.testing.assert_close(states[stage][name], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"ZeRO-{stage} vs ZeRO-2, {name}: {m}")


@pytest.mark.parametrize("stage", [4, -1])
def test_an_unknown_zero_stage_is_one_clear_line(stage):
    from moekd_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="distill.zero_stage"):
        load_config(None, [f"distill.zero_stage={stage}"])
