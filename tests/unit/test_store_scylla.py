"""The parts of the ScyllaDB adapter that need no cluster: URLs, replication, the
statements it runs, and a cluster that cannot be reached."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailgrid.errors import Unavailable
from mailgrid.natsd import free_port
from metadata_svc import schema, store_scylla
from metadata_svc.store_scylla import ScyllaLocation, ScyllaMetadataStore, parse_replication


def test_url_names_hosts_port_keyspace_and_local_dc() -> None:
    assert ScyllaLocation.from_url("scylla://s1:9142,s2:9142/mail?dc=eu") == \
        ScyllaLocation(("s1", "s2"), 9142, "mail", "eu")
    assert ScyllaLocation.from_url("scylla://10.0.0.1/mail") == \
        ScyllaLocation(("10.0.0.1",), 9042, "mail", None)


@pytest.mark.parametrize("url", ["scylla://h1/", "scylla:///ks", "scylla://h1:1,h2:2/ks",
                                 "scylla://h1/bad-keyspace", "sqlite:///x"])
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        ScyllaLocation.from_url(url)


def test_replication_setting_becomes_keyspace_options() -> None:
    assert parse_replication("replication_factor=3") == {"replication_factor": 3}
    assert parse_replication("eu=3, us=2") == {"eu": 3, "us": 2}
    with pytest.raises(ValueError):
        parse_replication("three")


def test_every_statement_the_adapter_runs_is_generated() -> None:
    source = Path(store_scylla.__file__).read_text()
    used = set(re.findall(r'_run\(\s*"(\w+)"', source))
    used |= set(re.findall(r'\("(delete_\w+)", \(', source))
    used |= {f"{name}_after" for name in ("folder_page", "unread_page")}
    used |= {"folder_page", "unread_page"}
    generated = set(schema.cql_statements("ks"))
    assert used <= generated, used - generated
    assert "insert_delivery" in used and "set_used_bytes" in used


async def test_unreachable_cluster_raises_unavailable() -> None:
    location = ScyllaLocation(("127.0.0.1",), free_port(), "mailgrid")
    with pytest.raises(Unavailable):
        await ScyllaMetadataStore.open(location)
