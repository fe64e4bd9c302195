"""The one schema for every moekd-ray option.

Every field has its default and its description here and nowhere else; YAML files under `jobs/` hold only
overrides. `extra="forbid"` everywhere so that a typo is an error, not a silently ignored key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from moekd_ray.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator


ATTACK_NAMES = ("mhm", "wir-random", "alert", "structural")
"""Every attack, spelled once (attacks.methods.ATTACKS has the same keys; a test checks). mhm, wir-random and alert
rename identifiers; structural makes semantics-preserving edits of the code's shape (attacks/structural.py)."""
AttackName = Literal[ATTACK_NAMES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------------------------------- data
class Subset(str, Enum):
    first = "first"
    random = "random"


class DataConfig(_Strict):
    dir: str | None = Field(
        None,
        description="Folder with train/valid/test .jsonl(.gz). Unset: $MOEKD_DATA_DIR, then ../shared/data/devign "
        "next to the checkout, then the Hugging Face hub dataset `hub_name`.",
    )
    hub_name: str = Field(
        "google/code_x_glue_cc_defect_detection", description="Hub dataset used when no local folder is found."
    )
    train_rows: int | None = Field(None, ge=1, description="Use only this many training rows (None: all).")
    eval_rows: int | None = Field(None, ge=1, description="Use only this many valid and test rows each (None: all).")
    subset: Subset = Field(Subset.random, description="How rows are picked when a row limit is set: first or random.")
    max_chars: int = Field(
        200_000, ge=1, description="Functions longer than this many characters are truncated (and counted in the log)."
    )
    train_projects: list[str] | None = Field(
        None, description="Keep only these projects' rows in train and valid (Devign: FFmpeg, qemu); None: all. With "
        "test_projects, a cross-project evaluation: train on FFmpeg, test on qemu, and the reverse.",
    )
    test_projects: list[str] | None = Field(None, description="Keep only these projects' rows in test; None: all.")
    input_transform: Literal["none", "canonical_identifiers"] = Field(
        "none", description="canonical_identifiers: every model (experts, student, the benchmark's baselines) reads "
        "a function with its parameters and locals renamed to v0, v1, ... by first occurrence (the renaming attacks' "
        "own tree-sitter finder), in training and in scoring alike (the transform is saved with each tokenizer, so "
        "the pyfunc, `moekd predict` and the attacks apply it too): renaming cannot change a prediction.",
    )

    @property
    def canonical(self) -> bool:
        """Models read functions after identifier canonicalisation (`input_transform`)."""
        return self.input_transform == "canonical_identifiers"


# ----------------------------------------------------------------------------------------------- partition
class PartitionStrategy(str, Enum):
    kmeans = "kmeans"
    syntax = "syntax"
    project = "project"
    length = "length"
    random = "random"


class PartitionConfig(_Strict):
    strategy: PartitionStrategy = Field(
        PartitionStrategy.kmeans,
        description="kmeans: k-means over hashed token TF-IDF; syntax: k-means over the syntax tree's units (kinds of "
        "function: pointer and memory handling, string handling, arithmetic, ...; no variable names); project: by "
        "source project (Devign: FFmpeg, qemu); length: by character-length quantiles; random: seeded random split.",
    )
    hash_features: int = Field(2**14, ge=16, description="Hashed TF-IDF width used by kmeans and by the router.")


# ------------------------------------------------------------------------------------------------- models
class ArchConfig(_Strict):
    """A RoBERTa-style encoder built from scratch (no pretrained weights)."""

    source: Literal["config"] = Field("config", description="config: build this architecture from scratch (the "
                                      "default when `source` is left out).")
    vocab_size: int = Field(5000, ge=300, description="BPE vocabulary trained on the training code.")
    hidden_size: int = Field(128, ge=8, description="Hidden width.")
    num_layers: int = Field(4, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    ffn_size: int = Field(512, ge=8, description="Feed-forward width.")
    max_length: int = Field(256, ge=16, le=4096, description="Tokens per function (longer ones are truncated).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout of hidden states and attention weights.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        return self


class PretrainedConfig(_Strict):
    """A pretrained checkpoint, by hub name or local folder, with its own tokenizer."""

    source: Literal["pretrained"] = Field("pretrained", description="pretrained: load name_or_path's weights.")
    name_or_path: str = Field(description="e.g. microsoft/codebert-base or a local folder.")
    max_length: int = Field(400, ge=16, le=4096, description="Tokens per function (longer ones are truncated).")


class NgramConfig(_Strict):
    """A fastText-style bag of hashed units (EmbeddingBag -> dropout -> linear): C-token n-grams, or the syntax tree's
    node-type paths and non-variable tokens. A different inductive bias from the encoder's (no order beyond n units,
    the whole function read), cheap to train on CPU."""

    source: Literal["ngram"] = Field("ngram", description="ngram: a bag of hashed units.")
    units: Literal["tokens", "syntax"] = Field(
        "tokens", description="tokens: C tokens and their n-grams; syntax: tree-sitter's syntax tree as root-ward "
        "paths of up to `ngram` node types plus every token that is not a variable's name (keywords, operators, "
        "types, fields, numbers, called functions): a structural expert that no renaming can move.",
    )
    buckets: int = Field(2**18, ge=16, le=2**24, description="Hash buckets shared by all units (embedding rows).")
    ngram: int = Field(2, ge=1, le=4, description="tokens: longest n-gram of C tokens (1: tokens only; 2: tokens + "
                       "pairs); syntax: longest node-type path.")
    dim: int = Field(64, ge=2, description="Embedding width.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on the pooled embedding.")
    max_length: int = Field(2048, ge=16, le=65536, description="N-grams read per function (from its start).")


class GraphConfig(_Strict):
    """A gated graph network over tree-sitter's syntax tree, in the spirit of Devign and ReVeal: nodes are the tree's
    nodes (punctuation left out), edges its parent-child links and each variable's flow from one use to the next.
    Variables' names are not read, only how they flow, so no renaming can move it; the shape of the code can."""

    source: Literal["graph"] = Field("graph", description="graph: a graph network over the syntax tree.")
    buckets: int = Field(2**16, ge=16, le=2**24, description="Hash buckets of the node labels (embedding rows).")
    dim: int = Field(64, ge=2, description="Node state width.")
    rounds: int = Field(4, ge=1, le=16, description="Message-passing steps: how far along the graph a node sees.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the pooled graph state.")
    max_length: int = Field(1024, ge=16, le=8192, description="Syntax-tree nodes read per function (the first in "
                            "pre-order).")


class PretrainSource(_Strict):
    """The encoder `moekd pretrain` trained with masked-LM on this config's code (`pretrain` section), with its
    tokenizer; the pipeline pretrains it first, or reuses the one with the same settings."""

    source: Literal["pretrain"] = Field("pretrain", description="pretrain: the encoder `moekd pretrain` trains.")
    max_length: int | None = Field(None, ge=16, le=4096, description="Tokens per function (None: pretrain.arch's).")


def _source_tag(value) -> str:
    # `source` may be left out of a YAML model block: it then means "config" (build from an architecture).
    return value.get("source", "config") if isinstance(value, dict) else getattr(value, "source", None)


ModelSource = Annotated[
    Union[Annotated[ArchConfig, Tag("config")], Annotated[PretrainedConfig, Tag("pretrained")],
          Annotated[NgramConfig, Tag("ngram")], Annotated[GraphConfig, Tag("graph")],
          Annotated[PretrainSource, Tag("pretrain")]],
    Discriminator(_source_tag),
]

# Student sizes after Compressor; "1.5mb" is the ultra-compact half-size student, "1mb" about half of that
# (the ultra student of the CPU benchmark, whose main student is "1.5mb": the 12-layer "3mb" does not learn from
# scratch in a CPU budget).
STUDENT_PRESETS: dict[str, ArchConfig] = {
    "3mb": ArchConfig(vocab_size=1000, hidden_size=96, num_layers=12, num_heads=8, ffn_size=64, max_length=256),
    "1.5mb": ArchConfig(vocab_size=1000, hidden_size=96, num_layers=6, num_heads=8, ffn_size=64, max_length=256),
    "1mb": ArchConfig(vocab_size=1000, hidden_size=96, num_layers=2, num_heads=8, ffn_size=64, max_length=256),
    "25mb": ArchConfig(vocab_size=6000, hidden_size=256, num_layers=6, num_heads=8, ffn_size=1024, max_length=256),
}


class Schedule(_Strict):
    epochs: int = Field(1, ge=1, description="Passes over the training data (at most: see patience).")
    batch_size: int = Field(16, ge=1, description="Micro-batch size per worker.")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, le=0.5, description="Share of all steps over which the learning rate "
                                "rises linearly from 0 to lr.")
    decay: Literal["linear", "cosine", "none"] = Field(
        "linear", description="After warm-up, the learning rate falls to 0 at the last step (linear, cosine) or stays.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient's global norm to this (None: no clip).")
    keep_best_by: Literal["auc", "accuracy", "f1", "loss", "last"] = Field(
        "auc", description="Validation metric that picks the epoch whose weights are kept (loss: lowest cross-entropy; "
        "last: the final epoch). auc is threshold-free, so the decision threshold can be chosen afterwards.")
    patience: int | None = Field(
        None, ge=1, description="Early stopping: stop after this many epochs without a better keep_best_by (None: off).")

    @model_validator(mode="after")
    def _patience_needs_metric(self):
        if self.patience is not None and self.keep_best_by == "last":
            raise ValueError("patience needs a validation metric to watch; set keep_best_by (e.g. auc) or drop patience")
        return self


class ResourcesConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel processes).")
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker; also its torch thread count.")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. {gpu_node: 1} to place the workers "
        "on nodes started with `ray start --resources`."
    )


class ExpertsConfig(_Strict):
    k: int = Field(2, ge=1, description="Number of experts = number of input-space parts.")
    model: ModelSource = Field(default_factory=ArchConfig, description="What each expert is built from.")
    models: list[ModelSource] | None = Field(
        None, description="One model per expert (length k), e.g. CodeBERT and GraphCodeBERT; overrides `model`."
    )
    train_on: Literal["part", "all_weighted"] = Field(
        "part",
        description="part: each expert trains only on its part; all_weighted: on all rows, with its part's loss "
        "multiplied by part_weight.",
    )
    part_weight: float = Field(4.0, ge=1, description="Loss weight of an expert's own part under all_weighted.")
    folds: int = Field(
        1, ge=1, le=10, description="Cross-fitting: each expert is `folds` models, each trained without one fold of "
        "the training split and predicting that fold, so the router and the student learn from targets the experts "
        "never trained on; on valid/test an expert is the mean of its fold models. 1: one model per expert, and the "
        "router and student see its in-sample (memorised) outputs.",
    )
    schedule: Schedule = Field(default_factory=Schedule, description="Expert training schedule.")
    schedules: list[Schedule] | None = Field(
        None, description="One schedule per expert (length k), e.g. a higher learning rate and larger batches for an "
        "n-gram bag than for an encoder; overrides `schedule` (fields left out take Schedule's defaults).",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per expert.")
    bf16: bool = Field(False, description="Train under bf16 autocast on GPU (weights and optimizer stay float32; "
                       "~2.4x faster for a CodeBERT-sized model on an H100); no effect on CPU.")

    @model_validator(mode="after")
    def _one_model_per_expert(self):
        for key in ("models", "schedules"):
            given = getattr(self, key)
            if given is not None and len(given) != self.k:
                raise ValueError(f"experts.{key} lists {len(given)} entries for k={self.k}; give exactly k or use "
                                 f"`{key[:-1]}`")
        return self

    def specs(self) -> list[ArchConfig | PretrainedConfig | NgramConfig | GraphConfig | PretrainSource]:
        """The model of each expert, in expert order."""
        return list(self.models) if self.models is not None else [self.model] * self.k

    def schedule_of(self, k: int) -> Schedule:
        return self.schedules[k] if self.schedules is not None else self.schedule


# ------------------------------------------------------------------------------------------------- router
class LearnedRouter(_Strict):
    """A gate MLP over the input's hashed TF-IDF, trained on the experts' frozen outputs."""

    kind: Literal["learned"] = Field("learned", description="learned: gate over the input's hashed TF-IDF; uniform: "
                                     "plain mean of the experts (takes no other router field).")
    hidden_size: int = Field(64, ge=1, description="Gate MLP hidden width.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the gate logits.")
    top_k: int | None = Field(None, ge=1, description="Keep the k largest weights per input (None: all, soft).")
    balance_weight: float = Field(0.01, ge=0, description="Weight of the load-balancing term.")
    part_loss_weight: float = Field(
        0.0, ge=0, le=100, description="Weight of a cross-entropy term teaching the gate each training row's part "
        "(expert j trained on part j): with experts that specialise, the gate then routes a function to its part's "
        "expert (0: the mixture's label likelihood alone, which routes by part only weakly).",
    )
    epochs: int = Field(30, ge=1, description="Router training epochs (full batch over the transfer set).")
    lr: float = Field(1e-3, gt=0, description="Router learning rate.")


class UniformRouter(_Strict):
    """The plain mean of the experts (uniform-moe): nothing to train, so nothing to set."""

    kind: Literal["uniform"] = Field("uniform", description="uniform: plain mean of the experts.")


def _router_tag(value) -> str:
    # `kind` may be left out of a YAML router block: it then means the learned router.
    return value.get("kind", "learned") if isinstance(value, dict) else getattr(value, "kind", None)


RouterConfig = Annotated[
    Union[Annotated[LearnedRouter, Tag("learned")], Annotated[UniformRouter, Tag("uniform")]],
    Discriminator(_router_tag),
]


# ----------------------------------------------------------------------------------------------- distill
class DistillConfig(_Strict):
    student: str = Field("3mb", description=f"Student size preset: one of {sorted(STUDENT_PRESETS)}.")
    student_arch: ArchConfig | None = Field(None, description="Explicit student architecture; overrides `student`.")
    max_length: int | None = Field(None, ge=16, le=4096, description="Student tokens per function (None: the preset's).")
    temperature: float = Field(10.0, gt=0, description="Distillation temperature T (KL scaled by T^2).")
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of hard-label cross-entropy; 0 = soft targets only.")
    augment_ratio: float = Field(
        0.0, ge=0, le=8, description="Robust distillation: identifier-renamed copies per transfer-set function, "
        "each distilled towards its original's soft targets (0: off; 0.5: half the functions get one copy).",
    )
    augment_attack: Literal[("random", "random-edits") + ATTACK_NAMES] = Field(  # type: ignore[valid-type]
        "random", description="How the copies are made: random names (random), random structural edits "
        "(random-edits), or what an attack finds against the plain mean of the experts (a function's first copy; "
        "random where the attack changes nothing).",
    )
    augment_budget: int = Field(30, ge=1, description="Attack queries per function for adversarial copies.")
    consistency_weight: float = Field(
        0.0, ge=0, le=10, description="Consistency distillation (needs augment_ratio > 0): each copy also carries its "
        "original into its batch, and the loss adds this weight x T^2 KL(student_T(original) || student_T(copy)), "
        "the original's side held fixed: a copy is pulled towards the student's own answer on its original as well "
        "as towards the teachers' target (0: off).",
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    bf16: bool = Field(False, description="bf16 mixed precision (GPUs with bf16; fp16 is not offered: CPU lacks it).")
    cpu_shm_comm: bool = Field(
        False, description="On CPU, build DeepSpeed's shared-memory allreduce op (~70 s compile per fresh start)."
    )
    schedule: Schedule = Field(default_factory=lambda: Schedule(epochs=2, batch_size=16, lr=1e-3),
                               description="Student training schedule.")
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_workers=2),
                                       description="Distillation workers (DeepSpeed data parallel).")

    @model_validator(mode="after")
    def _known_preset(self):
        if self.consistency_weight and not self.augment_ratio:
            raise ValueError(f"consistency_weight={self.consistency_weight} needs copies to be consistent with: set "
                             "augment_ratio > 0 (e.g. 1) or consistency_weight 0")
        if self.student not in STUDENT_PRESETS:  # checked even when student_arch overrides it: a typo is an error
            raise ValueError(f"unknown student preset {self.student!r}; use one of {sorted(STUDENT_PRESETS)}")
        return self

    def arch(self) -> ArchConfig:
        arch = self.student_arch or STUDENT_PRESETS[self.student]
        return arch.model_copy(update={"max_length": self.max_length}) if self.max_length else arch


# ---------------------------------------------------------------------------------------------- pretrain
class PretrainSchedule(Schedule):
    keep_best_by: Literal["loss", "last"] = Field(
        "loss", description="Which epoch's encoder to keep: the lowest held-out masked-LM loss, or the last.")


class PretrainConfig(_Strict):
    """Masked-LM pretraining of a RoBERTa-style encoder on unlabelled C functions (`moekd pretrain`; the pipeline
    runs it first when an expert has `source: pretrain`). The corpus is the training split's functions (labels
    unused) plus `extra_corpus`; never a validation or test function."""

    arch: ArchConfig = Field(
        default_factory=lambda: ArchConfig(vocab_size=4000, hidden_size=64, num_layers=2, num_heads=4, ffn_size=256),
        description="The encoder (its BPE vocabulary is trained on the corpus).")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked per function, drawn anew each "
                             "epoch (80% <mask>, 10% a random token, 10% unchanged; RoBERTa's dynamic masking).")
    extra_corpus: list[str] = Field(
        default_factory=list, description="More unlabelled C code: folders (every *.c and *.h, split into "
        "functions) or .jsonl files with a `func` field. Functions whose whitespace-normalised text equals a "
        "validation or test function are dropped (one line says how many).")
    holdout: float = Field(0.02, gt=0, lt=0.5, description="Share of the corpus held out for the per-epoch "
                           "masked-LM loss and masked-token accuracy.")
    schedule: PretrainSchedule = Field(default_factory=lambda: PretrainSchedule(epochs=2, batch_size=32, lr=1e-3),
                                       description="Pretraining schedule.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    bf16: bool = Field(False, description="bf16 mixed precision (GPUs with bf16).")
    cpu_shm_comm: bool = Field(False, description="As distill.cpu_shm_comm.")
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_workers=2),
                                       description="Pretraining workers (DeepSpeed data parallel).")


# --------------------------------------------------------------------------------------- infra: ray, mlflow
class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Cluster address; None: $RAY_ADDRESS if set, else a local Ray started on 127.0.0.1."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all).")
    storage_path: str | None = Field(
        None, description="Ray Train checkpoint storage (on a cluster: a folder every node mounts, or a URI such as "
        "s3://bucket/moekd); every reader of a run's checkpoints (--resume, attack --target expert_<k>, tune's best "
        "trial) looks where the run's config.yaml says. None: <run folder>/ray (a search's: <output_dir>/tune or "
        "<output_dir>/student_search)."
    )
    max_failures: int = Field(
        2, ge=0, description="Restarts of a Ray Train run after a worker dies; it resumes from its latest checkpoint. "
        "In a search (tune, student_search), Tune reruns the failed trial instead, up to this many times."
    )
    fault_injection: str | None = Field(
        None, pattern=r"^\w+:[1-9][0-9]*$", description="Testing: '<run>:<step>' (run = expert_<k> or student) makes "
        "that run's rank-0 worker exit hard once at that optimizer step (counted over all epochs, from 1)."
    )


class MLflowConfig(_Strict):
    tracking_uri: str = Field("sqlite:///mlruns.db", description="sqlite:///file.db, a folder, or http://host:port.")
    experiment: str = Field("moekd", description="MLflow experiment name.")
    registered_model: str | None = Field(
        "moekd-student", description="Registry name for the student (None: do not register)."
    )


class EvalConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="Inference batch size.")
    threads: int = Field(2, ge=1, description="Torch threads for evaluation and the throughput figure.")
    threshold: Literal["balanced_accuracy", "accuracy", "f1", "mcc"] | Annotated[float, Field(gt=0, lt=1)] = Field(
        "balanced_accuracy", description="Decision threshold on P(vulnerable) of every evaluated model: the cut that "
        "maximises a validation metric, or a fixed value. balanced_accuracy (the mean of the two classes' recalls) "
        "does not depend on the validation split's class balance, so a cut chosen on a split with another balance than "
        "the one scored later does not over- or under-predict vulnerable (Devign's valid split: 41.5% vulnerable, "
        "test: 45.9%); accuracy and f1 can pick a cut that labels everything one class on an unbalanced split; mcc "
        "(Matthews correlation) is 0 for a one-class model. The student's cut is moved into its weights (the "
        "registered model then says vulnerable at P >= 0.5 exactly where the chosen cut applies) and recorded as "
        "moekd.threshold.",
    )
    degenerate_share: float = Field(
        0.95, gt=0.5, le=1, description="A model that labels at least this share of the validation functions with one "
        "class is degenerate: a warning, the tag moekd.degenerate=true, and `registry promote` refuses it.",
    )
    min_val_f1: float = Field(0.2, ge=0, le=1, description="A model whose validation F1 is below this is degenerate too.")
    reference: bool = Field(
        True, description="Fit the tfidf-lr reference (TF-IDF of C-token uni+bigrams + logistic regression, C chosen "
        "on valid) on the same training rows and show it in the final table.",
    )


# -------------------------------------------------------------------------------------------------- tune
class UniformDist(_Strict):
    dist: Literal["uniform"] = Field("uniform", description="uniform: any value in [low, high].")
    low: float = Field(description="Lowest value.")
    high: float = Field(description="Highest value (above low).")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class LogUniformDist(UniformDist):
    dist: Literal["loguniform"] = Field("loguniform", description="loguniform: uniform in log(value), for scales.")
    low: float = Field(gt=0, description="> 0 (log scale).")


class ChoiceDist(_Strict):
    dist: Literal["choice"] = Field("choice", description="choice: one of `values`.")
    values: list = Field(min_length=1, description="The values to pick from (null allowed, e.g. for top_k).")


Distribution = Annotated[Union[UniformDist, LogUniformDist, ChoiceDist], Field(discriminator="dist")]

# Fields a trial may change: all act after the experts, so trials reuse the cached expert logits.
TUNABLE = ("router.temperature", "router.top_k", "distill.temperature", "distill.alpha", "distill.schedule.lr")


def _default_space() -> dict:
    return {
        "router.temperature": LogUniformDist(low=0.5, high=2.0),
        "distill.temperature": ChoiceDist(values=[1, 2, 4, 10]),
        "distill.alpha": UniformDist(low=0.0, high=1.0),
        "distill.schedule.lr": LogUniformDist(low=3e-4, high=3e-3),
    }


ROBUST_ATTACK_N = 30  # tune.attack_n of a robust_f1 search that does not set it


class TuneConfig(_Strict):
    from_run: str | None = Field(
        None, description="MLflow run id of a finished pipeline run whose experts and router trials reuse "
        "(None: run the pipeline first)."
    )
    space: dict[str, Distribution] = Field(
        default_factory=_default_space, description=f"Search space over {list(TUNABLE)}: uniform, loguniform, choice."
    )
    num_samples: int = Field(8, ge=1, description="Trials.")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once (each needs distill.resources).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo runs all.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of trials per rung.")
    search: Literal["random", "optuna"] = Field("random", description="random sampling or Optuna's TPE sampler.")
    metric: Literal["val_f1", "val_accuracy", "val_loss", "robust_f1"] = Field(
        "val_f1", description="Objective (val_loss is minimised, the others maximised). robust_f1: last-epoch val_f1 "
        "- robustness_weight x ASR of attack.method (attack.query_budget queries a function) on attack_n validation "
        "functions, measured once after a trial's last epoch; ASHA then stops on per-epoch val_f1.",
    )
    robustness_weight: float | None = Field(
        None, gt=0, description="robust_f1 only, and required there: w in val_f1 - w x ASR."
    )
    attack_n: int | None = Field(
        None, ge=1, description="robust_f1 only: validation functions attacked per trial, one seeded sample shared "
        f"by every trial (unset: {ROBUST_ATTACK_N}, written into the resolved config).",
    )
    register_best: bool = Field(True, description="Register the best trial's student in the model registry.")

    @model_validator(mode="after")
    def _robust_fields(self):
        if self.metric != "robust_f1":
            for key in ("robustness_weight", "attack_n"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies only to metric robust_f1 (metric is {self.metric}); "
                                     "set metric: robust_f1 or drop it")
        elif self.robustness_weight is None:
            raise ValueError("metric robust_f1 needs robustness_weight (w in val_f1 - w x ASR), e.g. 0.5")
        elif self.attack_n is None:
            self.attack_n = ROBUST_ATTACK_N
        return self


# ------------------------------------------------------------------------------------------------ attack
class AttackConfig(_Strict):
    method: AttackName = Field(
        "mhm", description="mhm: Metropolis-Hastings renaming; wir-random: importance-ranked random renaming; "
        "alert: embedding-nearest substitutes, greedy then genetic search; structural: semantics-preserving edits "
        "(dead code, swaps, for/while, braces, parentheses, split/merged declarations) searched as MHM searches."
    )
    split: Literal["valid", "test"] = Field("test", description="Split the attacked functions are drawn from.")
    n: int = Field(200, ge=1, description="Functions attacked (a seeded sample of the split).")
    query_budget: int = Field(300, ge=1, description="Model queries allowed per attacked function.")
    candidates: int = Field(16, ge=1, description="Substitutes tried per step (one batched query).")
    population: int = Field(16, ge=2, description="alert: genetic-search population.")
    vocab_size: int = Field(5000, ge=10, description="Identifier vocabulary (from the training split) to draw from.")
    vocab_rows: int = Field(4000, ge=10, description="Training functions the vocabulary is read from.")
    include_function_name: bool = Field(False, description="Also rename the function's own name.")
    workers: int = Field(2, ge=1, description="Ray tasks attacking in parallel (each loads the model once).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPU share of each attacking worker (Ray num_gpus; e.g. 0.25: "
                                   "four workers share a GPU); 0: CPU. A GPU cluster's CodeBERT-sized victims need it.")
    in_pipeline: bool = Field(False, description="`moekd run`: attack the student as a last stage.")


# --------------------------------------------------------------------------------------------- benchmark
METHODS = ("compressor", "avatar", "uniform-moe", "moekd", "moekd-ultra", "moekd-robust", "moekd-robust-adv")

# AVATAR's released Devign student (Shi et al., ICSE-SEIP 2023): BPE vocabulary 19,302, 7 layers, hidden 18,
# FFN 1,491, 6 heads, 351 tokens; trained at lr 1e-3, batch 64.
AVATAR_STUDENT = ArchConfig(vocab_size=19302, hidden_size=18, num_layers=7, num_heads=6, ffn_size=1491, max_length=351)


class BenchmarkConfig(_Strict):
    """`moekd benchmark`: every method on the same data, transfer set, student preset, seeds and attack sample."""

    methods: list[Literal[METHODS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(METHODS), min_length=1,
        description="compressor: one teacher, T=teacher_temperature, alpha 0, no copies; avatar: the same teacher, "
        "AVATAR's student; uniform-moe: mean of the K experts; moekd: experts + learned router (the mixture methods "
        "distil with distill's augment_* and consistency_weight, MoEKD's robust recipe when the job sets them); "
        "moekd-ultra: moekd with the ultra_student preset; moekd-robust: moekd with robust_augment_ratio randomly renamed copies in the "
        "transfer set; moekd-robust-adv: the same with copies renamed by robust_adv_attack against the experts.",
    )
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Student seeds (initialisation and shuffling).")
    attacks: list[AttackName] = Field(
        ["mhm", "wir-random"], description="Attacks run on every student (attack.n functions, attack.query_budget)."
    )
    labelled_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of train the teachers learn from with labels; the rest is the transfer "
        "set the students learn from the teachers' soft targets (Compressor's split).",
    )
    teacher_temperature: float = Field(10.0, gt=0, description="T of compressor and avatar (Compressor's 10).")
    ultra_student: str = Field("1.5mb", description=f"Preset of moekd-ultra: one of {sorted(STUDENT_PRESETS)}.")
    ultra_student_arch: ArchConfig | None = Field(None, description="moekd-ultra's explicit architecture (about half "
                                                  "the main student's size); overrides `ultra_student`.")
    avatar_student: ArchConfig = Field(default_factory=lambda: AVATAR_STUDENT.model_copy(),
                                       description="avatar's student architecture.")
    avatar_lr: float = Field(1e-3, gt=0, description="avatar's learning rate (AVATAR's).")
    avatar_batch_size: int = Field(64, ge=1, description="avatar's batch size (AVATAR's); epochs as distill's.")
    robust_augment_ratio: float = Field(1.0, gt=0, le=8, description="moekd-robust(-adv)'s distill.augment_ratio.")
    robust_consistency_weight: float = Field(0.0, ge=0, le=10, description="moekd-robust(-adv)'s "
                                             "distill.consistency_weight (0: copies only).")
    robust_copies: Literal["random", "random-edits"] = Field(
        "random", description="moekd-robust's distill.augment_attack: randomly renamed or randomly restructured "
        "copies (with data.input_transform canonical_identifiers, renamed copies equal their originals).")
    robust_adv_attack: AttackName = Field(
        "wir-random", description="moekd-robust-adv's distill.augment_attack (its budget: distill.augment_budget).")
    attack_teacher: bool = Field(True, description="Also attack the single teacher (a reference row).")
    attack_experts: bool = Field(False, description="Also attack each expert and the plain mean of the experts "
                                 "(the mixture row; the routed mixture needs the router's features, which an "
                                 "attacked function would change): where students' sensitivity comes from.")
    teacher_expert: int = Field(0, ge=0, description="The single teacher (compressor, avatar) has this expert's model "
                                "and schedule: the strongest single model is Compressor's setting (its CodeBERT).")
    reference_tfidf: bool = Field(True, description="Fit the tfidf-lr baseline on the labelled part and attack it "
                                  "too (a reference row: attacks need only a scorer).")
    bootstrap: int = Field(2000, ge=100, description="Resamples of the paired bootstrap behind the confidence "
                           "intervals of moekd minus compressor and avatar.")
    latency_functions: int = Field(100, ge=1, description="Functions timed one by one for the p50 latency.")

    @model_validator(mode="after")
    def _known_ultra(self):
        if self.ultra_student not in STUDENT_PRESETS:
            raise ValueError(f"unknown ultra_student preset {self.ultra_student!r}; use one of {sorted(STUDENT_PRESETS)}")
        return self


# ------------------------------------------------------------------------------------------------ predict
class PredictConfig(_Strict):
    """`moekd predict`'s options (given on its command line: it reads no YAML config; `--batch-size` for
    batch_size)."""

    model: str = Field("models:/moekd-student@champion", description="models:/<name>/<version> | "
                       "models:/<name>@<alias>, or a folder holding an MLmodel file.")
    threshold: float = Field(0.5, ge=0, le=1, description="Verdict vulnerable at P(vulnerable) >= this.")
    format: Literal["table", "json", "sarif"] = Field("table", description="How results are written: table, json "
                                                      "(one object a function) or sarif (SARIF 2.1.0, for code "
                                                      "scanning).")
    glob: list[str] | None = Field(None, description="File name patterns in folders, repeatable (unset: *.c, *.h).")
    batch_size: int = Field(64, ge=1, description="Functions scored at once (bounds memory).")
    output: str | None = Field(None, description="Write the results to this file (unset: stdout).")
    tracking_uri: str | None = Field(None, description="MLflow store of models:/ URIs (unset: $MLFLOW_TRACKING_URI, "
                                     "else sqlite:///mlruns.db).")


# ---------------------------------------------------------------------------------------- student search
class StudentSearchConfig(_Strict):
    """`moekd search-student`: multi-objective search over the student's architecture on a run's cached targets.
    hidden = heads x head_dim, so every sampled hidden width is divisible by its head count."""

    from_run: str | None = Field(
        None, description="MLflow run id or folder of a finished pipeline run whose aggregated soft targets every "
        "trial distils from (None: run the pipeline first).",
    )
    num_layers: list[int] = Field([1, 2, 4, 6], min_length=1, description="Layer counts to choose from.")
    num_heads: list[int] = Field([2, 4, 8], min_length=1, description="Attention head counts.")
    head_dim: list[int] = Field([8, 12, 16], min_length=1, description="Width per head (hidden = heads x head_dim).")
    ffn_size: list[int] = Field([64, 128, 256, 512], min_length=1, description="Feed-forward widths.")
    vocab_size: list[int] = Field([500, 1000, 2000], min_length=1, description="Student BPE vocabulary sizes.")
    max_length: list[int] = Field([64, 128], min_length=1, description="Tokens per function.")
    max_size_mb: float | None = Field(
        3.0, gt=0, description="Constraint: a sampled student larger than this is not trained (None: no bound)."
    )
    num_samples: int = Field(12, ge=1, description="Trials (sampled architectures).")
    max_concurrent: int = Field(1, ge=1, description="Trials at once (1 keeps the latency objective clean).")
    asr_n: int = Field(30, ge=1, description="Validation functions attacked per trial (the same seeded sample).")
    asr_attack: AttackName = Field("mhm", description="Attack of the ASR objective.")
    asr_budget: int = Field(50, ge=1, description="Queries per attacked function for the ASR objective.")
    register_pareto: bool = Field(True, description="Register every Pareto-optimal student (objectives as tags).")

    @model_validator(mode="after")
    def _positive(self):
        for name in ("num_layers", "num_heads", "head_dim", "ffn_size", "vocab_size", "max_length"):
            bad = [v for v in getattr(self, name) if v < (300 if name == "vocab_size" else 1)]
            if bad:
                raise ValueError(f"{name}: {bad} out of range (vocab_size >= 300, the rest >= 1)")
        return self


# ---------------------------------------------------------------------------------------------- registry
class GatesConfig(_Strict):
    """What a student version must show (in its evidence tags) before `moekd registry promote` moves an alias."""

    min_test_f1: float | None = Field(None, ge=0, le=1, description="Test F1 at least this (None: no gate).")
    max_asr: float | None = Field(None, ge=0, le=1, description="Attack success rate at most this (None: no gate).")
    asr_attack: AttackName = Field("mhm", description="Which attack's ASR max_asr reads.")
    max_size_mb: float | None = Field(None, gt=0, description="Size at most this many MB (None: no gate).")
    max_f1_drop: float | None = Field(
        0.0, ge=0, description="Test F1 may be at most this far below the alias's current holder (None: no gate)."
    )


class RegistryConfig(_Strict):
    gates: GatesConfig = Field(default_factory=GatesConfig, description="What `moekd registry promote` checks.")


class MoEKDConfig(_Strict):
    name: str = Field("moekd", description="Run name (MLflow parent run).")
    seed: int = Field(0, description="Seed for subsets, partitions, initialisation and shuffling.")
    output_dir: str = Field("runs", description="Where each run writes its folder of artifacts.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the functions come from, and how many.")
    partition: PartitionConfig = Field(default_factory=PartitionConfig,
                                       description="How the training set is split into one part per expert.")
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig, description="The teachers: what and how each trains.")
    router: RouterConfig = Field(default_factory=LearnedRouter, description="How the experts' outputs are weighted: "
                                  "kind learned (default) or uniform.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="The student and how it learns.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="`moekd pretrain`, and experts "
                                     "with `source: pretrain`.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster, and checkpoint storage.")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig, description="Tracking store and registered model name.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation, decision threshold, degeneracy "
                             "checks.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`moekd tune` only.")
    attack: AttackConfig = Field(default_factory=AttackConfig, description="`moekd attack` (and run's last stage).")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="`moekd registry promote` gates.")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="`moekd benchmark` only.")
    student_search: StudentSearchConfig = Field(default_factory=StudentSearchConfig,
                                                description="`moekd search-student` only.")

    @model_validator(mode="after")
    def _cross_field(self):
        for k, spec in enumerate(self.experts.specs()):
            if isinstance(spec, PretrainSource) and (spec.max_length or 0) > self.pretrain.arch.max_length:
                raise ValueError(f"expert {k}: source pretrain reads at most pretrain.arch.max_length="
                                 f"{self.pretrain.arch.max_length} tokens, not {spec.max_length}; lower its max_length "
                                 "or raise pretrain.arch.max_length")
        if self.benchmark.teacher_expert >= self.experts.k:
            raise ValueError(f"benchmark.teacher_expert={self.benchmark.teacher_expert}: there are experts 0.."
                             f"{self.experts.k - 1}; name one of them")
        if self.router.kind == "learned" and self.router.top_k is not None and self.router.top_k > self.experts.k:
            raise ValueError(f"router.top_k={self.router.top_k} exceeds experts.k={self.experts.k}; use top_k <= k")
        routed = [key for key in self.tune.space if key.startswith("router.")]
        if self.router.kind == "uniform" and routed:
            if "space" in self.tune.model_fields_set:
                raise ValueError(f"tune.space: {routed} tune the learned router, but router.kind is uniform; drop "
                                 "them or use router.kind learned")
            for key in routed:  # the default space's router dimensions: nothing to tune in a plain mean
                del self.tune.space[key]
        for key, dist in self.tune.space.items():
            if key not in TUNABLE:
                raise ValueError(f"tune.space: {key!r} cannot be tuned on cached experts; tunable: {list(TUNABLE)}")
            # Each end of the range (each choice) must itself be a valid config value, e.g. T > 0.
            for value in dist.values if isinstance(dist, ChoiceDist) else (dist.low, dist.high):
                try:
                    self.with_values({key: value})
                except ValidationError as err:
                    raise ValueError(f"tune.space.{key}: {value!r} is not a valid value ({err.errors()[0]['msg']})") from None
        return self

    def with_values(self, values: dict) -> "MoEKDConfig":
        """A re-validated copy with dotted fields replaced (a trial's config)."""
        tree = self.model_dump(mode="json")
        tree["tune"]["space"] = {}  # a trial's config holds its values, not the space (and is not re-checked)
        for key, value in values.items():
            _set_dotted(tree, key, value)
        return MoEKDConfig.model_validate(tree)

    def digest(self) -> str:
        """Short hash of the resolved config (names runs and cached stage outputs)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ loading
def dump_yaml(tree: dict) -> str:
    """The resolved config as saved with every run, checkpoint and registered model."""
    return yaml.safe_dump(tree, sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.get(key)
        if node is None:
            node = tree[key] = {}
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section; use e.g. experts.k=3")
        tree = node
    tree[keys[-1]] = value


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = MoEKDConfig) -> str:
    """Every problem on one line: `source: key: problem (got value); unknown option key: did you mean ...?; ...`.
    `model` is the one that was validated (its schema tells the user's keys from pydantic's tags)."""
    problems: dict[str, list[str]] = {}  # per key, the union members' complaints are joined with "or"
    seen_by_key: dict[str, str] = {}
    unknown: dict[str, str] = {}  # a misspelt key is its own sentence: what it is, then the fix
    for e in err.errors():
        where, holder = _locate(e["loc"], model)
        if e["type"] == "extra_forbidden":
            unknown[where] = _unknown_option(where, holder)
        elif e["type"] == "union_tag_invalid":
            problems.setdefault(where, []).append(
                f"unknown source {e['ctx']['tag']!r}; use one of {e['ctx']['expected_tags']}")
        else:
            problems.setdefault(where, []).append(e["msg"].removeprefix("Value error, "))
        seen = e.get("input")
        seen_by_key[where] = "" if isinstance(seen, dict) else f" (got {seen!r})"
    return f"{source}: " + "; ".join(unknown.get(k) or f"{k}: {', or '.join(problems[k])}{seen_by_key[k]}"
                                     for k in seen_by_key)


def _unknown_option(dotted: str, holder: type[BaseModel] | None) -> str:
    """`unknown option data.train_row: did you mean data.train_rows?`: the closest field of the model the key sits
    in, else that model's fields."""
    *section, key = dotted.split(".")
    if holder is None:  # under a free-form mapping: nothing to compare against
        return f"unknown option {dotted}"
    match = difflib.get_close_matches(key, list(holder.model_fields), n=1, cutoff=0.6)
    if match:
        return f"unknown option {dotted}: did you mean {'.'.join([*section, match[0]])}?"
    return f"unknown option {dotted}: use one of {', '.join(holder.model_fields)}"


def _locate(loc: tuple, model: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """An error's path as the user wrote it, and the model whose field its last key is (None if not a model).

    pydantic puts the chosen member of a union in the path (experts.models.0.pretrained.nme, eval.threshold.
    constrained-float); walking the schema along the path tells those tags from the user's keys, and finds the member
    (here PretrainedConfig) whose fields a misspelt key is compared with."""
    parts: list[str] = []
    node, holder = model, None
    for part in loc:
        node = _strip_optional(node)
        if get_origin(node) in (Union, UnionType):  # a real union: this part is pydantic's tag of a member
            node = next((_unannotated(m) for m in get_args(node) if part in _member_tags(m)), None)
            continue
        holder = node
        parts.append(str(part))
        node = _child(node, part)
    is_model = isinstance(holder, type) and issubclass(holder, BaseModel)
    return ".".join(parts) or "(top level)", holder if is_model else None


def _unannotated(annotation):
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _strip_optional(annotation):
    """`X | None` -> X (pydantic puts no tag in the path for it); Annotated[...] -> its type."""
    annotation = _unannotated(annotation)
    if get_origin(annotation) in (Union, UnionType):
        members = [m for m in get_args(annotation) if m is not type(None)]
        if len(members) == 1:
            return _strip_optional(members[0])
    return annotation


def _member_tags(member) -> set[str]:
    """The tags naming a union member in an error's path: its Tag, or the value of its one-value Literal field
    (UniformDist's dist: "uniform")."""
    tags = {m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)}
    model = _unannotated(member)
    if isinstance(model, type) and issubclass(model, BaseModel):
        for field in model.model_fields.values():
            if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
                tags.add(get_args(field.annotation)[0])
    return tags


def _child(node, part):
    """The annotation one key below `node`: a model's field, a list's item, a mapping's value (None: unknown)."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    if get_origin(node) is list:
        return get_args(node)[0]
    if get_origin(node) is dict:
        return get_args(node)[1]
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> MoEKDConfig:
    """Read a YAML file (or the defaults), apply `key.sub=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass the path of a YAML file such as jobs/quickstart.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. experts.k=3")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    try:
        return MoEKDConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def member_names(cfg: MoEKDConfig) -> list[list[str]]:
    """Per expert, the names of its models (Ray Train run and checkpoint folders): expert_<k>, or
    expert_<k>_fold_<f> when cross-fitting. Here, not in stages/, because the attacks read a run's experts too."""
    folds = cfg.experts.folds
    return [[f"expert_{k}"] if folds == 1 else [f"expert_{k}_fold_{f}" for f in range(folds)]
            for k in range(cfg.experts.k)]
