"""The dry run of a migration (`exitplan migrate --dry-run`): what would be written, per object and
per dataset, with nothing written anywhere."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from config.models import LoadedConfig
from connectors.base import ConnectorError

from .endpoints import close_endpoint, destination_limits, open_source
from .errors import RunError, call_endpoint
from .key_copies import check_keysets
from .crypto.segments import SegmentLayout
from .crypto.tink_format import TINK_LAYOUT
from .dataset_copy import DryRunSummary, PlannedObject, dry_run, place_all, plan_sized_object
from .estimate import Estimate, PlanTally, SizedWrite, estimate, terms_for
from .inventory import selected
from .listing import dataset_listing
from .output_format import IDENTITY, OutputFormat
from .planning import PlanRefused
from .project import open_state
from .run import output_formats, placer, transfer_settings


def plan(loaded: LoadedConfig, datasets: list[str], on_object: Callable[[str, PlannedObject], None], *,
         tallies: list[PlanTally] | None = None) -> list[DryRunSummary]:
    """What `migrate` would write, per dataset, touching nothing: the state store is only read (if
    it exists), and of the destination only its keyset copies, refused (exit 4) as `migrate` would
    refuse them. The keyset is unwrapped (a read), so a dry run also proves the KEK works.
    `tallies`, when given, receives each dataset's `PlanTally` (what the estimate is made of)."""
    formats = output_formats(loaded, datasets)
    check_keysets(loaded, [n for n in datasets if formats[n] is not IDENTITY])
    settings = transfer_settings(loaded)
    state = open_state(loaded, read_only=True)
    results = []
    try:
        for name in datasets:
            ds = loaded.config.datasets[name]
            source = call_endpoint(f"dataset `{name}`: source", open_source, loaded, name)
            limits = destination_limits(loaded, ds.destination)
            shown = partial(on_object, name)
            if tallies is not None:
                tally = PlanTally(name, partial(_planned_size, limits=limits, settings=settings, output_format=formats[name]))
                tallies.append(tally)
                shown = partial(_counted, tally, shown)
            try:
                listing = dataset_listing(loaded, name, source)
                summary = dry_run(name, place_all(selected(listing, ds), placer(loaded, name, limits, formats[name])),
                                  limits, settings, output_format=formats[name], state=state, on_object=shown)
                summary = replace(summary, listed_from=listing.origin, not_copied=dict(listing.not_copied))
                results.append(summary)
            except ConnectorError as exc:
                raise RunError(f"dataset `{name}`: listing {source.label}: {exc}", exc) from None
            finally:
                close_endpoint(source, f"dataset `{name}`: source")
    finally:
        if state is not None:
            state.close()
    return results


def _counted(tally: PlanTally, on_object: Callable[[PlannedObject], None], planned: PlannedObject) -> None:
    tally.add(planned)
    on_object(planned)


def _planned_size(size: int, *, limits, settings, output_format: OutputFormat) -> SizedWrite | None:
    """How an object of `size` bytes would be written (an Archive-tier one: once rehydrated; None:
    it would not fit anyway)."""
    try:
        planned = plan_sized_object(size, limits, settings, output_format)
    except PlanRefused:
        return None
    return SizedWrite(planned.output_size, planned.part_count, planned.single_put)


@dataclass(frozen=True)
class _Layout:
    """An output format's layout without its keys: enough to plan parts (`plan_sized_object`)."""

    layout: SegmentLayout
    copies: bool


def size_planner(loaded: LoadedConfig, name: str) -> Callable[[int], SizedWrite | None]:
    """How dataset `name` would write an object of a given size, known without unwrapping a key
    (the output format's layout is fixed): the report's estimate plans the state's listing with it."""
    fmt = IDENTITY if loaded.config.datasets[name].public else _Layout(TINK_LAYOUT, copies=True)
    return partial(_planned_size, limits=destination_limits(loaded, loaded.config.datasets[name].destination),
                   settings=transfer_settings(loaded), output_format=fmt)


def plan_with_estimate(loaded: LoadedConfig, datasets: list[str], on_object: Callable[[str, PlannedObject], None]
                       ) -> tuple[list[DryRunSummary], Estimate]:
    """`plan`, and the estimate of its duration and cost (`engine.estimate`), priced at the
    configuration's terms and the last measured run's throughput."""
    tallies: list[PlanTally] = []
    summaries = plan(loaded, datasets, on_object, tallies=tallies)
    state = open_state(loaded, read_only=True)
    try:
        runs = state.recent_runs(limit=30) if state is not None else []
    finally:
        if state is not None:
            state.close()
    return summaries, estimate(tallies, terms_for(loaded, datasets, runs))
