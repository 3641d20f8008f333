"""Alerts: the Prefect automations `exitplan deploy` makes from the configuration's `alerts` section.

A nightly delta that fails, a run no worker picks up, a run that hangs, a verify that finds copies
differing from what was recorded: each is an automation on the Prefect server that sends to the
notification block the operator names (`alerts.notify`, `<block-type-slug>/<block-name>`), so
nobody has to watch the UI. They are named `exitplan <project>: <what>`; `deploy` creates them,
updates them to the configuration on every deploy, and deletes the ones switched off.

What they watch:
- `run failed`: `prefect.flow-run.Failed` / `Crashed` of a run of the project's deployments (not the
  `shards` deployment: a failed shard fails the run that started it, which alerts once);
- `run late`: a run Prefect marked Late that has not started `late_after_minutes` later;
- `run too long`: a run still running `running_longer_than_hours` after it started;
- `verify discrepancies`: the `exitplan.verify.discrepancies` event the verify and exit-plan flows
  emit when a destination copy differs from what was recorded (`discrepancy_event`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from config.errors import ConfigFileError
from config.models import AlertsConfig, LoadedConfig

DISCREPANCY_EVENT = "exitplan.verify.discrepancies"
FLOW_RUN_ENDS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                 "prefect.flow-run.Cancelled")
# The text of every notification: what happened, to which run, where to look (Prefect's templates).
_RUN_BODY = ("{{ flow_run.name }} ({{ deployment.name }}): {{ flow_run.state.name }}"
             "{% if flow_run.state.message %}: {{ flow_run.state.message }}{% endif %}\n{{ flow_run|ui_url }}")


def project_resource(project: str) -> str:
    """The Prefect event resource id of an exitplan project (what its own events are about)."""
    return f"exitplan.project.{project}"


@dataclass(frozen=True)
class AlertSpec:
    """One automation: its name's last words, whether the configuration wants it, and (when it does)
    its trigger and the notification's subject and body."""

    what: str
    wanted: bool
    trigger: Any = None
    subject: str = ""
    body: str = ""

    def name(self, project: str) -> str:
        return f"exitplan {project}: {self.what}"


# Every alert exitplan knows, by the last words of its name.
ALERTS = ("run failed", "run late", "run too long", "verify discrepancies")


def alert_specs(project: str, alerts: AlertsConfig | None, run_deployments: list[str]) -> list[AlertSpec]:
    """Every alert exitplan knows, for `project` whose runs come from the deployments `run_deployments`
    (ids), each wanted or not by `alerts` (a trigger only for the wanted ones; none without an
    `alerts` section)."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    if alerts is None:
        return [AlertSpec(what, False) for what in ALERTS]

    of_deployments = {"prefect.resource.role": "deployment",
                      "prefect.resource.id": [f"prefect.deployment.{d}" for d in run_deployments]}
    late, long = alerts.late_after_minutes, alerts.running_longer_than_hours

    def not_over(after: str, expect: set[str], within: timedelta):
        """Fires when a run had `after` and none of `expect` followed within `within`."""
        return EventTrigger(after={after}, expect=expect, for_each={"prefect.resource.id"},
                            match_related=of_deployments, posture=Posture.Proactive, threshold=1, within=within)

    specs = [AlertSpec("run failed", False) if not alerts.on_failure else AlertSpec(
        "run failed", True,
        EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, match_related=of_deployments,
                     posture=Posture.Reactive, threshold=1),
        f"exitplan {project}: run failed", _RUN_BODY)]
    specs.append(AlertSpec("run late", False) if late is None else AlertSpec(
        "run late", True, not_over("prefect.flow-run.Late", {"prefect.flow-run.Running", *FLOW_RUN_ENDS},
                                   timedelta(minutes=late)),
        f"exitplan {project}: run not started",
        f"{{{{ flow_run.name }}}} has not started {late:g} min after Prefect marked it late: is a worker running "
        "on its pool?\n{{ flow_run|ui_url }}"))
    specs.append(AlertSpec("run too long", False) if long is None else AlertSpec(
        "run too long", True, not_over("prefect.flow-run.Running", set(FLOW_RUN_ENDS), timedelta(hours=long)),
        f"exitplan {project}: run still running",
        f"{{{{ flow_run.name }}}} is still running {long:g} h after it started\n{{{{ flow_run|ui_url }}}}"))
    specs.append(AlertSpec("verify discrepancies", False) if not alerts.on_discrepancies else AlertSpec(
        "verify discrepancies", True,
        EventTrigger(expect={DISCREPANCY_EVENT}, match={"prefect.resource.id": project_resource(project)},
                     posture=Posture.Reactive, threshold=1),
        f"exitplan {project}: verify found discrepancies",
        "{{ event.payload.discrepancies }} object(s) at the destination differ from what was recorded "
        "({{ event.payload.datasets }}); see the run's discrepancies table"))
    return specs


def notification_block_id(alerts: AlertsConfig, loaded: LoadedConfig):
    """The id of the notification block `alerts.notify` names; `ConfigFileError` when the server has
    no such block."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, _, name = alerts.notify.partition("/")
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(name, slug, include_secrets=False).id
        except ObjectNotFound:
            raise ConfigFileError(
                f"{loaded.path}: field `alerts.notify`: the Prefect server has no block {alerts.notify!r} (type "
                f"{slug!r}, name {name!r}); create it first (in the UI: Blocks, or `prefect block create {slug}`), "
                "then deploy again") from None


def ensure_alerts(loaded: LoadedConfig, run_deployments: list[str]) -> list[str]:
    """Create or update the wanted automations of the project and delete the unwanted ones; the
    lines saying what was done."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    project = loaded.config.project
    alerts = loaded.config.alerts
    specs = alert_specs(project, alerts, run_deployments)
    block_id = notification_block_id(alerts, loaded) if alerts else None
    lines = []
    with get_client(sync_client=True) as client:
        for spec in specs:
            existing = client.read_automations_by_name(spec.name(project))
            if not spec.wanted:
                for automation in existing:
                    client.delete_automation(automation.id)
                    lines.append(f"alert removed: {spec.name(project)}")
                continue
            automation = AutomationCore(
                name=spec.name(project), description=f"exitplan alert for project {project}: {spec.what}",
                enabled=True, trigger=spec.trigger,
                actions=[SendNotification(block_document_id=block_id, subject=spec.subject, body=spec.body)])
            if existing:
                client.update_automation(existing[0].id, automation)
                for extra in existing[1:]:
                    client.delete_automation(extra.id)
            else:
                client.create_automation(automation)
            lines.append(f"alert: {spec.name(project)} -> {alerts.notify}")
    return lines


def discrepancy_event(project: str, checked: dict[str, Any]) -> None:
    """Emit `exitplan.verify.discrepancies` (about the project, with the counts) when verify found
    destination copies that differ from what was recorded; nothing otherwise."""
    failed = {d["dataset"]: d["failed"] for d in checked["datasets"] if d.get("failed")}
    if not failed:
        return
    from prefect.events import emit_event

    emit_event(DISCREPANCY_EVENT, resource={"prefect.resource.id": project_resource(project),
                                            "prefect.resource.name": project},
               payload={"discrepancies": sum(failed.values()), "datasets": ", ".join(sorted(failed)),
                        "run_id": checked.get("run_id")})
