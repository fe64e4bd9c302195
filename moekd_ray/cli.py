"""`moekd`: one entry point. Each command loads a YAML config (+ key=value overrides), validates, calls a function.

    moekd run jobs/quickstart.yaml [experts.k=3 distill.temperature=4 ...]
    moekd pretrain jobs/devign_cpu.yaml  # masked-LM encoder for experts with `source: pretrain`
    moekd sync <run folder>  # completes the MLflow run of a `moekd run` that outlived a tracking-server outage
    moekd validate jobs/devign_gpu.yaml
    moekd benchmark jobs/benchmark_quick.yaml
    moekd search-student jobs/student_search.yaml student_search.from_run=<pipeline run id>
    moekd attack [jobs/quickstart.yaml] --model <run id | folder | models:/name/version> --attack mhm --n 200
    moekd config            # every option with its default and description
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path

from pydantic import BaseModel

from moekd_ray.config import ATTACK_NAMES, MoEKDConfig, PredictConfig, load_config
from moekd_ray.console import Console
from moekd_ray.errors import USER_ERRORS, ConfigError


def describe_options(section: BaseModel | None = None, prefix: str = "") -> list[str]:
    """Every option, dotted, with its default and description (help text comes from the schema).
    Walks a default instance, so a section's defaults are the ones its parent gives it."""
    section = section if section is not None else MoEKDConfig()
    lines = []
    for name, f in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel) and name != "model":
            lines.extend(describe_options(value, f"{prefix}{name}."))
            continue
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, dict):
            value = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in value.items()}
        elif isinstance(value, Enum):
            value = value.value
        lines.append(f"{prefix}{name} = {value!r}  # {f.description or ''}")
    return lines


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` ends every option's text with `(default: ...)`. An option whose default is None ("not given") says
    what that means in its own text, in the same form, as "(default: None)" would tell nothing; flags and required
    options have no default to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one `moekd: error:` line (like every other bad input) instead of
    the usage block and the error; subcommands' parsers are of this class too (and so show defaults alike)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"moekd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    parser = Parser(prog="moekd", description="Mixture-of-Experts knowledge distillation on Ray.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, DeepSpeed's and the libraries' output "
                        "too (it always goes to the run's log file)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole pipeline"), ("validate", "validate a config without running")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML config, e.g. jobs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. experts.k=3")
        if name == "run":
            p.add_argument("--resume", metavar="RUN", help="continue this interrupted run (its folder or MLflow run "
                           "id): finished stages are reused, an unfinished training resumes from its checkpoint "
                           "(default: a new run)")
    p = sub.add_parser("pretrain", help="masked-LM pretraining of an encoder on the training code (+ pretrain."
                       "extra_corpus) that experts with `source: pretrain` start from; reused when it exists")
    p.add_argument("config", help="YAML config with a `pretrain:` section (defaults otherwise)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.schedule.epochs=3")
    p = sub.add_parser("sync", help="replay the MLflow writes a `moekd run` spooled while the tracking server was "
                       "unreachable onto its MLflow run")
    p.add_argument("run_folder", help="the run folder the run printed (holds mlflow_spool.jsonl)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run's mlflow.tracking_uri)")
    p = sub.add_parser("tune", help="Ray Tune search over router/distillation temperatures, alpha and lr")
    p.add_argument("config", help="YAML config with a `tune:` section, e.g. jobs/tune_quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=4")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search of this config")
    p = sub.add_parser("benchmark", help="every distillation method side by side: accuracy, robustness, size, speed")
    p.add_argument("config", help="YAML config with a `benchmark:` section, e.g. jobs/benchmark_quick.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. benchmark.seeds=[0]")
    p.add_argument("--resume", nargs="?", const="latest", metavar="FOLDER",
                   help="continue an interrupted benchmark of this config (its folder; no value: the newest one): "
                   "complete cells are reused, an incomplete one continues where it stopped (default: a new benchmark)")
    p = sub.add_parser("search-student", help="multi-objective search over the student architecture (Pareto front)")
    p.add_argument("config", help="YAML config with a `student_search:` section, e.g. jobs/student_search.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. student_search.from_run=<run id>")
    p = sub.add_parser("attack", help=f"attack a trained model ({', '.join(ATTACK_NAMES)})")
    p.add_argument("config", nargs="?", help="YAML config for data, attack and MLflow settings (default: defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. attack.query_budget=500")
    p.add_argument("--model", required=True,
                   help="pipeline run id or folder, a model folder, or models:/<name>/<version> | models:/<name>@<alias>")
    p.add_argument("--target", default="student", help="in a pipeline run: student, uniform or expert_<k>")
    p.add_argument("--attack", choices=ATTACK_NAMES,
                   help="sets attack.method (default: the config's)")
    p.add_argument("--split", choices=["valid", "test"], help="sets attack.split (default: the config's)")
    p.add_argument("--n", type=int, help="sets attack.n, the functions sampled from the split (default: the config's)")
    p = sub.add_parser("registry", help="list registered students; promote a version through the gates")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("list", "every version with aliases and evidence"),
                         ("promote", "move an alias to a version if it passes registry.gates")):
        a = actions.add_parser(action, help=text)
        a.add_argument("--config", help="YAML config (mlflow.tracking_uri, registry.gates) (default: defaults)")
        a.add_argument("overrides", nargs="*", help="key=value overrides, e.g. registry.gates.min_test_f1=0.5")
        if action == "list":
            a.add_argument("--name", help="only this registered model (default: every registered model)")
        else:
            a.add_argument("--name", required=True, help="registered model name")
            a.add_argument("--version", required=True, help="the version to promote")
            a.add_argument("--alias", default="champion", help="the alias to move to it")
            a.add_argument("--force", action="store_true", help="promote despite failed gates (recorded as forced)")
    p = sub.add_parser("quantize", help="an int8 copy of a run's student for deployment, measured beside it and "
                       "registered as its own version")
    p.add_argument("run", help="the finished `moekd run`: its folder or MLflow run id")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config, e.g. "
                   "mlflow.tracking_uri=sqlite:///mlruns.db")
    p = sub.add_parser("predict", help="score every C function of a file, a folder (recursive) or stdin")
    p.add_argument("path", help="a C file, a folder, or - for stdin")
    for name, field in PredictConfig.model_fields.items():  # the schema's options, defaults and help
        text = field.description.rstrip(".").replace("(unset: ", "(default: ")
        text = text if text[:2].isupper() else text[0].lower() + text[1:]  # "MLflow ..." stays
        p.add_argument(f"--{name.replace('_', '-')}", default=field.default, help=text,
                       action="append" if name == "glob" else "store")
    sub.add_parser("config", help="list every option with its default and description")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also come after options (`moekd attack CFG --model X attack.n=50`).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # MLflow's INFO lines (creating tables, experiments) would bury moekd's own one-line messages; mlflow reads
    # this when it is first imported (later, lazily).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Ray merges log lines that differ only in numbers ("[repeated 4x across cluster]"): the console shows its own
    # status line instead, and the log file should hold every line. Ray reads this when it is first imported.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    try:
        if args.command == "config":
            predict_options = [f"moekd predict --{key.replace('_', '-')} ={rest}"  # as its flags are spelt
                               for key, rest in (line.split(" =", 1) for line in describe_options(PredictConfig()))]
            print("\n".join(describe_options() + predict_options))
            return 0
        if args.command == "attack":
            return _attack(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "registry":
            return _registry(args)
        if args.command == "sync":
            return _sync(args)
        if args.command == "quantize":
            from moekd_ray.recipes.quantize import run_quantize

            run_quantize(args.run, args.overrides)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(f"{args.config}: valid (config digest {cfg.digest()}, {cfg.experts.k} experts, "
                  f"student {cfg.distill.student_arch and 'custom' or cfg.distill.student})")
            return 0
        check_outputs_persist(cfg)
        log_path = None if args.command == "run" else (  # `moekd run`: in its run folder, once it exists
            Path(cfg.output_dir) / "logs" / f"{args.command}-{datetime.now():%Y%m%d-%H%M%S}.log")
        with Console(verbose=args.verbose, log_when_working=log_path) as console:
            _run_driver(args, cfg, console)
        return 0
    except USER_ERRORS as exc:
        if args.debug or os.environ.get("MOEKD_DEBUG"):
            raise
        print(f"moekd: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (re-raised unless a tracking server's login refused it)
        refused = None
        if type(exc).__module__.startswith("mlflow.") and not (args.debug or os.environ.get("MOEKD_DEBUG")):
            from moekd_ray.tracking import refusal

            refused = refusal(exc)
        if refused is None:
            raise
        print(f"moekd: error: {refused}", file=sys.stderr)
        return 2


RAY_JOB_CACHE = "runtime_resources"  # Ray's folder of job working dirs (ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME)


def check_outputs_persist(cfg: MoEKDConfig) -> None:
    """What a run writes must outlive it. Under `ray job submit --working-dir .` the driver runs in Ray's copy of
    the checkout, a cache deleted with the job (with the cluster, for a RayJob): a relative output_dir, storage path
    or local tracking store would land there, and `--resume`, `tune.from_run` and `moekd attack --model <run>`
    would find nothing afterwards."""
    uri = cfg.mlflow.tracking_uri
    local_store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None if "://" in uri else uri
    for key, path, fix in (("output_dir", cfg.output_dir, "/mnt/shared/moekd/runs"),
                           ("ray.storage_path", cfg.ray.storage_path, "/mnt/shared/moekd/ray"),
                           ("mlflow.tracking_uri", local_store, "http://<MLflow server> or sqlite:////mnt/shared/m.db")):
        if path and "://" not in path and RAY_JOB_CACHE in Path(path).resolve().parts:
            raise ConfigError(f"{key}: {Path(path).resolve()} is inside Ray's job working dir, which is deleted with "
                              f"the job; set {key} to persistent storage, e.g. {key}={fix}")


def _run_driver(args, cfg: MoEKDConfig, console: Console) -> None:
    """A long-running command, its output through the console."""
    if args.command == "pretrain":
        from moekd_ray.stages.pretrain import pretrain_encoder

        pretrain_encoder(cfg, log=console.say)
    elif args.command == "tune":
        from moekd_ray.recipes.pipeline import run_pipeline
        from moekd_ray.recipes.tune import run_search

        # The pipeline runs first when tune.from_run is unset; handed in here, as recipes do not import each other.
        run_search(cfg, resume=args.resume, log=console.say, run_pipeline=run_pipeline)
    elif args.command == "search-student":
        from moekd_ray.recipes.pipeline import run_pipeline
        from moekd_ray.recipes.student_search import run_student_search

        run_student_search(cfg, log=console.say, run_pipeline=run_pipeline)
    elif args.command == "benchmark":
        from moekd_ray.recipes.benchmark import run_benchmark

        run_benchmark(cfg, log=console.say, resume=args.resume)
    else:
        from moekd_ray.recipes.pipeline import run_pipeline

        run_pipeline(cfg, log=console.say, resume=args.resume)
    from moekd_ray import ray_runtime

    ray_runtime.shutdown()  # Ray's last lines (workers exiting) go to the log file, not after the final table


def _attack(args) -> int:
    from moekd_ray.recipes.attack import run_attack

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `moekd attack --model X attack.n=50`: no config file, only overrides
        config, overrides = None, [config, *overrides]
    for key, value in (("method", args.attack), ("split", args.split), ("n", args.n)):
        if value is not None:
            overrides.append(f"attack.{key}={value}")
    cfg = load_config(config, overrides)
    check_outputs_persist(cfg)
    run_attack(cfg, args.model, args.target)
    return 0


def _registry(args) -> int:
    from moekd_ray import registry, tracking

    cfg = load_config(args.config, args.overrides)
    tracking.connect(cfg.mlflow.tracking_uri)
    client = tracking.client()
    if args.action == "list":
        print(registry.format_versions(registry.list_versions(client, args.name)))
        return 0
    failed = registry.promote(client, args.name, args.version, args.alias, cfg.registry.gates, args.force)
    print(f"{args.name} v{args.version} is now @{args.alias}" + (f" (FORCED past: {'; '.join(failed)})" if failed else ""))
    return 0


def _sync(args) -> int:
    from moekd_ray import tracking

    folder = Path(args.run_folder)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder}: not a `moekd run` folder (no config.yaml); give the folder that `moekd run` "
                          "printed as `run folder ...`")
    uri = args.tracking_uri or load_config(folder / "config.yaml").mlflow.tracking_uri
    tracking.connect(uri)
    replayed = tracking.replay_spool(folder, uri)
    if replayed is None:
        print(f"{folder}: nothing to replay (no {tracking.SPOOL}): its MLflow run is complete")
    else:
        print(f"replayed {replayed[1]} spooled MLflow writes onto run {replayed[0]} at {uri}")
    return 0


def _predict(args) -> int:
    from pydantic import ValidationError

    from moekd_ray.recipes.predict import predict

    given = {name: getattr(args, name) for name in PredictConfig.model_fields}
    try:
        opts = PredictConfig.model_validate(given)
    except ValidationError as err:
        e = err.errors()[0]
        name = str(e["loc"][0])
        raise ConfigError(f"--{name.replace('_', '-')} {given[name]}: {e['msg']}") from None
    predict(args.path, model=opts.model, threshold=opts.threshold, fmt=opts.format, globs=opts.glob,
            batch_size=opts.batch_size, output=opts.output, tracking_uri=opts.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
