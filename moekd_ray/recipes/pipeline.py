"""The MoEKD pipeline, top to bottom: data -> tokenizers -> partition -> experts -> router + aggregate -> distil ->
evaluate -> register. One MLflow parent run, a nested run per stage and per expert.

    moekd run jobs/quickstart.yaml
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from moekd_ray import console, progress, ray_runtime, tracking
from moekd_ray.config import MoEKDConfig, PretrainedConfig, dump_yaml, load_config
from moekd_ray.errors import ConfigError
from moekd_ray.augment import robust_transfer_set
from moekd_ray.attacks.workers import adversarial_renamings, format_summary, substitute_pool
from moekd_ray.recipes.attack import attack_model, log_attack
from moekd_ray.data import SPLITS, dataset_hash, describe, load_devign, split_records
from moekd_ray.baseline import TfidfLR
from moekd_ray.decision import decide_folder, decision_tags, load_decision, pick_threshold
from moekd_ray.metrics import (classification_metrics, comparison_figure, confusion_matrix_figure, degenerate,
                               size_accuracy_figure)
from moekd_ray.models import build_model, load_model, num_params, size_mb
from moekd_ray.partition import assign_parts, code_features, partition, partition_table
from moekd_ray.registry import promote_first
from moekd_ray.stages.aggregate import (aggregate, fit_gate, load_soft_targets, save_soft_targets, specialisation,
                                       specialisation_lines)
from moekd_ray.stages.distill import distill_student
from moekd_ray.stages.experts import by_expert, encode_for_experts, expert_logits, make_tokenizers, member_names, train_experts
from moekd_ray.stages.pretrain import with_pretrained_encoder
from moekd_ray.tokenization import encode, load_tokenizer
from moekd_ray.train_loop import predict_logits, probs1, throughput



@dataclass
class PipelineResult:
    run_dir: Path
    run_id: str
    model_uri: str | None
    table: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(cfg: MoEKDConfig, log=print, resume: str | None = None) -> PipelineResult:
    """The whole pipeline; `resume` (a run folder or MLflow run id of this config) continues an interrupted run:
    finished stages are reused from its folder, an unfinished Ray Train run resumes from its latest checkpoint."""
    # Every check before anything is written (not even the tracking store): every data row, then any model that
    # cannot be had (offline, misspelt, weights not safetensors; loading it once in the driver costs seconds).
    data = load_devign(cfg.data, cfg.seed)
    for spec in {s.name_or_path: s for s in cfg.experts.specs() if isinstance(s, PretrainedConfig)}.values():
        load_tokenizer(spec.name_or_path)
        build_model(spec, cfg.seed)
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)  # an unreachable server: here
    cfg = with_pretrained_encoder(cfg, log, data)  # experts with `source: pretrain`: its folder (pretrained, or reused)
    run_dir, parent_id = resume_target(cfg, resume, log) if resume else (
        Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{cfg.digest()}", None)
    log(f"data: {describe(data)}")
    if not resume:
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    console.attach_log(run_dir / console.LOG_FILE)  # with `moekd run`: Ray's, DeepSpeed's and the libraries' lines go there
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, ("experts", "distill"))  # a GPU without bf16: one line before any training
    labels = {s: np.asarray(data[s]["target"], dtype=np.int64) for s in SPLITS}
    funcs = {s: list(data[s]["func"]) for s in SPLITS}
    timer = StageTimer(log, ["tokenizers", "partition", "experts", "router", "distill", "evaluate",
                             *(["attack"] if cfg.attack.in_pipeline else []), "register"])
    finished = Finished(cfg, run_dir, bool(resume), log)  # what an interrupted run left (nothing for a new run)

    # Every MLflow write goes through the tracker: if the server stops answering, they are spooled in the run
    # folder and training goes on (`moekd sync <run folder>` completes the MLflow run).
    tracker = tracking.Tracker(run_dir, experiment_id, log, cfg.mlflow.tracking_uri)
    with tracker.run(parent_id, cfg.name) as run_id:
        log(f"run folder {run_dir}, MLflow run {run_id}" + (" (resumed)" if resume else ""))
        log(f"full log: {run_dir / console.LOG_FILE}")
        if parent_id is None:  # a new MLflow run (also when the resumed folder's run is not in this store)
            tracker.set_tags({"moekd.config_digest": cfg.digest(), "moekd.run_dir": str(run_dir.resolve())})
            tracker.log_config(cfg.model_dump(mode="json"))
            tracker.log_inputs(split_records(cfg.data, data))  # the UI's Datasets: what trained and tested it

        with timer("tokenizers"), tracker.stage("tokenizers"):
            expert_toks, student_tok = finished.tokenizers()
            if expert_toks is None:
                expert_toks, student_tok = make_tokenizers(cfg, funcs["train"], run_dir)
            else:
                timer.reused("tokenizers")
            enc_expert = encode_for_experts(cfg, expert_toks, funcs)
            student_max = cfg.distill.arch().max_length
            enc_student = {s: encode(student_tok, funcs[s], student_max) for s in SPLITS}
            tracker.log_artifact(run_dir / "tokenizers", "tokenizers")
            tracker.log_metrics({"student_vocab": len(student_tok),
                                 **{f"expert_{k}_vocab": len(t) for k, t in enumerate(expert_toks)}})

        with timer("partition"), tracker.stage("partition", cfg.partition.model_dump(mode="json")):
            features = {s: code_features(funcs[s], cfg.partition.hash_features) for s in SPLITS}
            parts = partition(funcs["train"], list(data["train"]["project"]), cfg.partition.strategy.value,
                              cfg.experts.k, cfg.seed, cfg.partition.hash_features)
            table = partition_table(parts, labels["train"], cfg.experts.k)
            tracker.log_table(table, "partition.json")
            for row in table:
                log(f"part {row['part']}: {row['rows']} rows, {row['vulnerable_share']:.1%} vulnerable")
                tracker.log_metrics({f"part_{row['part']}_rows": row["rows"],
                                     f"part_{row['part']}_vulnerable_share": row["vulnerable_share"]})

        with timer("experts"):
            members = [m for names in member_names(cfg) for m in names]
            results = finished.members()
            todo = [m for m in members if m not in results]
            if todo:
                if results:
                    log(f"experts: {', '.join(results)} finished before the interruption (reused); training "
                        f"{', '.join(todo)}, each from its latest reported checkpoint if it has one")
                fitted, finished_at = train_experts(cfg, enc_expert, labels, parts, run_dir, todo)
                ended = {m: ray_runtime.epoch_rows(r)[-1]["finished_at"] for m, r in results.items()}
                results.update(zip(todo, fitted))
                ended.update(zip(todo, finished_at))
                # Every member's stage run (a killed driver logged none: they are logged once all have trained).
                specs = [spec for spec in cfg.experts.specs() for _ in range(cfg.experts.folds)]
                for member, spec in zip(members, specs):
                    rows = ray_runtime.epoch_rows(results[member])
                    log(epoch_summary(member, rows))
                    span = (rows[0]["started_at"], ended[member])  # the MLflow run spans the training
                    with tracker.stage(member, spec.model_dump(mode="json"), span=span):
                        tracker.log_epochs(rows)
                        tracker.log_text(dump_yaml(spec.model_dump(mode="json")), "config.yaml")
                        tracker.log_table(rows, "epochs.json")
            else:
                timer.reused("experts")
            checkpoints = by_expert(cfg, [results[m].checkpoint for m in members])

        with timer("router"), tracker.stage("router", cfg.router.model_dump(mode="json")):
            soft_path = run_dir / "soft_targets.safetensors"
            targets = finished.soft_targets(soft_path)
            if targets is None:
                logits = expert_logits(cfg, checkpoints, enc_expert)  # every expert over every split, once
                router_epochs = []
                gates = fit_gate(cfg, features, logits, labels, log=log, history=router_epochs)
                tracker.log_epochs(router_epochs)
                targets = aggregate(cfg, logits, gates, labels)
                save_soft_targets(targets, soft_path, {"config_digest": cfg.digest()})
                tracker.log_artifact(soft_path)
            else:
                timer.reused("router")
            mean_w = targets["train"]["weights"].mean(0)
            tracker.log_metrics({f"train_mean_weight_{k}": float(w) for k, w in enumerate(mean_w)})
            # Do the experts specialise, and does the router follow the parts? On validation, every run.
            valid_parts = assign_parts(cfg.partition.strategy.value, funcs["train"], list(data["train"]["project"]),
                                       parts, funcs["valid"], list(data["valid"]["project"]), cfg.experts.k, cfg.seed,
                                       cfg.partition.hash_features, (features["train"], features["valid"]))
            spec = specialisation(targets["valid"], valid_parts, cfg.experts.k)
            for line in specialisation_lines(spec):
                log(line)
            tracker.log_text(json.dumps(spec, indent=1), "specialisation.json")
            tracker.log_metrics({"routing_entropy": spec["routing_entropy"],
                                 **{f"expert_{i}_part_{j}_val_accuracy": a for i, row in enumerate(spec["accuracy"])
                                    for j, a in enumerate(row)},
                                 **{f"part_{j}_weight_{i}": w for j, row in enumerate(spec["weight"])
                                    for i, w in enumerate(row)}})

        with timer("distill"), tracker.stage("distill", cfg.distill.model_dump(mode="json")):
            student_dir = run_dir / "student"
            if finished.student(student_dir):
                timer.reused("distill")
            else:
                soft = targets["train"]["soft_targets"]
                pool = substitute_pool(cfg, funcs["train"]) if cfg.distill.augment_ratio else []
                enc_train, train_labels, teacher, copies = robust_transfer_set(
                    cfg.distill, enc_student["train"], labels["train"], soft, funcs["train"], student_tok, student_max,
                    pool, cfg.seed, lambda: adversarial_renamings(cfg, run_dir, "uniform", funcs["train"], soft, pool,
                                                                  log), log)
                if copies:
                    tracker.log_metrics(copies)
                result = distill_student(cfg, {**enc_student, "train": enc_train}, {**labels, "train": train_labels},
                                         teacher, run_dir)
                tracker.log_epochs(ray_runtime.epoch_rows(result))
                tracker.log_artifact(run_dir / "deepspeed_config.json")
                # The decision threshold, chosen on validation, goes into the student's weights (models.shift_decision)
                # as the folder is written: a student folder is always one with its threshold applied.
                decision = ray_runtime.copy_atomically(result.checkpoint, student_dir, lambda folder: decide_folder(
                    cfg.eval, folder, enc_student["valid"], labels["valid"]))
                log(f"student: decision threshold {decision['threshold']:.3f} (by validation {cfg.eval.threshold}), "
                    "moved into its weights")
            student = load_model(student_dir)
            decision = load_decision(student_dir)
            tracker.set_tags(decision_tags(decision))
            log(f"student: {num_params(student):,} parameters, {size_mb(student):.2f} MB (float32)")

        with timer("evaluate"), tracker.stage("evaluate"):
            rows, test_probs = evaluate_all(cfg, checkpoints, targets, student, enc_expert, enc_student, labels)
            if cfg.eval.reference:
                rows.append(reference_row(cfg, funcs, labels, test_probs))
            tracker.log_table(rows, "results.json")
            tracker.log_figure(comparison_figure(rows, f"{cfg.name}: every model on test"), "model_comparison.png")
            for row in rows:  # one run per model, same metric names: the MLflow UI compares them side by side
                with tracker.stage(row["model"]):
                    tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and
                                         not isinstance(v, bool)})
                    fig = confusion_matrix_figure(labels["test"], *test_probs[row["model"]], f"{row['model']}, test")
                    tracker.log_figure(fig, f"confusion_{row['model']}_test.png")
            useless = {r["model"]: r["degenerate"] for r in rows if r["degenerate"]}
            for name, why in useless.items():
                log(f"warning: {name} is degenerate: it {why}")
            if useless:
                tracker.set_tags({"moekd.degenerate_models": ",".join(useless)})

        student_row = next(r for r in rows if r["model"] == "student")
        tracker.log_metrics(headline_metrics(rows))  # on the parent run: runs sort and compare by these
        if cfg.attack.in_pipeline:
            with timer("attack"), tracker.stage(f"attack_{cfg.attack.method}"):
                attack_rows, summary = attack_model(cfg, run_dir.resolve(), "student", "student", log)
                log(format_summary(cfg.attack.method, summary))
                log_attack(attack_rows, summary, cfg.attack, tracker, run_dir)
            student_row.update({f"{k}_{cfg.attack.method}": summary[k] for k in ("asr", "robust_accuracy")})
            tracker.log_metrics({f"student_{k}_{cfg.attack.method}": summary[k] for k in ("asr", "robust_accuracy")})

        with timer("register"):
            # The student's degenerate verdict is its row's (after the threshold in its weights).
            student_tags = decision_tags({**decision, "degenerate": student_row["degenerate"]})
            model_uri = tracker.log_student_model(
                student_dir, run_dir / "tokenizers" / "student", cfg.model_dump(mode="json"),
                cfg.mlflow.registered_model, {k: v for k, v in student_row.items() if isinstance(v, float)},
                tags={"moekd.data_hash": dataset_hash(data), **student_tags, **reference_tags(rows)},
            )
            tracker.set_tags(student_tags)
            champion = ""  # registered (not spooled): the first student that passes the gates becomes @champion
            if model_uri and cfg.mlflow.registered_model:
                registered, version = cfg.mlflow.registered_model, model_uri.rsplit("/", 1)[1]
                champion = f" ({promote_first(tracker.client, registered, version, cfg.registry.gates)})"
        tracker.log_metrics({f"seconds_{k}": v for k, v in timer.seconds.items()})
        tracker.set_tags({f"moekd.stage.{k}": v for k, v in timer.status.items()})
        # What the MLflow UI shows first: the final table as the parent run's description, and accuracy against
        # size (with the attack success rate where it was measured) as a plot.
        asr_key = f"asr_{cfg.attack.method}" if cfg.attack.in_pipeline else None
        tracker.set_tags({"mlflow.note.content": markdown_table(rows, asr_key)})
        tracker.log_figure(size_accuracy_figure(rows, f"{cfg.name}: test accuracy against size", asr_key),
                           "accuracy_vs_size.png")
        log(format_table(rows))
        for name, why in useless.items():
            log(f"warning: {name} is degenerate: it {why}")
        log(f"student model: {model_uri or 'registered by `moekd sync` (the tracking server is unreachable)'}"
            + champion)
        return PipelineResult(run_dir, run_id, model_uri, rows, timer.seconds)


def evaluate_all(cfg, checkpoints, targets, student, enc_expert, enc_student, labels) -> tuple[list[dict], dict]:
    """Accuracy/precision/recall/F1 on valid and test at each model's decision threshold (chosen on validation by
    eval.threshold; the student's is already in its weights), parameters, MB and inference throughput per model, and
    each model's (test P(vulnerable), threshold). checkpoints[k]: expert k's models (its fold models when cross-fitting: the
    expert is their mean, and it costs all of them). Throughput: functions/s at eval.batch_size and eval.threads."""
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
        row.update({f"{split}_{k}": v for k, v in classification_metrics(labels[split], probs[split], threshold).items()})
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


class StageTimer:
    """`with timer("name"):` keeps each stage's wall time and status (ran, or reused on resume); the console's
    status line names the stage while it runs, and one line says how it ended."""

    def __init__(self, log, stages: list[str]):
        self.log, self.stages, self.seconds, self.status = log, stages, {}, {}

    @contextlib.contextmanager
    def __call__(self, name):
        place = f"{self.stages.index(name) + 1}/{len(self.stages)}"
        progress.stage(name, self.stages.index(name) + 1, len(self.stages))
        self.status.setdefault(name, "ran")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        progress.stage(None)
        self.log(f"[{place}] {name} {self.status[name]} in {console.duration(self.seconds[name])}")

    def reused(self, name):
        self.status[name] = "reused"


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


def epoch_summary(name: str, rows: list[dict]) -> str:
    """One line for a trained model: its kept epoch's validation figures."""
    best = next((r for r in rows if r["epoch"] == rows[-1]["best_epoch"]), rows[-1])
    return (f"{name}: epoch {best['epoch']} of {len(rows)} kept, val acc {best['val_accuracy']:.3f} "
            f"f1 {best['val_f1']:.3f} auc {best['val_auc']:.3f}")


# ------------------------------------------------------------------------------------------------- resume
class Finished:
    """What the run folder already holds, for `--resume`: each stage asks here first and makes only what is
    missing. A new run's folder holds nothing."""

    def __init__(self, cfg: MoEKDConfig, run_dir: Path, resume: bool, log=print):
        self.cfg, self.run_dir, self.resume, self.log = cfg, run_dir, resume, log

    def tokenizers(self):
        """(expert tokenizers, student tokenizer) as saved, or (None, None)."""
        return saved_tokenizers(self.cfg, self.run_dir) if self.resume else (None, None)

    def members(self) -> dict:
        """The Ray Train results of the expert models that finished training (`finished_members`)."""
        return finished_members(self.cfg, self.run_dir) if self.resume else {}

    def soft_targets(self, path: Path) -> dict | None:
        return cached_soft_targets(path, self.cfg, self.log) if self.resume else None

    def student(self, folder: Path) -> bool:
        """Whether the student was distilled and saved (the folder appears complete or not at all)."""
        return self.resume and (folder / "model.safetensors").is_file()


def resume_target(cfg: MoEKDConfig, spec: str, log=print) -> tuple[Path, str | None]:
    """The run folder and MLflow run to continue; the run must have been made with this very config. MLflow writes
    spooled during a tracking outage are replayed first (as `moekd sync` would)."""
    run = tracking.pipeline_run(spec, "--resume")
    if run is None:
        raise ConfigError(f"--resume {spec}: neither a run folder (with config.yaml) nor an MLflow run id")
    folder, run_id = run
    saved = load_config(folder / "config.yaml")
    if saved.digest() != cfg.digest():
        raise ConfigError(f"--resume {spec}: that run used config {saved.digest()}, this config is {cfg.digest()}; "
                          f"resume with the run's own config: moekd run {folder / 'config.yaml'} --resume {spec}")
    replayed = tracking.replay_spool(folder, cfg.mlflow.tracking_uri)
    if replayed:
        run_id = replayed[0]
        log(f"replayed {replayed[1]} MLflow writes spooled during a tracking outage onto MLflow run {run_id}")
    return folder, run_id


def saved_tokenizers(cfg: MoEKDConfig, run_dir: Path):
    folder = run_dir / "tokenizers"
    names = [f"expert_{k}" for k in range(cfg.experts.k)] + ["student"]
    if not all((folder / n / "tokenizer.json").is_file() for n in names):
        return None, None
    toks = {n: load_tokenizer(folder / n) for n in names}
    return [toks[n] for n in names[:-1]], toks["student"]


def finished_members(cfg: MoEKDConfig, run_dir: Path) -> dict:
    """The Ray Train results, by member name (`member_names`), of the expert models whose run finished (all its
    epochs, or stopped early), as Ray recorded them in the run's storage."""
    done = {}
    for member in (m for names in member_names(cfg) for m in names):
        result = ray_runtime.saved_result(ray_runtime.run_storage(cfg, run_dir, member))
        if result is not None and ray_runtime.epoch_rows(result)[-1]["final"]:
            done[member] = result
    return done


def cached_soft_targets(path: Path, cfg: MoEKDConfig, log) -> dict | None:
    """The soft-target file if it is intact and of this config; else None (it is rebuilt), with a warning."""
    if not path.is_file():
        return None
    try:
        return load_soft_targets(path, expect_digest=cfg.digest())
    except ValueError as exc:
        log(f"warning: {path} is unusable ({exc}); rebuilding it")
        return None

