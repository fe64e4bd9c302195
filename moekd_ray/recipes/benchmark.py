"""`moekd benchmark`: MoEKD next to Compressor- and AVATAR-style single-teacher distillation, on the same footing.

    moekd benchmark jobs/benchmark_quick.yaml      # smoke comparison, under 20 minutes on 2 CPU cores
    moekd benchmark jobs/benchmark_cpu.yaml        # the BENCHMARKS.md table

Top to bottom (`run_benchmark`):
1. data: train is split (seeded) into a labelled part the teachers learn from and a transfer part the students
   learn from through the teachers' soft targets only, as in Compressor; every figure is on the test split.
2. teachers, once, cached by a hash of what they depend on: the K experts on a partition of the labelled part and
   one single teacher of the first expert's architecture on all of it (K+1 Ray Train runs at once); their logits.
3. the router, on the labelled part (`recipes.aggregate.fit_gate`).
4. per seed, every method's soft targets on the transfer set and its student, distilled with DeepSpeed
   (`recipes.distill.distill_trainer`); a seed's students are fitted concurrently. moekd-robust's transfer set
   also holds identifier-renamed copies of its functions (`augment.py`), drawn from the attacks' vocabulary;
   moekd-robust-adv's copies are the renamings an attack finds against the plain mean of the experts.
5. each student and each teacher: test metrics, parameters, MB, throughput, p50 latency; each student and the
   single teacher: every attack of `benchmark.attacks` on the same seeded functions with the same query budget.
6. the table is read back from the MLflow runs just logged (mean ± std over seeds) and written as markdown and
   CSV, with plots: accuracy vs size, ASR vs size, a confusion matrix per method.
No method sees labels of the transfer set (alpha is 0 for all), and all use `distill.schedule.epochs`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import ray.train
import torch

from moekd_ray import ray_runtime, tracking
from moekd_ray.augment import with_renamed_copies
from moekd_ray.config import METHODS, MoEKDConfig, dump_yaml
from moekd_ray.errors import ConfigError
from moekd_ray.data import dataset_hash, describe, load_devign
from moekd_ray.metrics import classification_metrics, confusion_matrix_figure, points_figure
from moekd_ray.models import load_model, num_params, size_mb
from moekd_ray.scoring import max_input_length
from moekd_ray.partition import code_features, partition
from moekd_ray.recipes.aggregate import expert_weights, fit_gate, load_soft_targets, save_soft_targets
from moekd_ray.recipes.attack import adversarial_renamings, attack_examples, format_summary, sample_examples, summarize
from moekd_ray.recipes.distill import distill_trainer
from moekd_ray.recipes.experts import expert_logits, expert_trainers
from moekd_ray.recipes.pipeline import encode_for_experts, make_tokenizers
from moekd_ray.router import mixture_probs
from moekd_ray.tokenization import encode, load_tokenizer, train_bpe
from moekd_ray.train_loop import latency_p50_ms, predict_logits, probs1, throughput

PROTOCOL_SPLITS = ("train", "transfer", "valid", "test")  # Compressor's protocol: "train" = the labelled half
SINGLE_TEACHER = ("compressor", "avatar")  # methods distilled from the single teacher; the rest from the experts
METRICS = ("test_accuracy", "test_precision", "test_recall", "test_f1", "params", "size_mb", "functions_per_s",
           "latency_p50_ms", "seconds_train")
ATTACK_METRICS = ("asr", "mean_queries", "robust_accuracy")


@dataclass
class BenchmarkResult:
    bench_dir: Path
    run_id: str
    rows: list[dict]  # the table: one row per method or reference model, means and stds


def run_benchmark(cfg: MoEKDConfig, log=print) -> BenchmarkResult:
    b = cfg.benchmark
    if cfg.experts.folds != 1:
        raise ConfigError(f"experts.folds={cfg.experts.folds}: the benchmark's students learn from a held-out transfer "
                          "set instead of cross-fitted targets; set experts.folds=1")
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)  # fail before any work
    bench_dir = Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{cfg.digest()}"
    bench_dir.mkdir(parents=True)
    (bench_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    data = load_devign(cfg.data, cfg.seed)
    log(f"data: {describe(data)}")
    funcs, labels, projects = split_transfer(data, b.labelled_fraction, cfg.seed)
    log(f"labelled part {len(labels['train'])} functions (teachers), transfer set {len(labels['transfer'])} (students)")
    ray_runtime.init_ray(cfg)
    examples, pool = sample_examples(cfg)  # one seeded sample, the same for every model and attack

    with mlflow.start_run(run_name=cfg.name, experiment_id=experiment_id) as parent:
        mlflow.set_tags({"moekd.benchmark": "1", "moekd.config_digest": cfg.digest(),
                         "moekd.data_hash": dataset_hash(data), "moekd.run_dir": str(bench_dir.resolve())})
        tracking.log_config(cfg.model_dump(mode="json"))
        teachers = train_teachers(cfg, funcs, labels, projects, log)
        start = time.perf_counter()
        features = {s: code_features(funcs[s], cfg.partition.hash_features) for s in PROTOCOL_SPLITS}
        gates = fit_gate(cfg, features, teachers.logits["experts"], labels, log=log)
        router_seconds = time.perf_counter() - start

        log("== teachers (references)")
        for name, row in evaluate_teachers(cfg, teachers, gates, funcs, labels, router_seconds).items():
            with tracking.stage_run(name):
                mlflow.set_tags({"moekd.bench.method": name, "moekd.bench.role": "teacher"})
                mlflow.log_metrics(row)
                log(f"{name}: test acc {row['test_accuracy']:.3f} f1 {row['test_f1']:.3f}, {row['size_mb']:.2f} MB")
                if name == "teacher" and b.attack_teacher:
                    attack_all(cfg, teachers.folder / "teacher", examples, pool, log)

        tokenizers = {}  # students of the same vocabulary and length share one BPE
        adversarial_copies: dict[str, dict[int, str]] = {}
        for seed in b.seeds:
            log(f"== students, seed {seed}: {', '.join(b.methods)} (distilled concurrently)")
            configs = {m: method_config(cfg, m, seed) for m in b.methods}
            encoded, trainers, copies = {}, [], {}
            for m, mcfg in configs.items():
                arch = mcfg.distill.arch()
                key = (arch.vocab_size, arch.max_length)
                if key not in tokenizers:
                    tok = train_bpe(funcs["train"] + funcs["transfer"], arch.vocab_size, arch.max_length)
                    tokenizers[key] = (tok, {s: encode(tok, funcs[s], arch.max_length) for s in PROTOCOL_SPLITS[1:]})
                encoded[m] = tokenizers[key]
                tok, enc = encoded[m]
                train, train_labels = enc["transfer"], labels["transfer"]
                teacher = method_targets(mcfg, m, teachers.logits, gates)
                if mcfg.distill.augment_ratio:
                    adversarial, copy_seed = None, seed
                    if mcfg.distill.augment_attack != "random":
                        # Attack-found copies depend on the teachers only: found once, the same for every seed.
                        if m not in adversarial_copies:
                            adversarial_copies[m] = adversarial_renamings(
                                mcfg.with_values({"seed": cfg.seed}), teachers.folder, "uniform", funcs["transfer"],
                                teacher, pool, log)
                        adversarial, copy_seed = adversarial_copies[m], cfg.seed
                    train, train_labels, teacher, n = with_renamed_copies(
                        train, train_labels, teacher, funcs["transfer"], tok, arch.max_length, pool,
                        mcfg.distill.augment_ratio, copy_seed, adversarial)
                    log(f"{m}: {n:,} identifier-renamed copies ({len(adversarial or {}):,} attack-found) join the "
                        f"{len(labels['transfer']):,} transfer functions")
                    copies[m] = {"renamed_copies": n, "attack_found_copies": len(adversarial or {})}
                trainers.append(distill_trainer(
                    mcfg, {"train": train, "valid": enc["valid"]}, {"train": train_labels, "valid": labels["valid"]},
                    teacher, f"{bench_dir.name}-{m}-s{seed}", ray_runtime.storage_path(cfg, bench_dir),
                    task=f"{m} seed {seed}"))
            results, _ = ray_runtime.fit_all(trainers)
            for (m, mcfg), result in zip(configs.items(), results):
                tok, enc = encoded[m]
                folder = bench_dir / "students" / f"{m}-s{seed}"
                ray_runtime.copy_atomically(result.checkpoint, folder)
                tok.save_pretrained(str(folder / "tokenizer"))
                epochs = ray_runtime.epoch_rows(result)
                with tracking.stage_run(f"{m}/seed{seed}", mcfg.distill.model_dump(mode="json")):
                    mlflow.set_tags({"moekd.bench.method": m, "moekd.bench.role": "student",
                                     "moekd.bench.seed": str(seed), "moekd.bench.student_dir": str(folder.resolve())})
                    tracking.log_epochs(epochs)
                    mlflow.log_metrics(copies.get(m, {}))
                    row, probs = evaluate_model(cfg, load_model(folder), enc["test"], labels["test"],
                                                sum(r["train_seconds"] for r in epochs))
                    mlflow.log_metrics(row)
                    fig = confusion_matrix_figure(labels["test"], probs, 0.5, f"{m}, seed {seed}, test")
                    if seed == b.seeds[0]:
                        (bench_dir / "report").mkdir(exist_ok=True)
                        fig.savefig(bench_dir / "report" / f"confusion_{m}.png", dpi=120)
                    tracking.log_figure(fig, "confusion_test.png")
                    log(f"{m} seed {seed}: test acc {row['test_accuracy']:.3f} f1 {row['test_f1']:.3f}, "
                        f"{row['size_mb']:.2f} MB, distilled in {row['seconds_train']:.0f} s")
                    attack_all(cfg, folder, examples, pool, log)

        rows = benchmark_table(mlflow.MlflowClient(), parent.info.run_id, b.attacks)
        write_outputs(rows, bench_dir, cfg, log)
        mlflow.log_artifacts(str(bench_dir / "report"), "report")
        return BenchmarkResult(bench_dir, parent.info.run_id, rows)


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
    """The single teacher: one expert of the first expert's model, on the whole labelled part."""
    return cfg.with_values({"experts.k": 1, "experts.models": None, "experts.schedules": None, "router.top_k": None,
                            "experts.model": cfg.experts.specs()[0].model_dump(mode="json"),
                            "experts.schedule": cfg.experts.schedule_of(0).model_dump(mode="json")})


def teachers_digest(cfg: MoEKDConfig) -> str:
    keys = {k: cfg.model_dump(mode="json")[k] for k in ("seed", "data", "partition", "experts")}
    keys["labelled_fraction"] = cfg.benchmark.labelled_fraction
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def train_teachers(cfg: MoEKDConfig, funcs: dict, labels: dict, projects: dict, log) -> Teachers:
    """The K experts and the single teacher, all at once, or the cached ones trained by an identical setting."""
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
    parts = partition(funcs["train"], projects["train"], cfg.partition.strategy.value, cfg.experts.k, cfg.seed,
                      cfg.partition.hash_features)
    tcfg, storage = teacher_config(cfg), ray_runtime.storage_path(cfg, folder)
    trainers = (expert_trainers(cfg, enc, labels, parts, "experts", storage)
                + expert_trainers(tcfg, enc[:1], labels, np.zeros_like(parts), "teacher", storage))
    with tracking.stage_run("teachers", cfg.experts.model_dump(mode="json")):
        results, _ = ray_runtime.fit_all(trainers)
        names = [f"expert_{k}" for k in range(cfg.experts.k)] + ["teacher"]
        for name, result, tok in zip(names, results, expert_toks + expert_toks[:1]):
            ray_runtime.copy_atomically(result.checkpoint, folder / name)
            tok.save_pretrained(str(folder / name / "tokenizer"))
            tracking.log_epochs(ray_runtime.epoch_rows(result), prefix=f"{name}.")
        checkpoints = [ray.train.Checkpoint.from_directory(str(folder / n)) for n in names]
        logits = {"experts": expert_logits(cfg, [[c] for c in checkpoints[:-1]], enc),
                  "teacher": expert_logits(tcfg, [checkpoints[-1:]], enc[:1])}
        info = {"seconds_train": time.perf_counter() - start, "reused": 0}
        mlflow.log_metrics(info)
    save_soft_targets({s: {n: logits[n][s] for n in logits} for s in PROTOCOL_SPLITS}, logits_file,
                      {"config_digest": digest})
    (folder / "teachers.json").write_text(json.dumps(info))  # last: marks the cache complete
    log(f"== teachers trained in {info['seconds_train']:.0f} s, cached in {folder}")
    return Teachers(folder, logits, info)


def evaluate_teachers(cfg: MoEKDConfig, teachers: Teachers, gates: dict, funcs: dict, labels: dict,
                      router_seconds: float) -> dict[str, dict]:
    """The reference rows: the single teacher, each expert and the routed mixture of the experts."""
    rows = {}
    names = [f"expert_{k}" for k in range(cfg.experts.k)] + ["teacher"]
    for k, name in enumerate(names):
        z = teachers.logits["teacher"]["test"][:, 0] if name == "teacher" else teachers.logits["experts"]["test"][:, k]
        model = load_model(teachers.folder / name)
        enc = encode(load_tokenizer(teachers.folder / name / "tokenizer"), funcs["test"], max_input_length(model))
        rows[name], _ = evaluate_model(cfg, model, enc, labels["test"], teachers.info["seconds_train"], probs1(z))
    experts = [rows[n] for n in names[:-1]]
    w = torch.from_numpy(expert_weights(cfg, gates["test"]))
    mix = mixture_probs(torch.from_numpy(np.array(teachers.logits["experts"]["test"])), w).numpy()[:, 1]
    rows["mixture"] = {
        **{f"test_{k}": v for k, v in classification_metrics(labels["test"], mix).items()},
        "params": sum(r["params"] for r in experts), "size_mb": sum(r["size_mb"] for r in experts),
        # The mixture runs every expert; the router's cost is negligible next to them.
        "functions_per_s": 1.0 / sum(1.0 / r["functions_per_s"] for r in experts),
        "latency_p50_ms": sum(r["latency_p50_ms"] for r in experts),
        "seconds_train": teachers.info["seconds_train"] + router_seconds,
    }
    return rows


# ---------------------------------------------------------------------------------------------- students
def method_config(cfg: MoEKDConfig, method: str, seed: int) -> MoEKDConfig:
    """The config a method's student is distilled with (logged as its run's params)."""
    b = cfg.benchmark
    # The transfer set is unlabelled for every method; only moekd-robust adds renamed copies to it.
    values = {"seed": seed, "distill.alpha": 0.0, "distill.augment_ratio": 0.0}
    if method in SINGLE_TEACHER:
        values["distill.temperature"] = b.teacher_temperature
    if method == "avatar":
        values.update({"distill.student_arch": b.avatar_student.model_dump(), "distill.max_length": None,
                       "distill.schedule.lr": b.avatar_lr, "distill.schedule.batch_size": b.avatar_batch_size})
    elif method == "uniform-moe":
        values["router.kind"] = "uniform"
    elif method == "moekd-ultra":
        values.update({"distill.student": b.ultra_student, "distill.student_arch": None})
    elif method in ("moekd-robust", "moekd-robust-adv"):
        values["distill.augment_ratio"] = b.robust_augment_ratio
        values["distill.augment_attack"] = "random" if method == "moekd-robust" else b.robust_adv_attack
    return cfg.with_values(values)


def method_targets(mcfg: MoEKDConfig, method: str, logits: dict, gates: dict) -> np.ndarray:
    """The method's teacher distribution on the transfer set, softened at its T: [N, 2]."""
    if method in SINGLE_TEACHER:
        z = logits["teacher"]["transfer"]
        w = np.ones(z.shape[:2], dtype=np.float32)
    else:
        z = logits["experts"]["transfer"]
        w = expert_weights(mcfg, gates["transfer"])
    return mixture_probs(torch.from_numpy(np.array(z)), torch.from_numpy(w), mcfg.distill.temperature).numpy()


def evaluate_model(cfg: MoEKDConfig, model, enc_test: dict, labels: np.ndarray, seconds_train: float,
                   probs: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Test accuracy/precision/recall/F1, parameters, MB, functions/s (eval.batch_size at eval.threads threads),
    p50 latency of one function alone; and the test P(vulnerable)."""
    if probs is None:
        probs = probs1(predict_logits(model, enc_test, cfg.eval.batch_size))
    row = {f"test_{k}": v for k, v in classification_metrics(labels, probs).items()}
    row.update({"params": num_params(model), "size_mb": size_mb(model), "seconds_train": seconds_train,
                "functions_per_s": throughput(model, enc_test, cfg.eval.batch_size, cfg.eval.threads),
                "latency_p50_ms": latency_p50_ms(model, enc_test, cfg.eval.threads, cfg.benchmark.latency_functions)})
    return row, probs


def attack_all(cfg: MoEKDConfig, folder: Path, examples: list, pool: list[str], log) -> None:
    """Every attack of benchmark.attacks on the model in `folder`; metrics `<metric>_<attack>` in the active run."""
    for method in cfg.benchmark.attacks:
        acfg = cfg.with_values({"attack.method": method})
        start = time.perf_counter()
        rows = attack_examples(folder, "student", acfg, examples, pool, log=lambda *_: None)
        summary = summarize(rows, time.perf_counter() - start)
        log(f"  {folder.name}: {format_summary(method, summary)}")
        mlflow.log_metrics({f"{k}_{method}": float(v) for k, v in summary.items()})


# ------------------------------------------------------------------------------------------------- table
def benchmark_table(client, parent_run_id: str, attacks: list[str]) -> list[dict]:
    """One row per method (students: mean and std over seeds) or reference model, read from the MLflow runs
    nested under the benchmark's run: every number in the report comes from a logged run."""
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000)
    names = list(METRICS) + [f"{m}_{a}" for a in attacks for m in ATTACK_METRICS]
    by_method: dict[str, list] = {}
    for run in runs:
        method = run.data.tags.get("moekd.bench.method")
        if method:
            by_method.setdefault(method, []).append(run)
    rows = []
    for method, group in by_method.items():
        role = group[0].data.tags["moekd.bench.role"]
        row = {"method": method, "role": role, "seeds": len(group) if role == "student" else 0,
               "run_ids": " ".join(sorted(r.info.run_id for r in group))}
        for name in names:
            values = [r.data.metrics[name] for r in group if name in r.data.metrics]
            if values:
                row[f"{name}_mean"] = float(np.mean(values))
                row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    # Students in METHODS order, then the references: teacher, mixture, experts.
    order = [*METHODS, "teacher", "mixture", *(f"expert_{k}" for k in range(len(rows)))]
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


def _cell(row: dict, name: str, fmt: str = ".3f") -> str:
    if f"{name}_mean" not in row:
        return "-"
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return f"{mean:{fmt}} ± {std:{fmt}}" if row["role"] == "student" and row["seeds"] > 1 else f"{mean:{fmt}}"


def markdown_table(rows: list[dict], attacks: list[str]) -> str:
    head = ["method", "seeds", "test acc", "precision", "recall", "F1"]
    for a in attacks:
        head += [f"ASR {a}", f"queries {a}", f"robust acc {a}"]
    head += ["params", "MB", "functions/s", "p50 ms", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"] if r["role"] == "student" else f"*{r['method']}* (teacher)", str(r["seeds"] or "-")]
        cells += [_cell(r, n) for n in ("test_accuracy", "test_precision", "test_recall", "test_f1")]
        for a in attacks:
            cells += [_cell(r, f"asr_{a}"), _cell(r, f"mean_queries_{a}", ".1f"), _cell(r, f"robust_accuracy_{a}")]
        cells += [f"{r['params_mean']:,.0f}", f"{r['size_mb_mean']:.2f}", _cell(r, "functions_per_s", ".0f"),
                  _cell(r, "latency_p50_ms", ".2f"), _cell(r, "seconds_train", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], bench_dir: Path, cfg: MoEKDConfig, log) -> None:
    """report/: benchmark.md, benchmark.csv, gains.csv and the plots (also logged to the parent run)."""
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
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        fig.savefig(report / name, dpi=120)
        plt.close(fig)
