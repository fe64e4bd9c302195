"""`moekd predict`: score every C function of a file, a directory tree or stdin with a registered student.

    moekd predict src/ --model models:/moekd-student@champion --format sarif --output moekd.sarif
    cat f.c | moekd predict - --format json

Streaming: files are found lazily (``os.walk``), each one is read, parsed with tree-sitter-c and split into its
``function_definition`` nodes, and functions are scored ``batch_size`` at a time; rows are written as soon as
their batch is scored. Only the current file and the current batch of function sources are held, so peak
memory is the model plus one batch (plus the largest file), whatever the size of the tree.

Bad input never stops a scan: a binary file, a file that is not UTF-8 or cannot be read is skipped, and a file
without any function definition is reported, each with one ``moekd: warning:`` line on stderr; so is a file with
syntax errors (naming the function or lines where they are), whose functions are still scored. What stops it
before anything is scored (one ``moekd: error:`` line, exit code 2): a missing path, a directory without
matching files, a model that cannot be found, an unreachable tracking server.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from moekd_ray.c_parser import Function, extract_functions
from moekd_ray.checksums import DamagedModel
from moekd_ray.errors import ConfigError, DataError, TrackingError
from moekd_ray.process_group import environment

DEFAULT_MODEL = "models:/moekd-student@champion"
DEFAULT_GLOBS = ("*.c", "*.h")
FORMATS = ("table", "json", "sarif")
STDIN = "-"
STDIN_NAME = "<stdin>"

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_ID = "moekd/vulnerable-function"
# The task and data the students are trained for (CodeXGLUE defect detection, i.e. Devign); the project has no
# homepage of its own yet.
INFORMATION_URI = "https://github.com/microsoft/CodeXGLUE/tree/main/Code-Code/Defect-detection"
SRCROOT = "%SRCROOT%"

_BINARY_PROBE = 8192  # like git and grep: a NUL byte in the first 8 KiB means binary


# ------------------------------------------------------------------------------------------ finding files

@dataclass
class ScanStats:
    files: int = 0  # files read and split (with or without functions)
    skipped: int = 0  # files not split: binary, not UTF-8, unreadable
    without_functions: int = 0
    with_parse_errors: int = 0  # files whose tree has errors (their functions are still scored)
    functions: int = 0
    flagged: int = 0  # functions at or above the threshold
    seconds: float = 0.0  # walking, parsing and scoring (model loading excluded)
    load_seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.functions / self.seconds if self.seconds > 0 else 0.0


def _matches(name: str, rel: str, globs: Sequence[str]) -> bool:
    """A glob matches the file name (`*.c`) or, if it has a slash, the path below the scanned folder (`src/*.c`)."""
    return any(fnmatch.fnmatchcase(rel if "/" in g else name, g) for g in globs)


def find_files(root: Path, globs: Sequence[str], warn: Callable[[str], None]) -> Iterator[Path]:
    """Files below ``root`` matching ``globs``, lazily, in sorted order; hidden folders (.git, .venv) are not
    entered and folder symlinks are not followed."""
    def on_error(exc: OSError) -> None:
        warn(f"{exc.filename}: cannot list ({exc.strerror}); skipped")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if _matches(name, path.relative_to(root).as_posix(), globs):
                yield path


def _display_base(target: Path) -> Path:
    """Paths are shown relative to the working directory when the target is inside it, else to the target
    folder (or the file's folder)."""
    cwd, full = Path(os.getcwd()), Path(os.path.abspath(target))
    if full == cwd or cwd in full.parents:
        return cwd
    return full if full.is_dir() else full.parent


def _read_source(data: bytes) -> str | None:
    """Why ``data`` cannot be scanned as C source, or None."""
    if b"\x00" in data[:_BINARY_PROBE]:
        return "binary file (NUL bytes); skipped"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); skipped "
                "(convert it, e.g. iconv -f latin1 -t utf-8)")
    return None


def iter_functions(sources: Iterable[tuple[str, Callable[[], bytes]]], stats: ScanStats,
                   warn: Callable[[str], None]) -> Iterator[tuple[str, Function]]:
    """(display path, function) for each function of each source; a source is (display path, reader)."""
    for display, read in sources:
        try:
            data = read()
        except OSError as exc:
            stats.skipped += 1
            warn(f"{display}: cannot read ({exc.strerror or exc}); skipped")
            continue
        problem = _read_source(data)
        if problem:
            stats.skipped += 1
            warn(f"{display}: {problem}")
            continue
        stats.files += 1
        if not data.strip():
            stats.without_functions += 1
            warn(f"{display}: empty file, no function")
            continue
        functions, errors = extract_functions(data)
        del data
        stats.with_parse_errors += bool(errors)
        if not functions:
            stats.without_functions += 1
            warn(f"{display}: " + ("tree-sitter could not parse it and found no function definition" if errors
                                   else "no function definition found"))
            continue
        if errors:
            warn(f"{display}: syntax errors in {_error_places(functions, errors)}; "
                 f"the {len(functions)} function(s) found are scored anyway")
        for fn in functions:
            yield display, fn


def _error_places(functions: Sequence[Function], errors: Sequence[tuple[int, int]], shown: int = 3) -> str:
    """Where the syntax errors are: the (outermost) function holding each one, else its lines."""
    places: list[str] = []
    for start, end in errors:
        fn = next((f for f in functions if f.start_line <= start and end <= f.end_line), None)
        place = (f"{fn.name} (lines {fn.start_line}-{fn.end_line})" if fn is not None
                 else f"line {start}" if start == end else f"lines {start}-{end}")
        if place not in places:
            places.append(place)
    more = f" and {len(places) - shown} more" if len(places) > shown else ""
    return ", ".join(places[:shown]) + more


def _sources(path: str, globs: Sequence[str], warn: Callable[[str], None]
             ) -> tuple[Iterator[tuple[str, Callable[[], bytes]]], Path | None]:
    """(display path, reader) pairs for PATH, and the folder displayed paths are relative to (None for stdin).
    Raises DataError before anything is read if PATH is missing or a folder without matching files."""
    if path == STDIN:
        return iter([(STDIN_NAME, lambda: sys.stdin.buffer.read())]), None
    target = Path(path)
    if not target.exists():
        raise DataError(f"{path}: no such file or directory")
    base = _display_base(target)

    def shown(p: Path) -> str:
        return Path(os.path.relpath(os.path.abspath(p), base)).as_posix()

    if not target.is_dir():  # a file named on the command line is scanned whatever the globs
        return iter([(shown(target), target.read_bytes)]), base
    files = find_files(target, globs, warn)
    first = next(files, None)
    if first is None:
        raise DataError(f"{path}: no files matching {' or '.join(globs)} (hidden folders are skipped); "
                        "give another folder or --glob")

    def chained():
        yield first
        yield from files

    return ((shown(p), p.read_bytes) for p in chained()), base


# ------------------------------------------------------------------------------------------ scoring

@dataclass(frozen=True)
class Row:
    file: str
    function: str
    start_line: int
    end_line: int
    probability: float
    verdict: str

    def as_dict(self) -> dict:
        return {"file": self.file, "function": self.function, "start_line": self.start_line,
                "end_line": self.end_line, "probability": self.probability, "verdict": self.verdict}


def pyfunc_scorer(model) -> Callable[[list[str]], list[float]]:
    """P(vulnerable) per source from a loaded pyfunc student (DataFrame `func` in, `probability` out)."""
    import pandas as pd

    def score(sources: list[str]) -> list[float]:
        out = model.predict(pd.DataFrame({"func": sources}))["probability"]
        probs = [float(p) for p in out]
        if len(probs) != len(sources):
            raise RuntimeError(f"the model returned {len(probs)} probabilities for {len(sources)} functions")
        return probs

    return score


def score_rows(functions: Iterable[tuple[str, Function]], score: Callable[[list[str]], list[float]],
               batch_size: int, threshold: float, stats: ScanStats) -> Iterator[Row]:
    """Rows in input order, scored ``batch_size`` functions at a time (only one batch of sources is held)."""
    batch: list[tuple[str, Function]] = []

    def flush() -> Iterator[Row]:
        probs = score([fn.source for _, fn in batch])
        for (display, fn), p in zip(batch, probs):
            vulnerable = p >= threshold
            stats.functions += 1
            stats.flagged += vulnerable
            yield Row(display, fn.name, fn.start_line, fn.end_line, p, "vulnerable" if vulnerable else "safe")
        batch.clear()

    for item in functions:
        batch.append(item)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


# ------------------------------------------------------------------------------------------ output formats

class TableWriter:
    """Aligned columns, written as rows arrive: the fixed-width columns come first, the function column widens
    (from then on) when a longer name arrives, the file comes last."""

    def __init__(self, out: IO[str]):
        self.out, self.width = out, 24

    def begin(self, **_) -> None:
        self.out.write(f"{'PROBABILITY':>11}  {'VERDICT':<10}  {'START':>6}  {'END':>6}  "
                       f"{'FUNCTION':<{self.width}}  FILE\n")

    def row(self, r: Row) -> None:
        self.width = max(self.width, len(r.function))
        self.out.write(f"{r.probability:>11.4f}  {r.verdict:<10}  {r.start_line:>6}  {r.end_line:>6}  "
                       f"{r.function:<{self.width}}  {r.file}\n")

    def end(self, **_) -> None:
        pass


class JsonWriter:
    """One JSON list of row objects, streamed (valid JSON once the scan ends)."""

    def __init__(self, out: IO[str]):
        self.out, self.first = out, True

    def begin(self, **_) -> None:
        self.out.write("[")

    def row(self, r: Row) -> None:
        self.out.write(("\n  " if self.first else ",\n  ") + json.dumps(r.as_dict()))
        self.first = False

    def end(self, **_) -> None:
        self.out.write("\n]\n" if not self.first else "]\n")


class SarifWriter:
    """A SARIF 2.1.0 log with one run: one result (level warning) per function at or above the threshold,
    the warnings of the scan as tool execution notifications, and the scan's figures as run properties.
    Results are streamed; URIs are relative to %SRCROOT%, the folder that displayed paths are relative to."""

    def __init__(self, out: IO[str], threshold: float, model: str):
        self.out, self.threshold, self.model, self.first = out, threshold, model, True
        self.base: Path | None = None

    def begin(self, base: Path | None = None, **_) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            tool_version = version("moekd-ray")
        except PackageNotFoundError:
            tool_version = "0"
        driver = {
            "name": "moekd", "version": tool_version, "informationUri": INFORMATION_URI,
            "rules": [{
                "id": RULE_ID, "name": "VulnerableFunction",
                "shortDescription": {"text": "Function predicted vulnerable by the MoEKD student"},
                "fullDescription": {"text": "A distilled code model (trained on Devign: FFmpeg and QEMU functions) "
                                            "gives this function a probability of being vulnerable at or above "
                                            "the threshold. A model's guess, not a proof: review the function."},
                "defaultConfiguration": {"level": "warning"},
            }],
        }
        run_head = {"tool": {"driver": driver}}
        if base is not None:
            run_head["originalUriBaseIds"] = {SRCROOT: {"uri": base.as_uri().rstrip("/") + "/"}}
        head = json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0"}, indent=2)[:-2]  # drop the closing "\n}"
        run = json.dumps(run_head, indent=2)[:-2]
        self.out.write(head + ',\n  "runs": [\n' + _indent(run, 4) + ',\n      "results": [')
        self.base = base

    def row(self, r: Row) -> None:
        if r.verdict != "vulnerable":
            return
        location = {"uri": quote(r.file, safe="/")}
        if self.base is not None:
            location["uriBaseId"] = SRCROOT
        result = {
            "ruleId": RULE_ID, "ruleIndex": 0, "level": "warning",
            "message": {"text": f"{r.function} is predicted vulnerable: probability {r.probability:.4f} "
                                f"(threshold {self.threshold:g})"},
            "locations": [{
                "physicalLocation": {"artifactLocation": location,
                                     "region": {"startLine": r.start_line, "endLine": r.end_line}},
                "logicalLocations": [{"name": r.function, "kind": "function"}],
            }],
            "properties": {"probability": r.probability},
        }
        self.out.write(("\n" if self.first else ",\n") + _indent(json.dumps(result, indent=2), 8))
        self.first = False

    def end(self, stats: ScanStats | None = None, warnings: Sequence[str] = (), **_) -> None:
        stats = stats or ScanStats()
        invocation = {
            "executionSuccessful": True,
            "toolExecutionNotifications": [{"level": "warning", "message": {"text": w}} for w in warnings],
        }
        properties = {"model": self.model, "threshold": self.threshold, "files": stats.files,
                      "skippedFiles": stats.skipped, "functions": stats.functions, "flagged": stats.flagged}
        tail = (("\n      ]" if not self.first else "]")
                + ',\n      "invocations": ' + _indent(json.dumps([invocation], indent=2), 6).lstrip()
                + ',\n      "properties": ' + _indent(json.dumps(properties, indent=2), 6).lstrip()
                + "\n    }\n  ]\n}\n")
        self.out.write(tail)


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


# ------------------------------------------------------------------------------------------ the model

def load_model(uri: str, tracking_uri: str | None = None, say: Callable[[str], None] | None = None):
    """The pyfunc student at ``uri``: a local folder holding an MLmodel file, or a models:/ (runs:/, ...) URI
    resolved against ``tracking_uri`` (default $MLFLOW_TRACKING_URI, else the project's sqlite:///mlruns.db). For a
    registered model, ``say`` is told which version (and run) an alias or name stands for: the one loaded."""
    from moekd_ray.registry import MlflowClient, MlflowException, load_pyfunc, resolve_version

    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        folder = Path(uri)
        if not folder.is_dir():
            raise ConfigError(f"--model {uri}: no such folder, and not a models:/<name>/<version> or "
                              "models:/<name>@<alias> URI")
        if not (folder / "MLmodel").is_file():
            raise ConfigError(f"--model {uri}: this folder has no MLmodel file; give the folder of a logged "
                              "pyfunc model (the one holding MLmodel) or models:/<name>/<version>")
        with _quiet_loading():
            return load_pyfunc(str(folder))
    if uri.startswith("file:"):
        with _quiet_loading():
            return load_pyfunc(uri)

    from moekd_ray.config import MLflowConfig
    from moekd_ray.tracking import connect

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or MLflowConfig().tracking_uri
    if tracking_uri.startswith("sqlite:///"):  # (MLflow would create an empty store and then not find the model)
        db = tracking_uri[len("sqlite:///"):]
        if not Path(db).is_file():
            raise ConfigError(f"--model {uri}: the tracking store {tracking_uri} does not exist (no file {db}); "
                              "give --tracking-uri or a local model folder")
    try:
        connect(tracking_uri)  # fails with one line if an http(s) server does not answer
    except TrackingError as exc:
        raise TrackingError(f"{exc}; for moekd predict: --tracking-uri URI, or --model <local model folder>") from None
    load, used = uri, None
    try:  # the version an alias points at now, loaded by number (the alias may move meanwhile)
        name, version = resolve_version(MlflowClient(), uri) or (None, None)
    except ConfigError:  # none: the load below fails with the registered models listed
        name = version = None
    if name:
        load, run_id = f"models:/{name}/{version}", MlflowClient().get_model_version(name, version).run_id
        used = f"model {uri}: {name} version {version}" + (f" (from MLflow run {run_id})" if run_id else "")
    try:
        with _quiet_loading():
            model = load_pyfunc(load)
        if used and say:  # once loaded: a model that fails to load gets its error as the only line
            say(used)
        return model
    except DamagedModel as exc:  # (the file it names lies in a download folder: say which model it came from)
        raise DamagedModel(f"--model {uri}: {exc}") from None
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model {uri}: cannot be loaded from {tracking_uri} ({reason}); "
                          f"{_registered_models(tracking_uri)}") from None


@contextlib.contextmanager
def _quiet_loading():
    """No progress bars (MLflow's download, transformers' weight loading) nor MLflow's advice to add type hints
    on stderr, where the scan's warnings and summary go."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # (catch_warnings restores showwarning; a filter would lose to load_model's own "once")
        with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), warnings.catch_warnings():
            show = warnings.showwarning

            def hide_type_hint_advice(message, category, *args, **kwargs):
                if not (issubclass(category, UserWarning) and "type hints" in str(message)):
                    show(message, category, *args, **kwargs)

            warnings.showwarning = hide_type_hint_advice
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _registered_models(tracking_uri: str) -> str:
    """The registered models of the current store, for an error message: what exists and how to list it."""
    from moekd_ray.registry import registered_models

    try:
        models = registered_models(20)
    except Exception:  # noqa: BLE001 (only decorates an error message)
        models = None
    how = f"list them with `moekd registry list mlflow.tracking_uri={tracking_uri}`"
    if models is None:
        return how
    if not models:
        return "this store has no registered model; " + how
    shown = []
    for m in models:
        versions = sorted(int(v.version) for v in (m.latest_versions or []))
        aliases = ",".join(f"@{a}" for a in sorted(m.aliases or {}))
        extra = " ".join(x for x in (f"latest v{versions[-1]}" if versions else "", aliases) if x)
        shown.append(f"{m.name} ({extra})" if extra else m.name)
    return "registered models here: " + ", ".join(shown) + "; " + how


# ------------------------------------------------------------------------------------------ the command

def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def predict(path: str, model: str = DEFAULT_MODEL, threshold: float = 0.5, fmt: str = "table",
            globs: Sequence[str] | None = None, batch_size: int = 64, output: str | None = None,
            tracking_uri: str | None = None, scorer: Callable[[list[str]], list[float]] | None = None,
            err: IO[str] | None = None) -> ScanStats:
    """Scan ``path`` (a C file, a folder, or "-" for stdin), write one row per function in ``fmt`` to
    ``output`` (default stdout) and a summary line to stderr. ``scorer`` replaces the model (tests)."""
    err = err or sys.stderr
    globs = tuple(globs or DEFAULT_GLOBS)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: must be between 0 and 1")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")

    notes: list[str] = []  # the warnings, for the SARIF log

    def warn(text: str) -> None:
        notes.append(text)
        print(f"moekd: warning: {text}", file=err, flush=True)

    stats = ScanStats()
    sources, base = _sources(path, globs, warn)  # path errors before the (slow) model load
    if scorer is None:
        t0 = time.perf_counter()
        scorer = pyfunc_scorer(load_model(model, tracking_uri, lambda text: print(f"moekd: {text}", file=err,
                                                                                     flush=True)))
        stats.load_seconds = time.perf_counter() - t0

    with open(output, "w", encoding="utf-8") if output else contextlib.nullcontext(sys.stdout) as out:
        writer = {"table": lambda: TableWriter(out), "json": lambda: JsonWriter(out),
                  "sarif": lambda: SarifWriter(out, threshold, model)}[fmt]()
        try:
            t0 = time.perf_counter()
            writer.begin(base=base)
            rows = score_rows(iter_functions(sources, stats, warn), scorer, batch_size, threshold, stats)
            for i, row in enumerate(rows, 1):
                writer.row(row)
                if i % batch_size == 0:
                    out.flush()  # a batch at a time, so a pipe sees results as they come
            stats.seconds = time.perf_counter() - t0
            writer.end(stats=stats, warnings=notes)
            out.flush()
        except BrokenPipeError:  # `moekd predict src | head`: the reader is gone; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return stats
    print(summary(stats, threshold), file=err, flush=True)
    return stats


def summary(stats: ScanStats, threshold: float) -> str:
    def n(count: int, noun: str) -> str:
        return f"{count} {noun}{'' if count == 1 else 's'}"

    notes = [x for x in (f"{stats.skipped} skipped" if stats.skipped else "",
                         f"{stats.without_functions} without functions" if stats.without_functions else "",
                         f"{stats.with_parse_errors} with syntax errors" if stats.with_parse_errors else "") if x]
    files = n(stats.files + stats.skipped, "file") + (f" ({', '.join(notes)})" if notes else "")
    return (f"moekd: {files}, {n(stats.functions, 'function')} ({stats.flagged} at or above {threshold:g}) "
            f"in {stats.seconds:.2f} s: {stats.per_second:.1f} functions/s; model loaded in "
            f"{stats.load_seconds:.1f} s; peak RSS {peak_rss_mib():.0f} MiB")
