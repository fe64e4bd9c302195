"""`moekd`: one entry point. Each command loads a YAML config (+ key=value overrides), validates, calls a function.

    moekd run jobs/quickstart.yaml [experts.k=3 distill.temperature=4 ...]
    moekd validate jobs/devign_gpu.yaml
    moekd config            # every option with its default and description
"""

from __future__ import annotations

import argparse
import os
import sys
from enum import Enum

from pydantic import BaseModel

from moekd_ray.config import MoEKDConfig, load_config
from moekd_ray.errors import USER_ERRORS


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekd", description="Mixture-of-Experts knowledge distillation on Ray.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole pipeline"), ("validate", "validate a config without running")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML config, e.g. jobs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. experts.k=3")
    p = sub.add_parser("tune", help="Ray Tune search over router/distillation temperatures, alpha and lr")
    p.add_argument("config", help="YAML config with a `tune:` section, e.g. jobs/tune_quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=4")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search of this config")
    sub.add_parser("config", help="list every option with its default and description")
    args = parser.parse_args(argv)

    try:
        if args.command == "config":
            print("\n".join(describe_options()))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(f"{args.config}: valid (config digest {cfg.digest()}, {cfg.experts.k} experts, "
                  f"student {cfg.distill.student_arch and 'custom' or cfg.distill.student})")
            return 0
        if args.command == "tune":
            from moekd_ray.recipes.tune import run_search

            run_search(cfg, resume=args.resume)
            return 0
        from moekd_ray.recipes.pipeline import run_pipeline

        run_pipeline(cfg)
        return 0
    except USER_ERRORS as exc:
        if args.debug or os.environ.get("MOEKD_DEBUG"):
            raise
        print(f"moekd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
