"""The CLI's progress line: a re-run with nothing to copy reaches 100% (unchanged objects have gone
through), the listing pass that gives the totals says so, and the ETA never guesses from nothing."""

from __future__ import annotations

import io

from flows.progress import ProgressDisplay

MiB = 1024 * 1024


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_a_rerun_with_nothing_to_copy_is_complete_not_stuck_at_zero():
    out = io.StringIO()
    display = ProgressDisplay(out)
    display.start("claims", 12, 7 * MiB)
    display.update(0, 12, 0, bytes_skipped=7 * MiB, objects_skipped=12, force=True)
    last = lines(out)[-1]
    assert "7.0 MiB / 7.0 MiB (100%)" in last and "12/12 objects (12 unchanged)" in last, last
    assert "ETA 0:00:00" in last, last


def test_part_copied_part_unchanged_counts_both_and_rates_only_the_copy():
    out = io.StringIO()
    display = ProgressDisplay(out)
    display.start("claims", 10, 10 * MiB)
    display.update(2 * MiB, 6, 1, bytes_skipped=4 * MiB, objects_skipped=4, force=True)
    last = lines(out)[-1]
    assert "6.0 MiB / 10.0 MiB (60%)" in last and "6/10 objects (4 unchanged), 1 failed" in last, last


def test_the_counting_pass_beside_the_copy_shows_its_figures_then_the_totals():
    out = io.StringIO()
    display = ProgressDisplay(out)
    display.interval = 0
    display.start("scans", -1, -1)
    display.counting("scans", 3000, 3 * MiB)
    display.update(MiB, 1000, 0)
    assert lines(out)[-1].endswith("counting: 3,000 objects, 3.0 MiB so far"), lines(out)
    display.counted("scans", 4000, 4 * MiB)
    display.update(2 * MiB, 2000, 0)
    assert lines(out)[-2] == "scans: 4,000 objects, 4.0 MiB to go through"
    assert "2.0 MiB / 4.0 MiB (50%)" in lines(out)[-1] and "2,000/4,000 objects" in lines(out)[-1]


def test_a_restore_counts_objects_of_those_expected_and_puts_a_failure_on_its_own_line():
    from flows.progress import RestoreDisplay

    out = io.StringIO()
    display = RestoreDisplay("claims", 4, out)
    display.interval = 0  # every update shown
    display.object_done(True, 3 * MiB)
    display.note("failed   claims/b.csv: the SHA-256 differs")
    display.object_done(False, 0)
    assert lines(out)[0] == "claims: restoring (4 objects expected)"
    assert lines(out)[1].startswith("claims: 1 of 4 objects restored, 3.0 MiB (") and "ETA" in lines(out)[1]
    assert lines(out)[2] == "failed   claims/b.csv: the SHA-256 differs"
    assert lines(out)[3].startswith("claims: 2 of 4 objects restored, 3.0 MiB (") and "1 failed" in lines(out)[3]
    unknown = io.StringIO()
    RestoreDisplay("claims", None, unknown)
    assert lines(unknown) == ["claims: restoring (what the destination holds)"]
