"""Every parameter of every flow a person can start has a description in the run form."""

from __future__ import annotations

import pytest

from flows.orchestrate import exit_plan, inventory_flow, migrate_flow, verify_flow


@pytest.mark.parametrize("flow", [exit_plan, inventory_flow, migrate_flow, verify_flow], ids=lambda f: f.name)
def test_every_parameter_is_described(flow):
    described = {name: (schema.get("description") or "").strip() for name, schema in flow.parameters.properties.items()}
    assert described and all(described.values()), {name: d for name, d in described.items() if not d}
