#!/usr/bin/env bash
# The full-data run's user-side figures (docs/measured.md): the registered student through mlflow.pyfunc on the whole
# test split, then MHM and the structural attack on 300 seeded test functions at 200 queries, on the student and on
# tfidf-lr fitted on the full training split with the same input transform.
#   bash docs/verify_full.sh <tracking uri of the run> [models:/moekd-student/1] [config]
cd "$(dirname "$0")/.." && . "${VENV:-.venv}/bin/activate"
URI=${1:?give the tracking URI the run logged to, e.g. sqlite:///mlruns.db}
MODEL=${2:-models:/moekd-student/1}
CONFIG=${3:-jobs/devign_cpu.yaml}
python docs/score_registered.py "$MODEL" --tracking-uri "$URI"
TFIDF=runs/tfidf-lr-full-$(basename "$CONFIG" .yaml)
python - "$CONFIG" "$TFIDF" <<'PY'
import sys
import numpy as np
from moekd_ray.baseline import TfidfLR
from moekd_ray.config import load_config
from moekd_ray.data import load_devign
cfg = load_config(sys.argv[1])
data = load_devign(cfg.data, cfg.seed)
TfidfLR(cfg.seed, cfg.data.canonical).fit(list(data["train"]["func"]), np.asarray(data["train"]["target"]),
                                          list(data["valid"]["func"]), np.asarray(data["valid"]["target"])).save(sys.argv[2])
print(f"tfidf-lr (full training split, canonical={cfg.data.canonical}) saved in {sys.argv[2]}")
PY
for model in "$MODEL" "$TFIDF"; do
  for a in mhm structural; do
    echo "== $model $a"
    moekd attack "$CONFIG" mlflow.tracking_uri="$URI" attack.split=test attack.n=300 attack.query_budget=200 \
      --model "$model" --attack "$a" 2>&1 | tail -13
  done
done
