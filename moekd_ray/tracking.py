"""Every MLflow call of the project (so MLflow API churn lands here): runs, params, figures, the student model."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from moekd_ray.config import dump_yaml
from moekd_ray.errors import TrackingError

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _reachable(tracking_uri: str) -> bool:
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5).read()
        return True
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def outage_guard(how_to_continue: str):
    """A tracking server that stops answering mid-run (after MLflow's own retries) ends the run with one line
    saying how to continue, instead of a traceback; what was logged before stays on the server."""
    try:
        yield
    except mlflow.exceptions.MlflowException:
        uri = mlflow.get_tracking_uri()
        if not uri.startswith(("http://", "https://")) or _reachable(uri):
            raise
        raise TrackingError(f"MLflow tracking server {uri} stopped answering during the run; restart it, then "
                            f"{how_to_continue}") from None


def connect(tracking_uri: str, experiment: str | None = None) -> str | None:
    """Point MLflow at `tracking_uri`, fail fast with one line if unreachable; set `experiment` (created if new)
    as the active one and return its id."""
    if tracking_uri.startswith(("http://", "https://")) and not _reachable(tracking_uri):
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable; start it (mlflow/start_server.sh) or set "
            "mlflow.tracking_uri=sqlite:///mlruns.db"
        )
    mlflow.set_tracking_uri(tracking_uri)
    # The active experiment, so that nested stage runs land beside their parent.
    return mlflow.set_experiment(experiment).experiment_id if experiment else None


def pipeline_run(spec: str, option: str) -> tuple[Path, str | None] | None:
    """(run folder, MLflow parent run id) of a pipeline run given by its folder or its MLflow run id (tag
    moekd.run_dir); None when `spec` is neither a run folder nor a run id. `option` names the flag in errors."""
    if Path(spec, "config.yaml").is_file():
        folder = Path(spec).resolve()
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`moekd.run_dir` = '{folder}'")
        return folder, (runs[0].info.run_id if runs else None)
    if not re.fullmatch(r"[0-9a-f]{32}", spec):
        return None
    try:
        run = mlflow.tracking.MlflowClient().get_run(spec)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"{option} {spec}: no such MLflow run at {mlflow.get_tracking_uri()}; give the run id "
                            "of a `moekd run` or its run folder") from None
    folder = run.data.tags.get("moekd.run_dir")
    if not folder or not Path(folder, "config.yaml").is_file():
        raise TrackingError(f"{option} {spec}: that run has no pipeline run folder on this machine (tag "
                            "moekd.run_dir); give the run folder itself")
    return Path(folder), spec


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:500]
    return out


@contextlib.contextmanager
def stage_run(name: str, params: dict | None = None):
    """A nested run for one stage or expert, under the active parent run."""
    with mlflow.start_run(run_name=name, nested=True) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run


def log_config(config_tree: dict) -> None:
    mlflow.log_params(flatten(config_tree))
    mlflow.log_text(dump_yaml(config_tree), "config.yaml")


def log_epochs(rows: list[dict], prefix: str = "", timestamps: list[int] | None = None) -> None:
    """Per-epoch metrics reported by a Ray Train run, with the epoch as MLflow step (and when each was reported,
    in ms, if given; else now)."""
    for i, row in enumerate(rows):
        step = int(row["epoch"])
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=step,
                           timestamp=timestamps[i] if timestamps else None)


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def log_table(rows: list[dict], path: str) -> None:
    mlflow.log_text(json.dumps(rows, indent=1), path)


def log_student_model(model_dir: Path, tokenizer_dir: Path, config_tree: dict, registered_name: str | None,
                      metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """Log the student as a pyfunc (C source strings -> P(vulnerable)) and register it with its evidence tags
    and model card (registry.py). Returns its model URI.

    The model is defined from code (pyfunc_model.py) and its weights are safetensors: nothing is pickled.
    """
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "func")]), outputs=Schema([ColSpec("double", "probability")])
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(dump_yaml(config_tree))
        info = mlflow.pyfunc.log_model(
            name="student",
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(model_dir), "tokenizer": str(tokenizer_dir), "config": str(cfg_path)},
            signature=signature,
            input_example={"func": ["int f(char *s) { char b[8]; strcpy(b, s); return 0; }"]},
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
            metadata={"metrics": {k: round(v, 4) for k, v in metrics.items()}},
        )
    if registered_name:
        from moekd_ray.config import MoEKDConfig
        from moekd_ray.registry import evidence_tags, record_evidence

        version = info.registered_model_version
        run = mlflow.active_run()
        evidence = evidence_tags(MoEKDConfig.model_validate(config_tree), metrics, run and run.info.run_id)
        record_evidence(mlflow.MlflowClient(), registered_name, version, {**evidence, **(tags or {})})
        return f"models:/{registered_name}/{version}"
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow")]
