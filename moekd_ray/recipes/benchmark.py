"""`moekd benchmark`: MoEKD next to Compressor- and AVATAR-style single-teacher distillation, on the same footing.

    moekd benchmark jobs/benchmark_quick.yaml      # smoke comparison, under 20 minutes on 2 CPU cores
    moekd benchmark jobs/benchmark_full.yaml       # the BENCHMARKS.md table (hours; stop it and `--resume` it)

Top to bottom (`run_benchmark`):
1. data: train is split (seeded) into a labelled part the teachers learn from and a transfer part the students
   learn from through the teachers' soft targets only, as in Compressor; every figure is on the test split.
2. teachers, once, cached by a hash of what they depend on: the K experts on a partition of the labelled part and
   one single teacher of expert `benchmark.teacher_expert`'s model on all of it (K+1 Ray Train runs at once).
3. the router, on the labelled part (`stages.aggregate.fit_gate`).
4. the reference cells: each expert, the routed mixture, the single teacher and the tfidf-lr baseline (fitted on
   the labelled part); the single teacher and tfidf-lr are attacked too.
5. per seed, every method's soft targets on the transfer set and its student, distilled with DeepSpeed
   (`stages.distill.distill_trainer`); a seed's students are fitted concurrently. moekd-robust's transfer set
   also holds identifier-renamed copies of its functions (`augment.py`), drawn from the attacks' vocabulary;
   moekd-robust-adv's copies are the renamings an attack finds against the plain mean of the experts.
   Each student cell: test metrics, parameters, MB, throughput, p50 latency, every attack of `benchmark.attacks`
   on the same seeded functions with the same query budget.
6. the table is read back from the MLflow runs (mean ± std over seeds), with paired bootstrap confidence
   intervals of moekd minus compressor, avatar and uniform-moe (the router's own effect), and written as markdown and CSV with plots.
No method sees labels of the transfer set (alpha is 0 for all), and all use `distill.schedule.epochs`.

Every cell ((method, seed), or a reference model) is one nested MLflow run under the benchmark's run, tagged
complete when all of it is logged. `--resume` reopens the benchmark's run: complete cells are reused as they are,
an incomplete cell continues where it stopped (a student already saved is not distilled again, an unfinished
distillation resumes from its checkpoint, an attack already logged is not rerun), so an interrupted run of several
hours ends with the table an uninterrupted run gives.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import ray.train
import torch

from moekd_ray import ray_runtime, tracking
from moekd_ray.augment import adversarial_renamings, robust_transfer_set
from moekd_ray.baseline import SavedTfidfLR, TfidfLR
from moekd_ray.config import METHODS, MoEKDConfig, dump_yaml, load_config
from moekd_ray.errors import ConfigError
from moekd_ray.data import dataset_hash, describe, load_devign
from moekd_ray.metrics import axes, confusion_matrix_figure, finish, points_figure
from moekd_ray.models import load_model
from moekd_ray.scoring import max_input_length
from moekd_ray.partition import code_features, partition
from moekd_ray.stages.aggregate import (expert_weights, fit_gate, load_soft_targets, report_specialisation,
                                       save_soft_targets, soft_targets)
from moekd_ray.attacks.workers import attack_examples, format_summary, sample_examples, summarize
from moekd_ray.stages.distill import distill_trainer
from moekd_ray.stages.evaluate import combined_cost, model_cost, model_row, text_model_cost
from moekd_ray.stages.experts import encode_for_experts, expert_logits, expert_trainers, make_tokenizers
from moekd_ray.stages.pretrain import with_pretrained_encoder
from moekd_ray.router import mixture_probs
from moekd_ray.tokenization import encode, load_tokenizer, train_bpe
from moekd_ray.train_loop import predict_logits, probs1

PROTOCOL_SPLITS = ("train", "transfer", "valid", "test")  # Compressor's protocol: "train" = the labelled half
SINGLE_TEACHER = ("compressor", "avatar")  # methods distilled from the single teacher; the rest from the experts
BASELINES = (*SINGLE_TEACHER, "uniform-moe")  # what moekd's bootstrap intervals are taken against
METRICS = ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_vulnerable_share", "params", "size_mb",
           "functions_per_s", "latency_p50_ms", "seconds_train")
PREDICTIONS = "predictions/test.json"  # each model's test P(vulnerable), logged in its cell
ATTACK_METRICS = ("asr", "mean_queries", "robust_accuracy", "asr_safe", "asr_vulnerable")


@dataclass
class BenchmarkResult:
    bench_dir: Path
    run_id: str
    rows: list[dict]  # the table: one row per method or reference model, means and stds
    differences: list[dict]  # moekd minus compressor / avatar / uniform-moe, bootstrap intervals


class FaultInjected(RuntimeError):
    """Testing (ray.fault_injection = "benchmark:<n>"): the driver stops once after n complete cells."""


def run_benchmark(cfg: MoEKDConfig, log=print, resume: str | None = None) -> BenchmarkResult:
    if cfg.experts.folds != 1:
        raise ConfigError(f"experts.folds={cfg.experts.folds}: the benchmark's students learn from a held-out transfer "
                          "set instead of cross-fitted targets; set experts.folds=1")
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)  # fail before any work
    bench_dir, parent_id = resume_target(cfg, resume) if resume else (new_bench_dir(cfg), None)
    data = load_devign(cfg.data, cfg.seed)
    log(f"data: {describe(data)}")
    funcs, labels, projects = split_transfer(data, cfg.benchmark.labelled_fraction, cfg.seed)
    log(f"labelled part {len(labels['train'])} functions (teachers), transfer set {len(labels['transfer'])} (students)")
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, ("experts", "distill"))  # a GPU without bf16: one line before any training
    tcfg = with_pretrained_encoder(cfg, log, data)  # `source: pretrain` experts: the encoder's folder
    examples, pool = sample_examples(cfg)  # one seeded sample, the same for every model and attack

    tracker = tracking.Tracker(None, experiment_id, log, cfg.mlflow.tracking_uri)  # no run folder: no spool
    with SessionClock(bench_dir) as clock, tracker.run(parent_id, cfg.name) as run_id:
        if parent_id:
            log(f"== resuming benchmark {bench_dir} (MLflow run {parent_id})")
        else:
            tracker.set_tags({"moekd.benchmark": "1", "moekd.config_digest": results_digest(cfg),
                               "moekd.data_hash": dataset_hash(data), "moekd.run_dir": str(bench_dir.resolve())})
            tracker.log_config(cfg.model_dump(mode="json"))
            (bench_dir / "mlflow_run_id").write_text(run_id)
        cells = Cells(tracker, run_id, cfg.ray.fault_injection, bench_dir, clock)
        bench = BenchmarkRun(cfg, bench_dir, tracker, cells, funcs, labels, examples, pool, log)
        parts = teacher_parts(tcfg, funcs, projects)  # the experts train on them; the router may learn them too
        teachers = train_teachers(tcfg, funcs, labels, parts, tracker, log)
        start = time.perf_counter()
        features = {s: code_features(funcs[s], cfg.partition.hash_features) for s in PROTOCOL_SPLITS}
        gates = fit_gate(tcfg, features, teachers.logits["experts"], labels, parts, log=log)
        router_seconds = time.perf_counter() - start
        log_specialisation(tracker, tcfg, funcs, labels, projects, features, parts, teachers, gates, log)

        reference_cells(bench, tcfg, teachers, gates, router_seconds)
        tokenizers = {}  # students of the same vocabulary and length share one BPE
        for seed in cfg.benchmark.seeds:
            student_cells(bench, seed, teachers, gates, tokenizers)

        rows = benchmark_table(run_id, cfg.benchmark.attacks)
        differences = difference_intervals(rows, labels["test"], cfg.benchmark.attacks, cfg.benchmark.bootstrap,
                                           cfg.seed)
        wall = clock.total()
        tracker.log_metrics({"wall_seconds": wall, "sessions": len(clock.sessions)})
        write_outputs(rows, differences, bench_dir, cfg, wall, len(clock.sessions), log)
        tracker.log_artifact(bench_dir / "report", "report")
        return BenchmarkResult(bench_dir, run_id, rows, differences)


@dataclass
class BenchmarkRun:
    """What every cell of one benchmark reads: its config, folder and cells, the protocol's splits and the one
    seeded attack sample (`examples`, with the vocabulary `pool` the renaming attacks draw from), and the tracker
    that writes its MLflow runs."""
    cfg: MoEKDConfig
    folder: Path
    tracker: tracking.Tracker
    cells: "Cells"
    funcs: dict
    labels: dict
    examples: list
    pool: list[str]
    log: object


def reference_cells(bench: BenchmarkRun, tcfg: MoEKDConfig, teachers: "Teachers", gates: dict,
                    router_seconds: float) -> None:
    """One cell per expert, the routed mixture, the single teacher and tfidf-lr: test row, and the attacks the
    config asks for (the single teacher and tfidf-lr; every expert and the experts' plain mean with
    benchmark.attack_experts)."""
    cfg, b, cells, log = bench.cfg, bench.cfg.benchmark, bench.cells, bench.log
    log("== references: the teachers and tfidf-lr")
    references = ([f"expert_{k}" for k in range(cfg.experts.k)] + ["mixture", "teacher"]
                  + (["tfidf-lr"] if b.reference_tfidf else []))
    reference_rows = {}  # each expert's row: the mixture's cost is theirs together
    for name in references:
        if cells.complete(name):
            log(f"{name}: reused (complete before the interruption)")
            reference_rows[name] = cells.metrics(name)
            continue
        role = "reference" if name == "tfidf-lr" else "teacher"
        with cells.open(name, {"moekd.bench.method": name, "moekd.bench.role": role}) as logged:
            folder = teachers.folder / name if name != "tfidf-lr" else bench.folder / "references" / "tfidf-lr"
            if "test_accuracy" not in logged:
                row, probs = evaluate_reference(tcfg, name, teachers, gates, bench.funcs, bench.labels, router_seconds,
                                                folder, reference_rows)
                reference_rows[name] = row
                log_evaluation(bench.tracker, row, probs, bench.labels["test"], f"{name}, test",
                               bench.folder / "report" / f"confusion_{name}.png")
                log(f"{name}: test acc {row['test_accuracy']:.3f} f1 {row['test_f1']:.3f}, {row['size_mb']:.2f} MB")
            if name == "tfidf-lr" or (name == "teacher" and b.attack_teacher) \
                    or (name.startswith("expert_") and b.attack_experts):
                attack_all(bench.tracker, cfg, folder, bench.examples, bench.pool, logged, log)
            elif name == "mixture" and b.attack_experts:  # the plain mean of the experts (uniform-moe's teacher)
                attack_all(bench.tracker, cfg, teachers.folder, bench.examples, bench.pool, logged, log,
                           target="uniform")


def student_cells(bench: BenchmarkRun, seed: int, teachers: "Teachers", gates: dict, tokenizers: dict) -> None:
    """Every method's student of one seed not complete yet: distilled concurrently (one DeepSpeed Ray Train run
    each), and each scored and attacked in its cell as soon as its own distillation ends."""
    cfg, log = bench.cfg, bench.log
    todo = [m for m in cfg.benchmark.methods if not bench.cells.complete(f"{m}/seed{seed}")]
    if not todo:
        log(f"== students, seed {seed}: all reused (complete before the interruption)")
        return
    configs = {m: method_config(cfg, m, seed) for m in todo}
    encoded = {m: student_tokenizer(bench, configs[m], tokenizers) for m in todo}
    trainers, copies = {}, {}
    for m in todo:
        if not (student_folder(bench.folder, m, seed) / "distill.json").is_file():  # distill.json is written last
            trainers[m], copies[m] = student_trainer(bench, m, seed, configs[m], encoded[m], teachers, gates)
    saved = [m for m in todo if m not in trainers]
    log(f"== students, seed {seed}: {', '.join(trainers) or 'none'} distilled concurrently"
        + (f"; {', '.join(saved)} saved before the interruption" if saved else ""))
    for m in saved:
        student_cell(bench, m, seed, configs[m], encoded[m][1]["test"])
    # Each student is saved, scored and attacked as soon as its distillation ends, while the others go on (a
    # seed's cells do not wait for its slowest student). An unfinished distillation resumes from its latest
    # reported checkpoint, a finished one is restored as it ended (same run name and storage).
    for m, result in ray_runtime.fit_as_completed(trainers):
        folder = student_folder(bench.folder, m, seed)
        ray_runtime.copy_atomically(result.checkpoint, folder)
        encoded[m][0].save_pretrained(str(folder / "tokenizer"))
        (folder / "distill.json").write_text(json.dumps({"epochs": ray_runtime.epoch_rows(result), **copies[m]}))
        student_cell(bench, m, seed, configs[m], encoded[m][1]["test"])


def student_tokenizer(bench: BenchmarkRun, mcfg: MoEKDConfig, tokenizers: dict) -> tuple:
    """The (BPE, encoded transfer/valid/test) of a student's vocabulary size and length, trained once and shared."""
    arch = mcfg.distill.arch()
    key = (arch.vocab_size, arch.max_length)
    if key not in tokenizers:
        funcs = bench.funcs
        tok = train_bpe(funcs["train"] + funcs["transfer"], arch.vocab_size, arch.max_length, bench.cfg.data.canonical)
        tokenizers[key] = (tok, {s: encode(tok, funcs[s], arch.max_length) for s in PROTOCOL_SPLITS[1:]})
    return tokenizers[key]


def student_trainer(bench: BenchmarkRun, m: str, seed: int, mcfg: MoEKDConfig, encoded: tuple, teachers: "Teachers",
                    gates: dict) -> tuple:
    """The method's DeepSpeed Ray Train run on its transfer set (with its robust copies, if any), and what the
    copies were (for distill.json)."""
    cfg, funcs, labels, log = bench.cfg, bench.funcs, bench.labels, bench.log
    arch = mcfg.distill.arch()
    tok, enc = encoded
    soft = method_targets(mcfg, m, teachers.logits, gates)
    # Attack-found copies depend on the teachers only: found once (base seed), the same for every seed.
    adversarial = not mcfg.distill.augment_attack.startswith("random")
    train, train_labels, teacher, copies = robust_transfer_set(
        mcfg.distill, enc["transfer"], labels["transfer"], soft, funcs["transfer"], tok, arch.max_length,
        bench.pool, cfg.seed if adversarial else seed,
        lambda: adversarial_copies(mcfg.with_values({"seed": cfg.seed}), m, teachers.folder, funcs["transfer"], soft,
                                   bench.pool, bench.folder, log),
        lambda line: log(f"{m}: {line}"))
    trainer = distill_trainer(
        mcfg, {"train": train, "valid": enc["valid"]}, {"train": train_labels, "valid": labels["valid"]}, teacher,
        f"{bench.folder.name}-{m}-s{seed}", ray_runtime.storage_path(cfg, bench.folder), task=f"{m} seed {seed}")
    return trainer, copies


def student_cell(bench: BenchmarkRun, m: str, seed: int, mcfg: MoEKDConfig, enc_test: dict) -> None:
    """A saved student's cell: its distillation's epochs, test row and confusion matrix, then its attacks."""
    cfg, log = bench.cfg, bench.log
    folder = student_folder(bench.folder, m, seed)
    distilled = json.loads((folder / "distill.json").read_text())
    tags = {"moekd.bench.method": m, "moekd.bench.role": "student", "moekd.bench.seed": str(seed),
            "moekd.bench.student_dir": str(folder.resolve())}
    with bench.cells.open(f"{m}/seed{seed}", tags, mcfg.distill.model_dump(mode="json")) as logged:
        if "test_accuracy" not in logged:
            bench.tracker.log_epochs(distilled["epochs"])
            bench.tracker.log_metrics({k: v for k, v in distilled.items() if k != "epochs"})
            row, probs = evaluate_model(cfg, m, load_model(folder), enc_test, bench.labels["test"],
                                        sum(r["train_seconds"] for r in distilled["epochs"]))
            figure = bench.folder / "report" / f"confusion_{m}.png" if seed == cfg.benchmark.seeds[0] else None
            log_evaluation(bench.tracker, row, probs, bench.labels["test"], f"{m}, seed {seed}, test", figure)
            log(f"{m} seed {seed}: test acc {row['test_accuracy']:.3f} f1 {row['test_f1']:.3f}, "
                f"{row['test_vulnerable_share']:.0%} called vulnerable, {row['size_mb']:.2f} MB, "
                f"distilled in {row['seconds_train']:.0f} s")
        attack_all(bench.tracker, cfg, folder, bench.examples, bench.pool, logged, log)


# ------------------------------------------------------------------------------------------------ resume
def results_digest(cfg: MoEKDConfig) -> str:
    """Hash of what the benchmark computes: the config without its `ray` section (where and how it runs)."""
    tree = cfg.model_dump(mode="json")
    tree.pop("ray")
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def new_bench_dir(cfg: MoEKDConfig) -> Path:
    bench_dir = Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{results_digest(cfg)}"
    bench_dir.mkdir(parents=True)
    (bench_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    return bench_dir


def resume_target(cfg: MoEKDConfig, spec: str) -> tuple[Path, str]:
    """The benchmark folder and MLflow run to continue: `spec` is its folder, or "latest" (the newest folder of
    this config under output_dir). It must have been started with this config (the `ray` section aside)."""
    digest = results_digest(cfg)
    if spec == "latest":
        found = sorted(Path(cfg.output_dir).glob(f"{cfg.name}-*-{digest}"), key=lambda p: p.name)
        if not found:
            raise ConfigError(f"--resume: no benchmark of this config ({cfg.name}-*-{digest}) under {cfg.output_dir}; "
                              "run it without --resume first, or name its folder: --resume <folder>")
        spec = str(found[-1])
    folder = Path(spec)
    if not (folder / "mlflow_run_id").is_file():
        raise ConfigError(f"--resume {spec}: not a benchmark folder (no mlflow_run_id in it); name the folder the "
                          "benchmark printed, or use --resume without a value for the newest one")
    saved = results_digest(load_config(folder / "config.yaml"))
    if saved != digest:
        raise ConfigError(f"--resume {spec}: that benchmark used config {saved}, this one is {digest}; resume it "
                          f"with its own config: moekd benchmark {folder / 'config.yaml'} --resume {spec}")
    return folder, (folder / "mlflow_run_id").read_text().strip()


class SessionClock:
    """Wall time over every session of a benchmark (a resumed one adds a session), kept in sessions.json: saved
    after every cell and every `every_s` seconds in between, so a killed session loses at most that much."""

    def __init__(self, bench_dir: Path, every_s: float = 60.0):
        self.path, self.start = bench_dir / "sessions.json", time.perf_counter()
        self.sessions = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.sessions.append(0.0)
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.ticker = threading.Thread(target=self._tick, args=(every_s,), daemon=True)

    def __enter__(self) -> "SessionClock":
        self.ticker.start()
        return self

    def __exit__(self, *exc) -> None:  # however the session ends: its time is in the file, and no thread is left
        if not self.stopped.is_set():
            self.stop()

    def stop(self) -> None:
        self.stopped.set()
        self.ticker.join()
        self.save()

    def _tick(self, every_s: float) -> None:
        while not self.stopped.wait(every_s):
            self.save()

    def save(self) -> None:
        with self.lock:
            self.sessions[-1] = time.perf_counter() - self.start
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.sessions))
            tmp.replace(self.path)

    def total(self) -> float:
        """The benchmark's wall time so far; ends this session's clock (the time of the report is not counted)."""
        self.stop()
        return float(sum(self.sessions))


class Cells:
    """The benchmark's cells, one nested MLflow run each under its run (written by `tracker`), found by their
    `moekd.bench.cell` tag. `open` starts a cell's run, or reopens an incomplete one and says which metrics it
    already holds (those steps are skipped); the run is tagged complete when the block ends."""

    def __init__(self, tracker: tracking.Tracker, parent_id: str, fault_injection: str | None, bench_dir: Path,
                 clock: SessionClock):
        self.tracker, self.clock = tracker, clock
        self.runs = {r.tags["moekd.bench.cell"]: r for r in tracking.child_runs(parent_id)
                     if "moekd.bench.cell" in r.tags}
        run, _, at = (fault_injection or "").rpartition(":")
        self.stop_after = int(at) if run == "benchmark" else None
        self.fault_marker = bench_dir / "fault_injected"
        self.completed = 0

    def complete(self, key: str) -> bool:
        run = self.runs.get(key)
        return run is not None and run.tags.get("moekd.bench.complete") == "1"

    def metrics(self, key: str) -> dict[str, float]:
        """What a cell complete before this session logged."""
        return dict(self.runs[key].metrics)

    @contextlib.contextmanager
    def open(self, key: str, tags: dict, params: dict | None = None):
        """The cell's run (named `key`), new or reopened; yields the metric names it already holds."""
        run, tracker = self.runs.get(key), self.tracker
        if run is not None:
            with tracker.reopen(run.run_id):
                yield set(tracking.get_run(run.run_id).metrics)
                tracker.set_tags({"moekd.bench.complete": "1"})
        else:
            with tracker.stage(key, params):
                tracker.set_tags({**tags, "moekd.bench.cell": key})
                yield set()
                tracker.set_tags({"moekd.bench.complete": "1"})
        self.clock.save()
        self.completed += 1
        if self.completed == self.stop_after and not self.fault_marker.exists():
            self.fault_marker.touch()
            raise FaultInjected(f"fault injection: the benchmark stopped after {self.completed} cells")


def student_folder(bench_dir: Path, method: str, seed: int) -> Path:
    return bench_dir / "students" / f"{method}-s{seed}"


def adversarial_copies(cfg: MoEKDConfig, method: str, teachers_folder: Path, funcs: list[str], teacher: np.ndarray,
                       pool: list[str], bench_dir: Path, log) -> dict[int, str]:
    """The renamings an attack finds against the plain mean of the experts (`adversarial_renamings`), found once
    per benchmark and kept in its folder (they take a while and depend on the teachers only)."""
    path = bench_dir / f"adversarial_copies-{method}.json"
    if path.is_file():
        return {int(i): code for i, code in json.loads(path.read_text()).items()}
    found = adversarial_renamings(cfg, teachers_folder, "uniform", funcs, teacher, pool, log)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(i): code for i, code in found.items()}))
    tmp.replace(path)
    return found


# ------------------------------------------------------------------------------------------------- data
def split_transfer(data: dict, labelled_fraction: float, seed: int):
    """funcs, labels and projects per split of PROTOCOL_SPLITS: train -> (seeded) labelled part "train" + "transfer"."""
    train = data["train"]
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    cut = int(round(len(train) * labelled_fraction))
    if cut == 0 or cut == len(train):
        raise ConfigError(f"benchmark.labelled_fraction={labelled_fraction} leaves an empty part of "
                         f"{len(train)} training rows; use more rows or a fraction nearer 0.5")
    index = {"train": np.sort(order[:cut]), "transfer": np.sort(order[cut:])}
    funcs, labels, projects = {}, {}, {}
    for split in PROTOCOL_SPLITS:
        ds = train.select(index[split]) if split in index else data[split]
        funcs[split] = list(ds["func"])
        labels[split] = np.asarray(ds["target"], dtype=np.int64)
        projects[split] = list(ds["project"])
    return funcs, labels, projects


# ---------------------------------------------------------------------------------------------- teachers
@dataclass
class Teachers:
    folder: Path  # teacher/ and expert_<k>/: model + tokenizer/
    logits: dict  # {"experts": {split: [N, K, 2]}, "teacher": {split: [N, 1, 2]}}
    info: dict  # training seconds and reuse


def teacher_config(cfg: MoEKDConfig) -> MoEKDConfig:
    """The single teacher: one expert of expert `benchmark.teacher_expert`'s model and schedule, on the whole
    labelled part."""
    k = cfg.benchmark.teacher_expert
    one = {"router.top_k": None} if cfg.router.kind == "learned" else {}  # top_k <= k = 1
    return cfg.with_values({"experts.k": 1, "experts.models": None, "experts.schedules": None, **one,
                            "benchmark.teacher_expert": 0, "experts.model": cfg.experts.specs()[k].model_dump(mode="json"),
                            "experts.schedule": cfg.experts.schedule_of(k).model_dump(mode="json")})


def teachers_digest(cfg: MoEKDConfig) -> str:
    keys = {k: cfg.model_dump(mode="json")[k] for k in ("seed", "data", "partition", "experts")}
    keys["labelled_fraction"] = cfg.benchmark.labelled_fraction
    keys["teacher_expert"] = cfg.benchmark.teacher_expert
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def teacher_parts(cfg: MoEKDConfig, funcs: dict, projects: dict) -> np.ndarray:
    """Each labelled training function's part (partition.strategy), which expert j trains on as part j."""
    p = cfg.partition
    return partition(funcs["train"], projects["train"], p.strategy.value, cfg.experts.k, cfg.seed, p.hash_features)


def train_teachers(cfg: MoEKDConfig, funcs: dict, labels: dict, parts: np.ndarray, tracker: tracking.Tracker,
                   log) -> Teachers:
    """The K experts (expert j weighted towards `parts` == j) and the single teacher, all at once (their epochs in a
    nested run "teachers"), or the cached ones trained by an identical setting."""
    digest = teachers_digest(cfg)
    folder = Path(cfg.output_dir) / "benchmark-teachers" / digest
    logits_file = folder / "logits.safetensors"
    if (folder / "teachers.json").is_file():
        try:
            flat = load_soft_targets(logits_file, expect_digest=digest)
            info = {**json.loads((folder / "teachers.json").read_text()), "reused": 1}
            log(f"== teachers: reused from {folder} (trained in {info['seconds_train']:.0f} s)")
            return Teachers(folder, {"experts": {s: flat[s]["experts"] for s in PROTOCOL_SPLITS},
                                     "teacher": {s: flat[s]["teacher"] for s in PROTOCOL_SPLITS}}, info)
        except ValueError as exc:
            log(f"warning: cached teachers in {folder} unusable ({exc}); retraining them")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log(f"== teachers: {cfg.experts.k} experts + 1 single teacher, concurrently")
    start = time.perf_counter()
    expert_toks, _ = make_tokenizers(cfg, funcs["train"] + funcs["transfer"], folder)
    enc = encode_for_experts(cfg, expert_toks, funcs)
    tcfg, storage = teacher_config(cfg), ray_runtime.storage_path(cfg, folder)
    k = cfg.benchmark.teacher_expert
    # Named by the setting: a shared ray.storage_path holds every benchmark's teachers, and Ray Train continues a
    # run of the same name there (another setting's teachers, under fixed names).
    trainers = (expert_trainers(cfg, enc, labels, parts, f"teachers-{digest}-experts", storage)
                + expert_trainers(tcfg, enc[k : k + 1], labels, np.zeros_like(parts), f"teachers-{digest}-single",
                                  storage))
    with tracker.stage("teachers", cfg.experts.model_dump(mode="json")):
        results, _ = ray_runtime.fit_all(trainers)
        names = [f"expert_{k}" for k in range(cfg.experts.k)] + ["teacher"]
        for name, result, tok in zip(names, results, expert_toks + expert_toks[k : k + 1]):
            ray_runtime.copy_atomically(result.checkpoint, folder / name)
            tok.save_pretrained(str(folder / name / "tokenizer"))
            tracker.log_epochs(ray_runtime.epoch_rows(result), prefix=f"{name}.")
        checkpoints = [ray.train.Checkpoint.from_directory(str(folder / n)) for n in names]
        logits = {"experts": expert_logits(cfg, [[c] for c in checkpoints[:-1]], enc),
                  "teacher": expert_logits(tcfg, [checkpoints[-1:]], enc[k : k + 1])}
        info = {"seconds_train": time.perf_counter() - start, "reused": 0}
        tracker.log_metrics(info)
    save_soft_targets({s: {n: logits[n][s] for n in logits} for s in PROTOCOL_SPLITS}, logits_file,
                      {"config_digest": digest})
    (folder / "teachers.json").write_text(json.dumps(info))  # last: marks the cache complete
    log(f"== teachers trained in {info['seconds_train']:.0f} s, cached in {folder}")
    return Teachers(folder, logits, info)


def log_specialisation(tracker: tracking.Tracker, cfg: MoEKDConfig, funcs: dict, labels: dict, projects: dict,
                       features: dict, parts: np.ndarray, teachers: Teachers, gates: dict, log) -> None:
    """The experts' K x K validation accuracy by part and the router's weights per part (as `moekd run` prints them),
    on the benchmark's run."""
    split = {"labels": labels["valid"], "expert_logits": teachers.logits["experts"]["valid"],
             "weights": expert_weights(cfg, gates["valid"])}
    report_specialisation(cfg, tracker, log, (funcs["train"], projects["train"]), parts,
                          (funcs["valid"], projects["valid"]), features, split)


def evaluate_reference(cfg: MoEKDConfig, name: str, teachers: Teachers, gates: dict, funcs: dict, labels: dict,
                       router_seconds: float, folder: Path, rows: dict[str, dict]) -> tuple[dict, np.ndarray]:
    """A reference row: an expert, the single teacher, the routed mixture of the experts (its size and cost from
    the experts' `rows`, evaluated before it), or tfidf-lr (fitted here on the labelled part, C chosen on valid,
    and saved into `folder` for the attacks)."""
    latency_n = cfg.benchmark.latency_functions
    if name == "tfidf-lr":
        start = time.perf_counter()
        TfidfLR(cfg.seed, cfg.data.canonical).fit(funcs["train"], labels["train"], funcs["valid"],
                                                  labels["valid"]).save(folder)
        seconds_train = time.perf_counter() - start
        model = SavedTfidfLR(folder)
        probs = model(funcs["test"])
        cost = text_model_cost(model, model.num_params, funcs["test"], latency_n)
        return cell_row(cfg, name, probs, labels["test"], {**cost, "seconds_train": seconds_train}), probs
    if name == "mixture":
        mix = soft_targets(cfg, teachers.logits["experts"]["test"], gates["test"], 1.0)[:, 1]
        cost = combined_cost([rows[f"expert_{k}"] for k in range(cfg.experts.k)])
        return cell_row(cfg, name, mix, labels["test"],
                        {**cost, "seconds_train": teachers.info["seconds_train"] + router_seconds}), mix
    z = teachers.logits["teacher"]["test"][:, 0] if name == "teacher" else \
        teachers.logits["experts"]["test"][:, int(name.removeprefix("expert_"))]
    model = load_model(folder)
    enc = encode(load_tokenizer(folder / "tokenizer"), funcs["test"], max_input_length(model))
    return evaluate_model(cfg, name, model, enc, labels["test"], teachers.info["seconds_train"], probs1(z))


# ---------------------------------------------------------------------------------------------- students
def method_config(cfg: MoEKDConfig, method: str, seed: int) -> MoEKDConfig:
    """The config a method's student is distilled with (logged as its run's params)."""
    b = cfg.benchmark
    # The transfer set is unlabelled for every method. Compressor and AVATAR distil as published (no copies); the
    # mixture methods with the config's distill section (copies and consistency, when it sets them: MoEKD's recipe);
    # moekd-robust(-adv) with the benchmark's robust_* settings.
    values = {"seed": seed, "distill.alpha": 0.0}
    if method in SINGLE_TEACHER:
        values.update({"distill.temperature": b.teacher_temperature, "distill.augment_ratio": 0.0,
                       "distill.consistency_weight": 0.0})
    if method == "avatar":
        values.update({"distill.student_arch": b.avatar_student.model_dump(), "distill.max_length": None,
                       "distill.schedule.lr": b.avatar_lr, "distill.schedule.batch_size": b.avatar_batch_size})
    elif method == "uniform-moe":
        values["router"] = {"kind": "uniform"}
    elif method == "moekd-ultra":
        values.update({"distill.student": b.ultra_student, "distill.student_arch": None})
        if b.ultra_student_arch:  # its own length, as avatar's
            values.update({"distill.student_arch": b.ultra_student_arch.model_dump(), "distill.max_length": None})
    elif method in ("moekd-robust", "moekd-robust-adv"):
        values["distill.augment_ratio"] = b.robust_augment_ratio
        values["distill.consistency_weight"] = b.robust_consistency_weight
        values["distill.augment_attack"] = b.robust_copies if method == "moekd-robust" else b.robust_adv_attack
    return cfg.with_values(values)


def method_targets(mcfg: MoEKDConfig, method: str, logits: dict, gates: dict) -> np.ndarray:
    """The method's teacher distribution on the transfer set, softened at its T: [N, 2]."""
    if method in SINGLE_TEACHER:
        z = logits["teacher"]["transfer"]
        return mixture_probs(torch.from_numpy(np.array(z)), torch.ones(z.shape[:2]), mcfg.distill.temperature).numpy()
    return soft_targets(mcfg, logits["experts"]["transfer"], gates["transfer"])


def evaluate_model(cfg: MoEKDConfig, name: str, model, enc_test: dict, labels: np.ndarray, seconds_train: float,
                   probs: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """A model's cell row (`cell_row`: test metrics, parameters, MB, functions/s, p50 latency of one function alone)
    and its test P(vulnerable)."""
    if probs is None:
        probs = probs1(predict_logits(model, enc_test, cfg.eval.batch_size))
    cost = model_cost(cfg, model, enc_test, cfg.benchmark.latency_functions)
    return cell_row(cfg, name, probs, labels, {**cost, "seconds_train": seconds_train}), probs


def cell_row(cfg: MoEKDConfig, name: str, test_probs: np.ndarray, test_labels: np.ndarray, cost: dict) -> dict:
    """The pipeline's row (`stages.evaluate.model_row`) on test at P(vulnerable) >= 0.5 (no method gets a tuned
    cut), as a cell's metrics."""
    row = model_row(cfg, name, {"test": test_probs}, {"test": test_labels}, cost, threshold=0.5)
    return {k: v for k, v in row.items() if k not in ("model", "threshold", "degenerate")}


def log_evaluation(tracker: tracking.Tracker, row: dict, probs: np.ndarray, labels: np.ndarray, title: str,
                   figure: Path | None) -> None:
    """A model's test row (plus the share it calls vulnerable), its test P(vulnerable) (the bootstrap's input) and
    its confusion matrix, into the tracker's innermost run (its cell); the figure also into the report when
    `figure` names a file."""
    row["test_vulnerable_share"] = float((np.asarray(probs) >= 0.5).mean())
    tracker.log_metrics(row)
    tracker.log_dict({"p_vulnerable": [round(float(p), 6) for p in probs]}, PREDICTIONS)
    fig = confusion_matrix_figure(labels, probs, 0.5, title)
    if figure is not None:
        figure.parent.mkdir(exist_ok=True)
        fig.savefig(figure, dpi=120)
    tracker.log_figure(fig, "confusion_test.png")


def attack_all(tracker: tracking.Tracker, cfg: MoEKDConfig, folder: Path, examples: list, pool: list[str],
               logged: set[str], log, target: str = "student") -> None:
    """Every attack of benchmark.attacks not yet `logged` on the model in `folder` (`target`: as load_victim takes
    it): metrics `<metric>_<attack>` and each example's outcome (attacks/<attack>.json, the bootstrap's input) in
    the tracker's innermost run (its cell)."""
    for method in cfg.benchmark.attacks:
        if f"asr_{method}" in logged:
            continue
        acfg = cfg.with_values({"attack.method": method})
        start = time.perf_counter()
        rows = attack_examples(folder, target, acfg, examples, pool, log=lambda *_: None)
        summary = summarize(rows, time.perf_counter() - start)
        log(f"  {folder.name}: {format_summary(method, summary)}")
        tracker.log_dict({k: [r[k] for r in rows] for k in ("index", "label", "status", "queries")},
                         f"attacks/{method}.json")
        tracker.log_metrics({f"{k}_{method}": float(v) for k, v in summary.items()})


# ------------------------------------------------------------------------------------------------- table
def benchmark_table(parent_run_id: str, attacks: list[str]) -> list[dict]:
    """One row per method (students: mean and std over seeds) or reference model, read from the MLflow runs
    nested under the benchmark's run: every number in the report comes from a logged run."""
    runs = tracking.child_runs(parent_run_id)
    names = list(METRICS) + [f"{m}_{a}" for a in attacks for m in ATTACK_METRICS]
    by_method: dict[str, list] = {}
    for run in runs:
        method = run.tags.get("moekd.bench.method")
        if method and run.tags.get("moekd.bench.complete") == "1":
            by_method.setdefault(method, []).append(run)
    rows = []
    for method, group in by_method.items():
        role = group[0].tags["moekd.bench.role"]
        row = {"method": method, "role": role, "seeds": len(group) if role == "student" else 0,
               "run_ids": " ".join(sorted(r.run_id for r in group))}
        for name in names:
            values = [r.metrics[name] for r in group if name in r.metrics]
            if values:
                row[f"{name}_mean"] = float(np.mean(values))
                row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    # Students in METHODS order, then the references: teacher, tfidf-lr, mixture, experts.
    order = [*METHODS, "teacher", "tfidf-lr", "mixture", *(f"expert_{k}" for k in range(len(rows)))]
    return sorted(rows, key=lambda r: order.index(r["method"]))


def relative_gains(rows: list[dict], attacks: list[str]) -> list[dict]:
    """moekd against compressor and avatar, the way the paper states it: relative % of accuracy and F1, relative
    reduction of ASR and relative change of robust accuracy."""
    by = {r["method"]: r for r in rows}
    out = []
    for base in ("compressor", "avatar"):
        if "moekd" not in by or base not in by:
            continue
        m, b = by["moekd"], by[base]
        gain = {"against": base}
        for key in ["test_accuracy", "test_f1"] + [f"robust_accuracy_{a}" for a in attacks]:
            if f"{key}_mean" in m and b.get(f"{key}_mean"):
                gain[f"{key}_rel_pct"] = 100 * (m[f"{key}_mean"] / b[f"{key}_mean"] - 1)
        for a in attacks:
            if f"asr_{a}_mean" in m and b.get(f"asr_{a}_mean"):
                gain[f"asr_{a}_reduction_pct"] = 100 * (1 - m[f"asr_{a}_mean"] / b[f"asr_{a}_mean"])
        out.append(gain)
    return out


def difference_intervals(rows: list[dict], labels: np.ndarray, attacks: list[str], resamples: int,
                         seed: int) -> list[dict]:
    """moekd minus compressor, avatar and uniform-moe (the learned router against the plain mean of the same
    experts; each method's metric averaged over its seeds) with 95% paired
    bootstrap intervals: the test functions (accuracy, F1) or the attacked sample (each attack's ASR) are resampled
    once per draw for every model, so the interval is that of the difference on this data. Read back from the
    per-function outputs logged in each student's run."""
    by = {r["method"]: r for r in rows}
    if "moekd" not in by:
        return []
    labels = np.asarray(labels).astype(bool)
    rng = np.random.default_rng([seed, 7])
    test_draws = rng.integers(len(labels), size=(resamples, len(labels)))
    outputs = {m: [logged_outputs(run_id, attacks) for run_id in by[m]["run_ids"].split()]
               for m in ("moekd", *BASELINES) if m in by}
    n_attacked = len(outputs["moekd"][0][1][attacks[0]]["status"]) if attacks else 0
    attack_draws = rng.integers(n_attacked, size=(resamples, n_attacked)) if attacks else None

    def test_metrics(method: str, draws: np.ndarray) -> dict[str, np.ndarray]:
        pred = np.stack([probs >= 0.5 for probs, _ in outputs[method]])[:, draws]  # [seeds, draws, functions]
        truth = labels[draws]
        tp = (pred & truth).sum(-1)
        fp, fn = (pred & ~truth).sum(-1), (~pred & truth).sum(-1)
        return {"test_accuracy": (pred == truth).mean(-1).mean(0),
                "test_f1": (2 * tp / np.maximum(2 * tp + fp + fn, 1)).mean(0)}

    def asr(method: str, attack: str, draws: np.ndarray) -> np.ndarray:
        status = np.stack([np.asarray(a[attack]["status"]) for _, a in outputs[method]])[:, draws]
        success = (status == "success").sum(-1)
        return (success / np.maximum(success + (status == "failed").sum(-1), 1)).mean(0)

    full_test, full_attack = np.arange(len(labels))[None], np.arange(n_attacked)[None]
    resampled = {m: test_metrics(m, test_draws) for m in outputs}
    whole = {m: test_metrics(m, full_test) for m in outputs}
    out = []
    for base in BASELINES:
        if base not in outputs:
            continue
        pairs = {k: (resampled["moekd"][k], resampled[base][k], whole["moekd"][k][0] - whole[base][k][0])
                 for k in resampled["moekd"]}
        for a in attacks:
            pairs[f"asr_{a}"] = (asr("moekd", a, attack_draws), asr(base, a, attack_draws),
                                 asr("moekd", a, full_attack)[0] - asr(base, a, full_attack)[0])
        for metric, (ours, theirs, point) in pairs.items():
            low, high = np.quantile(ours - theirs, [0.025, 0.975])
            out.append({"against": base, "metric": metric, "difference": float(point), "low": float(low),
                        "high": float(high)})
    return out


def logged_outputs(run_id: str, attacks: list[str]) -> tuple[np.ndarray, dict]:
    """A cell's test P(vulnerable) and each attack's per-example outcomes, as logged in its run."""
    probs = np.asarray(tracking.load_dict(run_id, PREDICTIONS)["p_vulnerable"])
    return probs, {a: tracking.load_dict(run_id, f"attacks/{a}.json") for a in attacks}


def differences_markdown(differences: list[dict]) -> str:
    lines = ["| moekd minus | metric | difference | 95% CI | significant |", "|---|---|---|---|---|"]
    for d in differences:
        significant = "yes" if d["low"] > 0 or d["high"] < 0 else "no"
        lines.append(f"| {d['against']} | {d['metric']} | {d['difference']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] "
                     f"| {significant} |")
    return "\n".join(lines)


def differences_figure(differences: list[dict]):
    """moekd minus each baseline (BASELINES) per metric, with its 95% bootstrap interval."""
    fig, ax = axes((6, 0.35 * len(differences) + 1.2))
    names = [f"{d['metric']} vs {d['against']}" for d in differences]
    y = np.arange(len(differences))
    point = np.array([d["difference"] for d in differences])
    err = np.array([[d["difference"] - d["low"] for d in differences], [d["high"] - d["difference"] for d in differences]])
    ax.errorbar(point, y, xerr=err, fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, names, fontsize=7)
    return finish(fig, ax, "moekd minus the other method (ASR: lower is more robust)", "",
                  "differences with 95% paired bootstrap intervals")


def _cell(row: dict, name: str, fmt: str = ".3f") -> str:
    if f"{name}_mean" not in row:
        return "-"
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return f"{mean:{fmt}} ± {std:{fmt}}" if row["role"] == "student" and row["seeds"] > 1 else f"{mean:{fmt}}"


def markdown_table(rows: list[dict], attacks: list[str]) -> str:
    head = ["method", "seeds", "test acc", "precision", "recall", "F1", "% vulnerable"]
    for a in attacks:
        head += [f"ASR {a}", f"ASR {a} safe / vulnerable", f"queries {a}", f"robust acc {a}"]
    head += ["params", "MB", "functions/s", "p50 ms", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"] if r["role"] == "student" else f"*{r['method']}* ({r['role']})", str(r["seeds"] or "-")]
        cells += [_cell(r, n) for n in ("test_accuracy", "test_precision", "test_recall", "test_f1")]
        cells.append(f"{100 * r['test_vulnerable_share_mean']:.0f}" if "test_vulnerable_share_mean" in r else "-")
        for a in attacks:
            by_class = f"{_cell(r, f'asr_safe_{a}')} / {_cell(r, f'asr_vulnerable_{a}')}"
            cells += [_cell(r, f"asr_{a}"), "-" if by_class == "- / -" else by_class,
                      _cell(r, f"mean_queries_{a}", ".1f"), _cell(r, f"robust_accuracy_{a}")]
        cells += [f"{r['params_mean']:,.0f}", f"{r['size_mb_mean']:.2f}", _cell(r, "functions_per_s", ".0f"),
                  _cell(r, "latency_p50_ms", ".2f"), _cell(r, "seconds_train", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], differences: list[dict], bench_dir: Path, cfg: MoEKDConfig, wall: float,
                  sessions: int, log) -> None:
    """report/: benchmark.md, benchmark.csv, gains.csv, differences.csv and the plots (also logged to the parent
    run)."""
    attacks = cfg.benchmark.attacks
    report = bench_dir / "report"
    report.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(report / "benchmark.csv", index=False)
    gains = relative_gains(rows, attacks)
    pd.DataFrame(gains).to_csv(report / "gains.csv", index=False)
    text = markdown_table(rows, attacks)
    if gains:
        keys = [k for k in gains[0] if k != "against"]
        text += ("\n\nmoekd relative to the single-teacher methods, %:\n\n| against | " + " | ".join(keys) + " |\n|"
                 + "---|" * (len(keys) + 1) + "\n"
                 + "\n".join(f"| {g['against']} | " + " | ".join(f"{g.get(k, float('nan')):+.1f}" for k in keys) + " |"
                             for g in gains))
    if differences:
        pd.DataFrame(differences).to_csv(report / "differences.csv", index=False)
        text += ("\n\nmoekd minus compressor, avatar and uniform-moe (students averaged over seeds), 95% paired bootstrap "
                 f"intervals over test functions / attacked functions, {cfg.benchmark.bootstrap} resamples:\n\n"
                 + differences_markdown(differences))
    text += f"\n\nwall time {wall / 60:.1f} min over {sessions} session(s)"
    (report / "benchmark.md").write_text(text + "\n")
    log(text)
    students = [r for r in rows if r["role"] == "student"]
    figures = {"accuracy_vs_size.png": points_figure(
        {r["method"]: (r["size_mb_mean"], r["test_accuracy_mean"], r["test_accuracy_std"]) for r in students},
        "size (MB)", "test accuracy", "accuracy vs size (mean ± std over seeds)")}
    for a in attacks:
        figures[f"asr_vs_size_{a}.png"] = points_figure(
            {r["method"]: (r["size_mb_mean"], r[f"asr_{a}_mean"], r[f"asr_{a}_std"]) for r in students
             if f"asr_{a}_mean" in r}, "size (MB)", f"ASR ({a})", f"attack success rate vs size, {a}")
    if differences:
        figures["differences_ci.png"] = differences_figure(differences)
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        fig.savefig(report / name, dpi=120)
        plt.close(fig)
