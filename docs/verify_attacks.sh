#!/usr/bin/env bash
# The attacks of BENCHMARKS.md "Scored and attacked as a user would":
#   bash docs/verify_attacks.sh runs/<defended robustness-ablation folder>   (after docs/register_folder.py)
cd "$(dirname "$0")/.." && . .venv/bin/activate
R=${1:?give the defended robustness-ablation benchmark folder}
for model in models:/moekd-robust-ablation/1 models:/compressor-ablation/1 $R/references/tfidf-lr; do
  for a in mhm structural; do
    echo "== $model $a"
    moekd attack jobs/robustness_ablation.yaml mlflow.tracking_uri=sqlite:///runs/verify.db attack.split=test \
      attack.n=100 attack.query_budget=100 --model $model --attack $a 2>&1 | tail -13
  done
done
