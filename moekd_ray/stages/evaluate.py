"""Stage: every model of the run (each expert, the routed mixture, the student and, with `eval.reference`, the
tfidf-lr baseline fitted on the same rows) on valid and test, one MLflow run each with its confusion matrix; and the
final table they make (`format_table` for the console, `markdown_table` for the MLflow UI). The pipeline's entry
is `evaluate_stage()`.
"""

from __future__ import annotations

import time

import numpy as np

from moekd_ray.baseline import TfidfLR
from moekd_ray.decision import pick_threshold
from moekd_ray.metrics import classification_metrics, comparison_figure, confusion_matrix_figure, degenerate
from moekd_ray.models import load_model, num_params, size_mb
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.tokenise import Encoded
from moekd_ray.train_loop import latency_p50_ms, predict_logits, probs1, throughput


def evaluate_stage(ctx: RunContext, checkpoints: list[list], targets: dict, student, enc: Encoded) -> list[dict]:
    """The final table's rows (`model_row`), one MLflow run per model (same metric names, so the UI compares them
    side by side), a warning line per degenerate model; the headline metrics go on the parent run."""
    cfg, tracker, labels = ctx.cfg, ctx.tracker, ctx.labels
    with ctx.timer("evaluate"), tracker.stage("evaluate"):
        rows, test_probs = evaluate_all(cfg, checkpoints, targets, student, enc.experts, enc.student, labels)
        if cfg.eval.reference:
            rows.append(reference_row(cfg, ctx.funcs, labels, test_probs))
        tracker.log_dict(rows, "results.json")
        tracker.log_figure(comparison_figure(rows, f"{cfg.name}: every model on test"), "model_comparison.png")
        for row in rows:
            with tracker.stage(row["model"]):
                tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and
                                     not isinstance(v, bool)})
                fig = confusion_matrix_figure(labels["test"], *test_probs[row["model"]], f"{row['model']}, test")
                tracker.log_figure(fig, f"confusion_{row['model']}_test.png")
        useless = degenerate_models(rows)
        for name, why in useless.items():
            ctx.log(f"warning: {name} is degenerate: it {why}")
        if useless:
            tracker.set_tags({"moekd.degenerate_models": ",".join(useless)})
    tracker.log_metrics(headline_metrics(rows))  # on the parent run: runs sort and compare by these
    return rows


def degenerate_models(rows: list[dict]) -> dict[str, str]:
    """Each degenerate model's name -> why (`metrics.degenerate`)."""
    return {r["model"]: r["degenerate"] for r in rows if r["degenerate"]}


def evaluate_all(cfg, checkpoints, targets, student, enc_expert, enc_student, labels) -> tuple[list[dict], dict]:
    """Every model's row (`model_row`: valid and test at its threshold, chosen on validation by eval.threshold; the
    student's is already in its weights) and each model's (test P(vulnerable), threshold). checkpoints[k]: expert
    k's models (its fold models when cross-fitting: the expert is their mean, and it costs all of them)."""
    rows, test_probs, expert_costs = [], {}, []

    def add(name: str, probs: dict, cost: dict, threshold: float | None = None) -> None:
        rows.append(model_row(cfg, name, probs, labels, cost, threshold))
        test_probs[name] = (np.asarray(probs["test"]), rows[-1]["threshold"])

    for k, members in enumerate(checkpoints):
        costs = []
        for ckpt in members:
            with ckpt.as_directory() as folder:
                costs.append(model_cost(cfg, load_model(folder), enc_expert[k]["test"]))
        expert_costs.append(combined_cost(costs))
        add(f"expert_{k}", {s: probs1(targets[s]["expert_logits"][:, k]) for s in ("valid", "test")}, expert_costs[-1])
    add("mixture", {s: targets[s]["mixture_probs"][:, 1] for s in ("valid", "test")}, combined_cost(expert_costs))
    add("student", {s: probs1(predict_logits(student, enc_student[s], cfg.eval.batch_size)) for s in ("valid", "test")},
        model_cost(cfg, student, enc_student["test"]), threshold=0.5)
    return rows, test_probs


def model_row(cfg, name: str, probs: dict[str, np.ndarray], labels: dict, cost: dict,
              threshold: float | None = None) -> dict:
    """One model's row, the schema the pipeline's table and the benchmark's cells share: `model`, `threshold` (None:
    chosen on validation by eval.threshold), `<split>_<metric>` on each split of `probs`, `degenerate` (why the model
    is useless, judged on validation; None without it) and its cost (`model_cost`)."""
    if threshold is None:
        threshold = pick_threshold(cfg.eval, labels["valid"], probs["valid"])
    row = {"model": name, "threshold": threshold}
    for split, p in probs.items():
        row.update({f"{split}_{k}": v for k, v in classification_metrics(labels[split], p, threshold).items()})
    row["degenerate"] = degenerate(labels["valid"], probs["valid"], cfg.eval.degenerate_share, cfg.eval.min_val_f1,
                                   threshold) if "valid" in probs else None
    return {**row, **cost}


def model_cost(cfg, model, enc_test: dict, latency_functions: int = 0) -> dict:
    """Parameters, MB and inference functions/s (eval.batch_size at eval.threads threads, `throughput`'s sample);
    with `latency_functions`, the median ms of scoring one function alone over that many."""
    cost = {"params": num_params(model), "size_mb": size_mb(model),
            "functions_per_s": throughput(model, enc_test, cfg.eval.batch_size, cfg.eval.threads)}
    if latency_functions:
        cost["latency_p50_ms"] = latency_p50_ms(model, enc_test, cfg.eval.threads, latency_functions)
    return cost


def text_model_cost(score, num_params: int, funcs: list[str], latency_functions: int = 0, n: int = 256) -> dict:
    """`model_cost` for a model that scores source text (`score(funcs) -> P(vulnerable)`, e.g. tfidf-lr): functions/s
    on the first n functions, float32 MB of its parameters."""
    start = time.perf_counter()
    score(funcs[:n])
    cost = {"params": num_params, "size_mb": num_params * 4 / 1e6,
            "functions_per_s": len(funcs[:n]) / (time.perf_counter() - start)}
    if latency_functions:
        times = []
        for func in funcs[:latency_functions]:
            start = time.perf_counter()
            score([func])
            times.append(1000 * (time.perf_counter() - start))
        cost["latency_p50_ms"] = float(np.median(times))
    return cost


def combined_cost(costs: list[dict]) -> dict:
    """The cost of running several models on every function (an expert's fold models, the mixture's experts)."""
    combined = {"params": sum(c["params"] for c in costs), "size_mb": sum(c["size_mb"] for c in costs),
                "functions_per_s": 1.0 / sum(1.0 / c["functions_per_s"] for c in costs)}
    if all("latency_p50_ms" in c for c in costs):
        combined["latency_p50_ms"] = sum(c["latency_p50_ms"] for c in costs)
    return combined


def reference_row(cfg, funcs: dict, labels: dict, test_probs: dict) -> dict:
    """The tfidf-lr baseline fitted on the same training rows, as a row of the final table."""
    ref = TfidfLR(cfg.seed, cfg.data.canonical).fit(funcs["train"], labels["train"], funcs["valid"],
                                                    labels["valid"])
    probs = {s: ref.predict_proba(funcs[s]) for s in ("valid", "test")}
    row = model_row(cfg, "tfidf-lr", probs, labels, text_model_cost(ref.predict_proba, ref.num_params, funcs["test"]))
    test_probs["tfidf-lr"] = (np.asarray(probs["test"]), row["threshold"])
    return row


def headline_metrics(rows: list[dict]) -> dict[str, float]:
    """The parent run's metrics: the student's, the mixture's, the best expert's (by validation accuracy) and the
    reference's test accuracy and F1, and the student's size and speed."""
    by_name = {r["model"]: r for r in rows}
    experts = [r for r in rows if r["model"].startswith("expert_")]
    picked = {"student": by_name["student"], "mixture": by_name["mixture"],
              "best_expert": max(experts, key=lambda r: r["valid_accuracy"]), "reference": by_name.get("tfidf-lr")}
    out = {f"{name}_{k}": row[k] for name, row in picked.items() if row for k in ("test_accuracy", "test_f1")}
    student = by_name["student"]
    out.update({"student_size_mb": student["size_mb"], "student_functions_per_s": student["functions_per_s"]})
    return out


def reference_tags(rows: list[dict]) -> dict[str, str]:
    """How the student compares with the tfidf-lr reference fitted on the same rows (for its registered version's
    description); none without a reference row."""
    by_name = {r["model"]: r for r in rows}
    if "tfidf-lr" not in by_name:
        return {}
    st, ref = by_name["student"], by_name["tfidf-lr"]
    return {"moekd.vs_reference": f"test accuracy {st['test_accuracy']:.3f} vs {ref['test_accuracy']:.3f} "
                                  f"({st['test_accuracy'] - ref['test_accuracy']:+.3f}), test F1 {st['test_f1']:.3f} "
                                  f"vs {ref['test_f1']:.3f} ({st['test_f1'] - ref['test_f1']:+.3f}), size "
                                  f"{st['size_mb']:.2f} vs {ref['size_mb']:.2f} MB"}


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<10} {'valid acc':>9} {'valid f1':>8} {'test acc':>8} {'test f1':>7} {'thr':>5} "
            f"{'params':>11} {'MB':>7} {'fn/s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<10} {r['valid_accuracy']:>9.3f} {r['valid_f1']:>8.3f} {r['test_accuracy']:>8.3f} "
            f"{r['test_f1']:>7.3f} {r['threshold']:>5.2f} {r['params']:>11,} {r['size_mb']:>7.2f} "
            f"{r['functions_per_s']:>7.1f}" + ("  DEGENERATE" if r.get("degenerate") else "")
        )
    return "\n".join(lines + comparison_lines(rows))


def markdown_table(rows: list[dict], asr_key: str | None = None) -> str:
    """The final table in Markdown (the parent run's description in the MLflow UI), with the same comparisons."""
    asr = [asr_key] if asr_key and any(isinstance(r.get(asr_key), float) for r in rows) else []
    head = ["model", "test acc", "test F1", "valid acc", "valid F1", "threshold", "params", "MB", "functions/s",
            *(f"ASR ({asr_key.removeprefix('asr_')})" for _ in asr)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["model"] + (" (degenerate)" if r.get("degenerate") else "")
        cells = [f"**{name}**" if r["model"] == "student" else name, f"{r['test_accuracy']:.3f}",
                 f"{r['test_f1']:.3f}", f"{r['valid_accuracy']:.3f}", f"{r['valid_f1']:.3f}", f"{r['threshold']:.2f}",
                 f"{r['params']:,}", f"{r['size_mb']:.2f}", f"{r['functions_per_s']:.1f}",
                 *(f"{r[k]:.3f}" if isinstance(r.get(k), float) else "" for k in asr)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = comparison_lines(rows) + [f"{r['model']} is degenerate: it {r['degenerate']}" for r in rows
                                      if r.get("degenerate")]
    return "\n".join(lines) + "".join(f"\n\n{n}" for n in notes) + "\n"


def comparison_lines(rows: list[dict]) -> list[str]:
    """The student against the mixture (speed, size, accuracy) and against the tfidf-lr reference."""
    lines = []
    by_name = {r["model"]: r for r in rows}
    if "mixture" in by_name and "student" in by_name:
        mix, st = by_name["mixture"], by_name["student"]
        lines.append(f"student vs mixture: {st['functions_per_s'] / mix['functions_per_s']:.1f}x the functions/s, "
                     f"{st['size_mb'] / mix['size_mb']:.3g}x the size, test accuracy "
                     f"{st['test_accuracy'] - mix['test_accuracy']:+.3f}")
    if "tfidf-lr" in by_name and "student" in by_name:
        lines.append(f"student vs tfidf-lr reference: test accuracy "
                     f"{by_name['student']['test_accuracy'] - by_name['tfidf-lr']['test_accuracy']:+.3f}, test F1 "
                     f"{by_name['student']['test_f1'] - by_name['tfidf-lr']['test_f1']:+.3f}")
    return lines
