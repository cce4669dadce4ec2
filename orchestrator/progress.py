"""Campaign progress for people: a live bar on a terminal, a plain line every few seconds elsewhere
(Ray job logs, CI, files), both showing runs done/total, runs/s over this session and the ETA.

The plain line is what the Ray dashboard shows of a campaign (the job's driver log), and what
`longtail status SUBMISSION_ID` reads back (cluster/jobs.py:last_progress): it starts with
"runs DONE/PLANNED" and names the campaign, its failures and its retries. Its period is
$LONGTAIL_PROGRESS_SECONDS (default 10 s).
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_INTERVAL = 10.0


def line_interval() -> float:
    try:
        return max(0.5, float(os.environ.get("LONGTAIL_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


class Progress:
    def __init__(self, total: int, done: int, label: str = "runs", stream=None, interval: float | None = None,
                 enabled: bool = True, clock=time.monotonic, campaign: str = ""):
        self.total, self.start_done, self.done = total, done, done
        self.failed = self.retried = 0
        self.in_flight = 0
        self.label = label
        self.campaign = campaign
        self.stream = stream or sys.stderr
        self.interval = line_interval() if interval is None else interval
        self.clock = clock
        self.t0 = clock()
        self.last_line = -float("inf")
        self.enabled = enabled
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, Progress as Bar, TextColumn

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} {task.fields[label]}"),
                            TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                            TextColumn("{task.fields[extra]}"), console=Console(file=self.stream),
                            transient=False)
            self._task = self._bar.add_task(label, total=total, completed=done, label=label, rate="",
                                            eta="?", extra="")
            self._bar.start()

    def rate(self) -> float:
        elapsed = self.clock() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("inf")

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        of = f" of campaign {self.campaign!r}" if self.campaign else ""
        return (f"{self.label} {self.done}/{self.total} ({pct:.1f}%){of}, {self.rate():.2f} {self.label}/s, "
                f"ETA {format_seconds(self.eta())}, {self.in_flight} in flight, {self.failed} failed, "
                f"{self.retried} retried")

    def update(self, done: int, failed: int = 0, in_flight: int = 0, force: bool = False, retried: int = 0) -> None:
        self.done, self.failed, self.in_flight, self.retried = done, failed, in_flight, retried
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=f"{self.rate():.2f}/s",
                             eta=format_seconds(self.eta()),
                             extra=", ".join(f"{n} {what}" for n, what in ((failed, "failed"), (retried, "retried")) if n))
            return
        now = self.clock()
        if force or now - self.last_line >= self.interval:
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.enabled:
            print(self.line(), file=self.stream, flush=True)
