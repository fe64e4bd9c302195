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

# The errors a user can fix: printed as one line (no traceback unless --debug).
from moekd_ray.config import ConfigError, MoEKDConfig, load_config
from moekd_ray.data import DataError


def _user_errors():
    from moekd_ray.tracking import TrackingError

    return (ConfigError, DataError, TrackingError, ValueError, FileNotFoundError)


def describe_options(model=MoEKDConfig, prefix: str = "") -> list[str]:
    """Every option, dotted, with its default and description (help text comes from the schema)."""
    from pydantic import BaseModel

    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_options(ann, f"{prefix}{name}."))
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, Enum):
            default = default.value
        lines.append(f"{prefix}{name} = {default!r}  # {f.description or ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekd", description="Mixture-of-Experts knowledge distillation on Ray.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole pipeline"), ("validate", "validate a config without running")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML config, e.g. jobs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. experts.k=3")
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
        from moekd_ray.recipes.pipeline import run_pipeline

        run_pipeline(cfg)
        return 0
    except _user_errors() as exc:
        if args.debug or os.environ.get("MOEKD_DEBUG"):
            raise
        print(f"moekd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
