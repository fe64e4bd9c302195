"""Every MLflow call of the project (so MLflow API churn lands here): runs, params, figures, the student model."""

from __future__ import annotations

import contextlib
import json
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


def connect(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at `tracking_uri`, fail fast with one line if unreachable; return the experiment id."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {tracking_uri} is unreachable ({getattr(exc, 'reason', exc)}); start it "
                "(mlflow/start_server.sh) or set mlflow.tracking_uri=sqlite:///mlruns.db"
            ) from None
    mlflow.set_tracking_uri(tracking_uri)
    # The active experiment, so that nested stage runs land beside their parent.
    return mlflow.set_experiment(experiment).experiment_id


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


def log_epochs(rows: list[dict], prefix: str = "") -> None:
    """Per-epoch metrics reported by a Ray Train run, with the epoch as MLflow step."""
    for row in rows:
        step = int(row["epoch"])
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}, step=step)


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def log_table(rows: list[dict], path: str) -> None:
    mlflow.log_text(json.dumps(rows, indent=1), path)


def log_student_model(model_dir: Path, tokenizer_dir: Path, config_tree: dict, registered_name: str | None,
                      metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """Log the student as a pyfunc (C source strings -> P(vulnerable)) and register it. Returns its model URI.

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
        version = info.registered_model_version
        for key, value in (tags or {}).items():
            mlflow.MlflowClient().set_model_version_tag(registered_name, version, key, value)
        return f"models:/{registered_name}/{version}"
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow")]
