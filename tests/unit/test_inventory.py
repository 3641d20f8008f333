"""Inventory on in-memory listings: the figures, the misfits, and flat memory over a million entries."""

from __future__ import annotations

from datetime import datetime, timezone

from config.models import DatasetConfig
from connectors.base import ObjectMeta, SinkLimits
from engine.inventory import MAX_EXAMPLES, inventory_dataset
from tests.memwatch import PeakRSS

WHEN = datetime(2026, 1, 1, tzinfo=timezone.utc)


def synthetic_listing(n: int, prefix: str = ""):
    """A lister's output generated on the fly, as a paged SDK listing would stream it."""
    for i in range(n):
        yield ObjectMeta(
            key=f"{prefix}{i // 1000:04d}/claim-{i:07d}.csv",
            size=i % 5000,
            etag=f"0x{i:016X}",
            content_md5=None if i % 3 == 0 else b"\x00" * 16,
            last_modified=WHEN,
            tier="Cool" if i % 100 == 0 else "Hot",
        )


def test_figures_and_misfits():
    ds = DatasetConfig(source="az", container="c", prefix="in/", destination="d", dest_prefix="out/", exclude=("*.tmp",))
    long_key = "in/" + "é" * 600  # 600 characters, 1,200 UTF-8 bytes: fits Azure, not S3
    listing = [
        ObjectMeta("in/a.csv", 10, "e1", b"1" * 16, WHEN, "Hot"),
        ObjectMeta("in/b.csv", 300, "e2", None, WHEN, "Archive"),
        ObjectMeta("in/skip.tmp", 10**9, "e3", None, WHEN, "Hot"),
        ObjectMeta(long_key, 5, "e4", None, WHEN, "Cool"),
        ObjectMeta("in/meta.bin", 7, "e5", None, WHEN, "Hot", metadata={"note": "x" * 3000}),
    ]
    inv = inventory_dataset("claims", ds, listing, SinkLimits())
    assert (inv.objects, inv.bytes) == (4, 322)
    assert (inv.largest_key, inv.largest_size) == ("in/b.csv", 300)
    assert inv.without_md5 == 3
    assert inv.not_hot == 2
    assert inv.tiers == {"Hot": 2, "Archive": 1, "Cool": 1}
    assert inv.misfit_count == 2
    reasons = dict(inv.misfits)
    assert "1204 UTF-8 bytes" in reasons[long_key]  # 4 bytes of "out/" + 1,200
    assert "metadata" in reasons["in/meta.bin"]


def test_a_million_entries_in_flat_memory():
    ds = DatasetConfig(source="az", container="c", destination="d", dest_prefix="x" * 1015 + "/")
    with PeakRSS() as mem:
        inv = inventory_dataset("big", ds, synthetic_listing(1_000_000), SinkLimits())
    assert inv.objects == 1_000_000
    assert inv.without_md5 == 333_334
    assert inv.not_hot == 10_000
    # Every key is too long with that prefix; only MAX_EXAMPLES are kept.
    assert inv.misfit_count == 1_000_000 and len(inv.misfits) == MAX_EXAMPLES
    # A million ObjectMeta held at once would take hundreds of MB; streaming keeps growth tiny.
    assert mem.growth < 16 * 1024**2, f"RSS grew by {mem.growth} bytes"


def test_exitplans_own_metadata_counts_as_migrate_counts_it():
    """A blob whose metadata fits alone but not beside exitplan's own encryption metadata: inventory
    (with the format's metadata, as `exitplan inventory` passes it) says it will not fit, at
    2,048 bytes + 1, and that it fits at exactly 2,048, as migrate's placement decides."""
    from engine.crypto.tink_format import encrypted_metadata
    from engine.inventory import WIDEST_KEY_ID
    from engine.placement import metadata_bytes

    ds = DatasetConfig(source="az", container="c", destination="d")

    def blob(key: str, user_bytes: int) -> ObjectMeta:
        return ObjectMeta(key, 7, "e", None, WHEN, "Hot", metadata={"note": "x" * (user_bytes - len("note"))})

    def reserved(meta: ObjectMeta) -> dict[str, str]:
        return encrypted_metadata(WIDEST_KEY_ID, "claims", meta)

    own = metadata_bytes(reserved(blob("a.bin", 10)))
    assert own > 100  # format, key id, size, associated data
    listing = [blob("a.bin", 2048 - own), blob("b.bin", 2048 - own + 1), blob("c.bin", 1950)]
    without = inventory_dataset("claims", ds, listing, SinkLimits())
    assert without.misfit_count == 0  # what inventory said before: each fits alone
    inv = inventory_dataset("claims", ds, listing, SinkLimits(), reserved=reserved)
    assert [k for k, _ in inv.misfits] == ["b.bin", "c.bin"]
    assert "2049 bytes once encoded (exitplan's own included)" in dict(inv.misfits)["b.bin"]


def test_names_restore_cannot_write_as_files_are_named_up_front():
    """Issue 12, item 6: the one rule (`placement.restore_path`, `FileBesideDirectory`) applied by
    inventory before anything moves: markers counted; `//`, a `/`-ending blob with bytes and a file
    that other keys continue below are named, an ADLS marker beside its contents is not."""
    ds = DatasetConfig(source="az", container="c", prefix="in/", destination="d")
    folder = {"hdi_isfolder": "true"}
    listing = [
        ObjectMeta("in/a//b", 1, "e"),
        ObjectMeta("in/adls", 0, "e", metadata=folder),
        ObjectMeta("in/adls/f", 1, "e"),
        ObjectMeta("in/d", 0, "e"),
        ObjectMeta("in/d.txt", 1, "e"),
        ObjectMeta("in/d/file", 1, "e"),
        ObjectMeta("in/dir/", 0, "e"),
        ObjectMeta("in/full/", 3, "e"),
        ObjectMeta("in/z", 1, "e"),
    ]
    inv = inventory_dataset("claims", ds, listing, SinkLimits())
    assert inv.objects == 9 and inv.misfit_count == 0
    assert inv.directory_markers == 2  # in/adls, in/dir/
    reasons = dict(inv.unrestorable)
    assert set(reasons) == {"in/a//b", "in/d", "in/full/"}
    assert "empty segment" in reasons["in/a//b"]
    assert "'d/file' continues below that name" in reasons["in/d"]
    assert "holds 3 bytes" in reasons["in/full/"]


def test_a_file_beside_a_directory_is_found_with_bounded_memory():
    from engine.placement import FileBesideDirectory

    clashes = FileBesideDirectory()
    found = []
    for i in range(100_000):
        for key in (f"k{i:06d}", f"k{i:06d}.x", f"k{i:06d}/y" if i % 2 else f"k{i:06d}z"):
            found += [(k, below) for k, below in clashes.add(key, key, file=True) if below]
            assert len(clashes._held) <= 2
    found += [(k, below) for k, below in clashes.finish() if below]
    assert len(found) == 50_000 and found[0] == ("k000001", "k000001/y")


def test_blob_kinds_and_tiers_are_counted_and_archive_is_named_as_migrate_refuses_it():
    """Issue 12, item 4: page and append blobs counted as Hot; an Archive blob said to fit."""
    from connectors.azure_blob import ARCHIVED

    ds = DatasetConfig(source="az", container="c", destination="d")
    listing = [
        ObjectMeta("block.bin", 3, "e", tier="Hot", kind="block"),
        ObjectMeta("cool.bin", 3, "e", tier="Cool", kind="block"),
        ObjectMeta("disk.vhd", 1024, "e", kind="page"),
        ObjectMeta("log.txt", 5, "e", kind="append"),
        ObjectMeta("cold.bin", 3, "e", tier="Archive", kind="block", not_copyable=ARCHIVED),
    ]
    inv = inventory_dataset("claims", ds, listing, SinkLimits())
    assert inv.kinds == {"block": 3, "page": 1, "append": 1}
    assert inv.tiers == {"Hot": 1, "Cool": 1, "none": 2, "Archive": 1}
    assert inv.misfit_count == 1 and "Archive tier" in dict(inv.misfits)["cold.bin"]
