"""The knobs of a transfer, and the memory formula they give."""

from __future__ import annotations

from dataclasses import dataclass, replace

from config.bandwidth import BandwidthTimetable
from engine.crypto.segments import SEGMENT_SIZE, MiB


@dataclass(frozen=True)
class TransferSettings:
    """How the engine moves bytes. Sizes in bytes, waits in seconds.

    **Memory.** Every payload buffer the engine holds is counted against one `MemoryBudget` of
    `memory_budget` bytes shared by all objects and threads of the process::

        peak in-flight payload <= memory_budget                               (enforced, always)
        peak process memory    ~= memory_budget
                                  + (concurrency + object_concurrency) x per-thread overhead
                                  + process baseline

    The payload is: each buffered part's plaintext (plus its output when the output format makes a
    copy: encryption doubles a part's charge), and each streamed part's current slice (likewise).
    Per-thread overhead is a thread's resident stack plus its SDK request state (connection buffers),
    on the order of 1 MiB; the baseline is the interpreter with the SDKs loaded (about 100-150 MB).
    Not counted: a connector that makes an extra copy of a body it sends or receives adds up to
    that request's size per thread issuing requests (transfer workers, and drivers doing single
    PUTs), which is why connectors must not copy bodies.

    The bound holds for any object size: a part whose buffer would exceed half the budget is not
    buffered but streamed, in slices of `stream_slice_size` (one slice held per streamed part), one
    part at a time for that object.
    """

    concurrency: int = 8
    """Transfer workers: how many range reads and part uploads of *multipart* objects are in
    flight at once across the process (each worker does one request at a time). Default 8.

    Requests in flight: a single-PUT object (at most `small_object_cutoff`) is read and PUT by its
    object driver itself, one request at a time, and a multipart object's driver issues only the
    small requests (open, complete, a head after a source change) while its parts go to the
    workers. So at most ``concurrency + objects_in_flight`` requests are in flight at once
    (``2 x concurrency`` with the defaults): ``objects_in_flight`` of them for small objects,
    ``concurrency`` for parts. Size the source's and the S3 connection pools to at least that
    sum. More workers than the memory budget can feed idle."""

    object_concurrency: int | None = None
    """Objects in progress at once (driver threads). Default None = `concurrency`. A driver plans
    its object and acquires its memory; for a single PUT it also does the read and the PUT (so
    this is the number of small objects copied at once), for a multipart object it submits the
    parts to the transfer workers and waits. Each in-progress object holds at least one part's
    memory (a single PUT holds the whole object)."""

    memory_budget: int = 128 * MiB
    """Bytes of payload the process may hold at once (see the formula above). Default 128 MiB
    (about 270 MB of process RSS in all, encrypted or not, measured on a 1 GiB object);
    at least 2 MiB (two 1 MiB segments). With buffered parts of P bytes, at most
    memory_budget // P parts (memory_budget // 2P once encrypted) are in flight, whatever
    `concurrency` says; parts above memory_budget / 2 are streamed."""

    part_size: int | None = None
    """Preferred multipart part size, output bytes, rounded up to whole 1 MiB segments. Default
    None = auto (16 MiB). Raised when the object would need more parts than the provider allows or
    parts below its minimum; lowered to the provider's maximum part size."""

    small_object_cutoff: int = 16 * MiB
    """Objects whose output is at most this many bytes go in one PUT (capped by the provider's
    maximum single PUT size and by half the memory budget: a single PUT is always buffered); larger
    ones use multipart. Default 16 MiB."""

    max_source_restarts: int = 3
    """How many times an object is restarted from its new version when the source changes during
    the copy (If-Match fails) before it fails with that reason. Default 3. Not a retry: each
    restart re-reads from byte 0 with a fresh output header."""

    part_attempts: int = 5
    """Attempts for one range read or one part upload (the engine's retry layer, above the SDK's)
    before the object fails. Default 5. Only errors a connector marks retryable are retried."""

    retry_wait_initial: float = 0.5
    """Seconds: scale of the exponential backoff between attempts, with full jitter (wait is
    random in 0 .. min(retry_wait_max, retry_wait_initial x 2^attempt)). Default 0.5. Tests use 0."""

    retry_wait_max: float = 30.0
    """Seconds: the longest wait between two attempts. Default 30."""

    stream_slice_size: int = 8 * MiB
    """Output bytes read, transformed and sent per step of a streamed part (rounded down to whole
    segments; at most half the memory budget). Default 8 MiB. Larger slices mean fewer, larger
    source reads; each slice is one range request."""

    bandwidth: BandwidthTimetable | None = None
    """Bytes per second of the run's uploads, across its threads and processes: one rate or a
    timetable (`transfer.bandwidth`, read in `transfer.bandwidth_timezone`; engine/pacing.py).
    Default None: no limit."""

    def __post_init__(self) -> None:
        checks = [
            (self.concurrency >= 1, f"concurrency must be at least 1, not {self.concurrency}"),
            (self.object_concurrency is None or self.object_concurrency >= 1,
             f"object_concurrency must be at least 1, not {self.object_concurrency}"),
            (self.memory_budget >= 2 * SEGMENT_SIZE,
             f"memory_budget must be at least {2 * SEGMENT_SIZE:,} bytes (2 MiB), not {self.memory_budget:,}"),
            (self.part_size is None or self.part_size >= 1, f"part_size must be positive, not {self.part_size}"),
            (self.small_object_cutoff >= 0, f"small_object_cutoff cannot be negative ({self.small_object_cutoff})"),
            (self.max_source_restarts >= 0, f"max_source_restarts cannot be negative ({self.max_source_restarts})"),
            (self.part_attempts >= 1, f"part_attempts must be at least 1, not {self.part_attempts}"),
            (self.retry_wait_initial >= 0 and self.retry_wait_max >= 0, "retry waits cannot be negative"),
            (self.stream_slice_size >= SEGMENT_SIZE,
             f"stream_slice_size must be at least one segment ({SEGMENT_SIZE:,} bytes)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def objects_in_flight(self) -> int:
        return self.object_concurrency or self.concurrency

    @property
    def requests_in_flight(self) -> int:
        """The most requests (connections) to the destination in flight at once."""
        return self.concurrency + self.objects_in_flight


def within_connections(settings: TransferSettings, limit: int) -> TransferSettings:
    """`settings` with transfer workers and object drivers cut so that at most `limit` (at least
    2) requests are in flight at once; unchanged when they already fit."""
    if settings.requests_in_flight <= limit:
        return settings
    workers = max(1, limit // 2)
    return replace(settings, concurrency=workers, object_concurrency=max(1, limit - workers))
