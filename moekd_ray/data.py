"""Devign / CodeXGLUE defect-detection data: find it, validate every row, subset it.

Rows are dicts with at least `func` (C source, non-empty string) and `target` (0 or 1); `project` is kept when
present (the `project` partition uses it). Local files are parsed here, line by line, so that a bad row is
reported with its file and line number; the result is a Hugging Face `datasets.Dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from pathlib import Path

import datasets

from moekd_ray.config import DataConfig
from moekd_ray.errors import DataError

SPLITS = ("train", "valid", "test")
log = logging.getLogger("moekd.data")
# The hub copy names the validation split "validation".
_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def default_data_dir() -> Path:
    """../shared/data/devign next to the checkout this package is installed from."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "devign"


def resolve_data_dir(cfg: DataConfig) -> Path | None:
    """The documented rule: config value, then $MOEKD_DATA_DIR, then ../shared/data/devign; None means the hub."""
    if cfg.dir:
        path = Path(cfg.dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data.dir={cfg.dir} is not a folder; point it at the folder holding train/valid/test.jsonl(.gz)")
        return path
    env = os.environ.get("MOEKD_DATA_DIR")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"MOEKD_DATA_DIR={env} is not a folder; point it at the folder holding train/valid/test.jsonl(.gz)")
        return Path(env)
    fallback = default_data_dir()
    return fallback if fallback.is_dir() else None


def split_file(data_dir: Path, split: str) -> Path:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (data_dir / name).exists():
            return data_dir / name
    raise DataError(f"{data_dir}: no {split}.jsonl or {split}.jsonl.gz; put the {split} split there or set data.dir")


def validate_row(row, where: str, max_chars: int) -> dict:
    """One validated row, or a DataError naming `where` (file:line) and the fix."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; each line must be one object")
    for field in ("func", "target"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}; every row needs 'func' (C source) and 'target' (0/1)")
    func, target = row["func"], row["target"]
    if not isinstance(func, str):
        raise DataError(f"{where}: 'func' must be a string, got {type(func).__name__}")
    if not func.strip():
        raise DataError(f"{where}: 'func' is empty; drop the row or give it the function's source")
    if isinstance(target, bool) or target not in (0, 1):
        raise DataError(f"{where}: 'target' must be 0 or 1, got {target!r}; fix the label")
    # Lone surrogates from JSON escapes are not valid UTF-8 and break tokenizer training: replace them. A function
    # longer than max_chars is cut there (the tokenizers keep far fewer tokens anyway); read_jsonl counts them.
    func = func[:max_chars].encode("utf-8", "replace").decode("utf-8")
    return {"func": func, "target": int(target), "project": str(row.get("project") or "")}


def read_jsonl(path: Path, max_chars: int) -> list[dict]:
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a file; give the .jsonl(.gz) file itself")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, truncated = [], 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is allowed
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line); "
                                    "re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
                rows.append(validate_row(obj, f"{path}:{lineno}", max_chars))
                truncated += len(obj["func"]) > max_chars
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); check the file is a complete .jsonl or .jsonl.gz") from None
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    if truncated:
        log.warning("%s: %d functions longer than data.max_chars=%d characters were truncated", path, truncated,
                    max_chars)
    return rows


def take_subset(rows: list[dict], n: int | None, how: str, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    if how == "first":
        return rows[:n]
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def _load_hub(name: str, split: str, max_chars: int) -> list[dict]:
    try:
        ds = datasets.load_dataset(name, split=_HUB_SPLIT[split])
    except Exception as exc:  # offline, unknown name, ...: one line with the fix
        raise DataError(
            f"no local Devign data found and the hub dataset {name} could not be loaded ({type(exc).__name__}); "
            "set data.dir or MOEKD_DATA_DIR to a folder with train/valid/test.jsonl(.gz)"
        ) from None
    return [validate_row(dict(r), f"{name}[{split}][{i}]", max_chars) for i, r in enumerate(ds)]


def of_projects(rows: list[dict], projects: list[str] | None, key: str, split: str) -> list[dict]:
    """The rows of `projects` (all rows when None); a DataError naming the projects there are when none is left."""
    if projects is None:
        return rows
    kept = [r for r in rows if r["project"] in projects]
    if not kept:
        there = sorted({r["project"] for r in rows})
        raise DataError(f"data.{key}={projects}: no {split} row is from those projects; the {split} split has "
                        f"{there} (names are case-sensitive)")
    return kept


def load_devign(cfg: DataConfig, seed: int) -> dict[str, datasets.Dataset]:
    """train/valid/test as `datasets.Dataset`s with columns func, target, project."""
    data_dir = resolve_data_dir(cfg)
    out = {}
    for split in SPLITS:
        if data_dir is None:
            rows = _load_hub(cfg.hub_name, split, cfg.max_chars)
        else:
            rows = read_jsonl(split_file(data_dir, split), cfg.max_chars)
        key = "test_projects" if split == "test" else "train_projects"
        rows = of_projects(rows, getattr(cfg, key), key, split)
        limit = cfg.train_rows if split == "train" else cfg.eval_rows
        rows = take_subset(rows, limit, cfg.subset.value, seed)
        out[split] = datasets.Dataset.from_list(rows)
    return out


def describe(ds: dict[str, datasets.Dataset]) -> str:
    parts = []
    for split, d in ds.items():
        pos = sum(d["target"])
        parts.append(f"{split} {len(d):,} rows ({pos / max(len(d), 1):.1%} vulnerable)")
    return ", ".join(parts)


def split_records(cfg: DataConfig, ds: dict[str, datasets.Dataset]) -> list[dict]:
    """What trained, selected and tested a model, one plain record per split (a run logs them as its MLflow dataset
    inputs): a name, where the split was read from (its file, or the hub dataset and split), a digest of exactly the
    rows used (`dataset_hash` of that split alone: functions and labels, in order), row counts and column types."""
    data_dir = resolve_data_dir(cfg)
    base = data_dir.resolve().name if data_dir else cfg.hub_name.rsplit("/", 1)[-1]
    records = []
    for split, d in ds.items():
        source = ({"uri": str(split_file(data_dir, split).resolve())} if data_dir
                  else {"path": cfg.hub_name, "split": _HUB_SPLIT[split]})
        records.append({"name": f"{base}-{split}", "split": split, "source_type": "local" if data_dir else
                        "hugging_face", "source": source, "digest": dataset_hash({split: d}), "rows": len(d),
                        "vulnerable_rows": int(sum(d["target"])),
                        "columns": {k: getattr(v, "dtype", "string") for k, v in d.features.items()}})
    return records


def dataset_hash(ds: dict[str, datasets.Dataset]) -> str:
    """Short sha256 of every split's functions and labels, in order: which data a model saw, as a registry tag."""
    h = hashlib.sha256()
    for split in sorted(ds):
        for func, target in zip(ds[split]["func"], ds[split]["target"]):
            h.update(func.encode("utf-8", "surrogatepass"))
            h.update(b"\x00%d\x00" % int(target))
    return h.hexdigest()[:16]
