"""`exitplan status`: whether each dataset is complete, read from the state store alone.

One definition of "complete" (engine/state/completeness.py): every object the dataset's newest
complete source listing holds is at the destination and verified, and no newer migrate run stopped
part-way through the listing. Verify, restore and the flows report the same `DatasetStatus`.
Read-only: nothing is written, no state store is created, no source or destination is contacted.
"""

from __future__ import annotations

from config.errors import ExitCode, UserError
from config.models import LoadedConfig

from . import state as st
from .project import open_state, state_location

MAX_EXAMPLES = 20  # objects named per category


def dataset_statuses(loaded: LoadedConfig, datasets: list[str], *, prefix: str = "",
                     examples: int = MAX_EXAMPLES) -> list[st.DatasetStatus]:
    """The status of each of `datasets`; with `prefix` (below each dataset's own prefix, as
    `restore --prefix` takes it), only its objects under that prefix. No state yet is a `UserError`
    (exit 2)."""
    statuses = _read(loaded, datasets, prefix, examples)
    if statuses is None:
        raise UserError(f"no state at {state_location(loaded)}: nothing was migrated with this configuration yet; "
                        f"run `exitplan migrate --config {loaded.path}` first", ExitCode.USAGE)
    return statuses


def restore_shortfall(loaded: LoadedConfig, dataset: str, prefix: str = "",
                      examples: int = MAX_EXAMPLES) -> st.DatasetStatus | None:
    """What a restore of `dataset` (under `prefix`) cannot bring back because it never arrived at
    the destination, from the state store (None when there is no state: nothing is known of what
    should be there)."""
    statuses = _read(loaded, [dataset], prefix, examples)
    return statuses[0] if statuses else None


def _read(loaded: LoadedConfig, datasets: list[str], prefix: str, examples: int) -> list[st.DatasetStatus] | None:
    store = open_state(loaded, read_only=True)
    if store is None:
        return None
    try:
        return [store.dataset_status(name, prefix=loaded.config.datasets[name].prefix + prefix if prefix else "",
                                     examples=examples) for name in datasets]
    finally:
        store.close()
