from __future__ import annotations

import uuid

import pytest

from mailgrid import ids


def test_timeuuids_sort_by_creation_with_the_time_sort_key() -> None:
    made = [ids.new_timeuuid() for _ in range(2000)]
    assert sorted(made, key=ids.time_sort_key) == made
    assert len(set(made)) == len(made)


def test_timeuuid_is_version_one_and_round_trips() -> None:
    value = ids.new_timeuuid()
    assert value.version == 1
    assert ids.parse_timeuuid(str(value)) == value


def test_timeuuid_carries_its_time() -> None:
    value = ids.new_timeuuid(at=1_700_000_000.5)
    assert ids.unix_time(value) == pytest.approx(1_700_000_000.5, abs=1e-6)


@pytest.mark.parametrize("text", ["nope", str(uuid.uuid4()), ""])
def test_parse_timeuuid_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        ids.parse_timeuuid(text)
