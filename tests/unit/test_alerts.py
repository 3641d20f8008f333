"""The alerts section: which Prefect automations `exitplan deploy` makes, and what they watch."""

from __future__ import annotations

from datetime import timedelta

import pytest

from config.errors import ConfigFileError
from config.loader import load_config
from config.models import AlertsConfig
from flows.alerts import DISCREPANCY_EVENT, alert_specs, discrepancy_event, project_resource
from tests.unit.test_config import variant, write

DEPLOYMENT = "11111111-2222-3333-4444-555555555555"


def test_each_alert_watches_the_project_and_its_deployments():
    specs = {s.what: s for s in alert_specs("hdh", AlertsConfig(notify="slack-webhook/ops",
                                                                running_longer_than_hours=12), [DEPLOYMENT])}
    assert all(s.wanted for s in specs.values()) and specs["run failed"].name("hdh") == "exitplan hdh: run failed"
    failed = specs["run failed"].trigger
    assert failed.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed.match_related["prefect.resource.id"] == [f"prefect.deployment.{DEPLOYMENT}"]
    late, long = specs["run late"].trigger, specs["run too long"].trigger
    assert late.after == {"prefect.flow-run.Late"} and "prefect.flow-run.Running" in late.expect
    assert late.within == timedelta(minutes=30) and late.posture.value == "Proactive"
    assert long.after == {"prefect.flow-run.Running"} and long.within == timedelta(hours=12)
    assert "prefect.flow-run.Completed" in long.expect and "prefect.flow-run.Failed" in long.expect
    assert specs["verify discrepancies"].trigger.expect == {DISCREPANCY_EVENT}
    assert specs["verify discrepancies"].trigger.match["prefect.resource.id"] in (project_resource("hdh"),
                                                                          [project_resource("hdh")])


def test_alerts_switched_off_are_not_wanted():
    specs = {s.what: s for s in alert_specs("hdh", AlertsConfig(notify="custom-webhook/x", on_failure=False,
                                                                late_after_minutes=None), [DEPLOYMENT])}
    assert not specs["run failed"].wanted and not specs["run late"].wanted
    assert not specs["run too long"].wanted  # off unless set
    assert specs["verify discrepancies"].wanted
    # Without an `alerts` section, none is wanted (deploy removes those an earlier one made).
    assert [(s.what, s.wanted) for s in alert_specs("hdh", None, [DEPLOYMENT])] == [
        (what, False) for what in ("run failed", "run late", "run too long", "verify discrepancies")]


@pytest.mark.parametrize("alerts, field", [
    ({"notify": "ops"}, "alerts.notify"),
    ({"notify": "slack-webhook/ops", "late_after_minutes": 0}, "alerts.late_after_minutes"),
    ({"notify": "slack-webhook/ops", "on_falure": True}, "alerts.on_falure"),
])
def test_alert_mistakes_are_config_errors(tmp_path, alerts, field):
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, variant(alerts=alerts)))
    assert field in str(info.value)


def test_a_verify_without_discrepancies_emits_nothing(monkeypatch):
    import prefect.events

    monkeypatch.setattr(prefect.events, "emit_event", lambda *a, **k: pytest.fail("emitted"))
    discrepancy_event("hdh", {"run_id": 1, "datasets": [{"dataset": "claims", "failed": 0}]})
