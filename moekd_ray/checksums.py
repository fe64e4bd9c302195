"""Checksums of a registered model's files: recorded when the student is logged, verified whenever it is loaded.

A damaged artifact store (an upload cut short, a flipped byte, a tokenizer file edited by hand) would otherwise give
a model that fails deep inside safetensors or the tokenizer, or, worse, one that loads and answers differently.
The manifest is one more pyfunc artifact, `checksums` (checksums.json): the sha256 and size of every file of the
other artifacts (the student folder with its weights, config and decision threshold; its tokenizer folder; the
resolved config), keyed by `<artifact>/<path inside it>`, so it does not depend on where MLflow puts them.
It guards against damage, not against someone who can also rewrite the manifest.

Self-contained (standard library only): a logged pyfunc carries a copy of this file, as it does of scoring.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "checksums"  # the pyfunc artifact that holds the manifest
FIX = "re-register the model from its run (or restore the file)"


class DamagedModel(ValueError):
    """A file of a registered model that is missing, truncated, altered or added since registration."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(artifacts: dict[str, str]) -> dict[str, Path]:
    """Every file of the artifacts, by `<artifact>/<path inside it>` (a single-file artifact: by its name)."""
    found = {}
    for name, location in sorted(artifacts.items()):
        root = Path(location)
        if root.is_dir():
            found.update({f"{name}/{p.relative_to(root).as_posix()}": p
                          for p in sorted(root.rglob("*")) if p.is_file()})
        elif root.exists():
            found[name] = root
    return found


def write_manifest(artifacts: dict[str, str], path: Path) -> None:
    """The manifest of `artifacts` (name -> local file or folder, as given to mlflow.pyfunc.log_model) into `path`."""
    files = {key: {"sha256": sha256(p), "bytes": p.stat().st_size} for key, p in _files(artifacts).items()}
    Path(path).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify(artifacts: dict[str, str]) -> None:
    """Check a loaded pyfunc's artifacts (context.artifacts) against its manifest; raise DamagedModel naming the
    first file that is missing, of another size, of another content, or not there at registration.
    A model logged before manifests were recorded has none, and is loaded unverified."""
    if MANIFEST not in artifacts:
        return
    where = Path(artifacts[MANIFEST])
    try:
        recorded = json.loads(where.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedModel(f"model file {where} (the checksums recorded at registration) is missing or unreadable: "
                           f"{FIX}") from None
    present = _files({k: v for k, v in artifacts.items() if k != MANIFEST})
    for key, want in recorded.items():
        path = present.get(key)
        if path is None:
            raise DamagedModel(f"model file {_location(artifacts, key)} recorded at registration is missing: {FIX}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise DamagedModel(f"model file {path} is {size:,} bytes, {want['bytes']:,} at registration (truncated "
                               f"or altered): {FIX}")
        if sha256(path) != want["sha256"]:
            raise DamagedModel(f"model file {path} does not match its checksum recorded at registration (altered): "
                               f"{FIX}")
    added = sorted(set(present) - set(recorded))
    if added:
        raise DamagedModel(f"model file {present[added[0]]} was not there at registration (added later): remove it, "
                           f"or {FIX}")


def _location(artifacts: dict[str, str], key: str) -> str:
    name, _, inside = key.partition("/")
    if name not in artifacts:
        return key
    return str(Path(artifacts[name]) / inside) if inside else artifacts[name]
