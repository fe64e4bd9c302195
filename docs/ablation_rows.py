"""Print a benchmark run's cells with per-class ASR (asr_safe / asr_vulnerable), as logged in its MLflow runs.

    python docs/ablation_rows.py <benchmark folder> [tracking URI]   # default: sqlite:///mlruns.db
"""
import sys
from pathlib import Path

import mlflow

folder = Path(sys.argv[1])
client = mlflow.MlflowClient(sys.argv[2] if len(sys.argv) > 2 else "sqlite:///mlruns.db")
parent = (folder / "mlflow_run_id").read_text().strip()
runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
keys = ["test_accuracy", "test_f1", "test_vulnerable_share"]
for run in sorted(runs, key=lambda r: r.data.tags.get("moekd.bench.cell", "")):
    m, cell = run.data.metrics, run.data.tags.get("moekd.bench.cell")
    if not cell:
        continue
    attacks = sorted({k.removeprefix("asr_safe_") for k in m if k.startswith("asr_safe_")})
    parts = [f"{k.removeprefix('test_')} {m[k]:.3f}" for k in keys if k in m]
    for a in attacks:
        parts.append(f"{a}: ASR {m[f'asr_{a}']:.3f} (safe {m[f'asr_safe_{a}']:.3f}, vulnerable "
                     f"{m[f'asr_vulnerable_{a}']:.3f}), robust acc {m[f'robust_accuracy_{a}']:.3f}")
    print(f"{cell:22s} " + "; ".join(parts))
