"""The attacked model: C source strings in, P(vulnerable) out, with a per-example query counter and budget.

A victim is named by one string, so that every Ray worker can load it itself:
  models:/<name>/<version> or models:/<name>@<alias>   a registered student (MLflow pyfunc)
  <MLflow run id> or runs/<pipeline run folder>         a pipeline run; `target` picks student, expert_<k> or
                                                        uniform (the plain mean of its experts)
  <model folder>                                        config.json + model.safetensors, tokenizer files beside
                                                        them or in `tokenizer`
  <folder of expert_<k>/ model folders>                 `target` uniform or expert_<k> (the benchmark's teachers)
  <tfidf-lr folder>                                     a saved tfidf-lr reference (baseline.TfidfLR.save)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from moekd_ray.baseline import SAVED as TFIDF_SAVED, SavedTfidfLR
from moekd_ray.errors import ConfigError
from moekd_ray.models import load_model
from moekd_ray.scoring import Scorer
from moekd_ray.tokenization import load_tokenizer
from moekd_ray.tracking import pipeline_run


class Classifier(Scorer):
    """The one scorer (scoring.Scorer), plus the embedding table ALERT draws substitutes from."""

    def embed_names(self, names: list[str]) -> np.ndarray:
        """Each identifier as the mean input embedding of its tokens (ALERT's substitute space)."""
        table = self.model.get_input_embeddings().weight.detach().cpu()
        ids = self.tokenizer([" " + n for n in names], add_special_tokens=False)["input_ids"]
        return torch.stack([table[i].mean(0) if i else table.mean(0) for i in ids]).numpy()


class Ensemble:
    """Plain mean of several classifiers' P(vulnerable): the uniform-router mixture of a run's experts."""

    def __init__(self, members: list[Classifier]):
        self.members = members

    def __call__(self, funcs: list[str]) -> np.ndarray:
        return np.mean([m(funcs) for m in self.members], axis=0)

    def embed_names(self, names: list[str]) -> np.ndarray:
        return self.members[0].embed_names(names)


class BudgetedVictim:
    """P(true class) per function; never answers more than `budget` functions for one attacked example."""

    def __init__(self, model, label: int, budget: int):
        self.model, self.label, self.budget, self.queries = model, label, budget, 0

    @property
    def remaining(self) -> int:
        return self.budget - self.queries

    def query(self, funcs: list[str]) -> np.ndarray:
        """Scores the first `remaining` of `funcs` (all of them while the budget lasts)."""
        funcs = funcs[: self.remaining]
        self.queries += len(funcs)
        if not funcs:
            return np.zeros(0, dtype=np.float32)
        p = np.asarray(self.model(funcs), dtype=np.float64)
        return p if self.label == 1 else 1.0 - p


def _expert_dirs(run_dir: Path) -> tuple[list[list[Path]], str]:
    """Each expert's checkpoint folders in a pipeline run (one, or one per fold model), from the Ray storage its
    config.yaml names (`ray.storage_path`, else the run folder's ray/; a remote one is copied here), and that
    storage. Stops at the first expert with none."""
    from moekd_ray import ray_runtime
    from moekd_ray.config import load_config, member_names

    cfg = load_config(run_dir / "config.yaml")
    dirs = []
    for members in member_names(cfg):
        results = [ray_runtime.saved_result(ray_runtime.run_storage(cfg, run_dir, m)) for m in members]
        if any(r is None for r in results):
            break
        dirs.append([ray_runtime.local_folder(r.checkpoint) for r in results])
    return dirs, ray_runtime.storage_path(cfg, run_dir)


def resolve_victim(spec: str, dst: Path) -> Path:
    """A local folder for `spec` (registry models are downloaded into `dst`), so Ray workers load from disk."""
    if spec.startswith("models:/"):
        from moekd_ray.registry import MlflowException, download_model

        try:
            return Path(download_model(spec, str(dst)))
        except MlflowException as exc:
            raise ConfigError(f"--model {spec}: {str(exc).splitlines()[0][:200]}; check the name and version "
                              "(`mlflow models` / the registry UI) and mlflow.tracking_uri") from None
    run = pipeline_run(spec, "--model")
    folder = (run[0] if run else Path(spec)).resolve()
    if not folder.is_dir():
        raise ConfigError(f"--model {spec}: not a models:/ URI, an MLflow run id or a folder")
    return folder


def load_victim(folder: str | Path, target: str = "student", batch_size: int = 64, device: str = "cpu"):
    """The model in `folder` (from `resolve_victim`), as a callable with `embed_names`, scoring on `device`."""
    folder = Path(folder)
    if (folder / "MLmodel").is_file():  # a registered student: the pyfunc wrapper holds model and tokenizer
        from moekd_ray.registry import load_pyfunc

        scorer = load_pyfunc(str(folder)).unwrap_python_model().scorer
        return Classifier(scorer.model, scorer.tokenizer, scorer.max_length, batch_size, device)
    if (folder / "config.yaml").is_file():  # a pipeline run folder
        if target == "student":
            return Classifier(load_model(folder / "student"), load_tokenizer(folder / "tokenizers" / "student"),
                              batch_size=batch_size, device=device)
        experts, storage = _expert_dirs(folder)

        def expert(k: int):
            tok = load_tokenizer(folder / "tokenizers" / f"expert_{k}")
            members = [Classifier(load_model(d), tok, batch_size=batch_size, device=device) for d in experts[k]]
            return members[0] if len(members) == 1 else Ensemble(members)  # fold models: their mean

        if target == "uniform" and experts:
            return Ensemble([expert(k) for k in range(len(experts))])
        m = re.fullmatch(r"expert_(\d+)", target)
        if m and int(m.group(1)) < len(experts):
            return expert(int(m.group(1)))
        if not experts:
            raise ConfigError(f"--target {target}: no expert checkpoints of {folder.name} in {storage} (the run's "
                              "ray.storage_path, else its ray/ folder); make that storage reachable here, or attack "
                              "--target student")
        raise ConfigError(f"--target {target}: {folder} has student, uniform and expert_0..expert_{len(experts) - 1}")
    if (folder / "expert_0" / "model.safetensors").is_file():  # a folder of experts (the benchmark's teachers)
        k = 0
        while (folder / f"expert_{k}").is_dir():
            k += 1
        if target == "uniform":
            return Ensemble([load_victim(folder / f"expert_{i}", batch_size=batch_size, device=device)
                             for i in range(k)])
        if re.fullmatch(r"expert_\d+", target) and (folder / target).is_dir():
            return load_victim(folder / target, batch_size=batch_size, device=device)
        raise ConfigError(f"--target {target}: {folder} has uniform and expert_0..expert_{k - 1}")
    if (folder / TFIDF_SAVED).is_file():
        return SavedTfidfLR(folder)
    if (folder / "model.safetensors").is_file():
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        return Classifier(load_model(folder), load_tokenizer(tok), batch_size=batch_size, device=device)
    raise ConfigError(f"--model {folder}: holds no MLmodel, pipeline config.yaml or model.safetensors")
