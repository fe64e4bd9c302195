"""What `moekd` shows on the terminal: its own lines (`say`) and one live status line, nothing else.

While a `Console` captures, everything else written to stdout and stderr in the driver (Ray's forwarded worker
logs, DeepSpeed's and the libraries' warnings, tqdm bars from checkpoint writes) goes to the run's log file, and to
the terminal too only with `--verbose`. Progress markers (progress.py), from the driver or forwarded by Ray from any
worker, become the status: the stage, each running task's share done, and its ETA. On a terminal it is one line
redrawn in place; into a file, a pipe or a CI log (`moekd run ... > log`, `ray job submit`), read later, it is a
plain progress line every `progress_every` seconds instead, as tqdm, rich and pip do: no carriage returns.
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
LOG_WIDTH = 120  # the longest progress line written to a file or pipe
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
    def __init__(self, verbose: bool = False, stream=None, redraw_every: float = 0.5,
                 log_when_working: Path | None = None, progress_every: float = 30.0, tty: bool | None = None):
        """`log_when_working`: the log file to open once work starts (the first progress marker) or the command
        ends well, so that a command refused by its checks writes nothing. `redraw_every`: seconds between redraws
        of the terminal's status line; `progress_every`: between progress lines elsewhere; `tty`: whether `stream`
        is a terminal (default: it says so)."""
        self.out = stream or sys.stdout
        self.log_when_working = log_when_working
        self.verbose = verbose
        self.tty = getattr(self.out, "isatty", lambda: False)() if tty is None else tty
        self.redraw_every, self.progress_every = redraw_every, progress_every
        self.started = time.monotonic()
        self.stopped = threading.Event()  # ends the thread that writes progress lines (not on a terminal)
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

    def _status_parts(self) -> list[str]:
        """The stage, then each running task with its share done and ETA."""
        parts = [self.stage] if self.stage else []
        for task, t in self.tasks.items():
            share = t["done"] / max(t["total"], 1)
            rate = (t["done"] - t["first_done"]) / max(t["at"] - t["first_at"], 1e-9)
            eta = f" ETA {duration((t['total'] - t['done']) / rate, compact=True)}" if rate > 0 else ""
            note = f" {t['note']}" if t["note"] else ""
            parts.append(f"{task}{note} {share:.0%}{eta}")
        return parts

    def status_line(self) -> str:
        """The terminal's status line."""
        line = " | ".join(self._status_parts())
        return line if len(line) <= 160 else line[:157] + "..."

    def progress_lines(self) -> list[str]:
        """The status for a log, with the time since the start: whole tasks per line, LOG_WIDTH at most each."""
        parts = self._status_parts()
        if not parts:
            return []
        lines = [f"progress {duration(time.monotonic() - self.started, compact=True)}: {parts[0]}"]
        for part in parts[1:]:
            if len(lines[-1]) + 3 + len(part) <= LOG_WIDTH:
                lines[-1] += " | " + part
            else:
                lines.append("  | " + part)
        return [line[:LOG_WIDTH] for line in lines]

    def _write_progress(self) -> None:
        """Every `progress_every` seconds until the console ends: the progress lines (not on a terminal)."""
        while not self.stopped.wait(self.progress_every):
            with self.lock:
                lines = self.progress_lines()
                if lines:
                    self.out.write("\n".join(lines) + "\n")
                    self.out.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:  # a file or pipe gets progress lines from their own thread, no redraws
            return
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
        if not self.tty:
            threading.Thread(target=self._write_progress, name="moekd-progress", daemon=True).start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _active
        real_out, real_err, handlers = self.saved
        self.stopped.set()
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

