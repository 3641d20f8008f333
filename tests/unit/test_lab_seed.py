"""lab/seed: deterministic, covers the edge cases it promises, and writes what it lists."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from typing import Iterable, Mapping

import pytest

from connectors.base import ContentSettings
from lab import seed as lab_seed
from lab.seed import MiB, UploadMode


def _fingerprint(objs) -> list[tuple]:
    return [(o.container, o.name, o.size, o.digests().sha256, o.upload.value, o.metadata_items, o.tier)
            for o in objs]


def test_same_profile_same_names_sizes_and_bytes():
    assert _fingerprint(lab_seed.expected_objects("tiny")) == _fingerprint(lab_seed.expected_objects("tiny"))


def test_deterministic_across_processes_and_hash_seeds():
    # A second interpreter with another PYTHONHASHSEED: catches any use of hash(), time or
    # unseeded randomness that a same-process comparison would miss.
    code = (
        "import json; from lab import seed as s;"
        "print(json.dumps([[o.container, o.name, o.size, o.digests().sha256] for o in s.expected_objects('tiny')]))"
    )
    runs = []
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    here = [[o.container, o.name, o.size, o.digests().sha256] for o in lab_seed.expected_objects("tiny")]
    assert runs[0] == runs[1] == here


def test_standard_names_and_sizes_are_stable():
    a = [(o.container, o.name, o.size) for o in lab_seed.expected_objects("standard")]
    b = [(o.container, o.name, o.size) for o in lab_seed.expected_objects("standard")]
    assert a == b


def test_tiny_profile_is_small_but_has_the_edges():
    objs = lab_seed.expected_objects("tiny")
    sizes = {o.size for o in objs}
    assert {0, 5 * MiB - 1, 5 * MiB, 5 * MiB + 1, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1} <= sizes
    assert max(sizes) <= 8 * MiB + 1
    assert len(objs) < 100


def test_standard_profile_shape():
    objs = lab_seed.expected_objects("standard")
    by = {s.container: s for s in lab_seed.summarize(objs)}
    assert by["claims"].blobs >= 1000
    assert max(o.size for o in objs) >= 300 * MiB
    assert sum(s.bytes for s in by.values()) <= 1024 * MiB
    assert {16 * MiB - 1, 16 * MiB, 16 * MiB + 1} <= {o.size for o in objs}
    assert any(o.name.count("/") >= 4 and "region=île-de-france" in o.name for o in objs)


@pytest.mark.parametrize("profile", ["tiny", "standard"])
def test_every_container_has_both_upload_modes_and_the_tricky_names(profile):
    objs = lab_seed.expected_objects(profile)
    for container in lab_seed.CONTAINERS:
        modes = {o.upload for o in objs if o.container == container}
        assert modes == {UploadMode.SINGLE, UploadMode.BLOCKS}, container
    names = " ".join(o.name for o in objs)
    for fragment in (" ", "é", "ü", "日本", "🚑", "%", "+", "#"):
        assert fragment in names, fragment
    assert [o for o in objs if o.tier == "Cool"]
    assert all(o.size <= lab_seed.SINGLE_SHOT_MAX for o in objs if o.upload is UploadMode.SINGLE)


def test_metadata_fits_azure_headers():
    objs = lab_seed.expected_objects("tiny")
    values = [v for o in objs for v in o.metadata.values()]
    assert any(not v.isascii() for v in values)  # "hôpital" is there
    for o in objs:
        for k, v in o.metadata.items():
            assert k.isidentifier() and k.isascii(), k
            v.encode("latin-1")  # what the SDK sends; raises if a value would not survive


def test_ranges_and_chunks_agree_with_the_whole():
    obj = next(o for o in lab_seed.expected_objects("tiny") if o.size == 5 * MiB + 1)
    whole = obj.read()
    assert len(whole) == obj.size and whole[128:132] == b"DICM"
    assert b"".join(obj.chunks(1_000_003)) == whole
    for start, end in ((0, 10), (100, 400), (300, 70_000), (obj.size - 17, obj.size), (5, 5)):
        assert obj.read_range(start, end) == whole[start:end]
    assert obj.digests().md5 == hashlib.md5(whole).digest()


def test_small_dicom_is_a_prefix_of_its_header():
    assert lab_seed.DicomLikeBinary("x", 0).read_range(0, 10) == b""
    one = lab_seed.DicomLikeBinary("x", 1)
    assert one.read_range(0, 1) == b"\0" and one.total_size() == 1


def test_stays_are_readable_parquet():
    pq = pytest.importorskip("pyarrow.parquet")
    stays = [o for o in lab_seed.expected_objects("tiny") if o.container == "stays"]
    for o in stays:
        table = pq.read_table(io.BytesIO(o.read()))
        assert "stay_id" in table.column_names
        assert (table.num_rows == 0) == o.name.endswith("empty-table.parquet")


def test_claims_csv_is_utf8_with_a_header():
    obj = next(o for o in lab_seed.expected_objects("tiny") if o.container == "claims" and o.size)
    text = obj.read().decode("utf-8")
    assert text.startswith("claim_id,") and text.endswith("\n")


def test_emulator_endpoint_only_on_loopback():
    ok = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=eA==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    assert lab_seed.emulator_blob_endpoint(ok) == "http://127.0.0.1:10000/devstoreaccount1"
    assert lab_seed.emulator_blob_endpoint("UseDevelopmentStorage=true").startswith("http://127.0.0.1:10000")
    with pytest.raises(ValueError, match="prod"):
        lab_seed.emulator_blob_endpoint("DefaultEndpointsProtocol=https;AccountName=prod;AccountKey=eA==;EndpointSuffix=core.windows.net")
    with pytest.raises(ValueError, match="loopback"):
        lab_seed.emulator_blob_endpoint("AccountName=a;AccountKey=eA==;BlobEndpoint=https://a.blob.core.windows.net")


class RecordingWriter:
    """A SeedWriter that keeps what it is given, to check `seed` without a server."""

    def __init__(self):
        self.containers: set[str] = set()
        self.blobs: dict[tuple[str, str], dict] = {}
        self.tiers: dict[tuple[str, str], str] = {}

    def ensure_container(self, container: str) -> None:
        self.containers.add(container)

    def put_single(self, container, name, body: bytes, content: ContentSettings, metadata: Mapping[str, str], md5: bytes):
        assert hashlib.md5(body).digest() == md5
        self.blobs[(container, name)] = {"body": body, "md5": md5, "meta": dict(metadata)}
        self.tiers.pop((container, name), None)  # an overwrite resets the tier, as on Azure

    def put_blocks(self, container, name, chunks: Iterable[bytes], content, metadata) -> int:
        parts = list(chunks)
        assert all(len(p) <= lab_seed.BLOCK_SIZE for p in parts)
        body = b"".join(parts)
        self.blobs[(container, name)] = {"body": body, "md5": None, "meta": dict(metadata)}
        self.tiers.pop((container, name), None)
        return len(body)

    def set_tier(self, container, name, tier) -> None:
        assert (container, name) in self.blobs, "tier set before the blob was written"
        self.tiers[(container, name)] = tier


def test_seed_writes_every_listed_object_the_listed_way():
    objs = lab_seed.expected_objects("tiny")
    writer = RecordingWriter()
    summaries = lab_seed.seed(writer, objs, workers=4)
    assert writer.containers == set(lab_seed.CONTAINERS)
    assert set(writer.blobs) == {(o.container, o.name) for o in objs}
    for o in objs:
        got = writer.blobs[(o.container, o.name)]
        assert hashlib.sha256(got["body"]).hexdigest() == o.digests().sha256
        assert (got["md5"] is not None) == (o.upload is UploadMode.SINGLE)
        assert got["meta"] == o.metadata
    assert writer.tiers == {(o.container, o.name): o.tier for o in objs if o.tier}
    assert summaries == lab_seed.summarize(objs)


def test_seed_raises_the_first_failure():
    class Failing(RecordingWriter):
        def put_single(self, container, name, *a, **k):
            if name.endswith(".dcm"):
                raise RuntimeError("boom")
            return super().put_single(container, name, *a, **k)

    with pytest.raises(RuntimeError, match="boom"):
        lab_seed.seed(Failing(), lab_seed.expected_objects("tiny"), workers=2)


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="tiny, standard, bench"):
        lab_seed.expected_objects("huge")


def test_the_commands_offer_every_seed_profile():
    # The CLI's `--profile` choices come from config.lab (the CLI does not import the seed).
    from config.lab import SEED_PROFILES
    from flows.cli import build_parser

    assert SEED_PROFILES == tuple(lab_seed.PROFILES)
    parser = build_parser()
    for command in (["lab", "seed"], ["demo"]):
        for name in SEED_PROFILES:
            assert parser.parse_args([*command, "--profile", name]).profile == name
