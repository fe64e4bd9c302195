"""Attack success rate split by the attacked function's true class, per method, from a `moekd benchmark` run.

    python docs/asr_by_class.py BENCHMARK_FOLDER TRACKING_URI

ASR counts the functions a model classified correctly and an attack flipped. A model that calls more functions
vulnerable has more correctly classified vulnerable functions among those attacked, and flipping those may be
easier; this table separates the two classes (seeds pooled) so that a difference in ASR between methods can be
told apart from a difference in which functions they get right. Reads each cell's `attacks/<name>.json`.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import mlflow  # noqa: E402  (after the setting it reads)

from moekd_ray import tracking  # noqa: E402
from moekd_ray.config import load_config  # noqa: E402


def main(folder: str, uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    rows = list(csv.DictReader((Path(folder) / "report" / "benchmark.csv").open()))
    attacks = load_config(Path(folder) / "config.yaml").benchmark.attacks  # the ones this run used
    print("| method | attack | ASR, vulnerable functions | ASR, safe functions | vulnerable share of attacked |")
    print("|---|---|---|---|---|")
    for row in rows:
        for attack in attacks:
            counts = {0: [0, 0], 1: [0, 0]}  # label -> [flipped, attacked]
            for run_id in row["run_ids"].split():
                try:
                    outcome = tracking.load_dict(run_id, f"attacks/{attack}.json")
                except Exception:  # a model that was not attacked (the experts, the mixture) or not by this attack
                    continue
                for label, status in zip(outcome["label"], outcome["status"]):
                    if status in ("success", "failed"):
                        counts[int(label)][0] += status == "success"
                        counts[int(label)][1] += 1
            (vf, va), (sf, sa) = counts[1], counts[0]
            if va + sa:
                print(f"| {row['method']} | {attack} | {vf / max(va, 1):.1%} of {va} | {sf / max(sa, 1):.1%} of {sa} "
                      f"| {va / (va + sa):.0%} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
