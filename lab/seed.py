"""The lab's synthetic health-like datasets: what `exitplan lab seed` writes, byte for byte.

Pure and deterministic: the same profile always gives the same blob names, sizes, bytes, content
headers and metadata (for a given Python and pyarrow version: Parquet files carry the writer's
version string). No storage SDK here; the writes go through a `SeedWriter` (the Azure one is
`connectors.azure_writer.AzureBlobWriter`, opened by `seed_azurite`), so tests can also ask this
module what *should* be in the emulator (`expected_objects`) and compare with what is. The lab's
destination bucket is created here too (`ensure_lab_buckets`), through `connectors.s3.S3Store.ensure_bucket`.

Three containers, each exercising a different part of the copy engine:

* ``claims``: thousands of small CSV files under deep, partition-style prefixes
  (``2024/03/region=île-de-france/facility=…/claims-00042.csv``), plus names with spaces,
  accents, CJK, emoji, ``%``, ``+``, ``#``, ``?`` and a 0-byte file.
* ``stays``: hospital stays as Parquet (pyarrow), Hive-partitioned.
* ``imaging``: DICOM-like binaries (a real-looking header, then pseudo-random "pixels") from
  0 bytes up to the profile's largest, including sizes one byte either side of the part
  boundaries the engine cares about (5, 8, 16 MiB), and one blob in the Cool tier.

Beside them, a partner's delivery for the lab's SFTP server (`expected_deliveries`,
`write_deliveries`): monthly CSV extracts and a scan archive in a directory tree.

Blobs are written two ways, because Azure stores them differently: single-shot with a
Content-MD5 (Put Blob), and as staged blocks without one (Put Block + Put Block List), which is
what many real uploaders leave behind and what the verifier must cope with.

Metadata values stay within Latin-1: Azure carries metadata in HTTP headers, and the SDK sends
them Latin-1 encoded, so "hôpital" round-trips but "日本" would not.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from config.azure_connection import blob_endpoints
from config.hosts import is_loopback_host
from config.lab import LAB_DELIVERIES
from connectors.base import ConnectorError, ContentSettings

KiB = 1024
MiB = 1024 * KiB

# The exact container names the example config (config/examples/lab.yaml) migrates.
CLAIMS = "claims"
STAYS = "stays"
IMAGING = "imaging"
CONTAINERS = (CLAIMS, STAYS, IMAGING)

# Block size for blobs uploaded as staged blocks; also the chunk size of every generator, so
# peak memory per upload in flight is one block whatever the blob's size.
BLOCK_SIZE = 4 * MiB

# Blobs above this are always uploaded as blocks: a single-shot upload holds the whole body in
# memory (and needs it twice over to compute its MD5 first).
SINGLE_SHOT_MAX = 8 * MiB + 1

# Sizes around which the engine switches behaviour: S3's minimum part (5 MiB), the default part
# size of most S3 clients (8 MiB), and exitplan's own default part (16 MiB).
PART_BOUNDARIES = (5 * MiB, 8 * MiB, 16 * MiB)

CSV_TYPE = "text/csv; charset=utf-8"
PARQUET_TYPE = "application/vnd.apache.parquet"
DICOM_TYPE = "application/dicom"

PYARROW_MISSING = (
    "pyarrow is needed to write the Parquet stays: install the lab extra with "
    "`pip install -e '.[lab]'` (or `pip install pyarrow`)"
)

REGIONS = (
    "île-de-france",
    "auvergne-rhône-alpes",
    "provence-alpes-côte-d'azur",
    "hauts-de-france",
    "grand-est",
    "bretagne",
    "occitanie",
    "nouvelle-aquitaine",
)
FACILITIES = (
    "hôpital Necker",
    "CHU de Rennes",
    "hôpital Saint-Éloi",
    "clinique du Parc",
    "CHU Grenoble Alpes",
    "hôpital de la Timone",
)
ACT_CODES = ("YYYY010", "ZBQK002", "DEQP003", "HFFA011", "NKMA001", "JQGA002", "QZFA036", "LMMA006")
ICD10 = ("I21.0", "J18.9", "S72.0", "K35.8", "E11.9", "C50.9", "O80", "F32.1", "N39.0", "I63.9")
DISCHARGE = ("domicile", "transfert", "soins de suite", "décès")


class MissingDependency(RuntimeError):
    """An optional package the seed needs is not installed; the message says how to install it."""


class UploadMode(str, Enum):
    """How a blob is written to Azure, which decides whether Azure keeps a Content-MD5 for it."""

    SINGLE = "single"  # one Put Blob with Content-MD5: the service stores the MD5
    BLOCKS = "blocks"  # Put Block ×N + Put Block List, no MD5: the service has none


# --------------------------------------------------------------------------------------------
# Content: recipes that regenerate the same bytes on demand
# --------------------------------------------------------------------------------------------


def _rng(seed: str) -> random.Random:
    # str seeds are hashed with SHA-512 (Random's version-2 seeding): stable across runs and
    # independent of PYTHONHASHSEED.
    return random.Random(seed)


def _keystream(seed: str, start: int, end: int) -> bytes:
    """Bytes ``start .. end-1`` of a pseudo-random stream named by `seed`.

    AES-256-CTR over zeros: about 8 GB/s on one core (a 300 MiB blob in well under a second,
    where `random.randbytes` manages about 0.4 GB/s), and seekable, so any range of a huge blob
    can be regenerated without producing what comes before it.
    """
    if end <= start:
        return b""
    key = hashlib.sha256(b"exitplan-lab-seed\0" + seed.encode("utf-8")).digest()
    block, skip = divmod(start, 16)
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    return enc.update(bytes(skip + end - start))[skip:]


@dataclass(frozen=True)
class DicomLikeBinary:
    """A DICOM-looking file of exactly `size` bytes: preamble, ``DICM``, a few explicit-VR
    elements, then pixel data from a keystream. Files smaller than the header are its prefix."""

    seed: str
    size: int
    modality: str = "CT"

    def header(self) -> bytes:
        rng = _rng(self.seed + "/header")

        def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
            if len(value) % 2:
                value += b"\0" if vr == b"UI" else b" "
            return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

        rows = rng.choice((256, 512, 1024))
        head = b"\0" * 128 + b"DICM"
        head += element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
        head += element(0x0008, 0x0060, b"CS", self.modality.encode())
        head += element(0x0010, 0x0020, b"LO", f"PSEUDO-{rng.randrange(10**8):08d}".encode())
        head += element(0x0028, 0x0010, b"US", struct.pack("<H", rows))
        head += element(0x0028, 0x0011, b"US", struct.pack("<H", rows))
        pixels = self.size - len(head) - 12
        length = pixels if 0 <= pixels < 0xFFFFFFFF else 0xFFFFFFFF  # undefined length when it won't fit
        return head + struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", length)

    def read_range(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if end <= start:
            return b""
        head = self.header()
        out = head[start:end]
        if end > len(head):
            out += _keystream(self.seed, max(start, len(head)) - len(head), end - len(head))
        return out

    def total_size(self) -> int:
        return self.size


@lru_cache(maxsize=256)
def _render_claims(seed: str, rows: int) -> bytes:
    rng = _rng(seed)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(
        ["claim_id", "patient_pseudo_id", "date_of_service", "region", "facility", "act_code",
         "amount_eur", "reimbursed_eur", "status"]
    )
    day0 = date(2023, 1, 1)
    for _ in range(rows):
        amount = rng.randrange(500, 250_000) / 100
        out.writerow([
            f"CLM-{rng.randrange(16**12):012x}",
            f"P{rng.randrange(10**10):010d}",
            (day0 + timedelta(days=rng.randrange(730))).isoformat(),
            rng.choice(REGIONS),
            rng.choice(FACILITIES),
            rng.choice(ACT_CODES),
            f"{amount:.2f}",
            f"{amount * rng.choice((0.6, 0.7, 0.8, 1.0)):.2f}",
            rng.choice(("payé", "rejeté", "en attente")),
        ])
    return buf.getvalue().encode("utf-8")


@dataclass(frozen=True)
class ClaimsCsv:
    """A CSV file of `rows` synthetic insurance claims (0 rows and no header when `rows` < 0)."""

    seed: str
    rows: int

    def render(self) -> bytes:
        return b"" if self.rows < 0 else _render_claims(self.seed, self.rows)

    def read_range(self, start: int, end: int) -> bytes:
        return self.render()[start:end]

    def total_size(self) -> int:
        return len(self.render())


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=64)
def _render_stays(seed: str, rows: int) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependency(PYARROW_MISSING) from exc
    rng = _rng(seed)
    day0 = date(2023, 1, 1)
    admissions = [day0 + timedelta(days=rng.randrange(730)) for _ in range(rows)]
    lengths = [rng.choice((0, 0, 1, 2, 3, 4, 6, 9, 14, 30)) for _ in range(rows)]
    table = pa.table({
        "stay_id": pa.array([f"SEJ-{rng.randrange(16**10):010x}" for _ in range(rows)], pa.string()),
        "patient_pseudo_id": pa.array([f"P{rng.randrange(10**10):010d}" for _ in range(rows)], pa.string()),
        "facility": pa.array([rng.choice(FACILITIES) for _ in range(rows)], pa.string()),
        "admission_date": pa.array(admissions, pa.date32()),
        "discharge_date": pa.array([a + timedelta(days=n) for a, n in zip(admissions, lengths)], pa.date32()),
        "length_of_stay_days": pa.array(lengths, pa.int16()),
        "primary_diagnosis_icd10": pa.array([rng.choice(ICD10) for _ in range(rows)], pa.string()),
        "cost_eur": pa.array([rng.randrange(20_000, 5_000_000) / 100 for _ in range(rows)], pa.float64()),
        "discharge_mode": pa.array([rng.choice(DISCHARGE) for _ in range(rows)], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


@dataclass(frozen=True)
class StaysParquet:
    """A Parquet file of `rows` hospital stays (0 rows is a valid file with only the schema)."""

    seed: str
    rows: int

    def render(self) -> bytes:
        return _render_stays(self.seed, self.rows)

    def read_range(self, start: int, end: int) -> bytes:
        return self.render()[start:end]

    def total_size(self) -> int:
        return len(self.render())


Recipe = DicomLikeBinary | ClaimsCsv | StaysParquet


@dataclass(frozen=True)
class Digests:
    md5: bytes
    sha256: str  # hex


@dataclass(frozen=True)
class SeedObject:
    """One blob the seed writes: where, how, with which headers, and how to regenerate its bytes."""

    container: str
    name: str
    recipe: Recipe
    upload: UploadMode
    content: ContentSettings
    metadata_items: tuple[tuple[str, str], ...] = ()
    tier: str | None = None  # None: the account default (Hot)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.metadata_items)

    @property
    def size(self) -> int:
        return self.recipe.total_size()

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start .. end-1`` of the blob, regenerated (half-open, like connectors.base)."""
        return self.recipe.read_range(start, end)

    def read(self) -> bytes:
        """The whole blob in memory: for small blobs and tests."""
        return self.read_range(0, self.size)

    def chunks(self, chunk_size: int = BLOCK_SIZE) -> Iterator[bytes]:
        """The blob as consecutive chunks of `chunk_size` bytes (the last may be shorter)."""
        size = self.size
        for start in range(0, size, chunk_size):
            yield self.read_range(start, min(start + chunk_size, size))

    def digests(self) -> Digests:
        md5, sha = hashlib.md5(), hashlib.sha256()
        for chunk in self.chunks():
            md5.update(chunk)
            sha.update(chunk)
        return Digests(md5.digest(), sha.hexdigest())


# --------------------------------------------------------------------------------------------
# Profiles: how much of each
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedProfile:
    """How much the seed writes. A preset from `PROFILES`, or a `dataclasses.replace` of one
    (the benchmark scripts scale `bench` that way).

    `claims_files` / `stays_files`: regular files (the special names come on top, in every
    profile). `*_rows`: rows per file, inclusive range. `imaging_sizes`: the exact byte size of
    each regular imaging binary; the part-boundary sizes (`boundaries`, each ±1) and the special
    names come on top.
    """

    name: str
    claims_files: int
    claims_rows: tuple[int, int]
    stays_files: int
    stays_rows: tuple[int, int]
    imaging_sizes: tuple[int, ...]
    boundaries: tuple[int, ...] = PART_BOUNDARIES


PROFILES: dict[str, SeedProfile] = {
    # Seconds: for the test suite. Still 0 bytes, 5 MiB ± 1 and 8 MiB ± 1.
    "tiny": SeedProfile(
        "tiny", claims_files=24, claims_rows=(3, 30), stays_files=4, stays_rows=(10, 200),
        imaging_sizes=(1, 4 * KiB + 3, 1 * MiB + 17), boundaries=(5 * MiB, 8 * MiB),
    ),
    # The demo: thousands of small files, a 300 MiB blob, about 0.6 GiB in all.
    "standard": SeedProfile(
        "standard", claims_files=3000, claims_rows=(5, 40), stays_files=200, stays_rows=(50, 600),
        imaging_sizes=(
            1, 1000, 64 * KiB, 1 * MiB, 4 * MiB - 1, 12 * MiB + 345, 32 * MiB + 7, 64 * MiB,
            100 * MiB + 13, 300 * MiB + 1,
        ),
    ),
    # Benchmarks: a few blobs of hundreds of MiB and many small ones (close to the 1 GiB mixed
    # set of LAB-NOTES: 4 × 128 MiB, 500 × 1 MiB, 2,000 small files).
    "bench": SeedProfile(
        "bench", claims_files=2000, claims_rows=(150, 250), stays_files=50, stays_rows=(500, 2000),
        imaging_sizes=(256 * MiB, 256 * MiB + 1, 192 * MiB - 1, 128 * MiB) + (1 * MiB,) * 200,
    ),
}


def _profile(profile: str | SeedProfile) -> SeedProfile:
    if isinstance(profile, SeedProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown seed profile {profile!r}; choose one of {', '.join(PROFILES)}") from None


def _bucket(name: str, n: int) -> int:
    # A stable per-name choice (crc32, not hash(): that one is salted per process).
    return zlib.crc32(name.encode("utf-8")) % n


def _claims(p: SeedProfile) -> list[SeedObject]:
    rng = _rng(f"claims/{p.name}")
    objs = []
    facilities = [f"{rng.randrange(10**9):09d}" for _ in range(12)]
    for i in range(p.claims_files):
        year = 2023 + i % 2
        month = 1 + (i // 2) % 12
        region = REGIONS[(i // 24) % len(REGIONS)]
        name = f"{year}/{month:02d}/region={region}/facility={rng.choice(facilities)}/claims-{i:05d}.csv"
        meta: tuple[tuple[str, str], ...] = ()
        if i % 7:  # some blobs carry no metadata at all
            meta = (("dataset", "claims"), ("region", region), ("source_system", "snds-synthetic"))
        objs.append(SeedObject(
            CLAIMS, name, ClaimsCsv(f"{CLAIMS}/{name}", rng.randint(*p.claims_rows)),
            UploadMode.BLOCKS if _bucket(name, 4) == 0 else UploadMode.SINGLE,
            ContentSettings(content_type=CSV_TYPE), meta,
        ))
    special = [
        ("special names/with space.csv", UploadMode.SINGLE),
        ("special names/100% remboursé.csv", UploadMode.BLOCKS),
        ("special names/a+b=c.csv", UploadMode.SINGLE),
        ("special names/#1 priorité.csv", UploadMode.SINGLE),
        ("special names/q?x=1&y=2.csv", UploadMode.BLOCKS),
        ("special names/日本/請求書.csv", UploadMode.SINGLE),
        ("special names/urgences 🚑.csv", UploadMode.BLOCKS),
        ("special names/Müller-Lüdenscheid ü.csv", UploadMode.SINGLE),
        ("archive/" + "/".join(f"level-{d:02d}" for d in range(24)) + "/deep.csv", UploadMode.SINGLE),
    ]
    for name, mode in special:
        objs.append(SeedObject(
            CLAIMS, name, ClaimsCsv(f"{CLAIMS}/{name}", 7), mode, ContentSettings(content_type=CSV_TYPE),
            (("dataset", "claims"), ("facility", "hôpital Necker")),
        ))
    # A 0-byte file: no header, no rows.
    objs.append(SeedObject(
        CLAIMS, "special names/empty.csv", ClaimsCsv(f"{CLAIMS}/empty", -1), UploadMode.SINGLE,
        ContentSettings(content_type=CSV_TYPE),
    ))
    return objs


def _stays(p: SeedProfile) -> list[SeedObject]:
    rng = _rng(f"stays/{p.name}")
    settings = ContentSettings(content_type=PARQUET_TYPE, cache_control="no-cache")
    objs = []
    for i in range(p.stays_files):
        region = REGIONS[i % len(REGIONS)]
        name = f"year={2023 + i % 2}/month={1 + (i // 2) % 12:02d}/region={region}/part-{i:05d}.parquet"
        objs.append(SeedObject(
            STAYS, name, StaysParquet(f"{STAYS}/{name}", rng.randint(*p.stays_rows)),
            UploadMode.BLOCKS if i % 3 == 0 else UploadMode.SINGLE, settings,
            (("dataset", "stays"), ("schema_version", "3"), ("facility", FACILITIES[i % len(FACILITIES)])),
        ))
    objs.append(SeedObject(
        STAYS, "exports/séjours 2023 (final).parquet", StaysParquet(f"{STAYS}/exports-2023", 300),
        UploadMode.SINGLE, settings, (("dataset", "stays"), ("note", "export validé par le DIM")),
    ))
    objs.append(SeedObject(
        STAYS, "exports/empty-table.parquet", StaysParquet(f"{STAYS}/empty", 0), UploadMode.BLOCKS, settings,
    ))
    return objs


def _imaging(p: SeedProfile) -> list[SeedObject]:
    modalities = ("CT", "MR", "CR", "US")
    objs: list[SeedObject] = []

    def add(name: str, size: int, mode: UploadMode, tier: str | None = None, modality: str = "CT") -> None:
        if size > SINGLE_SHOT_MAX:
            mode = UploadMode.BLOCKS
        meta = (("modality", modality), ("facility", FACILITIES[_bucket(name, len(FACILITIES))]),
                ("study_uid", f"1.2.250.1.{zlib.crc32(name.encode()):010d}"))
        objs.append(SeedObject(
            IMAGING, name, DicomLikeBinary(f"{IMAGING}/{name}", size, modality), mode,
            ContentSettings(content_type=DICOM_TYPE), meta, tier,
        ))

    add("empty/zero-bytes.dcm", 0, UploadMode.SINGLE)
    for b in p.boundaries:
        for delta, mode in ((-1, UploadMode.SINGLE), (0, UploadMode.BLOCKS), (1, UploadMode.SINGLE)):
            label = {-1: "minus-1", 0: "exact", 1: "plus-1"}[delta]
            add(f"boundaries/{b // MiB}MiB-{label}.dcm", b + delta, mode)
    for i, size in enumerate(p.imaging_sizes):
        modality = modalities[i % len(modalities)]
        name = f"{modality}/{2023 + i % 2}/{1 + i % 12:02d}/study-{i:05d}/series-1.dcm"
        add(name, size, UploadMode.SINGLE if i % 2 else UploadMode.BLOCKS, modality=modality)
    add("special names/IRM cérébrale 日本 🧠.dcm", 3 * KiB + 5, UploadMode.SINGLE, modality="MR")
    add("special names/100% + #1 scan.dcm", 2 * KiB + 1, UploadMode.BLOCKS)
    # One blob in the Cool tier: readable, but the engine must carry or report its tier.
    add("archive/2019/cold-study/series-1.dcm", 256 * KiB + 9, UploadMode.BLOCKS, tier="Cool")
    return objs


def expected_objects(profile: str | SeedProfile) -> list[SeedObject]:
    """Every blob `seed` writes for `profile`, in a stable order (containers in `CONTAINERS`
    order). Sizes and digests are computed on demand from the recipes (`.size`, `.digests()`),
    so listing is cheap; the Parquet stays need pyarrow (`MissingDependency` otherwise)."""
    p = _profile(profile)
    objs = _claims(p) + _stays(p) + _imaging(p)
    names = [(o.container, o.name) for o in objs]
    assert len(names) == len(set(names)), "duplicate blob names in a seed profile"
    return objs


# --------------------------------------------------------------------------------------------
# The partner delivery (SFTP)
# --------------------------------------------------------------------------------------------


def expected_deliveries(profile: str | SeedProfile) -> list[SeedObject]:
    """The partner delivery `write_deliveries` puts below the lab sshd's root, in directory
    `LAB_DELIVERIES`: monthly claim extracts (CSV) from a partner insurer, a scan archive large
    enough to be copied in parts (above 8 MiB, one byte off a part boundary), a 0-byte end-of-
    delivery marker and a name with spaces and accents. A file has no content headers and no
    metadata on SFTP: only names, sizes and bytes."""
    p = _profile(profile)
    rng = _rng(f"{LAB_DELIVERIES}/{p.name}")
    objs = []
    months = max(2, min(12, p.claims_files // 100))
    for m in range(months):
        for part in range(3):
            name = f"2026-{m + 1:02d}/extract-{part:02d}.csv"
            objs.append(SeedObject(LAB_DELIVERIES, name, ClaimsCsv(f"{LAB_DELIVERIES}/{name}",
                                                                   rng.randint(*p.claims_rows)),
                                   UploadMode.SINGLE, ContentSettings()))
    for name, recipe in (
        ("2026-01/scans/archive.dcm", DicomLikeBinary(f"{LAB_DELIVERIES}/archive", 8 * MiB + 1)),
        ("2026-01/DONE", ClaimsCsv(f"{LAB_DELIVERIES}/done", -1)),
        ("2026-02/relevé des séjours.csv", ClaimsCsv(f"{LAB_DELIVERIES}/releve", 11)),
    ):
        objs.append(SeedObject(LAB_DELIVERIES, name, recipe, UploadMode.SINGLE, ContentSettings()))
    return objs


def write_deliveries(root: Path, objects: Sequence[SeedObject]) -> ContainerSummary:
    """Write the delivery's files below `root` (the lab sshd serves this machine's disk, so they
    are written in place, not over SFTP); idempotent: a file already holding the right bytes is
    left as is, so its size and mtime, the SFTP change marker, do not move."""
    total = 0
    for obj in objects:
        path = root / obj.container / obj.name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = b"".join(obj.chunks())
        if not (path.is_file() and path.stat().st_size == len(body) and path.read_bytes() == body):
            temp = path.with_name(f".{path.name}.seed-tmp")
            temp.write_bytes(body)
            temp.replace(path)
        total += len(body)
    return ContainerSummary(LAB_DELIVERIES, len(objects), total)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class SeedWriter(Protocol):
    """What seeding needs from the emulator; `connectors.azure_writer.AzureBlobWriter` is one."""

    def ensure_container(self, container: str) -> None: ...

    def put_single(
        self, container: str, name: str, body: bytes, content: ContentSettings,
        metadata: Mapping[str, str], md5: bytes,
    ) -> None: ...

    def put_blocks(
        self, container: str, name: str, chunks: Iterable[bytes], content: ContentSettings,
        metadata: Mapping[str, str],
    ) -> int: ...

    def set_tier(self, container: str, name: str, tier: str) -> None: ...


@dataclass(frozen=True)
class ContainerSummary:
    container: str
    blobs: int
    bytes: int


def summarize(objects: Sequence[SeedObject]) -> list[ContainerSummary]:
    """Blob count and total bytes per container, in `CONTAINERS` order."""
    counts: dict[str, list[int]] = {}
    for o in objects:
        c = counts.setdefault(o.container, [0, 0])
        c[0] += 1
        c[1] += o.size
    order = [c for c in CONTAINERS if c in counts] + sorted(set(counts) - set(CONTAINERS))
    return [ContainerSummary(c, counts[c][0], counts[c][1]) for c in order]


def write_object(writer: SeedWriter, obj: SeedObject) -> int:
    """Write one blob the way its `upload` mode says; returns the bytes written."""
    if obj.upload is UploadMode.SINGLE:
        body = obj.read()
        writer.put_single(obj.container, obj.name, body, obj.content, obj.metadata, hashlib.md5(body).digest())
        written = len(body)
    else:
        written = writer.put_blocks(obj.container, obj.name, obj.chunks(BLOCK_SIZE), obj.content, obj.metadata)
    if written != obj.size:
        raise RuntimeError(f"{obj.container}/{obj.name}: wrote {written} bytes, expected {obj.size}")
    if obj.tier:
        # After the write: an overwrite resets the tier, so re-seeding sets it again.
        writer.set_tier(obj.container, obj.name, obj.tier)
    return written


def seed(
    writer: SeedWriter,
    objects: Sequence[SeedObject],
    *,
    workers: int = 8,
    on_written: Callable[[SeedObject], None] | None = None,
) -> list[ContainerSummary]:
    """Create the containers and write every object, `workers` at a time.

    Idempotent: an existing blob of the same name is overwritten with the same bytes; other
    blobs in the containers are left alone. Peak memory is about `workers` × `SINGLE_SHOT_MAX`
    (single-shot bodies are held whole; block uploads hold one `BLOCK_SIZE` block each).
    The first failure cancels what has not started and is raised.
    """
    for container in dict.fromkeys(o.container for o in objects):
        writer.ensure_container(container)
    # Largest first, so the long uploads overlap the thousands of small ones instead of
    # finishing alone at the end.
    ordered = sorted(objects, key=lambda o: -o.size if isinstance(o.recipe, DicomLikeBinary) else 0)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lab-seed") as pool:
        futures = {pool.submit(write_object, writer, o): o for o in ordered}
        try:
            for f in as_completed(futures):
                f.result()
                if on_written:
                    on_written(futures[f])
        except BaseException:
            # Leave nothing queued behind a failure (or Ctrl-C); running writes finish on exit.
            for f in futures:
                f.cancel()
            raise
    return summarize(objects)


class LabStoreError(RuntimeError):
    """Azurite or the lab's S3 server refused a request or did not answer; the message says which."""


def seed_azurite(
    connection_string: str,
    objects: Sequence[SeedObject],
    *,
    workers: int = 8,
    on_written: Callable[[SeedObject], None] | None = None,
) -> list[ContainerSummary]:
    """`seed` into the Azure Blob endpoint of `connection_string` (check it with
    `emulator_blob_endpoint` first). Connector errors come back as `LabStoreError`."""
    from connectors.azure_writer import AzureBlobWriter

    try:
        writer = AzureBlobWriter(connection_string)
        return seed(writer, objects, workers=workers, on_written=on_written)
    except ConnectorError as exc:
        raise LabStoreError(str(exc)) from exc


def ensure_lab_buckets(
    endpoint_url: str, buckets: Sequence[str], *, access_key: str, secret_key: str, region: str,
) -> dict[str, bool]:
    """Create the lab's destination bucket(s) on its S3 server; idempotent.

    Returns, per bucket, whether it was created now (False: it was there already).
    """
    from connectors.base import SinkLimits
    from connectors.s3 import S3Store

    try:
        return {
            b: S3Store(b, endpoint_url=endpoint_url, region=region, access_key_id=access_key,
                       secret_access_key=secret_key, limits=SinkLimits(), max_attempts=3).ensure_bucket()
            for b in buckets
        }
    except ConnectorError as exc:
        raise LabStoreError(str(exc)) from exc


def emulator_blob_endpoint(connection_string: str) -> str:
    """The blob endpoint a connection string points at, if it is a local emulator; else ValueError.

    Seeding overwrites `claims`, `stays` and `imaging`: it must never reach a real account. The
    endpoint is the one the Azure SDK will use (`config.azure_connection`).
    """
    endpoint = blob_endpoints(connection_string).primary
    if not is_loopback_host(urlsplit(endpoint).hostname):
        raise ValueError(f"the connection string's blob endpoint {endpoint} is not on loopback (127.0.0.1): it names "
                         "an Azure account, not a local emulator")
    return endpoint
