"""deploy/compose.yaml names only settings that exist and runs only services that exist
(no Docker daemon runs here: this is what can be checked without one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mailgrid import services
from mailgrid.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _mailgrid_services() -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in _compose()["services"].items()
            if spec.get("command", [None])[0] == "mailgrid"}


def test_every_mailgrid_setting_in_the_compose_file_exists() -> None:
    for name, spec in _mailgrid_services().items():
        for variable in spec["environment"]:
            field = variable.removeprefix("MAILGRID_").lower()
            assert field in Settings.model_fields, f"{name}: {variable}"


def test_each_suite_service_runs_and_listens_on_all_interfaces() -> None:
    found = _mailgrid_services()
    for spec in services.SERVICES:
        assert found[spec.name]["command"] == ["mailgrid", "serve", spec.name]
        env = found[spec.name]["environment"]
        assert env[f"MAILGRID_{spec.grpc_setting.upper()}"].startswith("0.0.0.0:")


def test_stateless_services_run_several_instances_with_r3_streams() -> None:
    found = _mailgrid_services()
    for name in ("delivery", "search", "realtime", "gateway"):
        assert found[name]["deploy"]["replicas"] >= 2
    assert found["metadata"].get("deploy", {}).get("replicas", 1) == 1  # one SQLite writer
    env = found["gateway"]["environment"]
    assert env["MAILGRID_NATS_REPLICAS"] == "3"
    assert len(env["MAILGRID_NATS_URL"].split(",")) == 3
    assert env["MAILGRID_BLOB_URL"].startswith("s3://")
    assert env["MAILGRID_SEARCH_URL"].startswith("meilisearch://")
    # Every service talks to the others by the addresses the others listen on.
    for spec in services.SERVICES:
        setting = f"MAILGRID_{spec.grpc_setting.upper()}"
        port = found[spec.name]["environment"][setting].rpartition(":")[2]
        if spec.name != "gateway":
            assert env[setting] == f"{spec.name}:{port}"
