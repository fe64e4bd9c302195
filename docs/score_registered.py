"""Score a registered student as a user would: loaded through mlflow.pyfunc, on a whole Devign split, next to the
tfidf-lr reference fitted on the full training split. The figures in docs/measured.md come from this script.

    python docs/score_registered.py models:/moekd-student/3 --tracking-uri sqlite:///mlruns.db [--split test]
"""

from __future__ import annotations

import argparse
import time

import mlflow
import numpy as np
import pandas as pd

from moekd_ray.baseline import TfidfLR
from moekd_ray.config import load_config
from moekd_ray.data import load_devign
from moekd_ray.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/<name>/<version>, models:/<name>@<alias> or runs:/<id>/student")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns.db", help="default: %(default)s")
    parser.add_argument("--split", default="test", choices=["valid", "test"], help="default: %(default)s")
    parser.add_argument("--no-reference", action="store_true", help="skip the tfidf-lr reference")
    args = parser.parse_args()

    data = load_devign(load_config().data, seed=0)  # the full splits
    funcs, labels = list(data[args.split]["func"]), np.asarray(data[args.split]["target"])
    mlflow.set_tracking_uri(args.tracking_uri)
    model = mlflow.pyfunc.load_model(args.model)
    start = time.perf_counter()
    probs = model.predict(pd.DataFrame({"func": funcs}))["probability"].to_numpy()
    seconds = time.perf_counter() - start
    rows = [("student (pyfunc)", probs, seconds)]
    if not args.no_reference:
        ref = TfidfLR().fit(list(data["train"]["func"]), np.asarray(data["train"]["target"]),
                            list(data["valid"]["func"]), np.asarray(data["valid"]["target"]))
        start = time.perf_counter()
        rows.append((f"tfidf-lr (C={ref.c:g})", ref.predict_proba(funcs), time.perf_counter() - start))
    print(f"{args.model} on the whole {args.split} split ({len(funcs):,} functions, {labels.mean():.1%} vulnerable)")
    print(f"{'model':<20} {'accuracy':>8} {'precision':>9} {'recall':>6} {'f1':>6} {'vulnerable':>10} {'fn/s':>7}")
    for name, p, secs in rows:
        m = classification_metrics(labels, p)
        print(f"{name:<20} {m['accuracy']:>8.4f} {m['precision']:>9.4f} {m['recall']:>6.3f} {m['f1']:>6.3f} "
              f"{(p >= 0.5).mean():>10.1%} {len(funcs) / secs:>7.0f}")


if __name__ == "__main__":
    main()
