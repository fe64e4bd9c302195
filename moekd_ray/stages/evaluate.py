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
from moekd_ray.train_loop import predict_logits, probs1, throughput


def evaluate_stage(ctx: RunContext, checkpoints: list[list], targets: dict, student, enc: Encoded) -> list[dict]:
    """The final table's rows (`result_row`), one MLflow run per model (same metric names, so the UI compares them
    side by side), a warning line per degenerate model; the headline metrics go on the parent run."""
    cfg, tracker, labels = ctx.cfg, ctx.tracker, ctx.labels
    with ctx.timer("evaluate"), tracker.stage("evaluate"):
        rows, test_probs = evaluate_all(cfg, checkpoints, targets, student, enc.experts, enc.student, labels)
        if cfg.eval.reference:
            rows.append(reference_row(cfg, ctx.funcs, labels, test_probs))
        tracker.log_table(rows, "results.json")
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
    """Accuracy/precision/recall/F1 on valid and test at each model's decision threshold (chosen on validation by
    eval.threshold; the student's is already in its weights), parameters, MB and inference throughput per model, and
    each model's (test P(vulnerable), threshold). checkpoints[k]: expert k's models (its fold models when
    cross-fitting: the expert is their mean, and it costs all of them). Throughput: functions/s at eval.batch_size
    and eval.threads."""
    bs, threads = cfg.eval.batch_size, cfg.eval.threads
    rows, test_probs, expert_seconds, expert_params, expert_mb = [], {}, [], 0, 0.0

    for k, members in enumerate(checkpoints):
        params, mb, seconds = 0, 0.0, 0.0
        for ckpt in members:
            with ckpt.as_directory() as folder:
                model = load_model(folder)
            seconds += 1.0 / throughput(model, enc_expert[k]["test"], bs, threads)
            params, mb = params + num_params(model), mb + size_mb(model)
        expert_seconds.append(seconds)
        expert_params, expert_mb = expert_params + params, expert_mb + mb
        probs = {s: probs1(targets[s]["expert_logits"][:, k]) for s in ("valid", "test")}
        rows.append(result_row(cfg, f"expert_{k}", probs, labels, params, mb, 1.0 / seconds, test_probs))
    # The mixture runs every expert (the router's cost is negligible next to them).
    mix = {s: targets[s]["mixture_probs"][:, 1] for s in ("valid", "test")}
    rows.append(result_row(cfg, "mixture", mix, labels, expert_params, expert_mb, 1.0 / sum(expert_seconds),
                           test_probs))
    probs = {s: probs1(predict_logits(student, enc_student[s], bs)) for s in ("valid", "test")}
    rows.append(result_row(cfg, "student", probs, labels, num_params(student), size_mb(student),
                           throughput(student, enc_student["test"], bs, threads), test_probs, threshold=0.5))
    return rows, test_probs


def result_row(cfg, name: str, probs: dict[str, np.ndarray], labels: dict, params: int, mb: float, rate: float,
               test_probs: dict, threshold: float | None = None) -> dict:
    """One model's row of the final table; `threshold` None: chosen on validation by eval.threshold. Its test
    P(vulnerable) and threshold go into `test_probs` (for the confusion matrices)."""
    if threshold is None:
        threshold = pick_threshold(cfg.eval, labels["valid"], probs["valid"])
    row = {"model": name, "threshold": threshold}
    for split in ("valid", "test"):
        metrics = classification_metrics(labels[split], probs[split], threshold)
        row.update({f"{split}_{k}": v for k, v in metrics.items()})
    row["degenerate"] = degenerate(labels["valid"], probs["valid"], cfg.eval.degenerate_share, cfg.eval.min_val_f1,
                                   threshold)
    test_probs[name] = (np.asarray(probs["test"]), threshold)
    return {**row, "params": params, "size_mb": mb, "functions_per_s": rate}


def reference_row(cfg, funcs: dict, labels: dict, test_probs: dict) -> dict:
    """The tfidf-lr baseline fitted on the same training rows, as a row of the final table."""
    ref = TfidfLR(cfg.seed, cfg.data.canonical).fit(funcs["train"], labels["train"], funcs["valid"],
                                                    labels["valid"])
    probs = {s: ref.predict_proba(funcs[s]) for s in ("valid", "test")}
    start = time.perf_counter()
    ref.predict_proba(funcs["test"][:256])
    rate = len(funcs["test"][:256]) / (time.perf_counter() - start)
    return result_row(cfg, "tfidf-lr", probs, labels, ref.num_params, ref.num_params * 4 / 1e6, rate, test_probs)


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
