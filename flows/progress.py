"""Progress for people: one redrawn line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from config.sizes import format_size


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class StatusLine:
    """One status line: redrawn in place at most every `tty_interval` seconds on a terminal;
    elsewhere (a log file, CI, a Prefect worker) printed as a plain line every `log_interval`."""

    def __init__(self, stream: TextIO | None = None, *, tty_interval: float = 0.2, log_interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = tty_interval if self.tty else log_interval
        self._lock = threading.Lock()
        self._last = 0.0
        self._drawn = False

    def restart(self, log_line: str) -> None:
        """A new phase (a dataset): the next update shows at once; `log_line` goes to logs only."""
        self._last = 0.0
        if not self.tty:
            self._write(log_line + "\n")

    def show(self, render, *, force: bool = False) -> None:
        """Show `render()` if a line is due (or `force`); `render` runs only then, under the lock."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.interval:
                return
            self._last = now
            text = render(now)
            if self.tty:
                self._write("\r\033[K" + text)
                self._drawn = True
            else:
                self._write(text + "\n")

    def finish(self) -> None:
        with self._lock:
            if self.tty and self._drawn:
                self._write("\n")
                self._drawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class ProgressDisplay(StatusLine):
    """Shows bytes, objects, MB/s and ETA for the dataset being copied. Objects skipped as
    unchanged count as gone through (a re-run with nothing to copy reaches 100%); the rate and
    the ETA count only the bytes copied."""

    def counting(self, dataset: str, objects: int, bytes_total: int) -> None:
        """The listing pass that gives the totals (beside the copy): its figures so far, shown
        after the copy's own until the totals are known."""
        self.counted_so_far = (objects, bytes_total)

    def counted(self, dataset: str, objects: int, bytes_total: int) -> None:
        """The totals are known: from now on a percentage and an ETA."""
        self.total_objects, self.total_bytes = objects, bytes_total
        if not self.tty:
            self._write(f"{dataset}: {objects:,} objects, {format_size(bytes_total)} to go through\n")

    def start(self, dataset: str, total_objects: int, total_bytes: int) -> None:
        self.dataset = dataset
        self.total_objects = total_objects
        self.total_bytes = total_bytes
        self.counted_so_far: tuple[int, int] | None = None
        self.started = time.monotonic()
        what = f"{total_objects:,} objects, {format_size(total_bytes)}" if total_objects >= 0 else "listing as it goes"
        self.restart(f"{dataset}: copying ({what})")

    def update(self, bytes_done: int, objects_done: int, objects_failed: int, *, bytes_skipped: int = 0,
               objects_skipped: int = 0, throttling: tuple = (), force: bool = False) -> None:
        """`throttling`: the endpoints whose requests in flight are cut after throttling answers
        (`engine.pacing.Throttling`), shown after the figures: "destination `ovh`: throttled: 4/8 in flight"."""
        def render(now: float) -> str:
            line = self._render(now, bytes_done, objects_done, objects_failed, bytes_skipped, objects_skipped)
            return "; ".join([line] + [f"{t.label} {t.sentence()}" for t in throttling])

        self.show(render, force=force)

    def _render(self, now: float, bytes_done: int, objects_done: int, objects_failed: int, bytes_skipped: int,
                objects_skipped: int) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = bytes_done / elapsed
        failed = f", {objects_failed:,} failed" if objects_failed else ""
        unchanged = f" ({objects_skipped:,} unchanged)" if objects_skipped else ""
        if self.total_objects < 0:  # totals unknown: the listing is consumed as the copy goes
            counting = (f"; counting: {self.counted_so_far[0]:,} objects, {format_size(self.counted_so_far[1])} "
                        "so far") if self.counted_so_far else ""
            return (f"{self.dataset}: {format_size(bytes_done)} copied, {objects_done:,} objects{unchanged}{failed}, "
                    f"{rate / 1e6:.1f} MB/s{counting}")
        through = bytes_done + bytes_skipped
        left = max(self.total_bytes - through, 0)
        # An ETA from the first instants (connections opening, small files first) is noise.
        settled = elapsed >= 3.0 or (self.total_bytes and bytes_done >= 0.05 * self.total_bytes)
        if not left:
            eta = "0:00:00"
        else:
            eta = _eta(left / rate) if rate > 0 and bytes_done and settled else "--:--:--"
        pct = 100.0 * through / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.dataset}: {format_size(through)} / {format_size(self.total_bytes)} ({pct:.0f}%), "
                f"{objects_done:,}/{self.total_objects:,} objects{unchanged}{failed}, {rate / 1e6:.1f} MB/s, ETA {eta}")


class RestoreDisplay(StatusLine):
    """Progress of a restore: objects and bytes written (of the objects the dataset must hold,
    when the state knows them), the rate, the time left; a failed object's line above it."""

    def __init__(self, dataset: str, expected: int | None, stream: TextIO | None = None):
        super().__init__(stream)
        self.dataset, self.expected = dataset, expected
        self.objects = self.failed = self.bytes = 0
        self.started = time.monotonic()
        what = f"{expected:,} objects expected" if expected is not None else "what the destination holds"
        self.restart(f"{dataset}: restoring ({what})")

    def object_done(self, ok: bool, size: int) -> None:
        self.objects += 1
        self.failed += not ok
        self.bytes += size if ok else 0
        self.show(self._render)

    def note(self, line: str) -> None:
        """A line of its own (a failed object), above the status line on a terminal."""
        with self._lock:
            self._write(("\r\033[K" if self.tty and self._drawn else "") + line + "\n")
            self._drawn = False
            self._last = 0.0

    def _render(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        of = f" of {self.expected:,}" if self.expected is not None else ""
        left = ""
        if self.expected and self.objects and self.objects < self.expected:
            left = f", ETA {_eta((self.expected - self.objects) * elapsed / self.objects)}"
        failed = f", {self.failed:,} failed" if self.failed else ""
        return (f"{self.dataset}: {self.objects:,}{of} objects restored, {format_size(self.bytes)} "
                f"({self.bytes / elapsed / 1e6:.1f} MB/s){failed}{left}")
