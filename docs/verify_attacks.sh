#!/usr/bin/env bash
# The attacks of BENCHMARKS.md "Scored and attacked as a user would" (the defended ablation run's folder is its own).
cd /work/main; . .venv/bin/activate
R=runs/robustness-ablation-20261207-040933-f1c6cac71136
for model in models:/moekd-robust-ablation/1 models:/compressor-ablation/1 $R/references/tfidf-lr; do
  for a in mhm structural; do
    echo "== $model $a"
    moekd attack jobs/robustness_ablation.yaml mlflow.tracking_uri=sqlite:///runs/verify.db attack.split=test \
      attack.n=100 attack.query_budget=100 --model $model --attack $a 2>&1 | tail -13
  done
done
