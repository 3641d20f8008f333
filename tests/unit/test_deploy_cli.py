"""deploy/prefect.yaml against Prefect's own schema, and `exitplan deploy`'s refusals before it
reaches a server (the end-to-end run is tests/integration/test_deploy.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from config.errors import ExitCode
from flows import deploy_cli
from flows.cli import main

PREFECT_YAML = deploy_cli.REPO_ROOT / deploy_cli.PREFECT_FILE

LAB = {
    "version": 1,
    "project": "deploy-test",
    "sources": {"azurite": {"kind": "azure_blob", "connection_string_env": "EP_TEST_DEPLOY_CS", "emulator": "azurite"}},
    "destinations": {"lab-s3": {"provider": "lab", "endpoint_url": "${EP_TEST_S3:-http://127.0.0.1:5000}",
                                "region": "eu-west-3", "bucket": "${EP_TEST_BUCKET}"}},
    "datasets": {"claims": {"source": "azurite", "container": "claims", "destination": "lab-s3"}},
    "keys": {"kek": {"backend": "local"}},
}


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EP_TEST_BUCKET", "exitplan-lab")
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(LAB), encoding="utf-8")
    return path


def test_prefect_yaml_is_valid_for_prefect_and_names_the_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    import flows.orchestrate as orch

    raw = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    model = PrefectYamlModel.model_validate(raw)
    deployments = {d.name: d for d in model.deployments}
    assert list(deployments) == ["exit-plan", "nightly-delta", "shards", "cutover", "weekly-verify"]
    flows = {"exit-plan": orch.exit_plan, "nightly-delta": orch.migrate_flow, "shards": orch.copy_shards_flow,
             "cutover": orch.cutover_flow, "weekly-verify": orch.verify_flow}
    for name, d in deployments.items():
        path, _, func = d.entrypoint.partition(":")
        assert (deploy_cli.REPO_ROOT / path).is_file() and getattr(orch, func) is flows[name]
        assert d.work_pool.name == deploy_cli.DEFAULT_POOL
        if name != "shards":  # started by a run, with that run's parameters
            assert d.parameters["config_path"] == "{{ $EXITPLAN_CONFIG }}"  # no path or secret in the file
        assert set(d.parameters or {}) <= set(flows[name].parameters.properties)
    assert f"{orch.copy_shards_flow.name}/shards" == orch.SHARDS_DEPLOYMENT
    assert not deployments["shards"].parameters
    assert raw["deployments"][0]["schedules"] == []
    for name in ("nightly-delta", "weekly-verify"):
        (sched,) = raw["deployments"][[d["name"] for d in raw["deployments"]].index(name)]["schedules"]
        built = _schedule_config_to_deployment_schedule(sched)["schedule"]
        assert built.timezone == "Europe/Paris" and built.cron
        assert deployments[name].concurrency_limit.limit == 1
    assert deployments["cutover"].concurrency_limit.limit == 1 and not raw["deployments"][3]["schedules"]
    assert "datasets" not in deployments["cutover"].parameters  # asked for by the run form, every time
    assert deployments["weekly-verify"].parameters["deep"] is True
    assert 0 < deployments["weekly-verify"].parameters["sample"] < 1
    # The worker runs from the checkout recorded at deploy time by the build step.
    assert model.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}]
    assert model.build[0]["prefect.deployments.steps.run_shell_script"]["id"] == "checkout"


def test_a_bad_config_is_refused_first(tmp_path, capsys):
    assert main(["deploy", "--config", str(tmp_path / "missing.yaml")]) == ExitCode.USAGE
    assert "no such configuration file" in capsys.readouterr().err


def test_an_unknown_deployment_is_refused(config, capsys):
    assert main(["deploy", "--config", str(config), "--deployment", "hourly"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "no deployment named 'hourly'" in err and "exit-plan, nightly-delta, shards, cutover, weekly-verify" in err


def test_no_prefect_api_says_how_to_set_one(config, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy", "--config", str(config)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "PREFECT_API_URL" in err and 'eval "$(exitplan lab env)"' in err


def test_an_unreachable_prefect_api_is_named(config, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["deploy", "--config", str(config)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"the Prefect API at {url} does not answer" in err


def test_a_variable_name_that_may_be_a_pasted_secret_is_not_printed(config, monkeypatch, capsys):
    from config.loader import load_config

    token = "f3a91c0e7b2d4a6f8e1c3b5d7f9a2c4e"  # a valid name, not a usual one
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["destinations"]["lab-s3"]["credentials"] = {"access_key_id_env": token}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    deploy_cli._print_worker(load_config(config), "exitplan", "http://127.0.0.1:4200/api")
    out = capsys.readouterr().out
    assert token not in out
    assert "AWS_SECRET_ACCESS_KEY" in out and "1 name(s) that do not read like variable names" in out


def test_worker_env_names(config):
    from config.loader import load_config

    required, optional = deploy_cli.worker_env_names(load_config(config))
    # the destination's credentials default to the variables boto3 reads
    assert required == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "EP_TEST_BUCKET", "EP_TEST_DEPLOY_CS"]
    assert optional == ["EP_TEST_S3"]
