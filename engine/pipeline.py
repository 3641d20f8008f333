"""Copy one object: plan, read ranges pinned to the source ETag, hash in order, transform, upload.

The shape (ARCHITECTURE.md §4, STYLE.md #6-#8):

- The object's driver (a thread of the `objects` pool) plans the parts and, **in part order**,
  acquires each part's bytes from the shared `MemoryBudget` before submitting its transfer
  (backpressure by blocking the producer). A transfer worker reads the range (If-Match on the
  source ETag), hands the plaintext to the in-order hasher, transforms it into output bytes, MD5s
  the output and uploads it with that Content-MD5. The bytes go back to the budget once the part
  is both uploaded and hashed.
- Hashing needs the plaintext in order; parts finish in any order. Finished parts wait in a small
  reorder buffer (`engine.ordered_digest`), and whoever fills the gap hashes the run. Because parts
  are acquired in order, a part in the buffer never waits for memory held by a later one: no deadlock.
- A part larger than the budget allows (above half of it) is *streamed*: the connector gets a
  file-like body that reads, hashes and transforms one slice at a time, and the part's MD5 is
  computed while streaming (the connector checks the returned ETag against the bytes that left;
  connectors/base.py says why the check is there and only there). Streamed parts of one object go
  one at a time (the object hash is in order and nothing is read twice); other objects keep going.
- Small objects are one PUT, buffered whole, read and sent by the object's driver itself (no
  hand-off to a transfer worker): the transfer pool bounds the parts of multipart objects, the
  driver pool bounds single PUTs (`TransferSettings` states the total).
- Nothing is published unless the plaintext byte count equals the source size and, where the source
  has a Content-MD5, the MD5 of the bytes read equals it. The multipart upload's abort is set up
  right after it is opened and runs on every failure path; a completed object whose ETag the
  connector finds wrong (not the one its parts make) is deleted and the object fails.
- Retries: a range read or a part upload is retried with tenacity (exponential backoff, full
  jitter) only for errors the connector marks retryable. `SourceChanged` is never retried: the
  object restarts from its new version (a new head, a new plan, a new output header), at most
  `max_source_restarts` times.

The output is the `OutputFormat`'s (`engine.output_format`): per object attempt it gives a
`SegmentEncoder` that turns a run of whole segments of plaintext into output bytes (encrypted, or
as is for a public dataset). What happened comes back as an `ObjectOutcome` (`engine.outcome`);
progress is announced to `CopyEvents` (`engine.copy_events`); an upload an earlier run left is
continued from its `ResumePoint` (`engine.resume_point`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import logging
import threading
from concurrent.futures import Future, wait
from typing import Callable, Mapping, Sequence

import tenacity

from connectors.base import (
    BodyDigestMismatch,
    ConnectorError,
    IntegrityError,
    MultipartUpload,
    NotFound,
    ObjectMeta,
    ObjectSink,
    ObjectSource,
    PartReceipt,
    SourceChanged,
    TransientError,
    Unsupported,
    WriteMeta,
    multipart_etag,
)
from engine.budget import Lease, MemoryBudget
from engine.copy_events import CopyEvents
from engine.crypto.segments import sum_output
from engine.executors import Executors, noted
from engine.placement import Placement
from engine.ordered_digest import OrderedDigest, md5_digest
from engine.outcome import ObjectOutcome
from engine.output_format import IDENTITY, OutputFormat
from engine.planning import ObjectPlan, PartPlan, PlanRefused, plan_object
from engine.resume_point import ResumePoint
from engine.settings import TransferSettings
from engine.state import StateUnwritable

log = logging.getLogger(__name__)

class ObjectFailed(Exception):
    """The object cannot be copied in this run; the message is the reason a user reads.
    `transient`: the cause may pass (a retryable connector error that outlasted the attempts), so
    trying the object again later can succeed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class _Refused(ObjectFailed):
    """The object cannot be written to this destination at all (decided before any byte moves)."""


class _Cancelled(Exception):
    """A part skipped because another part of the object already failed."""


class _WrongObjectPublished(Exception):
    """Completing the upload published an object whose ETag is not the one its parts make (never
    retried: the object is deleted from the destination and fails)."""


# --------------------------------------------------------------------------------------------
# One object
# --------------------------------------------------------------------------------------------


def buffer_limit(budget_capacity: int) -> int:
    """The largest charge a buffered part or single PUT may have: half the budget, so that at
    least two parts can be in flight; anything larger is streamed."""
    return budget_capacity // 2


def single_put_cutoff(settings: TransferSettings, budget_capacity: int, copies: bool) -> int:
    """Output bytes at or under which an object goes in one (always buffered) PUT."""
    factor = 2 if copies else 1
    return min(settings.small_object_cutoff, buffer_limit(budget_capacity) // factor)


def copy_object(
    source: ObjectSource,
    sink: ObjectSink,
    meta: ObjectMeta,
    placement: Placement,
    *,
    settings: TransferSettings,
    budget: MemoryBudget,
    executors: Executors,
    output_format: OutputFormat = IDENTITY,
    events: CopyEvents | None = None,
    replace_placement: Callable[[ObjectMeta], Placement] | None = None,
    resume: ResumePoint | None = None,
) -> ObjectOutcome:
    """Copy one object from `source` to `sink` at `placement.dest_key`; never raises for a failure of
    this object (the outcome says "failed" with the reason). Call from an `executors.objects` thread
    (or directly with serial executors): it waits on transfer futures.

    On a source change the object restarts from its new version; `replace_placement` (if given)
    re-places the new version (its metadata may have changed), otherwise the placement is kept.
    A `DoesNotFit` raised by it fails the object with its message.

    `resume`: an upload an earlier run left unfinished; the first attempt continues it when the
    source version and the destination key are the same (see `ResumePoint`), else aborts it.
    """
    events = events or CopyEvents()
    counter = _Counter()
    restarts = 0
    current = meta
    while True:
        attempt = _Attempt(source, sink, current, placement, settings, budget, executors,
                           output_format, events, counter, restarts, resume)
        resume = None  # only the first attempt may continue it (a restart aborted it)
        try:
            return attempt.run()
        except SourceChanged as exc:
            attempt.undo_progress()
            if restarts >= settings.max_source_restarts:
                return attempt.failed(
                    f"the source object changed during the copy {restarts + 1} times (last: {exc}); "
                    f"gave up after {settings.max_source_restarts} restarts, it will be copied by a later run",
                    transient=True)
            restarts += 1
            try:
                new = _retrying(settings, counter, f"head of {meta.key!r}")(source.head, meta.key)
            except NotFound:
                return attempt.failed("the source object was deleted since it was listed (or during the copy)")
            except (ObjectFailed, ConnectorError) as head_exc:
                return attempt.failed(f"the source changed and reading its new version failed: {head_exc}")
            events.source_changed(current, new)
            log.info("%s changed (ETag %s -> %s); restarting from the new version", meta.key, current.etag, new.etag)
            current = new
            if replace_placement is not None:
                try:
                    placement = replace_placement(new)
                except ValueError as place_exc:  # DoesNotFit
                    return attempt.failed(f"the new version of the source cannot be written: {place_exc}", restarts)
        except _Refused as exc:
            return attempt.failed(str(exc), refused=True)
        except ObjectFailed as exc:
            return attempt.failed(str(exc), transient=exc.transient)
        except ConnectorError as exc:
            return attempt.failed(f"{type(exc).__name__}: {exc}", transient=exc.retryable)
        except StateUnwritable:  # not this object's failure: the run stops (copy_objects)
            raise
        except Exception as exc:  # a bug must fail this object, not the run
            log.exception("internal error while copying %s", meta.key)
            return attempt.failed(f"internal error: {type(exc).__name__}: {exc}")


class _CompletedUpload:
    """An upload an earlier run completed (the object is there with the ETag its parts make):
    nothing can be sent to it any more; completing it again answers that ETag."""

    def __init__(self, key: str, upload_id: str, etag: str):
        self.key, self.upload_id, self.etag = key, upload_id, etag

    def upload_part(self, number: int, body, size: int, md5: bytes | None, offset: int | None = None) -> PartReceipt:
        raise NotFound(f"part {number} of {self.key!r} differs from the object an earlier run completed; "
                       "the next run copies the object again", key=self.key)

    def list_parts(self) -> list[PartReceipt]:
        return []

    def complete(self, parts: Sequence[PartReceipt]) -> str:
        return self.etag

    def abort(self) -> None:
        pass


def _abort_quietly(upload: MultipartUpload) -> None:
    try:
        upload.abort()
    except Unsupported:
        # The provider cannot abort (`multipart.abort: false`): the upload's row keeps its id, so
        # `exitplan cleanup` names it; the bucket's lifecycle rule removes it.
        log.info("the multipart upload %s of %r is left open: the provider cannot abort it", upload.upload_id,
                 upload.key)
    except Exception:
        log.warning("could not abort the multipart upload %s of %r", upload.upload_id, upload.key, exc_info=True)


class _Counter:
    """The engine's requests for one object: `value` every one sent (retries included), `retried`
    those sent again after a retryable failure, `resent` those of them that carried a body (a part
    or a single PUT, whose bytes crossed the network again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = self.retried = self.resent = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n

    def again(self, body: bool) -> None:
        with self._lock:
            self.retried += 1
            self.resent += body


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ConnectorError) and exc.retryable and not isinstance(exc, SourceChanged)


def _retrying(settings: TransferSettings, counter: _Counter, what: str, *, body: bool = False) -> Callable:
    """A callable ``run(fn, *args)`` retrying `fn` per settings; the final retryable failure becomes
    `ObjectFailed` naming `what`, a non-retryable error propagates unchanged. Each retry is counted
    (`body`: the request carries a part or an object, so a retry sends its bytes again)."""

    def again(state) -> None:
        counter.again(body)
        log.info("%s: attempt %d failed (%s); retrying", what, state.attempt_number,
                 state.outcome.exception() if state.outcome else "?")

    def retrying() -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(settings.part_attempts),
            wait=tenacity.wait_random_exponential(multiplier=settings.retry_wait_initial, max=settings.retry_wait_max),
            retry=tenacity.retry_if_exception(_is_retryable),
            # The first attempt was counted when it was made (`run`).
            before=lambda state: state.attempt_number > 1 and counter.add(),
            before_sleep=again,
            reraise=True,
        )

    def run(fn: Callable, *args, **kwargs):
        # The first attempt outside tenacity: building a `Retrying` costs more than a small object's
        # request, and most attempts succeed. A retryable failure is handed to tenacity as its
        # first attempt's outcome (not sent again), so the waits, counts and logs are tenacity's.
        counter.add()
        try:
            return fn(*args, **kwargs)
        except ConnectorError as exc:
            if not _is_retryable(exc):
                raise
            failed = [exc]
        try:
            def attempt(*a, **k):
                if failed:
                    raise failed.pop()
                return fn(*a, **k)

            return retrying()(attempt, *args, **kwargs)
        except ConnectorError as exc:
            if _is_retryable(exc):
                raise ObjectFailed(f"{what} failed after {settings.part_attempts} attempts: {exc}", transient=True) from exc
            raise

    return run


class _Attempt:
    """One attempt at one version of one object."""

    def __init__(self, source: ObjectSource, sink: ObjectSink, meta: ObjectMeta, placement: Placement,
                 settings: TransferSettings, budget: MemoryBudget, executors: Executors,
                 output_format: OutputFormat, events: CopyEvents, counter: _Counter, restarts: int,
                 resume: ResumePoint | None = None):
        self.source = source
        self.sink = sink
        self.meta = meta
        self.placement = placement
        self.settings = settings
        self.budget = budget
        self.executors = executors
        self.format = output_format
        self.events = events
        self.counter = counter
        self.restarts = restarts
        self.plan: ObjectPlan | None = None
        self.digest = OrderedDigest(want_md5=meta.content_md5 is not None)
        # ETags that are MD5s let a resumed upload recognise its own parts and object (`_keep`,
        # `_completed_before`); checking a write's answer is the connector's (connectors/base.py).
        self.etags_are_md5 = sink.etag_is_md5
        # A sink that hashes what it writes (connectors/base.py) is not sent an MD5 to check.
        self.sink_hashes = getattr(sink, "hashes_writes", False)
        # A part's output is hashed for the sink to check (Content-MD5) and for ETags that are MD5s;
        # a sink that wants neither (`part_md5`, connectors/base.py) is sent none.
        self.part_md5 = self.etags_are_md5 or getattr(sink, "part_md5", True)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_reported = 0
        self.resume = resume
        self.parts_kept = 0
        self.resumed = False
        self.upload_restarted = False

    # ---- outcome helpers -------------------------------------------------------------------

    def failed(self, reason: str, restarts: int | None = None, refused: bool = False,
               transient: bool = False) -> ObjectOutcome:
        return ObjectOutcome(
            source_key=self.meta.key, dest_key=self.placement.dest_key, source_etag=self.meta.etag,
            size=self.meta.size, status="failed", reason=reason,
            parts=self.plan.part_count if self.plan else 0, bytes_sent=self.bytes_sent,
            restarts=self.restarts if restarts is None else restarts, attempts=self.counter.value,
            retried=self.counter.retried, resent=self.counter.resent,
            output_size=self.plan.output_size if self.plan else 0, refused=refused, transient=transient,
        )

    def _sent(self, part: PartPlan) -> None:
        with self._lock:
            self.bytes_sent += part.output_size
            self.bytes_reported += part.plaintext_size
        self.events.bytes_moved(part.plaintext_size)

    def undo_progress(self) -> None:
        with self._lock:
            n, self.bytes_reported = self.bytes_reported, 0
        if n:
            self.events.bytes_moved(-n)

    def retry(self, what: str, *, body: bool = False) -> Callable:
        return _retrying(self.settings, self.counter, f"{what} of {self.meta.key!r}", body=body)

    # ---- the attempt -------------------------------------------------------------------------

    def run(self) -> ObjectOutcome:
        factor = 2 if self.format.copies else 1
        try:
            self.plan = plan_object(
                self.meta.size, self.sink.limits, layout=self.format.layout, part_size=self.settings.part_size,
                single_put_cutoff=single_put_cutoff(self.settings, self.budget.capacity, self.format.copies),
            )
        except PlanRefused as exc:
            self._drop_resume("the object cannot be written any more")
            raise _Refused(str(exc)) from exc
        plan = self.plan
        reattached = self._reattach(plan)
        encoder = None
        if reattached is not None:
            try:
                encoder = self.format.begin(self.meta, header=self.resume.header, key_id=self.resume.key_id)
            except Exception as exc:  # the data key is gone from the keyset, a malformed header
                log.warning("%s: cannot continue upload %s with its recorded header (%s); starting over",
                            self.meta.key, self.resume.upload_id, exc)
                _abort_quietly(reattached[0])
                reattached = None
                self.resumed = False
        if encoder is None:
            encoder = self.format.begin(self.meta)
        self.encoder = encoder
        write_meta = self.placement.write_meta
        if encoder.metadata:
            write_meta = dataclasses.replace(write_meta, metadata={**write_meta.metadata, **encoder.metadata})
        self.events.attempt_started(self.meta, plan, self.restarts)

        if plan.single_put:
            dest_etag = self._single_put(plan.parts[0], write_meta)
        else:
            streamed = plan.part_output_size * factor > buffer_limit(self.budget.capacity)
            dest_etag = self._multipart(plan, write_meta, streamed, reattached)

        return ObjectOutcome(
            source_key=self.meta.key, dest_key=self.placement.dest_key, source_etag=self.meta.etag,
            size=self.meta.size, status="ok", sha256=self.digest.sha256.hexdigest(),
            md5_checked=self.meta.content_md5 is not None, etag_checked=self.etags_are_md5, dest_etag=dest_etag,
            parts=plan.part_count,
            bytes_sent=self.bytes_sent, restarts=self.restarts, attempts=self.counter.value,
            retried=self.counter.retried, resent=self.counter.resent,
            output_size=plan.output_size, resumed=self.resumed, parts_kept=self.parts_kept,
            upload_restarted=self.upload_restarted,
        )

    # ---- resume --------------------------------------------------------------------------------

    def _drop_resume(self, why: str) -> None:
        """The recorded upload will not be continued: abort it (its parts cost storage)."""
        resume, self.resume = self.resume, None
        if resume is None:
            return
        log.info("%s: giving up the upload %s left by an earlier run: %s", self.meta.key, resume.upload_id, why)
        try:
            _abort_quietly(self.sink.resume_multipart(resume.dest_key, resume.upload_id))
        except NotFound:
            pass
        except ConnectorError as exc:
            log.warning("%s: could not abort upload %s (%s); `exitplan cleanup` lists it", self.meta.key,
                        resume.upload_id, exc)

    def _reattach(self, plan: ObjectPlan) -> tuple[MultipartUpload, dict[int, PartReceipt]] | None:
        """Re-attach to the upload an earlier run left, when it can be continued: (the upload,
        the parts the destination lists, by number). None: start over (the upload, if any, is aborted)."""
        resume = self.resume
        if resume is None:
            return None
        if resume.source_etag != self.meta.etag or resume.size != self.meta.size:
            self._drop_resume(f"the source changed since (ETag {resume.source_etag} -> {self.meta.etag})")
            return None
        if resume.dest_key != self.placement.dest_key or plan.single_put:
            self._drop_resume("the object is now written differently")
            return None
        if not self.sink.behaviour.list_parts:
            # Nothing can say which parts the destination holds: the object starts over.
            log.info("%s: restarting the object: the provider does not list the parts of an upload "
                     "(multipart.list_parts: false), so the upload %s cannot be continued", self.meta.key,
                     resume.upload_id)
            self._drop_resume("its parts cannot be listed")
            self.upload_restarted = True
            return None
        try:
            upload = self.retry("re-attaching to the multipart upload")(
                self.sink.resume_multipart, resume.dest_key, resume.upload_id)
            listed = self.retry("listing the parts of the multipart upload")(upload.list_parts)
        except Unsupported as exc:
            raise ObjectFailed(
                f"the upload {resume.upload_id} left by an earlier run cannot be continued: {exc}; if this provider "
                "does not answer ListParts, set `provider_overrides: {multipart: {list_parts: false}}` on the "
                "destination (objects are then restarted, not continued)") from exc
        except NotFound:
            done = self._completed_before(plan, resume)
            if done is not None:
                self.resumed = True
                return done
            log.info("%s: the upload %s left by an earlier run is gone; starting over", self.meta.key, resume.upload_id)
            self.resume = None
            return None
        self.resumed = True
        return upload, {r.number: r for r in listed}

    def _completed_before(self, plan: ObjectPlan, resume: ResumePoint
                          ) -> tuple[MultipartUpload, dict[int, PartReceipt]] | None:
        """The upload is gone, but the earlier run may have completed it and died before recording
        that: if the destination object's ETag is the one its recorded parts make, every part is
        "listed" as recorded (each is still checked against what we would send, and the source
        re-read for the object hash) and completing is a no-op. None: start over."""
        if not self.etags_are_md5:
            return None
        recorded = {r.number: r for r in resume.parts}
        mine = [recorded.get(p.number) for p in plan.parts]
        if any(r is None or r.md5 is None or r.size != p.output_size for r, p in zip(mine, plan.parts)):
            return None
        expected = multipart_etag([r.md5 for r in mine])
        try:
            head = self.retry("head of the destination")(self.sink.head, self.placement.dest_key)
        except NotFound:
            return None
        etag = head.etag.strip('"').lower()
        if etag != expected or head.size != plan.output_size:
            return None
        log.info("%s: the upload %s was completed by an earlier run; checking it", self.meta.key, resume.upload_id)
        listed = {p.number: PartReceipt(p.number, r.etag, r.size) for r, p in zip(mine, plan.parts)}
        return _CompletedUpload(self.placement.dest_key, resume.upload_id, etag), listed

    def _keep(self, part: PartPlan, listed: PartReceipt | None, md5: bytes | None) -> bool:
        """Whether the part the destination lists is exactly what we would send now (`md5`, known
        whenever ETags are MD5s)."""
        if listed is None or listed.size != part.output_size:
            return False
        etag = listed.etag.strip('"').lower()
        if self.etags_are_md5:
            return md5 is not None and etag == md5.hex()
        # ETags that are not MD5s cannot be checked against the bytes: trust only a recorded receipt.
        recorded = {r.number: r for r in self.resume.parts} if self.resume else {}
        mine = recorded.get(part.number)
        return mine is not None and mine.etag.strip('"').lower() == etag and mine.size == listed.size

    def _kept(self, part: PartPlan, listed: PartReceipt, md5: bytes | None) -> None:
        with self._lock:
            self.parts_kept += 1
            self.bytes_reported += part.plaintext_size
        self.events.bytes_moved(part.plaintext_size)
        self.events.part_kept(part, listed, md5)

    def _offset(self, part: PartPlan) -> int:
        """Where `part`'s output starts in the object: every part before it is `part_output_size`."""
        return (part.number - 1) * self.plan.part_output_size

    def _charge(self, part: PartPlan) -> int:
        return part.plaintext_size + (part.output_size if self.format.copies else 0)

    def _read(self, start: int, end: int) -> bytes:
        """Range read, pinned to the ETag, exact length, retried."""
        key, etag = self.meta.key, self.meta.etag

        def read() -> bytes:
            data = self.source.read_range(key, start, end, if_match=etag)
            if len(data) != end - start:
                raise TransientError(f"short read of {key!r}: {len(data)} bytes for range {start}-{end}", key=key)
            return data

        # An empty object is read too (an empty range: the connector checks the object is still
        # there at that ETag): listed from an inventory report days ago, it may have been deleted,
        # or rewritten with content, since.
        try:
            return self.retry(f"read of bytes {start}-{end}")(read)
        except NotFound as exc:
            raise ObjectFailed(f"the source object was deleted since it was listed (or during the copy) ({exc})") from exc

    def _check_source(self, *, md5_by_sink: bool = False) -> None:
        """Before anything is published: every byte was read, and the source's MD5 matches (or,
        `md5_by_sink`, the sink checks it as it writes: `_put_task`)."""
        if self.digest.count != self.meta.size:
            raise ObjectFailed(
                f"read {self.digest.count:,} bytes but the source says the object has {self.meta.size:,}; nothing was written"
            )
        if self.meta.content_md5 is not None and not md5_by_sink:
            got = self.digest.md5.digest()
            if got != self.meta.content_md5:
                raise self._wrong_source_md5(got)

    def _wrong_source_md5(self, got: bytes) -> ObjectFailed:
        """The failure of an object whose bytes read have MD5 `got`, not the source's stored one."""
        return ObjectFailed(
            f"the bytes read do not match the source's stored Content-MD5 "
            f"(stored {base64.b64encode(self.meta.content_md5).decode()}, read {base64.b64encode(got).decode()}): "
            "the source object is corrupt or its stored MD5 is wrong; nothing was written"
        )

    def _check_output(self, out: bytes | memoryview, part: PartPlan) -> None:
        if len(out) != part.output_size:
            raise ObjectFailed(f"part {part.number}: the output format produced {len(out):,} bytes, "
                               f"{part.output_size:,} planned")

    def _check_receipt(self, receipt: PartReceipt, part: PartPlan) -> None:
        # The receipt's ETag was checked by the connector that sent the part (connectors/base.py).
        if receipt.size != part.output_size:
            raise IntegrityError(f"part {part.number} of {self.placement.dest_key!r}: the destination "
                                 f"holds {receipt.size:,} bytes, {part.output_size:,} were sent")

    # ---- single PUT ----------------------------------------------------------------------------

    def _single_put(self, part: PartPlan, write_meta: WriteMeta) -> str:
        charge = self._charge(part)
        self.budget.acquire(charge)
        try:
            # On the driver's own thread: handing one read and one PUT to a transfer worker and
            # waiting costs two thread switches per small object and adds nothing, since the driver
            # would only wait. The driver pool bounds these requests (see TransferSettings).
            return self._put_task(part, write_meta)
        finally:
            self.budget.release(charge)

    def _put_task(self, part: PartPlan, write_meta: WriteMeta) -> str:
        data = self._read(0, self.meta.size)
        # A sink that hashes what it writes checks a plain copy against the source's stored MD5
        # as it writes, before publishing (connectors/base.py, `hashes_writes`): the bytes are
        # hashed once, not once here and again there.
        md5_by_sink = self.sink_hashes and not self.format.copies and self.meta.content_md5 is not None
        if md5_by_sink:
            self.digest.md5 = None
        self.digest.update(data)
        self._check_source(md5_by_sink=md5_by_sink)
        out = self.encoder.encode(0, data)
        self._check_output(out, part)
        if md5_by_sink:
            md5 = self.meta.content_md5
        elif not self.format.copies and self.digest.md5 is not None:
            md5 = self.digest.md5.digest()  # output is the plaintext: its MD5 is already known
        elif self.sink_hashes:
            md5 = None
        else:
            md5 = md5_digest(out)
        dest = self.placement.dest_key

        def put() -> str:
            try:
                return self.sink.put(dest, out, part.output_size, write_meta, md5).strip('"')
            except BodyDigestMismatch as exc:
                if md5_by_sink:  # the bytes read are not the source's: no retry can change that
                    raise self._wrong_source_md5(exc.computed) from exc
                raise

        etag = self.retry("upload", body=True)(put)
        self._sent(part)
        return etag

    # ---- multipart -------------------------------------------------------------------------------

    def _multipart(self, plan: ObjectPlan, write_meta: WriteMeta, streamed: bool,
                   reattached: tuple[MultipartUpload, dict[int, PartReceipt]] | None = None) -> str:
        dest = self.placement.dest_key
        if reattached is not None:
            upload, listed = reattached
        else:
            upload = self.retry("opening the multipart upload")(self.sink.open_multipart, dest, write_meta)
            listed = {}
        # Abort on every failure of this object from here on: an open upload keeps its parts (and
        # costs storage) until a lifecycle rule removes it, and must never be completed
        # half-written. Not on an interrupt (KeyboardInterrupt, SystemExit): the run stops, the
        # object did not fail, and the next run continues this upload from its recorded parts.
        try:
            self.events.upload_opened(upload, self.encoder.header, self.encoder.key_id)
            if streamed:
                results = self._streamed_parts(plan, upload, listed)
            else:
                results = self._buffered_parts(plan, upload, listed)
            receipts = [r for r, _ in results]
            md5s = [m for _, m in results]
            if [r.number for r in receipts] != list(range(1, plan.part_count + 1)):
                raise ObjectFailed(f"{len(receipts)} of {plan.part_count} part receipts came back; not completing")
            sent = sum(r.size for r in receipts)
            if sent != plan.output_size:
                raise ObjectFailed(f"{sent:,} bytes were sent, {plan.output_size:,} planned; not completing")
            self._check_source()
            etag = self._complete(upload, receipts, multipart_etag(md5s) if self.etags_are_md5 else None)
        except _WrongObjectPublished as exc:
            # Published but not what we sent: remove it rather than leave a wrong object behind.
            try:
                self.sink.delete(dest)
            except Exception:
                log.warning("could not delete %r after an ETag mismatch", dest, exc_info=True)
            hint = ("; if this provider's multipart ETags are not S3's MD5 of the parts' MD5s (as with server-side "
                    "encryption at several providers), set `provider_overrides: {multipart: {etag: opaque}}` on the "
                    "destination" if self.etags_are_md5 else "")
            raise ObjectFailed(f"{exc}; the object was deleted from the destination{hint}") from exc
        except Exception:
            _abort_quietly(upload)  # the original failure matters more; the upload stays listable
            raise
        return etag

    def _complete(self, upload: MultipartUpload, receipts: Sequence[PartReceipt], expected: str | None) -> str:
        """Complete the upload (retried); `expected` is the multipart ETag of the parts sent (None
        where ETags are not MD5s), used to recognise our object when an earlier try completed it
        and only the answer was lost."""
        tried = False

        def complete() -> str:
            nonlocal tried
            try:
                return upload.complete(receipts).strip('"')
            except IntegrityError as exc:  # the connector found the completed object's ETag wrong
                raise _WrongObjectPublished(str(exc)) from exc
            except NotFound:
                # An earlier attempt may have completed it and only the answer was lost.
                if tried:
                    head = self.sink.head(self.placement.dest_key)
                    if head.etag.strip('"').lower() == expected:
                        return head.etag.strip('"')
                raise
            finally:
                tried = True

        return self.retry("completing the multipart upload")(complete)

    def _buffered_parts(self, plan: ObjectPlan, upload: MultipartUpload,
                        listed: Mapping[int, PartReceipt]) -> list[tuple[PartReceipt, bytes | None]]:
        failure = threading.Event()
        futures: list[Future] = []
        try:
            for part in plan.parts:
                if failure.is_set():
                    break
                charge = self._charge(part)
                # In part order, blocking: the backpressure that bounds memory, and the order that
                # keeps the in-order hasher from waiting on memory held by later parts.
                if not self.budget.acquire(charge, cancel=failure):
                    break
                lease = Lease(self.budget, charge, ("hash", "upload"))
                try:
                    futures.append(self.executors.transfers.submit(self._part_task, part, upload, lease, failure,
                                                                   listed.get(part.number)))
                except BaseException:
                    lease.release_all()
                    raise
        except BaseException as exc:
            failure.set()
            self.digest.abandon()
            # The parts already submitted end before the upload is aborted: a part sent after the
            # abort could survive it. What they raise goes with this error (`_Cancelled` aside).
            wait(futures)
            others = [f.exception() for f in futures if not f.cancelled()]
            noted(exc, [e for e in others if e is not None and not isinstance(e, _Cancelled)], "another part")
            raise
        results: list[tuple[PartReceipt, bytes | None]] = []
        errors: list[BaseException] = []
        for future in futures:  # wait for every submitted part, so no worker outlives the attempt
            try:
                results.append(future.result())
            except _Cancelled:
                pass
            except BaseException as exc:
                errors.append(exc)
        if errors:
            changed = [e for e in errors if isinstance(e, SourceChanged)]
            raise changed[0] if changed else errors[0]
        return results

    def _part_task(self, part: PartPlan, upload: MultipartUpload, lease: Lease,
                   failure: threading.Event, listed: PartReceipt | None = None) -> tuple[PartReceipt, bytes | None]:
        """Read, hash, transform and upload one part. On resume, a part the destination already
        lists is read, hashed and transformed all the same (the object hash needs every byte, and
        where ETags are MD5s the output's MD5 proves the listed part is what we would send;
        elsewhere the listed receipt must be the one recorded) but not uploaded again."""
        fed = False
        try:
            if failure.is_set():
                raise _Cancelled()
            data = self._read(part.plaintext_start, part.plaintext_end)
            self.digest.feed(part.number - 1, data, lambda: lease.done("hash"))
            fed = True
            out = self.encoder.encode(part.first_segment, data)
            self._check_output(out, part)
            md5 = hashlib.md5(out).digest() if self.part_md5 else None
            if self._keep(part, listed, md5):
                self._kept(part, listed, md5)
                return listed, md5

            def send() -> PartReceipt:
                receipt = upload.upload_part(part.number, out, part.output_size, md5, offset=self._offset(part))
                self._check_receipt(receipt, part)
                return receipt

            receipt = self.retry(f"upload of part {part.number}", body=True)(send)
            self._sent(part)
            self.events.part_uploaded(part, receipt, md5)
            return receipt, md5
        except BaseException:
            failure.set()
            if not fed:
                lease.done("hash")
            self.digest.abandon()  # parts waiting to be hashed give their memory back now
            raise
        finally:
            lease.done("upload")

    # ---- streamed parts (larger than the budget allows to buffer) --------------------------------

    def _streamed_parts(self, plan: ObjectPlan, upload: MultipartUpload,
                        listed: Mapping[int, PartReceipt]) -> list[tuple[PartReceipt, bytes | None]]:
        slice_segments = self._slice_segments()
        seg = self.format.layout.segment_size
        # The driver acquires one slice's worth for the whole part, so that a transfer worker never
        # waits on the budget (a worker waiting for memory held by parts queued behind it would
        # deadlock the pool); the body reuses that allowance slice after slice.
        allowance = slice_segments * seg * (2 if self.format.copies else 1)
        results = []
        for part in plan.parts:  # one at a time: the object hash is in order, nothing is read twice
            self.budget.acquire(allowance)
            try:
                results.append(self.executors.transfers.submit(self._streamed_part, part, upload,
                                                               slice_segments, listed.get(part.number)).result())
            finally:
                self.budget.release(allowance)
        return results

    def _slice_segments(self) -> int:
        factor = 2 if self.format.copies else 1
        seg = self.format.layout.segment_size
        size = min(self.settings.stream_slice_size, buffer_limit(self.budget.capacity) // factor)
        return max(1, size // seg)

    def _streamed_part(self, part: PartPlan, upload: MultipartUpload, slice_segments: int,
                       listed: PartReceipt | None = None) -> tuple[PartReceipt, bytes | None]:
        snapshot = self.digest.snapshot()
        if listed is not None and listed.size == part.output_size:
            # Resume: stream the part through the hash and the transform without sending it; keep
            # the listed part if its MD5 is ours, else send it again (re-read from the source).
            body = _StreamedPartBody(self, part, slice_segments)
            try:
                while body.read(1 << 20):
                    pass
            finally:
                body.close()
            if body.error is not None:
                raise body.error
            md5 = body.md5.digest() if body.md5 is not None else None
            if body.sent == part.output_size and self._keep(part, listed, md5):
                self._kept(part, listed, md5)
                return listed, md5

        def send() -> tuple[PartReceipt, bytes | None]:
            # A retried part is read again from the source; the hash goes back to where the part began.
            self.digest.restore(snapshot)
            body = _StreamedPartBody(self, part, slice_segments)
            try:
                receipt = upload.upload_part(part.number, body, part.output_size, None, offset=self._offset(part))
            except ConnectorError:
                if body.error is not None:  # our read failed inside the connector: that is the cause
                    raise body.error from None
                raise
            finally:
                body.close()
            if body.error is not None:
                raise body.error
            if body.sent != part.output_size or self.digest.count != part.plaintext_end:
                raise TransientError(f"part {part.number}: the connector consumed {body.sent:,} of "
                                     f"{part.output_size:,} bytes", key=self.meta.key)
            md5 = body.md5.digest() if body.md5 is not None else None
            self._check_receipt(receipt, part)
            return receipt, md5

        receipt, md5 = self.retry(f"upload of part {part.number}", body=True)(send)
        self._sent(part)
        self.events.part_uploaded(part, receipt, md5)
        return receipt, md5


class _StreamedPartBody(io.RawIOBase):
    """A part's body read slice by slice from the source: each slice of whole segments is read
    (pinned, retried), hashed in order, transformed and MD5'd (where the sink wants part MD5s),
    then handed out; it is dropped when
    the connector asks for bytes past it. At most one slice is held, within the allowance the
    object's driver acquired for the part."""

    def __init__(self, attempt: _Attempt, part: PartPlan, slice_segments: int):
        super().__init__()
        self.attempt = attempt
        self.part = part
        self.slice_segments = slice_segments
        self.md5 = hashlib.md5() if attempt.part_md5 else None
        self.sent = 0
        self.error: BaseException | None = None
        self._next_segment = part.first_segment
        self._end_segment = part.first_segment + part.segment_count
        self._out: bytes | memoryview = b""
        self._buf: memoryview = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _advance(self) -> bool:
        a = self.attempt
        self._release()
        if self._next_segment >= self._end_segment:
            return False
        layout = a.format.layout
        size = a.meta.size
        first = self._next_segment
        count = min(self.slice_segments, self._end_segment - first)
        start = layout.segment_plaintext_range(first, size)[0]
        end = layout.segment_plaintext_range(first + count - 1, size)[1]
        out_size = sum_output(layout, first, count, size)
        data = a._read(start, end)
        a.digest.update(data)
        out = a.encoder.encode(first, data)
        if len(out) != out_size:
            raise ObjectFailed(f"part {self.part.number}: the output format produced {len(out):,} bytes for "
                               f"segments {first}-{first + count - 1}, {out_size:,} planned")
        if self.md5 is not None:
            self.md5.update(out)
        self._out = out
        self._buf = memoryview(out)
        self._pos = 0
        self._next_segment = first + count
        return True

    def _release(self) -> None:
        self._out = b""
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        try:
            if self._pos >= len(self._buf) and not self._advance():
                return b""
            whole = self._pos == 0 and (n is None or n < 0 or n >= len(self._buf))
            if whole and isinstance(self._out, bytes):
                chunk: bytes = self._out  # the whole slice: no copy
            else:
                stop = len(self._buf) if n is None or n < 0 else self._pos + n
                chunk = self._buf[self._pos:stop].tobytes()
            self._pos += len(chunk)
            self.sent += len(chunk)
            return chunk
        except BaseException as exc:
            self.error = exc
            raise

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._release()
        super().close()
