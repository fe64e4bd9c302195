"""Every MLflow call of the project (so MLflow API churn lands here). Reads hand back plain values (`RunRecord`,
dicts); every write goes through one API, the `Tracker`: runs, params, metrics, figures, the student model.
`moekd run`'s tracker has a run folder and keeps writing to a spool file there while the server is down; the
benchmark's, the searches' and `moekd attack`'s have none, so an outage is an error there."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from moekd_ray.checksums import MANIFEST, write_manifest
from moekd_ray.config import dump_yaml
from moekd_ray.errors import TrackingError

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
SCORING_CODE = Path(__file__).with_name("scoring.py")  # logged beside it: a served model needs no moekd-ray
CHECKSUMS_CODE = Path(__file__).with_name("checksums.py")  # likewise
INT8_CODE = Path(__file__).with_name("int8.py")  # likewise: an int8 student's loader
SPOOL = "mlflow_spool.jsonl"  # in the run folder: MLflow writes made while the tracking server was down
# Tags a run created, or a student model logged, by a Tracker write with that write's key, so that a replay of the
# write finds what an earlier attempt made instead of making a second one.
SPOOL_KEY = "moekd.spool_key"


def _reachable(tracking_uri: str) -> bool:
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5).read()
        return True
    except (urllib.error.URLError, OSError):
        return False


def connect(tracking_uri: str, experiment: str | None = None) -> str | None:
    """Point MLflow at `tracking_uri`, fail fast with one line if unreachable; set `experiment` (created if new)
    as the active one and return its id."""
    if tracking_uri.startswith(("http://", "https://")) and not _reachable(tracking_uri):
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable; start it (mlflow/start_server.sh) or set "
            "mlflow.tracking_uri=sqlite:///mlruns.db"
        )
    global _uri
    mlflow.set_tracking_uri(tracking_uri)
    _uri = tracking_uri
    if tracking_uri.startswith(("http://", "https://")):
        _check_login(tracking_uri)
    # The active experiment, so that nested stage runs land beside their parent.
    return mlflow.set_experiment(experiment_id=experiment_id(experiment)).experiment_id if experiment else None


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if new. Not `mlflow.set_experiment(name)`: when two processes create
    the same new experiment at once (two jobs, a team's first runs), the one that loses the race is handed the
    experiment but not made active, so its runs land in Default without a word (mlflow/mlflow#10334; seen here on
    PostgreSQL in tests/test_team_server.py)."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another process created it just now


def _check_login(tracking_uri: str) -> None:
    """A server behind a login (`mlflow server --app-name basic-auth`) answers /health to anyone and refuses
    everything else with 401: one read here turns that into one line naming the settings, before any work, instead
    of a REST traceback (or a misleading "does not exist") at the first write."""
    try:
        mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as exc:
        refused = refusal(exc, tracking_uri)
        if refused is not None:
            raise refused from None
        # not a login problem: the call that needs the server reports it


def refusal(exc: BaseException, tracking_uri: str | None = None) -> TrackingError | None:
    """A tracking server's login app refusing a request (401: no or a wrong login; 403: logged in, not permitted),
    as one line naming the fix; None for any other error. `moekd` prints it instead of a REST traceback, whichever
    call was refused: the first read (`connect`), or a write later on (a tag, an alias, a run)."""
    if not isinstance(exc, mlflow.exceptions.MlflowException):
        return None
    status = exc.get_http_status_code()
    if status not in (401, 403):
        return None
    uri, user = tracking_uri or current_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    endpoint = re.search(r"endpoint (\S+)", str(exc))
    what = endpoint.group(1).removeprefix("/api/2.0/mlflow/").removeprefix("/ajax-api/2.0/mlflow/") \
        if endpoint else "the request"
    if status == 403:
        return TrackingError(f"MLflow tracking server {uri} lets user {user!r} in but refused {what} (403): ask its "
                             "admin for the permission (READ to read; EDIT to log runs, tags or aliases on that "
                             "experiment or registered model)")
    if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return TrackingError(f"MLflow tracking server {uri} refused the login of user {user!r} (401): check "
                             "MLFLOW_TRACKING_PASSWORD (and MLFLOW_TRACKING_USERNAME)")
    return TrackingError(f"MLflow tracking server {uri} requires a login (401): set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD to a user of its basic-auth app")


_uri: str | None = None  # where this process tracks, as connect() was told (not read back from MLflow's state)


def current_uri() -> str:
    return _uri or os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default store"


# ------------------------------------------------------------------------------------------------------ reads
# Runs as plain values. Every write goes through a `Tracker` (below).
def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


@dataclass(frozen=True)
class RunRecord:
    """What the drivers read of a logged run: plain values, not MLflow's objects."""
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]  # each metric's latest value
    params: dict[str, str]

    @classmethod
    def of(cls, run) -> "RunRecord":
        return cls(run.info.run_id, dict(run.data.tags), dict(run.data.metrics), dict(run.data.params))


def get_run(run_id: str) -> RunRecord:
    return RunRecord.of(client().get_run(run_id))


def load_dict(run_id: str, artifact_file: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")


def child_runs(parent_id: str) -> list[RunRecord]:
    """The runs nested directly under `parent_id`."""
    experiment = client().get_run(parent_id).info.experiment_id
    found = client().search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000)
    return [RunRecord.of(r) for r in found]


def find_runs(experiment: str, filter_string: str, max_results: int = 1) -> list[RunRecord]:
    """Runs of the experiment named `experiment` matching `filter_string` (none if there is no such experiment)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [RunRecord.of(r) for r in
            client().search_runs([found.experiment_id], filter_string=filter_string, max_results=max_results)]


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
        raise TrackingError(f"{option} {spec}: no such MLflow run at {current_uri()}; give the run id "
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


# What a Ray Train epoch row carries that is not a measurement: when, how it ran, bookkeeping. Not plotted as
# metrics: the run's start and end times carry the times (Tracker.stage's `span`), the rest are tags.
NOT_METRICS = ("epoch", "started_at", "finished_at", "resumed_from", "world_size", "zero_stage", "final")


def epoch_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in row.items() if k not in NOT_METRICS}


def epoch_tags(rows: list[dict]) -> dict[str, str]:
    """The constants of a Ray Train run's epochs, as tags (resumed_from: epochs done before its latest restart)."""
    return {f"moekd.{k}": str(rows[-1][k]) for k in ("resumed_from", "world_size", "zero_stage") if k in rows[-1]}


def log_student_model(model_dir: Path, tokenizer_dir: Path, config_tree: dict, registered_name: str | None,
                      metrics: dict[str, float], tags: dict[str, str] | None = None, key: str | None = None) -> str:
    """Log the student as a pyfunc (C source strings -> P(vulnerable)) and register it with its evidence tags
    and model card (registry.py). Returns its model URI.

    The model is defined from code (pyfunc_model.py) and its weights are safetensors: nothing is pickled.
    The sha256 of every artifact file is logged with it (checksums.py), and loading it checks them.
    The input column is unnamed, so a list of strings, a Series, a string and a `func` DataFrame all pass MLflow's
    schema check.

    `key` (a Tracker write's) makes a repeat of the same write complete what an earlier attempt left: the student
    logged under that key is reused and its registered version found, so no second model or version is made.
    """
    run = mlflow.active_run()
    run_id = run and run.info.run_id
    client = mlflow.MlflowClient()
    model_id = _keyed_student(client, run, key) if key and run else None
    if model_id is None:
        model_id = _log_pyfunc(model_dir, tokenizer_dir, config_tree, metrics, {SPOOL_KEY: key} if key else None)
    if not registered_name:
        return f"models:/{model_id}"
    from moekd_ray.config import MoEKDConfig
    from moekd_ray.registry import evidence_tags, record_evidence

    version = _registered_version(client, registered_name, run_id, model_id)
    if version is None:
        version = mlflow.register_model(f"models:/{model_id}", registered_name).version
    evidence = evidence_tags(MoEKDConfig.model_validate(config_tree), metrics, run_id)
    record_evidence(client, registered_name, version, {**evidence, **(tags or {})})
    return f"models:/{registered_name}/{version}"


def _log_pyfunc(model_dir: Path, tokenizer_dir: Path, config_tree: dict, metrics: dict[str, float],
                tags: dict | None) -> str:
    """The student logged into the active run (not registered); its logged model id."""
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("double", "probability")]))
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(dump_yaml(config_tree))
        artifacts = {"model": str(model_dir), "tokenizer": str(tokenizer_dir), "config": str(cfg_path)}
        write_manifest(artifacts, Path(tmp) / "checksums.json")
        return mlflow.pyfunc.log_model(
            name="student",
            python_model=str(PYFUNC_CODE),
            artifacts={**artifacts, MANIFEST: str(Path(tmp) / "checksums.json")},
            signature=signature,
            input_example=["int f(char *s) { char b[8]; strcpy(b, s); return 0; }"],
            code_paths=[str(SCORING_CODE), str(CHECKSUMS_CODE), str(INT8_CODE)],
            pip_requirements=_requirements(),
            metadata={"metrics": {k: round(v, 4) for k, v in metrics.items()}},
            tags=tags,
        ).model_id


def _keyed_student(client: mlflow.MlflowClient, run, key: str) -> str | None:
    """The id of the student a write with this key logged completely into `run`, if one did. One whose upload was
    cut short (not READY) is deleted, to be logged again."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    for model in (m for m in models if m.tags.get(SPOOL_KEY) == key):
        if model.status == LoggedModelStatus.READY:
            return model.model_id
        client.delete_logged_model(model.model_id)
    return None


def _registered_version(client: mlflow.MlflowClient, name: str, run_id: str | None, model_id: str) -> str | None:
    """The version of `name` registered from this logged model, if there is one."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if run_id else []
    return next((v.version for v in versions if v.source == f"models:/{model_id}"), None)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow")]


# ------------------------------------------------------------------- every write, outage-proof with a run folder
class Tracker:
    """Every MLflow write of one command (`moekd run`, `benchmark`, `tune`, `search-student`, `attack`): its parent
    run, the nested runs (stages, benchmark cells, trials), their params, metrics, tags and artifacts, and the
    registered student.

    Each write goes to MLflow first (with MLflow's own HTTP retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES). Once an
    http(s) tracking server has stopped answering, the tracker says so in one line and, for the rest of the run,
    appends each write as a JSON line to <run folder>/mlflow_spool.jsonl instead, so that training goes on.
    Artifacts are referenced by their path in the run folder (texts and figures are saved there first); a run created
    meanwhile gets a local key, which the replay maps to the MLflow run it creates. `moekd sync <run folder>` (or
    `moekd run --resume`) replays the spool onto the same MLflow run (`replay_spool`). Without a run folder
    (`run_dir=None`: the commands other than `moekd run`) an outage is an error, as with direct MLflow calls.
    `tracking_uri`: the store it writes to (default: the one `connect` was given)."""

    def __init__(self, run_dir: Path | None, experiment_id: str | None = None, log=print,
                 tracking_uri: str | None = None):
        self.run_dir, self.experiment_id, self.log = run_dir, experiment_id, log
        self.uri = tracking_uri or current_uri()
        self.client = mlflow.MlflowClient(self.uri) if tracking_uri else mlflow.MlflowClient()
        self.runs: list[str] = []  # the runs being written to, innermost last: MLflow run ids, or local keys
        self.root: str | None = None  # the parent run
        self.spool_id: str | None = None  # set when spooling starts
        self.spooled = 0

    @contextlib.contextmanager
    def run(self, run_id: str | None, name: str):
        """The parent run: `run_id` reopened, or a new run named `name`. Yields its id (a local key if the server was
        already down). On leaving it ends FINISHED (FAILED on an error, KILLED on Ctrl-C), and a run that spooled
        says so in one line with the command that completes it."""
        if run_id:
            self.root = run_id
            opened = self.reopen(run_id)
        else:
            self.root = run_id = self._create(name, parent=None)
            opened = self._open(run_id)
        try:
            with opened:
                yield run_id
        finally:
            if self.spooled:
                self.log(f"MLflow tracking server {self.uri} was unreachable: {self.spooled} writes "
                         f"spooled to {self.run_dir / SPOOL}; once it answers again, complete MLflow run {run_id} "
                         f"with: moekd sync {self.run_dir.resolve()}")

    @contextlib.contextmanager
    def stage(self, name: str, params: dict | None = None, span: tuple[float, float] | None = None):
        """A nested run for one stage or expert, under the innermost open run. `span`: its real start and end
        (Unix seconds), for work done before its run is written (an expert trained by Ray Train). Yields its id."""
        start, end = (int(t * 1000) for t in span) if span else (None, None)
        run_id = self._create(name, parent=self.runs[-1], start_time=start)
        with self._open(run_id, end_time=end):
            if params:
                self.log_params(flatten(params))
            yield run_id

    @contextlib.contextmanager
    def reopen(self, run_id: str):
        """An existing run (a nested one too: a benchmark cell an interrupted session left) written to again inside
        the block, and ended when it ends."""
        self._write({"op": "reopen", "run": run_id})
        with self._open(run_id):
            yield run_id

    def log_params(self, params: dict) -> None:
        self._write({"op": "params", "run": self.runs[-1], "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict, step: int = 0, timestamp: int | None = None) -> None:
        """`timestamp`: when the values were measured (ms), if not now (a Tune trial's reports)."""
        self._write({"op": "metrics", "run": self.runs[-1], "metrics": {k: float(v) for k, v in metrics.items()},
                     "step": step, "time": timestamp or _now()})

    def set_tags(self, tags: dict) -> None:
        self._write({"op": "tags", "run": self.runs[-1], "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files (under `artifact_path`)."""
        self._write({"op": "artifact", "run": self.runs[-1], "path": self._ref(path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write({"op": "text", "run": self.runs[-1], "text": text, "artifact_file": artifact_file})

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self._write({"op": "figure", "run": self.runs[-1], "figure": fig, "artifact_file": artifact_file})
        finally:
            plt.close(fig)

    def log_config(self, config_tree: dict) -> None:
        self.log_params(flatten(config_tree))
        self.log_text(dump_yaml(config_tree), "config.yaml")

    def log_dict(self, obj: dict | list, artifact_file: str) -> None:
        """A JSON artifact (a table's rows, a benchmark cell's per-function outputs); `load_dict` reads it back."""
        self.log_text(json.dumps(obj, indent=1), artifact_file)

    def log_epochs(self, rows: list[dict], prefix: str = "", timestamps: list[int] | None = None) -> None:
        """Per-epoch metrics reported by a Ray Train run, with the epoch as MLflow step (and when each was reported,
        in ms, if given); its constants as tags."""
        for i, row in enumerate(rows):
            self.log_metrics(epoch_metrics(row, prefix), step=int(row["epoch"]),
                             timestamp=timestamps[i] if timestamps else None)
        if rows and not prefix:
            self.set_tags(epoch_tags(rows))

    def log_inputs(self, records: list[dict]) -> None:
        """The data splits (`data.split_records`) as the innermost run's MLflow dataset inputs."""
        self._write({"op": "inputs", "run": self.runs[-1], "datasets": records})

    def log_student_model(self, model_dir: Path, tokenizer_dir: Path, config_tree: dict, registered_name: str | None,
                          metrics: dict[str, float], tags: dict[str, str] | None = None) -> str | None:
        """`log_student_model` into the innermost run; its model URI, or None when spooled (the replay registers it)."""
        return self._write({"op": "model", "run": self.runs[-1], "key": f"model-{uuid.uuid4().hex[:12]}",
                            "model_dir": self._ref(model_dir), "tokenizer_dir": self._ref(tokenizer_dir),
                            "config": config_tree, "registered_name": registered_name, "metrics": metrics,
                            "tags": tags})

    @contextlib.contextmanager
    def _open(self, run_id: str, end_time: int | None = None):
        self.runs.append(run_id)
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.runs.pop()
            self._write({"op": "end", "run": run_id, "status": status, "time": end_time or _now()})

    def _create(self, name: str, parent: str | None, start_time: int | None = None) -> str:
        from mlflow.tracking.context.registry import resolve_tags  # what mlflow.start_run tags a run with

        key = f"local-{uuid.uuid4().hex[:12]}"
        if parent is None:
            self.root = key
        created = self._write({"op": "create", "key": key, "parent": parent, "name": name,
                               "experiment_id": self.experiment_id, "tags": resolve_tags(), "time": start_time or _now()})
        return created or key

    def _ref(self, path: Path) -> str:
        """A path as the spool keeps it: relative to the run folder when inside it."""
        path = Path(path).resolve()
        if self.run_dir is not None and path.is_relative_to(self.run_dir.resolve()):
            return str(path.relative_to(self.run_dir.resolve()))
        return str(path)

    def _write(self, op: dict):
        if self.spool_id is None:
            try:
                return _apply(self.client, op, {}, self.run_dir)
            except (mlflow.exceptions.MlflowException, OSError):
                uri = self.uri
                if self.run_dir is None or not uri.startswith(("http://", "https://")) or _reachable(uri):
                    raise
                self.spool_id = uuid.uuid4().hex[:12]
                self.log(f"warning: MLflow tracking server {uri} stopped answering; training goes on, and MLflow "
                         f"writes go to {self.run_dir / SPOOL} for the rest of the run")
                self._append({"op": "spool", "id": self.spool_id, "run": self.root, "tracking_uri": uri,
                              "time": _now()})
        if op["op"] in ("text", "figure"):  # saved in the run folder, the spool keeps its path
            path = self.run_dir / "mlflow_spool_files" / f"{self.spool_id}-{self.spooled}" / op["artifact_file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if op["op"] == "text":
                path.write_text(op["text"])
            else:
                op["figure"].savefig(path)
            folder = str(PurePosixPath(op["artifact_file"]).parent)
            op = {"op": "artifact", "run": op["run"], "path": self._ref(path),
                  "artifact_path": None if folder == "." else folder}
        self._append(op)
        self.spooled += 1
        return None

    def _append(self, op: dict) -> None:
        with (self.run_dir / SPOOL).open("a") as f:
            f.write(json.dumps(op) + "\n")


def _now() -> int:
    return int(time.time() * 1000)


def _apply(client: mlflow.MlflowClient, op: dict, ids: dict[str, str], run_dir: Path | None, replay: bool = False):
    """One Tracker write, to MLflow; `ids` maps local keys of runs created by a replay to their MLflow run ids.
    Returns the new run id for a run created, the model URI for a student logged.

    A `replay` of a write that may have been applied already (by a replay killed before it saved its progress, or
    by the live attempt whose answer was lost) leaves MLflow as one application would: a run is created, a metric
    point logged, a student logged and registered only if not there yet. The other writes are idempotent as they
    are: params (equal values), tags, artifacts (same path), run status."""
    kind, run = op["op"], ids.get(op.get("run"), op.get("run"))
    if kind == "create":
        found = replay and client.search_runs([op["experiment_id"]], f"tags.`{SPOOL_KEY}` = '{op['key']}'")
        if found:
            ids[op["key"]] = found[0].info.run_id
            return ids[op["key"]]
        tags = {**op["tags"], SPOOL_KEY: op["key"]}
        if op["parent"]:
            tags["mlflow.parentRunId"] = ids.get(op["parent"], op["parent"])
        ids[op["key"]] = client.create_run(op["experiment_id"], op["time"], tags, op["name"]).info.run_id
        return ids[op["key"]]
    if kind == "reopen":
        client.update_run(run, "RUNNING")
    elif kind == "end":
        client.set_terminated(run, op["status"], op["time"])
    elif kind == "params":
        client.log_batch(run, params=[Param(k, v) for k, v in op["params"].items()])
    elif kind == "metrics":
        points = [Metric(k, v, op["time"], op["step"]) for k, v in op["metrics"].items()]
        if replay:  # the same point logged twice would be two points of its history
            points = [m for m in points if not _in_history(client, run, m)]
        if points:
            client.log_batch(run, metrics=points)
    elif kind == "tags":
        client.log_batch(run, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        path = Path(run_dir or "", op["path"])  # an absolute path stays as it is
        (client.log_artifacts if path.is_dir() else client.log_artifact)(run, str(path), op["artifact_path"])
    elif kind == "inputs":  # MLflow keeps one input per dataset name and digest: a replay adds none
        client.log_inputs(run, datasets=[dataset_input(r) for r in op["datasets"]])
    elif kind == "text":
        client.log_text(run, op["text"], op["artifact_file"])
    elif kind == "figure":
        client.log_figure(run, op["figure"], op["artifact_file"])
    elif kind == "model":  # mlflow.pyfunc.log_model logs into the active run
        # start_run refuses a run of another experiment than the process's active one (set by an earlier command)
        mlflow.set_experiment(experiment_id=client.get_run(run).info.experiment_id)
        mlflow.start_run(run_id=run)
        try:
            return log_student_model(Path(run_dir or "", op["model_dir"]), Path(run_dir or "", op["tokenizer_dir"]),
                                     op["config"], op["registered_name"], op["metrics"], op["tags"], op.get("key"))
        finally:
            with contextlib.suppress(mlflow.exceptions.MlflowException, OSError):
                mlflow.end_run()  # FINISHED for now; the run's own "end" write comes later
    elif kind != "spool":
        raise ValueError(f"unknown MLflow spool entry {op!r}")
    return None


# The splits' roles, as MLflow's dataset context tag names them in the UI's Datasets section.
CONTEXTS = {"train": "training", "valid": "validation", "test": "test"}
_COLUMN_TYPES = {"int64": "long", "int32": "integer", "bool": "boolean", "float32": "float", "float64": "double"}


def dataset_input(record: dict) -> DatasetInput:
    """One split (a `data.split_records` record) as an MLflow dataset input: a light dataset (its source, digest,
    columns and row counts, not its rows), with the split's role as its context."""
    schema = Schema([ColSpec(_COLUMN_TYPES.get(t, "string"), name) for name, t in record["columns"].items()])
    dataset = Dataset(record["name"], record["digest"], record["source_type"], json.dumps(record["source"]),
                      json.dumps({"mlflow_colspec": schema.to_dict()}),
                      json.dumps({"num_rows": record["rows"], "vulnerable_rows": record["vulnerable_rows"]}))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", CONTEXTS.get(record["split"], record["split"]))])


def _in_history(client: mlflow.MlflowClient, run: str, point: Metric) -> bool:
    return any((m.step, m.timestamp) == (point.step, point.timestamp)
               and (m.value == point.value or math.isnan(m.value) and math.isnan(point.value))  # NaN != NaN
               for m in client.get_metric_history(run, point.key))


def replay_spool(run_dir: Path, tracking_uri: str | None = None) -> tuple[str, int] | None:
    """Replay a run folder's pending spool, in order, at the current tracking URI: the runs created during the
    outage are created, and every write lands on the run it was meant for. Returns (the parent run's id, writes
    replayed), or None when nothing is pending. Progress is saved after each write, so a replay cut short continues
    where it stopped; the write it stopped at is applied only if MLflow lacks it (`_apply`'s replay), so a kill at any
    point applies no write twice. A finished spool is renamed mlflow_spool.replayed-<time>.jsonl, so replaying twice
    adds nothing."""
    run_dir = Path(run_dir)
    spool, progress_file = run_dir / SPOOL, run_dir / "mlflow_spool.progress.json"
    if not spool.is_file():
        return None
    ops = []
    for line in spool.read_text().splitlines():
        try:
            ops.append(json.loads(line))
        except ValueError:  # the last line, cut short by a killed driver: that write never completed
            break
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if not ops or progress.get("spool") != ops[0]["id"]:  # none yet, or left by an earlier spool
        progress = {"spool": ops[0]["id"] if ops else None, "done": 0, "ids": {}}
    client = mlflow.MlflowClient()
    for n in range(progress["done"], len(ops)):
        try:
            _apply(client, ops[n], progress["ids"], run_dir, replay=True)
        except (mlflow.exceptions.MlflowException, OSError):
            uri = tracking_uri or current_uri()
            if not uri.startswith(("http://", "https://")) or _reachable(uri):
                raise
            raise TrackingError(f"MLflow tracking server {uri} stopped answering during the replay ({n} of {len(ops)} "
                                f"spool lines done); when it is back, `moekd sync {run_dir}` continues from there") from None
        progress["done"] = n + 1
        tmp = progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, progress_file)
    spool.rename(run_dir / f"mlflow_spool.replayed-{datetime.now():%Y%m%d-%H%M%S}.jsonl")
    progress_file.unlink(missing_ok=True)
    root = ops[0]["run"] if ops else None
    return progress["ids"].get(root, root), sum(op["op"] != "spool" for op in ops)
