"""The state store: what exists, what moved, what was proven (ARCHITECTURE.md §7, STYLE.md #11).

SQLAlchemy Core over SQLite in WAL mode by default (the caller passes `.exitplan/state.db` beside
the config); the same tables work on PostgreSQL when several workers share a run.

Objects move along `TRANSITIONS`, an explicit table of allowed state changes. A transition is
written *before* the side effect it announces (in_progress before the first byte moves), so a kill
at any line leaves a row that says what might have happened. A transition not in the table raises
`InvalidTransition`; the check and the write are one UPDATE (``WHERE state IN allowed``), so two
writers cannot both win.

One `objects` row per (run, dataset, source key): a run's rows are its history; the newest
uploaded/verified row of a key across runs, unless a newer row says that copy was deleted or found
wrong, is what a re-run compares against (`current_copy`).

A row may be inserted directly in a state one step from pending (`add_object(state=...)`): the
same as inserting it pending and moving it at once, in one statement. Writes whose loss is
harmless (a single PUT's "uploaded": a lost mark only means the object is copied again) can be
queued in a `WriteBatch` and committed many at a time; see its docstring for when that is allowed.

Resume: a multipart object's row carries the upload id, the 40-byte encryption header and the
data key id of its current attempt (all public: the header is written on the object, the key id in
its metadata; never key material), recorded with `record_upload` right after the upload is opened
and before any part is sent. The `parts` table holds the receipt of every part the destination
acknowledged (number, ETag, size, MD5), recorded after the acknowledgement; a part uploaded but not
recorded when the process died is found again with ListParts. `resumable` finds the row a killed
run left behind.

Completeness: `run_datasets` records which migrate and verify runs went through which datasets
(a migrate run, its whole source listing); the newest listing gone through defines what a dataset
must hold, and `dataset_status` puts each expected object in one category (completeness.py: the
one definition of "complete" that verify, restore, status and the flows use).

The package owns every table (schema.py, the audit manifest's `audit_recorded` included) and every
query (store.py; completeness.py for a dataset's status); the other modules ask `StateStore` and get
frozen records (records.py). Rows are built and checked in rows.py; batch.py queues the harmless
writes. A full disk, a read-only filesystem or a refused permission becomes `StateUnwritable` in
unwritable.py (for the database through the store's error hook, for the state directory's other
files around their writes with `writing_file`): one sentence, and `StateStore.unwritable` tells
the engine to stop.
"""

from .batch import WriteBatch
from .records import (COPIED_COPY, CurrentCopy, FAILED_PERMANENT, FAILED_TRANSIENT, FOUND_WRONG, NEVER_ARRIVED, NEVER_ATTEMPTED,
                      NOT_AT_DESTINATION, PENDING_COPY, STATUS_CATEGORIES, VERIFIED_COPY, CutoverRecord, DatasetFigures, counts_from_json, counts_to_json, DatasetStatus, DatasetTotals, FeedPosition, ListingRangeRecord,
                      ObjectRecord, ObjectStatus, PartRecord, RunDataset, RunRecord, ShardCounts, ShardRecord, StatusCount)
from .schema import (CHANGED, COPIED, FAILED, IN_PROGRESS, INITIAL_STATES, PENDING, REMOVED, STATES, TRANSITIONS,
                     UNCHANGED, UPLOADED, VERIFIED, VERIFY_REASON, InvalidTransition, audit_recorded, listing, listing_ranges,
                     metadata, objects, parts, run_datasets, runs, shards, utcnow)
from .store import StateStore
from .unwritable import StateUnwritable, writing_file

__all__ = [
    "CHANGED", "COPIED", "FAILED", "IN_PROGRESS", "INITIAL_STATES", "PENDING", "REMOVED", "STATES", "TRANSITIONS",
    "UNCHANGED", "UPLOADED", "VERIFIED", "VERIFY_REASON",
    "InvalidTransition", "utcnow",
    "metadata", "runs", "objects", "parts", "listing", "listing_ranges", "shards", "audit_recorded", "run_datasets",
    "CurrentCopy", "DatasetFigures", "DatasetTotals", "FeedPosition", "ListingRangeRecord", "ObjectRecord", "PartRecord", "RunRecord", "ShardCounts", "ShardRecord",
    "CutoverRecord", "counts_from_json", "counts_to_json", "DatasetStatus", "ObjectStatus", "RunDataset", "StatusCount",
    "VERIFIED_COPY", "COPIED_COPY", "FAILED_PERMANENT", "FAILED_TRANSIENT", "FOUND_WRONG", "PENDING_COPY",
    "NEVER_ATTEMPTED", "STATUS_CATEGORIES", "NEVER_ARRIVED", "NOT_AT_DESTINATION",
    "StateStore", "StateUnwritable", "WriteBatch", "writing_file",
]
