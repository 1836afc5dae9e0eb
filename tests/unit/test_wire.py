"""mailgrid.wire: the protobuf wire forms joined by hand are the generated ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgrid import wire
from mailgrid.v1 import delivery_pb2

RAW = delivery_pb2.InboundJob.RAW_FIELD_NUMBER


def a_job(raw: bytes = b"") -> delivery_pb2.InboundJob:
    job = delivery_pb2.InboundJob(queue_id="Q1", size=7, mail_from="a@example.net",
                                  rcpt_to=["b@example.test", "c@example.test"],
                                  client_address="192.0.2.1", helo="client.example",
                                  raw=raw)
    job.received_at.FromSeconds(1_764_000_000)
    return job


@pytest.mark.parametrize("sizes", [[], [0], [0, 0], [1], [127], [128], [60, 68],
                                   [16383, 1], [100, 102_400], [2_100_000]])
def test_a_bytes_field_added_to_a_message_is_the_generated_wire_form(
        sizes: list[int]) -> None:
    parts = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    joined = wire.with_bytes_field(a_job().SerializeToString(), RAW, *parts)
    expected = a_job(raw=b"".join(parts))
    assert delivery_pb2.InboundJob.FromString(joined) == expected
    # Byte for byte too: the field comes last in the generated form as well.
    assert joined == expected.SerializeToString()


@given(st.lists(st.binary(max_size=300), max_size=5))
def test_any_parts_read_back_as_their_join(parts: list[bytes]) -> None:
    joined = wire.with_bytes_field(a_job().SerializeToString(), RAW, *parts)
    assert delivery_pb2.InboundJob.FromString(joined).raw == b"".join(parts)
