"""Register a saved student folder (model + tokenizer/, e.g. a benchmark cell's `students/<method>-s<seed>`) as a
pyfunc in a tracking store, so it can be scored and attacked as a user would (docs/score_registered.py, moekd attack).

    python docs/register_folder.py runs/<benchmark>/students/moekd-robust-s0 moekd-robust-ablation \
        --tracking-uri sqlite:///runs/verify.db
"""
import argparse
from pathlib import Path

import mlflow

from moekd_ray.tracking import log_student_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder")
parser.add_argument("name")
parser.add_argument("--tracking-uri", default="sqlite:///mlruns.db")
args = parser.parse_args()
folder = Path(args.folder)
mlflow.set_tracking_uri(args.tracking_uri)
with mlflow.start_run(run_name=f"register {folder.name}"):
    print(log_student_model(folder, folder / "tokenizer", {}, args.name, {}))
