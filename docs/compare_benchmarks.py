"""Did a code change leave `moekd benchmark` unchanged? Compares two benchmark runs of the same config, cell by cell.

    python docs/compare_benchmarks.py BEFORE_FOLDER BEFORE_TRACKING_URI AFTER_FOLDER AFTER_TRACKING_URI

Each folder is the one `moekd benchmark` printed (it holds `mlflow_run_id`). Compared, per cell (reference model or
(method, seed)): every logged metric except time and speed (train seconds, functions/s, latency, attack seconds),
the per-function test probabilities (`predictions/test.json`) and every attack's per-function outcome
(`attacks/<name>.json`). The rows of a seeded benchmark are equal to the last digit when nothing changed; the
probabilities say more than the rows when a model is near-constant (its rows barely move however it changes).
Prints one line per cell and exits 1 on any difference.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow.tracking import MlflowClient  # noqa: E402  (after the setting it reads)

TIMING = ("seconds", "per_s", "latency", "wall", "sessions", "started", "finished", "samples_per_s")


def cells(folder: str, uri: str) -> dict[str, tuple[MlflowClient, object]]:
    client = MlflowClient(uri)
    parent = client.get_run((Path(folder) / "mlflow_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    return {r.data.tags["moekd.bench.cell"]: (client, r) for r in children if "moekd.bench.cell" in r.data.tags}


def artifacts(client: MlflowClient, run) -> dict[str, object]:
    """predictions/test.json and attacks/*.json of a cell, parsed."""
    found = {}
    for folder in ("predictions", "attacks"):
        for item in client.list_artifacts(run.info.run_id, folder):
            if item.path.endswith(".json"):
                with tempfile.TemporaryDirectory() as tmp:
                    found[item.path] = json.loads(Path(client.download_artifacts(run.info.run_id, item.path, tmp))
                                                  .read_text())
    return found


def main(before: str, before_uri: str, after: str, after_uri: str) -> int:
    a, b = cells(before, before_uri), cells(after, after_uri)
    if set(a) != set(b):
        print(f"cells differ: only before {sorted(set(a) - set(b))}, only after {sorted(set(b) - set(a))}")
        return 1
    differing = 0
    for name in sorted(a):
        (ca, ra), (cb, rb) = a[name], b[name]
        metrics = {k for k in ra.data.metrics.keys() | rb.data.metrics.keys() if not any(t in k for t in TIMING)}
        diff = sorted(k for k in metrics if ra.data.metrics.get(k) != rb.data.metrics.get(k))
        files_a, files_b = artifacts(ca, ra), artifacts(cb, rb)
        diff += sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
        n_probs = len(files_a.get("predictions/test.json", {}).get("p_vulnerable", []))
        print(f"{name}: {len(metrics)} metrics, {n_probs} test probabilities, "
              f"{sum(k.startswith('attacks/') for k in files_a)} attack outcome files: "
              + ("equal" if not diff else f"DIFFERENT: {', '.join(diff)}"))
        differing += bool(diff)
    print(f"{len(a)} cells, {differing} different")
    return int(differing > 0)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
