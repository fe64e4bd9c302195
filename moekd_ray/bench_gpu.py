"""GPU check and throughput: the same train_epoch / predict_logits / kd_loss the Ray workers run, on one GPU.

    python -m moekd_ray.bench_gpu [--steps 30]

For each student preset and a CodeBERT-sized expert (random init from its config: no hub needed), prints training
samples/s (AdamW, batch 32, length 256) and inference functions/s (batch 128), in fp32 and under bf16 autocast.
Token ids and soft targets are random: throughput depends on shapes, not on the text.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moekd_ray.config import STUDENT_PRESETS, ArchConfig
from moekd_ray.losses import kd_loss
from moekd_ray.models import build_model, num_params, size_mb
from moekd_ray.train_loop import make_loader, predict_logits, torch_step, train_epoch

CODEBERT_SIZE = ArchConfig(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072, max_length=512)


def arrays(n: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(5, vocab, (n, length)).astype(np.int32),
            "attention_mask": np.ones((n, length), dtype=np.int32),
            "labels": rng.integers(0, 2, n).astype(np.int64),
            "teacher": rng.dirichlet([1, 1], n).astype(np.float32)}


def measure(arch: ArchConfig, steps: int, bf16: bool, length: int = 256) -> tuple[float, float]:
    model = build_model(arch, 0).cuda()
    data = arrays(32 * steps, length, arch.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = make_loader(data, 32, shuffle=True)

    def loss_fn(logits, batch):
        return kd_loss(logits.float(), batch["teacher"], batch["labels"], temperature=4.0, alpha=0.5)

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        train_epoch(model, make_loader({k: v[:64] for k, v in data.items()}, 32, False), loss_fn,
                    torch_step(opt))  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        stats = train_epoch(model, loader, loss_fn, torch_step(opt))
        torch.cuda.synchronize()
        start = time.perf_counter()
        predict_logits(model, data, 128)
        torch.cuda.synchronize()
        infer = len(data["labels"]) / (time.perf_counter() - start)
    return stats["samples_per_s"], infer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model and dtype")
    steps = parser.parse_args(argv).steps
    assert torch.cuda.is_available(), "no GPU visible to torch"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  batch 32 train / 128 inference, length 256")
    print(f"{'model':<16}{'params':>12}{'MB':>8}{'dtype':>7}{'train/s':>10}{'infer/s':>10}")
    models = {**{f"student {k}": a for k, a in STUDENT_PRESETS.items()}, "codebert-size": CODEBERT_SIZE}
    for name, arch in models.items():
        model = build_model(arch, 0)
        for bf16 in (False, True):
            train_rate, infer_rate = measure(arch, steps, bf16)
            print(f"{name:<16}{num_params(model):>12,}{size_mb(model):>8.1f}{'bf16' if bf16 else 'fp32':>7}"
                  f"{train_rate:>10.0f}{infer_rate:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
