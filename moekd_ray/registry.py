"""The students in the MLflow model registry: loading them, their evidence, a listing, and gated promotion through
aliases.

Evidence lives in model-version tags (what an auditor reads in the UI or with `moekd registry list`):
  metric.<name>        test_accuracy, test_f1, size_mb, params, ... and asr_<attack> once `moekd attack` ran
  moekd.student        student preset, moekd.teachers: the expert set, moekd.config_digest, moekd.data_hash,
  moekd.source_run     the MLflow run that produced the version
  promotion.<n>        one JSON record per promotion attempt (alias, promoted or refused, gates, whether --force
                       was given and whether it overrode failed gates, by `moekd registry promote` or `moekd run`);
                       n = 1, 2, ... per version
"""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from moekd_ray.config import GatesConfig, MoEKDConfig
from moekd_ray.errors import ConfigError

METRIC = "metric."
PROMOTION = "promotion."


class PromotionRefused(ConfigError):
    def __init__(self, message: str, failed: list[str]):
        super().__init__(message)
        self.failed = failed  # the failed gates, each a phrase


# -------------------------------------------------------------------------------------------------- loading
def load_pyfunc(uri: str):
    """A logged or registered student as MLflow loads it: a local folder holding MLmodel, or a models:/ (runs:/,
    file:) URI against the tracking store `tracking.connect` set. Raises MlflowException or OSError."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def download_model(uri: str, dst: str) -> str:
    """The model's files at `uri` (e.g. models:/name/version) into the folder `dst`; the local folder's path."""
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)


def registered_models(limit: int = 20) -> list:
    """The store's registered models (name, latest_versions, aliases), at most `limit`."""
    return list(MlflowClient().search_registered_models(max_results=limit))


def teacher_name(spec) -> str:
    """An expert's model in a few words, for the registered version's tags."""
    if getattr(spec, "name_or_path", None):
        return spec.name_or_path
    if spec.source == "ngram":
        return f"{spec.ngram}-gram bag x{spec.dim}"
    if spec.source == "graph":
        return f"syntax graph x{spec.dim}"
    return f"{spec.hidden_size}h{spec.num_layers}L"


def evidence_tags(cfg: MoEKDConfig, metrics: dict[str, float], source_run: str | None) -> dict:
    """The version tags that say what a registered student is."""
    specs = cfg.experts.specs()
    teachers = [teacher_name(s) for s in specs]
    tags = {f"{METRIC}{k}": f"{float(v):.6g}" for k, v in metrics.items()}
    tags.update({
        "moekd.student": cfg.distill.student if cfg.distill.student_arch is None else "custom",
        "moekd.teachers": f"{len(specs)} x " + ", ".join(sorted(set(teachers))) + f" ({cfg.router.kind} router)",
        "moekd.config_digest": cfg.digest(),
    })
    if source_run:
        tags["moekd.source_run"] = source_run
    return tags


def model_card(name: str, version: str, tags: dict) -> str:
    """A short markdown description for the MLflow UI: what the model is and its measured figures."""
    rows = "\n".join(f"| {k.removeprefix(METRIC)} | {v} |" for k, v in sorted(tags.items()) if k.startswith(METRIC))
    return (f"MoEKD student `{name}` v{version}: the `{tags.get('moekd.student')}` student distilled from "
            f"{tags.get('moekd.teachers')}. Input: C function sources (column `func`); output: P(vulnerable) "
            f"(column `probability`). Config digest {tags.get('moekd.config_digest')}, data "
            f"{tags.get('moekd.data_hash', '?')}, source run {tags.get('moekd.source_run', '?')}.\n\n"
            + (f"Against the tfidf-lr reference fitted on the same rows: {tags['moekd.vs_reference']}.\n\n"
               if tags.get("moekd.vs_reference") else "")
            + f"| metric | value |\n|---|---|\n{rows}\n")


REGISTERED_MODEL_CARD = (
    "Vulnerability detectors for C functions distilled by moekd-ray (MoEKD: a mixture of experts, weighed per "
    "function by a router, taught a compact student). Input: C function sources (a string column, a list of "
    "strings, a string, or a DataFrame with `func`); output: P(vulnerable) per function, the decision threshold "
    "chosen on validation already in the weights (vulnerable when >= 0.5). Each version's description gives its "
    "teachers, data, measured figures and the run that made it; `moekd registry list` compares them.")


def record_evidence(client: MlflowClient, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    all_tags = client.get_model_version(name, version).tags
    client.update_model_version(name, version, description=model_card(name, version, all_tags))
    if not client.get_registered_model(name).description:  # a user's own description stays
        client.update_registered_model(name, description=REGISTERED_MODEL_CARD)


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str] | None:
    """(name, version) of a models:/name/version or models:/name@alias URI; None for anything else."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/").rstrip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias).version
        name, version = ref.split("/", 1)
        return name, client.get_model_version(name, version).version
    except (MlflowException, ValueError):
        raise ConfigError(f"{uri}: no such registered model version; `moekd registry list` shows what exists") from None


def list_versions(client: MlflowClient, name: str | None = None) -> list[dict]:
    """One row per version (newest first within a model): aliases and the evidence tags."""
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for model_name in names:
        try:
            aliases = client.get_registered_model(model_name).aliases  # {alias: version}
        except MlflowException:
            raise ConfigError(f"registered model {model_name!r} does not exist; `moekd registry list` shows all") from None
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{model_name}'"):
            t = mv.tags
            rows.append({
                "name": model_name, "version": int(mv.version), "aliases": ",".join(sorted(by_version.get(mv.version, []))),
                "test_accuracy": _num(t.get("metric.test_accuracy")), "test_f1": _num(t.get("metric.test_f1")),
                "asr": {k.removeprefix("metric.asr_"): _num(v) for k, v in t.items() if k.startswith("metric.asr_")},
                "size_mb": _num(t.get("metric.size_mb")), "student": t.get("moekd.student", ""),
                "teachers": t.get("moekd.teachers", ""), "data_hash": t.get("moekd.data_hash", ""),
                "config_digest": t.get("moekd.config_digest", ""), "source_run": t.get("moekd.source_run", mv.run_id or ""),
            })
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def _num(value) -> float | None:
    return None if value in (None, "") else float(value)


def format_versions(rows: list[dict]) -> str:
    head = (f"{'name':<16} {'ver':>3} {'aliases':<10} {'test acc':>8} {'test F1':>7} {'ASR':<18} {'MB':>6} "
            f"{'student':<7} {'data':<12} {'config':<12} {'source run':<32} teachers")
    lines = [head, "-" * len(head)]
    fmt = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        asr = " ".join(f"{k}={v:.2f}" for k, v in sorted(r["asr"].items())) or "-"
        lines.append(f"{r['name']:<16} {r['version']:>3} {r['aliases'] or '-':<10} {fmt(r['test_accuracy'], 8)} "
                     f"{fmt(r['test_f1'], 7)} {asr:<18} {fmt(r['size_mb'], 6)} {r['student']:<7} "
                     f"{r['data_hash'][:12]:<12} {r['config_digest']:<12} {r['source_run']:<32} {r['teachers']}")
    return "\n".join(lines)


def promotion_records(tags: dict) -> list[tuple[int, dict]]:
    """(n, record) of a version's `promotion.<n>` tags, oldest first (n compared as a number: 2 before 10)."""
    found = [(int(k.removeprefix(PROMOTION)), v) for k, v in tags.items()
             if k.startswith(PROMOTION) and k.removeprefix(PROMOTION).isdigit()]
    return [(n, json.loads(v)) for n, v in sorted(found)]


def failed_gates(tags: dict, gates: GatesConfig, champion_tags: dict | None) -> list[str]:
    """Each gate the version fails, as a phrase naming the gate, the value and the bound."""
    failed = []
    if tags.get("moekd.degenerate") == "true":  # not a gate one can configure away: a useless model
        failed.append(f"degenerate model ({tags.get('moekd.degenerate_reason', 'one class or F1 below the floor')})")

    def value(key):
        v = tags.get(METRIC + key)
        return None if v is None else float(v)

    f1, size, asr = value("test_f1"), value("size_mb"), value(f"asr_{gates.asr_attack}")
    if gates.min_test_f1 is not None and (f1 is None or f1 < gates.min_test_f1):
        failed.append(f"test_f1 {f1 if f1 is not None else 'unmeasured'} < min_test_f1 {gates.min_test_f1}")
    if gates.max_asr is not None and (asr is None or asr > gates.max_asr):
        failed.append(f"asr_{gates.asr_attack} {'unmeasured (run moekd attack on it)' if asr is None else asr} "
                      f"> max_asr {gates.max_asr}")
    if gates.max_size_mb is not None and (size is None or size > gates.max_size_mb):
        failed.append(f"size_mb {size} > max_size_mb {gates.max_size_mb}")
    if gates.max_f1_drop is not None and champion_tags is not None and f1 is not None:
        best = champion_tags.get(METRIC + "test_f1")
        if best is not None and f1 < float(best) - gates.max_f1_drop:
            failed.append(f"test_f1 {f1} is more than max_f1_drop {gates.max_f1_drop} below the current holder's {best}")
    return failed


def promote(client: MlflowClient, name: str, version: str, alias: str, gates: GatesConfig,
            force: bool = False, by: str = "moekd registry promote") -> list[str]:
    """Move `alias` to `version` if it passes the gates (or `force`); record the attempt (made `by` that command)
    as a version tag. Returns the failed gates (empty when it passed); raises PromotionRefused when refused."""
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise ConfigError(f"{name} version {version} does not exist; `moekd registry list --name {name}`") from None
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    champion_tags = holder.tags if holder is not None and holder.version != mv.version else None
    failed = failed_gates(mv.tags, gates, champion_tags)
    passed = not failed or force
    n = max((k for k, _ in promotion_records(mv.tags)), default=0) + 1
    # force: --force was given; forced: it overrode failed gates (a version that passes is promoted either way)
    record = {"alias": alias, "result": "promoted" if passed else "refused", "force": bool(force),
              "forced": bool(force and failed),
              "failed_gates": failed, "gates": gates.model_dump(mode="json"),
              "previous_holder": holder.version if holder is not None else None, "by": by, "time": int(time.time())}
    client.set_model_version_tag(name, version, f"{PROMOTION}{n}", json.dumps(record))
    if not passed:
        raise PromotionRefused(f"{name} v{version} not promoted to @{alias}: " + "; ".join(failed)
                               + " (fix the model or the gates in registry.gates; --force overrides and is recorded)",
                               failed)
    client.set_registered_model_alias(name, alias, version)
    return failed


def promote_first(client: MlflowClient, name: str, version: str, gates: GatesConfig, alias: str = "champion") -> str:
    """`moekd run`'s student becomes @champion when no version holds that alias yet and it passes the gates (a
    degenerate one never does), recorded like any promotion: so `moekd predict`, whose default model is
    models:/<name>@champion, works right after the first run. Once a version holds it, only `moekd registry
    promote` moves it (the runs of a team differ in data and settings: their F1 alone does not rank them).
    Returns what happened, in a few words for the run's last line."""
    promote_command = f"`moekd registry promote --name {name} --version {version}`"
    try:
        holder = client.get_registered_model(name).aliases.get(alias)  # {alias: version}
        if holder is not None and str(holder) == str(version):
            return f"@{alias}"
        if holder is not None:
            return f"@{alias} stays v{holder}; {promote_command} moves it"
        promote(client, name, version, alias, gates, by="moekd run")
    except PromotionRefused as exc:
        return f"not @{alias}: " + "; ".join(exc.failed)
    except MlflowException as exc:  # the run's work is done and registered: say it, do not fail the run
        if exc.get_http_status_code() in (401, 403):  # a team server's login: this user may not move the alias
            return f"not @{alias}: the tracking server refused it ({exc.error_code}); someone with EDIT on {name}: " \
                   f"{promote_command}"
        return f"not @{alias}: the tracking store did not answer ({exc.error_code}); {promote_command}"
    return f"now @{alias}, what `moekd predict` uses"
