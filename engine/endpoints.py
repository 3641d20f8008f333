"""Build connectors from a loaded configuration, reading their credentials.

Credentials are read here, at the last moment, from the environment variables or the Prefect
blocks the config names (`config.secrets`); they are handed to the SDK client and kept nowhere
else (never in a result, a log or the state).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from config.azure_connection import connection_string_blob_endpoint
from config.errors import ConfigFileError, PolicyRefusal
from config.hosts import is_loopback_host
from config.lab import LAB_S3_ACCESS_KEY, LAB_S3_SECRET_KEY
from config.loader import source_connection_string
from config.models import LoadedConfig, S3Credentials, SftpDestinationConfig, SftpSourceConfig
from config.policy import check_sovereignty, destination_profile
from config.providers import ProviderProfile
from config.secrets import read_env, read_secret
from connectors.base import UNPACED, ConnectorError, ObjectSource, RequestPacer, SinkBehaviour, SinkLimits

from .errors import call_endpoint

log = logging.getLogger(__name__)


def sink_limits(profile: ProviderProfile, *, keys_are_paths: bool = False) -> SinkLimits:
    """The provider's part and size limits as the connectors and the planner take them
    (`keys_are_paths`: the destination writes files, an SFTP one)."""
    lim = profile.limits
    return SinkLimits(
        min_part_size=lim.min_part_size,
        max_part_size=lim.max_part_size,
        max_parts=lim.max_parts,
        max_object_size=lim.max_object_size,
        max_single_put_size=lim.max_single_put_size,
        max_metadata_bytes=lim.max_metadata_bytes,
        # Files keep no tags: an SFTP destination's go into exitplan's metadata (`placement.place`).
        max_tags=0 if keys_are_paths else lim.max_tags,
        keys_are_paths=keys_are_paths,
    )


def sink_behaviour(profile: ProviderProfile) -> SinkBehaviour:
    """The provider's multipart API support and checksum-header policy as the connectors take them."""
    mp = profile.multipart
    return SinkBehaviour(list_parts=mp.list_parts, abort=mp.abort, list_uploads=mp.list_uploads,
                         flexible_checksums=profile.flexible_checksums, direct_requests=profile.direct_requests)


def destination_limits(loaded: LoadedConfig, destination: str) -> SinkLimits:
    kind = loaded.config.destinations[destination].kind
    return sink_limits(destination_profile(loaded, destination), keys_are_paths=kind == "sftp")


def storage_classes(loaded: LoadedConfig, dataset: str) -> Callable[[str | None], str | None]:
    """The storage class an object of `dataset` lands in, by its source tier: the dataset's
    `tier_classes`, else the destination's `storage_class` (every tier), else the provider
    catalog's `tier_classes`; None: the bucket's default class (and always for an SFTP destination).
    Tiers match without regard to case."""
    ds = loaded.config.datasets[dataset]
    dest = loaded.config.destinations[ds.destination]
    if dest.kind == "sftp":
        return lambda tier: None
    by_tier = {} if dest.storage_class else destination_profile(loaded, ds.destination).tier_classes
    by_tier = {t.lower(): c for t, c in {**by_tier, **ds.tier_classes}.items()}
    return lambda tier: by_tier.get((tier or "").lower(), dest.storage_class)


def _config_relative(loaded: LoadedConfig, path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else loaded.path.parent / p)


def open_sftp(loaded: LoadedConfig, field: str, cfg: SftpSourceConfig | SftpDestinationConfig, directory: str, *,
              limits: SinkLimits | None = None, label: str | None = None, source: bool = False):
    """An `SftpStore` over `directory` (below `cfg.root`) of the server `cfg` names, logged in with
    the credentials it names (read here). `field` is the config section (`sources.partner`) for
    messages. A `source` carries what the metadata files of a tree exitplan wrote hold, found from
    `directory` up to `cfg.root` (`SftpStore.source_details`)."""
    from connectors.sftp import HostKeyPin, SftpLogin, SftpStore, refuse_hostile_key

    if directory:
        try:
            refuse_hostile_key(directory, field)
        except ConnectorError as exc:
            raise ConfigFileError(f"{loaded.path}: {exc}; name a directory below `{field}.root`") from None
    def login_item(item: str, what: str) -> str | None:
        """`item` (private_key, passphrase, password, certificate) from its `_file`, `_env` or
        `_block` field, or None when none is set."""
        path = getattr(cfg, f"{item}_file", None)
        if path:
            path = _config_relative(loaded, path)
            try:
                return Path(path).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigFileError(f"{loaded.path}: field `{field}.{item}_file`: cannot read the {what} {path} "
                                      f"({exc.__class__.__name__}); check the path") from None
        env, block = getattr(cfg, f"{item}_env"), getattr(cfg, f"{item}_block")
        if not (env or block):
            return None
        return read_secret(loaded, f"{field}.{item}_{'block' if block else 'env'}", env=env, block=block)

    if cfg.auth == "password":
        login = SftpLogin(cfg.username, password=login_item("password", "password"))
    else:
        login = SftpLogin(cfg.username, private_key=login_item("private_key", "key file"),
                          passphrase=login_item("passphrase", "passphrase"),
                          certificate=login_item("certificate", "certificate"))
    pin = HostKeyPin(known_hosts=_config_relative(loaded, cfg.known_hosts) if cfg.known_hosts else None,
                     fingerprints=tuple(cfg.host_key_fingerprints))
    path = "/".join(p for p in (cfg.root.rstrip("/"), directory) if p) or "/"
    store = SftpStore(cfg.host, cfg.port, path, login, pin, limits=limits, connections=cfg.connections,
                      label=label or f"sftp:{cfg.host}:{cfg.port}{path}", transport=cfg.transport,
                      tree_root=cfg.root if source else None)
    store.source_details = source
    return store


def check_connection_string_unchanged(loaded: LoadedConfig, source: str, conn: str) -> None:
    """Judge the connection string read now as the loader judged the one it read: the variable or
    the block may have changed since (a worker process, a block edited mid-run). A string that now
    leaves loopback in lab mode is a `PolicyRefusal` (exit 3), before any request."""
    src = loaded.config.sources[source]
    field = f"sources.{source}.connection_string_{'block' if src.connection_string_block else 'env'}"
    endpoint = connection_string_blob_endpoint(conn, where=loaded.path, source=source, field=field)
    host = urlsplit(endpoint).hostname
    if loaded.lab_mode and not is_loopback_host(host):
        raise PolicyRefusal(
            f"source `{source}` in {loaded.path} is refused: its connection string ({field}) now names {host}, off "
            "loopback, while the configuration was loaded in lab mode; load it again (run the command again)"
        )


def open_source(loaded: LoadedConfig, dataset: str, *, pacer: RequestPacer = UNPACED) -> ObjectSource:
    """The Azure container, SFTP directory or S3 bucket a dataset reads from. `pacer`: how fast to
    talk to it (engine/pacing.py; an SFTP server is not paced)."""
    ds = loaded.config.datasets[dataset]
    name = ds.source
    src = loaded.config.sources[name]
    t = loaded.config.transfer
    if src.kind == "sftp":
        return open_sftp(loaded, f"sources.{name}", src, ds.container, source=True)
    if src.kind == "s3":
        from connectors.s3 import S3Store

        field = f"sources.{name}.credentials"
        return S3Store(
            ds.container, endpoint_url=src.endpoint_url, region=src.region,
            access_key_id=_s3_credential(loaded, field, src.credentials, "access_key_id"),
            secret_access_key=_s3_credential(loaded, field, src.credentials, "secret_access_key"),
            session_token=_s3_credential(loaded, field, src.credentials, "session_token"),
            addressing_style=src.addressing_style, limits=SinkLimits(), verify_tls=src.verify_tls,
            max_pool_connections=max(src.max_connections, t.concurrency + (t.object_concurrency or t.concurrency)),
            label=f"s3:{src.host}/{ds.container}", pacer=pacer, source_details=True,
        )
    return open_azure_container(loaded, name, ds.container, pacer=pacer)


def open_azure_container(loaded: LoadedConfig, name: str, container: str, *, pacer: RequestPacer = UNPACED):
    """`container` of the Azure account that source `name` reads, with that source's credentials
    (a dataset's container, or the one its inventory report is in)."""
    from connectors.azure_blob import AzureBlobSource

    src = loaded.config.sources[name]
    t = loaded.config.transfer
    pool = max(src.max_connections, t.concurrency + (t.object_concurrency or t.concurrency))
    if src.connection_string_env or src.connection_string_block:
        conn = source_connection_string(src, where=loaded, name=name)
        if not conn:
            read_env(loaded, f"sources.{name}.connection_string_env", src.connection_string_env)  # raises: not set
        check_connection_string_unchanged(loaded, name, conn)
        source = AzureBlobSource.from_connection_string(conn, container, max_connections=pool, pacer=pacer)
    elif src.sas_token_env or src.sas_token_block:
        field = f"sources.{name}.sas_token_{'block' if src.sas_token_block else 'env'}"
        token = read_secret(loaded, field, env=src.sas_token_env, block=src.sas_token_block)
        source = AzureBlobSource.from_sas(src.account_url, token, container, max_connections=pool, pacer=pacer)
    else:
        source = AzureBlobSource.from_default_credential(src.account_url, container, max_connections=pool, pacer=pacer)
    if not src.direct_requests:
        source.use_sdk_only()
    return source


def _s3_credential(loaded: LoadedConfig, field: str, creds: S3Credentials, item: str) -> str | None:
    """S3 key `item` where `creds` (at config section `field`) says it is, or None when not named."""
    ref = creds.reference(item)
    if ref is None:
        return None
    suffix, env_or_block = ref
    # A session token is optional in an aws-credentials block; named on its own, it is required.
    required = not (item == "session_token" and suffix == "block")
    return read_secret(loaded, f"{field}.{suffix}", item=item, required=required, **env_or_block)


def open_sink(loaded: LoadedConfig, destination: str, *, max_attempts: int | None = None,
              pacer: RequestPacer = UNPACED):
    """The S3 bucket or SFTP directory a destination names (an `ObjectSink` that is also an `ObjectSource`).
    `max_attempts`: attempts per request (default: the connector's, 5), fewer for a check that
    must not wait on a destination that does not answer. `pacer`: how fast to talk to it
    (engine/pacing.py; an SFTP server is not paced)."""
    dest = loaded.config.destinations[destination]
    t = loaded.config.transfer
    profile = destination_profile(loaded, destination)
    if dest.kind == "sftp":
        return open_sftp(loaded, f"destinations.{destination}", dest, "", limits=destination_limits(loaded, destination),
                         label=f"{profile.name}:sftp:{dest.host}{dest.root}")
    from connectors.s3 import S3Store

    creds = dest.credentials

    def credential(item: str) -> str | None:
        return _s3_credential(loaded, f"destinations.{destination}.credentials", creds, item)

    if profile.lab_only and creds.access_key_id_env and not os.environ.get(creds.access_key_id_env):
        # The lab's S3 server accepts any credentials; these only name the lab.
        key_id, secret = LAB_S3_ACCESS_KEY, LAB_S3_SECRET_KEY
    else:
        key_id = credential("access_key_id")
        secret = credential("secret_access_key")
    token = credential("session_token")
    return S3Store(
        dest.bucket,
        endpoint_url=dest.endpoint_url,
        region=dest.region,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
        addressing_style=dest.addressing_style or profile.addressing_style,
        limits=sink_limits(profile),
        etag_is_md5=profile.multipart.etag == "md5",
        behaviour=sink_behaviour(profile),
        # Requests in flight: part uploads (concurrency) + single PUTs and open/complete calls
        # (one per object in progress).
        max_pool_connections=max(dest.max_connections, t.concurrency + (t.object_concurrency or t.concurrency)),
        verify_tls=dest.verify_tls,
        label=f"{profile.name}:{dest.bucket}",
        pacer=pacer,
        **({"max_attempts": max_attempts} if max_attempts else {}),
    )


def close_endpoint(endpoint, where: str) -> None:
    """Close a connector's connections (its `close`, where it has one). A failure is said in the
    log, not raised: closing is cleanup after work that has already ended, one way or the other."""
    close = getattr(endpoint, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("%s: closing %s failed (%s)", where, getattr(endpoint, "label", "its connections"), exc)


def opened_ahead(futures: dict[str, Future], what: str) -> dict[str, object]:
    """The endpoints `futures` (by name) opened ahead and no one asked for, each waited for, to be
    closed; one whose open failed is left out, in the debug log: nothing needed it, and whatever
    stopped the run first is the error said."""
    endpoints = {}
    for name, future in futures.items():
        try:
            endpoints[name] = future.result()
        except Exception:
            log.debug("%s `%s`, opened ahead, failed and was not needed", what, name, exc_info=True)
    return endpoints


class DestinationSinks:
    """The sinks of a configuration's destinations, each opened on first use and kept until `close`:
    a run's check, keyset copies, objects and manifest go through one store per destination (one
    SSH connection to an SFTP server instead of one per step). Unpaced until `pace`. Call it with
    a destination's name: its sink (what `open_sink` raises when it cannot be opened; nothing is
    kept then)."""

    def __init__(self, loaded: LoadedConfig):
        self._loaded = loaded
        self._pacer_of: Callable[[str], RequestPacer] | None = None
        self._lock = threading.Lock()
        self._sinks: dict[str, object] = {}
        self._ahead: dict[str, Future] = {}  # being opened on threads of their own (`open_ahead`)

    def open_ahead(self, destinations: Iterable[str]) -> None:
        """Start opening the SFTP servers among `destinations` now, each on a thread of its own
        (never paced: nothing they need comes later): an SSH login waits on the server, not on
        this process. Asked for, such a sink is waited for, and what its open raised is raised."""
        for destination in destinations:
            if self._loaded.config.destinations[destination].kind == "sftp" and destination not in self._ahead:
                self._ahead[destination] = on_a_thread(open_sink, self._loaded, destination)

    def pace(self, pacer_of: Callable[[str], RequestPacer]) -> None:
        """Pace the sinks from now on, those already open included (call it between requests: a
        run paces its sinks once its state store, where the shared limits live, is open). A sink
        that is never paced (an SFTP server's) has no `pacer` and is left as it is."""
        with self._lock:
            self._pacer_of = pacer_of
            for destination, sink in self._sinks.items():
                if hasattr(sink, "pacer"):
                    sink.pacer = pacer_of(destination)

    def __call__(self, destination: str):
        with self._lock:
            sink = self._sinks.get(destination)
            if sink is None:
                early = self._ahead.pop(destination, None)
                if early is not None:
                    sink = early.result()
                else:
                    pacer = self._pacer_of(destination) if self._pacer_of is not None else UNPACED
                    sink = open_sink(self._loaded, destination, pacer=pacer)
                self._sinks[destination] = sink
            return sink

    def opened(self) -> list:
        with self._lock:
            return list(self._sinks.values())

    def close(self) -> None:
        """Close every sink opened (their connections, an SFTP store's `ssh` processes); a sink
        that fails to close is said in the log, and the others are closed all the same."""
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            ahead, self._ahead = self._ahead, {}
        sinks.update(opened_ahead(ahead, "destination"))  # opened ahead, never asked for: closed too
        for destination, sink in sorted(sinks.items()):
            close_endpoint(sink, f"destination `{destination}`")

    def __enter__(self) -> "DestinationSinks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def on_a_thread(fn: Callable, *args) -> Future:
    """`fn(*args)` started now on a thread of its own; its future."""
    runner = ThreadPoolExecutor(1, thread_name_prefix="open-ahead")
    try:
        return runner.submit(fn, *args)
    finally:
        runner.shutdown(wait=False)


def open_source_ahead(loaded: LoadedConfig, dataset: str) -> Future | None:
    """Start opening `dataset`'s source now, on a thread of its own, when it is an SFTP server
    (never paced, so nothing it needs comes later): its SSH logins wait on the server (a fifth of a
    second on loopback, round trips far away), not on this process. The future raises what the
    open raised, as `call_endpoint` words it; None for any other kind of source."""
    if loaded.config.sources[loaded.config.datasets[dataset].source].kind != "sftp":
        return None
    return on_a_thread(call_endpoint, f"dataset `{dataset}`: source", open_source, loaded, dataset)


class OpenedAhead:
    """The SFTP servers a migration talks to, opened while the command goes on importing and
    checking what its run needs (`DestinationSinks.open_ahead`, `open_source_ahead`: the first
    dataset's source and every destination of `datasets`), once the sovereignty policy has passed
    (no server it refuses is contacted). The run takes them over (`MigrationRun.start`); `close`
    closes what it did not take (the command stopped before its run opened)."""

    def __init__(self, loaded: LoadedConfig, datasets: list[str]):
        check_sovereignty(loaded)
        self.sinks = DestinationSinks(loaded)
        self.sinks.open_ahead(dict.fromkeys(loaded.config.datasets[n].destination for n in datasets))
        self.sources: dict[str, Future] = {}
        early = open_source_ahead(loaded, datasets[0]) if datasets else None
        if early is not None:
            self.sources[datasets[0]] = early

    def close(self) -> None:
        sources, self.sources = self.sources, {}
        try:
            self.sinks.close()
        finally:
            for dataset, source in opened_ahead(sources, "the source of dataset").items():
                close_endpoint(source, f"dataset `{dataset}`: source")

    def __enter__(self) -> "OpenedAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def publish_file(loaded: LoadedConfig, destinations: list[str], path: Path, key: str, what: str, *,
                 content_type: str, metadata: dict[str, str] | None = None,
                 sinks: DestinationSinks | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Copy the file at `path` to `key` in each destination (next to the data: the audit manifest,
    the report), as `content_type` with `metadata`: ([(its label/key, a URL naming it)], notes on
    failures). A failure is a note, not an error: the next run copies it again. `sinks`: the
    caller's open sinks (else opened here and closed after). A file of at most `DIRECT_MAX_BYTES`
    is sent from memory with its MD5 (checked by the destination, and one request where the sink
    sends small bodies directly: no streaming client made for it); a larger one is streamed."""
    from connectors.base import DIRECT_MAX_BYTES, ContentSettings, WriteMeta

    if sinks is None:
        with DestinationSinks(loaded) as own:
            return publish_file(loaded, destinations, path, key, what, content_type=content_type, metadata=metadata,
                                sinks=own)
    meta = WriteMeta(ContentSettings(content_type=content_type), metadata or {})
    written, notes = [], []
    for dest in sorted(set(destinations)):
        try:
            sink = sinks(dest)
            with open(path, "rb") as body:
                size = os.fstat(body.fileno()).st_size
                data = body.read(size + 1) if size <= DIRECT_MAX_BYTES else None
                if data is not None and len(data) == size:
                    sink.put(key, data, size, meta, hashlib.md5(data).digest())
                else:  # large, or changed since its size was read: streamed
                    body.seek(0)
                    sink.put(key, body, os.fstat(body.fileno()).st_size, meta, None)
            written.append((f"{sink.label}/{key}", object_url(loaded, dest, key)))
        except (ConnectorError, OSError) as exc:
            notes.append(f"{what} could not be copied to destination `{dest}` ({exc}); the next run copies it")
    return written, notes


def object_url(loaded: LoadedConfig, destination: str, key: str) -> str:
    """Where object `key` of a destination is, as a URL a person can read (path-style for S3,
    sftp:// for an SFTP server); it names the object, reading it takes the bucket's credentials."""
    from urllib.parse import quote

    dest = loaded.config.destinations[destination]
    if dest.kind == "sftp":
        return f"sftp://{dest.host}:{dest.port}{quote(dest.root.rstrip('/') + '/' + key)}"
    return f"{dest.endpoint_url.rstrip('/')}/{dest.bucket}/{quote(key)}"
