"""Connections per provider across runs: one Prefect global concurrency limit per provider.

A limit is named `exitplan-provider-<provider>` and holds `orchestration.provider_connections`
(or `default_provider_connections`) slots. `exitplan deploy` and every migration flow create or
update it; a migration flow then takes as many slots as it opens connections to the provider
(`strict=True`: a missing limit is an error, not a silent pass), so several runs at once never
exceed the configured number.
"""

from __future__ import annotations

from config.models import LoadedConfig


def provider_limit_name(provider: str) -> str:
    """The name of the Prefect global concurrency limit of `provider`."""
    return f"exitplan-provider-{provider}"


def provider_limits(loaded: LoadedConfig, datasets: list[str]) -> dict[str, int]:
    """provider -> the connection limit the configuration sets for it (for the datasets' destinations)."""
    orch = loaded.config.orchestration
    providers = {loaded.config.destinations[loaded.config.datasets[d].destination].provider for d in datasets}
    return {p: orch.provider_connections.get(p, orch.default_provider_connections) for p in sorted(providers)}


def ensure_provider_limits(limits: dict[str, int]) -> None:
    """Create (or update) the Prefect global concurrency limit of each provider."""
    from prefect.client.orchestration import get_client  # prefect only when a server is asked

    with get_client(sync_client=True) as client:
        for provider, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(provider_limit_name(provider), limit)
