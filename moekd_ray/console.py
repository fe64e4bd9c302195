"""What `moekd` shows on the terminal: its own lines (`say`) and one live status line, nothing else.

While a `Console` captures, everything else written to stdout and stderr in the driver (Ray's forwarded worker
logs, DeepSpeed's and the libraries' warnings, tqdm bars from checkpoint writes) goes to the run's log file, and to
the terminal too only with `--verbose`. Progress markers (progress.py), from the driver or forwarded by Ray from any
worker, become the status line: the stage, each running task's share done, and its ETA, redrawn in place.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from pathlib import Path

from moekd_ray import progress

LOG_FILE = "moekd.log"  # in the run folder
_active: Console | None = None


def attach_log(path: Path) -> None:
    """From now on the active console (if any) also writes everything to `path`; say its place once."""
    if _active is not None:
        _active.attach_log(path)


class _Sink(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr while the console captures."""

    def __init__(self, console: Console, real):
        self.console, self.real, self.partial = console, real, ""

    def write(self, text: str) -> int:
        self.console.captured(text, self)
        return len(text)

    def flush(self) -> None:
        self.console.flush()

    def isatty(self) -> bool:
        return False  # libraries then skip colours and cursor tricks in what only the log file sees

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")


class Console:
    def __init__(self, verbose: bool = False, stream=None, redraw_every: float | None = None,
                 log_when_working: Path | None = None):
        """`log_when_working`: the log file to open once work starts (the first progress marker) or the command
        ends well, so that a command refused by its checks writes nothing."""
        self.out = stream or sys.stdout
        self.log_when_working = log_when_working
        self.verbose = verbose
        tty = getattr(self.out, "isatty", lambda: False)()
        # In place on a terminal; into a file or pipe a redraw is bytes, not a new line, but keep them rarer.
        self.redraw_every = redraw_every if redraw_every is not None else (0.5 if tty else 5.0)
        self.lock = threading.RLock()
        self.log_file = None
        self.pending: list[str] = []  # what was written before the log file's place was known
        self.stage = ""
        self.tasks: dict[str, dict] = {}  # task -> latest report, with when it was first and last seen
        self.shown = ""  # the status line now on the terminal
        self.drawn_at = 0.0
        self.saved = None

    # ------------------------------------------------------------------ moekd's own lines
    def say(self, text: str = "") -> None:
        with self.lock:
            self._clear()
            self.out.write(f"{text}\n")
            self.out.flush()
            self._log(f"{text}\n")
            self._draw(force=True)

    def attach_log(self, path: Path) -> None:
        with self.lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(path, "a", encoding="utf-8")
            self.log_file.write("".join(self.pending))
            self.pending.clear()
            self.log_file.flush()

    # ------------------------------------------------------------------ everything else
    def captured(self, text: str, sink: _Sink) -> None:
        with self.lock:
            self._log(text)
            sink.partial += text
            *lines, sink.partial = sink.partial.split("\n")
            for line in lines:
                fields = progress.parse(line)
                if fields is not None:
                    self._update(fields)
                elif self.verbose:
                    self._clear()
                    sink.real.write(line + "\n")
            self._draw()

    def flush(self) -> None:
        with self.lock:
            if self.log_file:
                self.log_file.flush()
            self.out.flush()

    def _log(self, text: str) -> None:
        if self.log_file:
            self.log_file.write(text)
        else:
            self.pending.append(text)

    # ------------------------------------------------------------------ the status line
    def _update(self, fields: dict) -> None:
        self._open_deferred_log()
        now = time.monotonic()
        if "stage" in fields:
            self.stage = f"[{fields['index']}/{fields['count']}] {fields['stage']}" if fields["stage"] else ""
            self.tasks.clear()
        else:
            seen = self.tasks.get(fields["task"])
            first = (seen["first_at"], seen["first_done"]) if seen and seen["done"] <= fields["done"] else (
                now, fields["done"])
            self.tasks[fields["task"]] = {**fields, "first_at": first[0], "first_done": first[1], "at": now}
            if fields["done"] >= fields["total"]:
                self.tasks.pop(fields["task"])

    def status_line(self) -> str:
        parts = [self.stage] if self.stage else []
        for task, t in self.tasks.items():
            share = t["done"] / max(t["total"], 1)
            rate = (t["done"] - t["first_done"]) / max(t["at"] - t["first_at"], 1e-9)
            eta = f" ETA {duration((t['total'] - t['done']) / rate, compact=True)}" if rate > 0 else ""
            note = f" {t['note']}" if t["note"] else ""
            parts.append(f"{task}{note} {share:.0%}{eta}")
        line = " | ".join(parts)
        return line if len(line) <= 160 else line[:157] + "..."

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn_at < self.redraw_every:
            return
        line = self.status_line()
        if line != self.shown:
            self._clear()
            self.out.write(line)
            self.out.flush()
            self.shown = line
        self.drawn_at = now

    def _open_deferred_log(self) -> None:
        if self.log_when_working is not None and self.log_file is None:
            path, self.log_when_working = self.log_when_working, None
            self.attach_log(path)
            self._clear()
            self.out.write(f"full log: {path}\n")

    def _clear(self) -> None:
        if self.shown:
            self.out.write("\r" + " " * len(self.shown) + "\r")
            self.shown = ""

    # ------------------------------------------------------------------ capture
    def __enter__(self) -> Console:
        global _active
        real_out, real_err = sys.stdout, sys.stderr
        sinks = {id(real_out): _Sink(self, real_out), id(real_err): _Sink(self, real_err)}
        # Handlers made before now (Ray's, at import) hold the real streams: point them at the sinks too.
        handlers = [h for h in _stream_handlers() if id(h.stream) in sinks]
        self.saved = (real_out, real_err, [(h, h.stream) for h in handlers])
        for h in handlers:
            h.setStream(sinks[id(h.stream)])
        sys.stdout, sys.stderr = sinks[id(real_out)], sinks[id(real_err)]
        _active = self
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _active
        real_out, real_err, handlers = self.saved
        with self.lock:
            if exc_type is None:
                self._open_deferred_log()
            self._clear()
            sys.stdout, sys.stderr = real_out, real_err
            for h, stream in handlers:
                h.setStream(stream)
            if self.log_file:
                self.log_file.close()
                self.log_file = None
        _active = None


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    # A handler whose stream is a read-only property (logging's last-resort handler) always writes to the
    # current sys.stderr, the sink, anyway.
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(type(h), "stream", None), property)]


def duration(seconds: float, compact: bool = False) -> str:
    """"4 min 11 s" for moekd's lines; compact ("4m11s") for the status line's ETAs."""
    if not compact:
        return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

