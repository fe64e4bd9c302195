"""Where a student's inference time goes, and what int8 linear layers could buy at most (#26 item 6).

For each student shape: functions/s in float32 at the given threads, the share of the forward pass's CPU time
spent in linear layers (torch.profiler: aten::addmm / aten::mm / aten::linear, self time), the speed-up that
*free* linear layers would give (Amdahl: 1 / (1 - share)), and the measured speed of torch's dynamically
quantised int8 linear layers. Random token ids, every sequence at full length (the students' worst case).

    python docs/student_profile.py [--threads 2] [--batch 64] [--passes 10]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.profiler import profile

from moekd_ray.config import STUDENT_PRESETS, ArchConfig
from moekd_ray.models import build_model

SHAPES = {"devign_cpu.yaml's student (2 x 64, 128 tokens)": ArchConfig(
    vocab_size=2000, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128, max_length=128),
    **{f"preset {name}": arch for name, arch in STUDENT_PRESETS.items() if name in ("3mb", "25mb")}}
LINEAR_OPS = {"aten::addmm", "aten::mm", "aten::linear", "quantized::linear_dynamic"}


def rate(model, ids, passes: int) -> float:
    with torch.inference_mode():
        model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(passes):
            model(input_ids=ids)
    return passes * len(ids) / (time.perf_counter() - start)


def linear_share(model, ids) -> float:
    with torch.inference_mode(), profile() as prof:
        for _ in range(3):
            model(input_ids=ids)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'student':50s} {'float fn/s':>10s} {'linear share':>12s} {'bound':>6s} {'dyn-int8 fn/s':>13s} {'ratio':>6s}")
    for name, arch in SHAPES.items():
        model = build_model(arch, 0).eval()
        ids = torch.randint(5, arch.vocab_size, (args.batch, arch.max_length))
        share = linear_share(model, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        # interleaved, the median of 3 ratios: a busy machine slows both alike
        pairs = [(rate(model, ids, args.passes), rate(int8, ids, args.passes)) for _ in range(3)]
        f, q = sorted(pairs, key=lambda p: p[1] / p[0])[1]
        print(f"{name:50s} {f:10.0f} {share:12.1%} {1 / (1 - share):5.2f}x {q:13.0f} {q / f:5.2f}x")


if __name__ == "__main__":
    main()
