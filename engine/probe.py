"""`exitplan probe`: measure what a destination bucket does, compare it with its provider profile, and
say whether a migration can go there safely as configured (issue 13).

The profile (config/providers/*.yaml, with the destination's `provider_overrides`) is what the
migration trusts: which ETag form to check after a multipart upload, whether ListParts, abort and
ListMultipartUploads answer, how many tags and metadata bytes fit, whether checksum headers may be
sent, whether small objects may go as direct requests. A provider that changed, or a catalog entry
that was wrong, shows up here on day one instead of as every multipart object failing in week two.

Only the configured bucket is ever addressed, after the sovereignty gate (the loader ran it), and
only below a throw-away prefix under `CONTROL_PREFIX` (`_exitplan/probe/<random>/`), which is
emptied on every path, an interrupted probe included; whatever could not be removed is named.

Each check has a verdict:
- `ok`: the bucket does what the profile says (or more, where more is harmless);
- `differs`: the profile is wrong in a way that costs nothing now (e.g. ListParts answers while the
  profile says it does not: resumes restart objects needlessly); an override is suggested;
- `warn`: worth knowing, not a reason to stop (e.g. a wrong Content-MD5 accepted, while every
  returned ETag is the MD5 of the bytes, which exitplan compares: corruption on the way is still
  caught);
- `FAIL`: a migration as configured would fail or lose a guarantee (the multipart ETag is opaque
  while the profile says md5: every multipart object would be refused after completion; ListParts
  refused while the profile says it answers; a wrong Content-MD5 accepted with nothing else to catch
  a corrupted body). Exit code 1.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from config.policy import destination_profile
from config.providers import ProviderProfile, load_catalog
from config.sizes import format_size
from connectors.s3_probe import Answer, BucketProbe

from .endpoints import open_sink
from .errors import call_endpoint
from .executors import create_pool
from .placement import CONTROL_PREFIX

PROBE_PREFIX = f"{CONTROL_PREFIX}probe/"
DEFAULT_THROUGHPUT_MIB = 10
LATENCY_SAMPLES = 10
# SigV4 signatures are refused beyond 15 minutes of skew (RequestTimeTooSkewed); well before
# that, a skew makes every timestamp in the audit manifest disagree with the provider's logs.
SKEW_WARN_SECONDS = 60
SKEW_FAIL_SECONDS = 15 * 60
AUTO_PART_SIZE = 16 * 1024**2   # the planner's part size under `transfer.part_size: auto` (engine.planning)

OK, DIFFERS, WARN, FAIL = "ok", "differs", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """One row of the probe's table: what was measured, what the profile says, the verdict and why."""

    check: str
    measured: str
    catalog: str
    verdict: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "measured": self.measured, "catalog": self.catalog, "verdict": self.verdict,
                "note": self.note}


@dataclass(frozen=True)
class ProbeReport:
    """A destination's probe: its checks, the `provider_overrides` that would make the profile match
    what was measured (the destination's whole block, its current overrides included; empty when
    nothing needs to change), and whatever the probe could not remove."""

    destination: str
    provider: str
    bucket: str
    endpoint: str
    prefix: str
    checks: tuple[Check, ...]
    suggested_overrides: dict[str, Any]
    left_behind: tuple[str, ...]
    seconds: float

    @property
    def safe(self) -> bool:
        """The bucket can hold a migration as configured: no check failed."""
        return not any(c.verdict == FAIL for c in self.checks)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.safe else ExitCode.FAILED

    def overrides_yaml(self) -> str:
        """The suggested overrides as the YAML an operator pastes into the configuration ("" when
        nothing needs to change)."""
        if not self.suggested_overrides:
            return ""
        block = {"destinations": {self.destination: {"provider_overrides": self.suggested_overrides}}}
        return yaml.safe_dump(block, default_flow_style=False, sort_keys=False)

    def as_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, "provider": self.provider, "bucket": self.bucket,
                "endpoint": self.endpoint, "prefix": self.prefix, "safe": self.safe,
                "checks": [c.as_dict() for c in self.checks], "suggested_overrides": self.suggested_overrides,
                "left_behind": list(self.left_behind), "seconds": round(self.seconds, 2)}


class ProbeInterrupted(KeyboardInterrupt):
    """The probe was interrupted; what it wrote was removed, except what `left_behind` names."""

    def __init__(self, destination: str, prefix: str, left_behind: list[str]):
        self.left_behind = tuple(left_behind)
        if left_behind:
            sentence = (f"destination `{destination}`: the probe was interrupted; under {prefix} it left: "
                        + "; ".join(left_behind))
        else:
            sentence = f"destination `{destination}`: the probe was interrupted; it removed everything it wrote under {prefix}"
        super().__init__(sentence)


@dataclass
class _Suggestions:
    """The overrides the measurements call for, section by section (`multipart.etag`, …)."""

    values: dict[str, Any] = field(default_factory=dict)

    def add(self, path: str, value: Any) -> None:
        section, _, name = path.partition(".")
        if name:
            self.values.setdefault(section, {})[name] = value
        else:
            self.values[section] = value

    def merged_with(self, current: dict[str, Any]) -> dict[str, Any]:
        if not self.values:
            return {}
        merged = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
        for key, value in self.values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        return merged


def probe_destinations(loaded: LoadedConfig, names: list[str] | None = None, *,
                       throughput_mib: int = DEFAULT_THROUGHPUT_MIB,
                       step: Callable[[str, str], None] | None = None) -> list[ProbeReport]:
    """Probe each S3 destination named (default: every S3 destination of the configuration); a
    `UserError` for a name that is not a destination or is an SFTP one. `step(destination, check)`
    is called before each check (progress lines; tests interrupt there)."""
    dests = loaded.config.destinations
    for name in names or ():
        if name not in dests:
            raise UserError(f"{loaded.path}: there is no destination `{name}` (known: {', '.join(dests)}); check "
                            "--destination")
        if dests[name].kind != "s3":
            raise UserError(f"{loaded.path}: destination `{name}` is an SFTP server; `exitplan probe` measures S3 "
                            "buckets only")
    chosen = list(names) if names else [n for n, d in dests.items() if d.kind == "s3"]
    if not chosen:
        raise UserError(f"{loaded.path}: no S3 destination to probe")
    return [probe_destination(loaded, name, throughput_mib=throughput_mib, step=step) for name in chosen]


def probe_destination(loaded: LoadedConfig, name: str, *, throughput_mib: int = DEFAULT_THROUGHPUT_MIB,
                      step: Callable[[str, str], None] | None = None) -> ProbeReport:
    """Measure destination `name`'s bucket below a fresh `_exitplan/probe/<random>/` prefix, judge
    each measurement against its profile, remove what was written. `throughput_mib`: how much the
    parallel-parts check sends (at least two parts of the provider's minimum part size)."""
    if throughput_mib < 1:
        raise UserError("--throughput-mib must be at least 1")
    dest = loaded.config.destinations[name]
    profile = destination_profile(loaded, name)
    prefix = f"{PROBE_PREFIX}{secrets.token_hex(6)}/"
    store = call_endpoint(f"destination `{name}`", open_sink, loaded, name)
    began = time.monotonic()
    probe = BucketProbe(store, prefix)
    try:
        measured = _measure(probe, loaded, name, profile, throughput_mib, step or (lambda d, c: None))
    except KeyboardInterrupt:
        raise ProbeInterrupted(name, f"s3://{dest.bucket}/{prefix}", probe.clean()) from None
    except BaseException:
        probe.clean()
        raise
    else:
        left = probe.clean()
    finally:
        store.close()
    checks, suggestions = _judge(measured, loaded, name, profile)
    return ProbeReport(name, profile.name, dest.bucket, dest.endpoint_url or "", prefix, tuple(checks),
                       suggestions.merged_with(dict(dest.provider_overrides)), tuple(left), time.monotonic() - began)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _measure(probe, loaded: LoadedConfig, name: str, profile: ProviderProfile, throughput_mib: int,
             step: Callable[[str, str], None]) -> dict[str, Any]:
    """Every measurement, by check, in the order of the table (each request sent once)."""
    m: dict[str, Any] = {}
    lim = profile.limits
    small = b"exitplan probe: a small object\n"
    step(name, "put")
    m["put"], m["put_etag"] = probe.put("small", small)
    m["put_body"] = small
    step(name, "wrong Content-MD5")
    m["wrong_md5"], _ = probe.put("wrong-md5", small, md5=bytes(16))
    step(name, "multipart")
    part = max(lim.min_part_size, 1024**2)
    parts = max(2, math.ceil(throughput_mib * 1024**2 / part))
    workers = min(parts, loaded.config.transfer.concurrency, 8)
    pool = create_pool(workers, "exitplan-probe")
    try:
        m["multipart"] = probe.multipart("multipart", part, parts, pool)
    finally:
        pool.shutdown(wait=True)
    step(name, "open upload")
    opened, upload_id = probe.open_upload("open-upload")
    m["open_upload"] = opened
    if upload_id:
        step(name, "list uploads")
        m["list_uploads"] = probe.list_uploads(upload_id)
        step(name, "abort")
        m["abort"] = probe.abort(upload_id)
    step(name, "tags")
    m["tags"] = probe.tag_limit("tags", lim.max_tags)
    step(name, "metadata")
    m["metadata"] = probe.metadata_limit("metadata", lim.max_metadata_bytes)
    step(name, "checksum headers")
    m["checksums"] = probe.put_with_checksum_headers("checksums", small)
    step(name, "direct requests")
    m["direct"] = probe.direct_requests("direct", small)
    step(name, "addressing")
    m["addressing"] = probe.addressing()
    step(name, "tls")
    m["tls"] = probe.tls()
    step(name, "latency")
    m["timing"] = probe.timing("small", LATENCY_SAMPLES)
    return m


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------


def _said(profile: ProviderProfile, base: ProviderProfile | None, path: str) -> str:
    """What the profile says at `path` (`multipart.etag`), marked when an override set it."""
    def get(p: ProviderProfile) -> Any:
        value: Any = p
        for part in path.split("."):
            value = getattr(value, part)
        return value

    value = get(profile)
    if isinstance(value, bool) and path.startswith("multipart."):
        text = "answered" if value else "not answered"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif value is None:
        text = "not published"
    else:
        text = f"{value:,}" if isinstance(value, int) else f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} (override)" if base is not None and get(base) != value else text


def _supported(answer: Answer, said: bool, what: str, field_path: str, sugg: _Suggestions, consequence: str
               ) -> Check:
    """A yes/no API (ListParts, abort, ListMultipartUploads) against the profile's flag."""
    if answer.accepted and said:
        return Check(what, "answered", "", OK)
    if answer.accepted:
        sugg.add(field_path, True)
        return Check(what, "answered", "", DIFFERS, "the profile says it is not answered; the override lets exitplan use it")
    if not said:
        return Check(what, str(answer), "", OK, "the profile says it is not answered")
    sugg.add(field_path, False)
    return Check(what, str(answer), "", FAIL, consequence)


def _judge(m: dict[str, Any], loaded: LoadedConfig, name: str, profile: ProviderProfile
           ) -> tuple[list[Check], _Suggestions]:
    base = load_catalog().get(profile.name)
    dest = loaded.config.destinations[name]
    sugg = _Suggestions()
    rows: list[Check] = []

    def row(check: Check, path: str | None) -> None:
        rows.append(Check(check.check, check.measured, _said(profile, base, path) if path else check.catalog,
                          check.verdict, check.note))

    put, put_etag = m["put"], m["put_etag"]
    single_md5 = put.accepted and put_etag.lower() == hashlib.md5(m["put_body"]).hexdigest()
    mp = m["multipart"]
    if put.accepted:
        row(Check("PUT with Content-MD5", "accepted", "accepted", OK), None)
    else:
        row(Check("PUT with Content-MD5", str(put), "accepted", FAIL,
                  "exitplan sends Content-MD5 with every body; check the credentials and the bucket policy"), None)
    etags_are_md5 = single_md5 and mp.part_etags_md5
    wrong = m["wrong_md5"]
    if not wrong.accepted and (put.accepted or wrong.code in ("BadDigest", "InvalidDigest")):
        # The same PUT with the right digest was accepted: the digest is what was refused.
        row(Check("wrong Content-MD5", f"refused ({wrong.code or wrong.status})", "refused", OK), None)
    elif etags_are_md5:
        row(Check("wrong Content-MD5", str(wrong), "refused", WARN,
                  "not refused, but every returned ETag is the MD5 of the bytes, which exitplan compares: a body "
                  "corrupted on the way is still caught"), None)
    else:
        row(Check("wrong Content-MD5", str(wrong), "refused", FAIL,
                  "not refused and the ETags are not MD5s: nothing would catch a body corrupted on the way"), None)
    if single_md5:
        row(Check("single-PUT ETag", "MD5 of the body", "MD5 of the body", OK), None)
    else:
        row(Check("single-PUT ETag", f"other ({put_etag or 'none'})", "MD5 of the body", FAIL,
                  "exitplan compares every single PUT's ETag with the MD5 it sent: each would be refused"), None)
    if not mp.completed.accepted:
        row(Check("multipart upload", str(mp.completed), "accepted", FAIL,
                  "objects above the single-PUT cut-off could not be written"), None)
    else:
        if mp.part_etags_md5:
            row(Check("part ETag", "MD5 of the part", "MD5 of the part", OK), None)
        else:
            row(Check("part ETag", "other", "MD5 of the part", FAIL,
                      "exitplan compares each part's ETag with the MD5 it sent: every part would be refused"), None)
        form = mp.etag_form
        shown = f"md5-of-md5s-{mp.parts}" if form == "md5" else f"opaque ({mp.etag})"
        if form == profile.multipart.etag:
            row(Check("multipart ETag", shown, "", OK), "multipart.etag")
        elif form == "opaque":
            sugg.add("multipart.etag", "opaque")
            row(Check("multipart ETag", shown, "", FAIL,
                      "exitplan would refuse every multipart object after completing it (its ETag is not the one "
                      "the parts make); set the override: integrity then rests on Content-MD5, sizes and the deep "
                      "read-back"), "multipart.etag")
        else:
            sugg.add("multipart.etag", "md5")
            row(Check("multipart ETag", shown, "", DIFFERS,
                      "the ETag can be checked after every completion; the override turns that check on"),
                "multipart.etag")
        row(_supported(mp.list_parts, profile.multipart.list_parts, "ListParts", "multipart.list_parts", sugg,
                       "a resumed upload would fail instead of restarting its object"), "multipart.list_parts")
    if "list_uploads" in m:
        (listed, saw), (aborted, gone) = m["list_uploads"], m["abort"]
        if listed.accepted and not saw:
            listed = Answer(False, None, "answered without the open upload")
        row(_supported(listed, profile.multipart.list_uploads, "ListMultipartUploads", "multipart.list_uploads", sugg,
                       "`exitplan cleanup` would fail instead of saying what it cannot see"), "multipart.list_uploads")
        if aborted.accepted and gone is False:
            aborted = Answer(False, None, "answered, but the upload is still there")
        row(_supported(aborted, profile.multipart.abort, "abort multipart upload", "multipart.abort", sugg,
                       "a failed object's parts would stay behind, billed, until a lifecycle rule removes them"),
            "multipart.abort")
    else:
        row(Check("open a multipart upload", str(m["open_upload"]), "accepted", FAIL,
                  "objects above the single-PUT cut-off could not be written"), None)
    row(_limit_check("tags per object", m["tags"], profile.limits.max_tags, "limits.max_tags", sugg, ""),
        "limits.max_tags")
    row(_limit_check("user metadata bytes", m["metadata"], profile.limits.max_metadata_bytes,
                     "limits.max_metadata_bytes", sugg, "objects with that much metadata would be refused one by one"),
        "limits.max_metadata_bytes")
    accepted, intact = m["checksums"]
    flexible = profile.flexible_checksums
    if accepted.accepted and intact and m["tls"][0] != "https" and not flexible:
        row(Check("x-amz-checksum-* headers", "accepted, stored intact (http)", "", OK,
                  "over plain http boto3 sends no aws-chunked body: only an https endpoint shows whether that form "
                  "is stored right"), "flexible_checksums")
    elif accepted.accepted and intact:
        if flexible:
            row(Check("x-amz-checksum-* headers", "accepted, stored intact", "", OK), "flexible_checksums")
        else:
            sugg.add("flexible_checksums", True)
            row(Check("x-amz-checksum-* headers", "accepted, stored intact", "", DIFFERS,
                      "exitplan sends Content-MD5 only; the headers would be safe too"), "flexible_checksums")
    else:
        measured = str(accepted) if not accepted.accepted else "accepted, but the bytes read back differ"
        if flexible:
            sugg.add("flexible_checksums", False)
            row(Check("x-amz-checksum-* headers", measured, "", FAIL,
                      "objects written with the headers would be refused or stored corrupted"), "flexible_checksums")
        else:
            row(Check("x-amz-checksum-* headers", measured, "", OK, "exitplan sends Content-MD5 only"),
                "flexible_checksums")
    style = dest.addressing_style or profile.addressing_style
    if "direct" in m:
        row(_direct_check(m["direct"], profile.direct_requests, sugg), "direct_requests")
    for kind, answer in m["addressing"].items():
        if answer is None:
            rows.append(Check(f"{kind}-style addressing", "not testable on an IP or loopback host", "",
                              OK if kind != style else FAIL, ""))
            continue
        used = kind == style
        if answer.accepted:
            rows.append(Check(f"{kind}-style addressing", "works", "used" if used else "", OK))
        else:
            rows.append(Check(f"{kind}-style addressing", str(answer), "used" if used else "",
                              FAIL if used else OK,
                              f"set `destinations.{name}.addressing_style` to the other style" if used else ""))
    scheme, verified = m["tls"]
    if scheme != "https":
        rows.append(Check("TLS", "plain http", "https", OK if loaded.lab_mode else FAIL,
                          "allowed in the lab only" if loaded.lab_mode else "the gate refuses plain http"))
    elif verified is not None and verified.accepted:
        rows.append(Check("TLS", "https, certificate verified", "https", OK))
    else:
        rows.append(Check("TLS", f"https, certificate NOT verified ({verified})", "https, verified",
                          OK if loaded.lab_mode else FAIL,
                          "the lab's self-signed certificate" if loaded.lab_mode else
                          "check the endpoint's certificate chain"))
    timing = m["timing"]
    skew = timing.clock_skew_seconds
    if skew is None:
        rows.append(Check("clock skew", "no Date header", "-", WARN, "the server's clock cannot be compared"))
    else:
        verdict = OK if abs(skew) <= SKEW_WARN_SECONDS else WARN if abs(skew) < SKEW_FAIL_SECONDS else FAIL
        rows.append(Check("clock skew", f"{skew:+.0f} s (server - local)", f"within {SKEW_WARN_SECONDS} s", verdict,
                          "" if verdict == OK else "set this machine's clock (NTP): signed requests are refused "
                                                   "beyond 15 minutes"))
    rows.append(Check("request latency", f"{timing.median_ms:.1f} ms (median of {timing.samples})", "-", OK))
    if mp.completed.accepted and mp.seconds > 0:
        rows.append(_throughput_check(mp, loaded, profile, base, sugg))
    return rows, sugg


def _direct_check(measured: tuple[Answer | None, bool | None], said: bool, sugg: _Suggestions) -> Check:
    """Small PUTs and ranged GETs as direct requests (connectors/s3.py): they must make the object a
    PUT through botocore makes, or the profile must say not to send them."""
    what = "direct PUT and GET (≤ 1 MiB)"
    answer, intact = measured
    if answer is None:
        return Check(what, "not sent (an endpoint only botocore resolves)", "", OK, "every request goes through boto3")
    works = answer.accepted and intact
    shown = "work, object as botocore makes it" if works else (
        str(answer) if not answer.accepted else "accepted, but the object differs from botocore's")
    if works and said:
        return Check(what, shown, "", OK)
    if works:
        sugg.add("direct_requests", True)
        return Check(what, shown, "", DIFFERS, "the override lets small objects cost less CPU")
    if not said:
        return Check(what, shown, "", OK, "the profile sends every request through boto3")
    sugg.add("direct_requests", False)
    return Check(what, shown, "", FAIL, "small objects would fail or land differently; the override sends them "
                                        "through boto3")


def _limit_check(what: str, found, said: int, path: str, sugg: _Suggestions, consequence: str) -> Check:
    """A count or size limit (tags, metadata bytes) tried at the profile's value and one above.
    `consequence`: what a lower limit breaks ("" when exitplan does not depend on it: it writes no
    tags today, so fewer tags than the profile says only makes the profile wrong)."""
    largest = found.largest_accepted
    if largest is not None and largest >= said:
        if found.first_refused is None:
            return Check(what, f"{said + 1:,} accepted (more than the profile says)", "", OK)
        return Check(what, f"{largest:,} accepted, {found.first_refused:,} refused", "", OK)
    sugg.add(path, largest or 0)
    measured = (f"refused ({found.refusal})" if largest is None
                else f"at most {largest:,} ({found.refusal} at {found.first_refused:,})")
    return Check(what, measured, "", FAIL if consequence else DIFFERS, consequence or "exitplan writes no tags today")


def _throughput_check(mp, loaded: LoadedConfig, profile: ProviderProfile, base, sugg: _Suggestions) -> Check:
    """The parallel parts' throughput, and whether a configured part fits the provider's longest
    request at the measured speed of one part."""
    rate = mp.parts * mp.part_bytes / mp.seconds
    measured = f"{rate / 1e6:.1f} MB/s ({mp.parts} parts of {format_size(mp.part_bytes)} in parallel)"
    limit = profile.limits.max_request_seconds
    said = _said(profile, base, "limits.max_request_seconds")
    if not limit or mp.part_seconds <= 0:
        return Check("parallel parts", measured, f"longest request: {said}", OK)
    part_size = loaded.config.transfer.part_size
    part_size = AUTO_PART_SIZE if part_size == "auto" else int(part_size)
    needed = part_size / (mp.part_bytes / mp.part_seconds)
    if needed <= limit:
        return Check("parallel parts", measured, f"longest request: {limit:g} s", OK,
                     f"a {format_size(part_size)} part takes about {needed:.1f} s")
    return Check("parallel parts", measured, f"longest request: {limit:g} s", FAIL,
                 f"a {format_size(part_size)} part would take about {needed:.0f} s at the speed of one part; "
                 "lower `transfer.part_size`")
