"""What a NATS message cannot say about a deferred outbound job: its attempts, last error
and next attempt. Kept in a JetStream key-value bucket keyed by the job's OUTBOUND stream
sequence, written when a job is deferred and removed when it is settled.

It only counts and describes: losing an entry (a crash) costs an attempt count, never a
message, because the message itself stays in the OUTBOUND stream until it is acked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from mailgrid.errors import Unavailable

log = logging.getLogger(__name__)

BUCKET = "outbound_state"
# Entries outlive any job: a day more than the longest queue lifetime allowed.
EXTRA_TTL = 24 * 3600.0


@dataclass
class JobState:
    job_id: str
    attempts: int = 0
    last_error: str = ""
    next_attempt: float = 0.0  # Unix time
    # Recipients already delivered by an attempt whose job could not be settled yet.
    done: list[str] = field(default_factory=list)
    # A "delayed" notice went to the sender.
    warned: bool = False


def key_for(stream_seq: int) -> str:
    return f"s{stream_seq}"


class StateStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, max_lifetime: float) -> StateStore:
        """The bucket, created on first use (by whichever instance comes first)."""
        try:
            try:
                kv = await js.key_value(BUCKET)
            except BucketNotFoundError:
                kv = await js.create_key_value(bucket=BUCKET, history=1,
                                               ttl=max_lifetime + EXTRA_TTL)
        except Exception as err:  # nats raises several unrelated types here
            raise Unavailable(f"cannot open the {BUCKET} bucket: {err}") from err
        return cls(kv)

    async def get(self, stream_seq: int) -> JobState | None:
        try:
            entry = await self.kv.get(key_for(stream_seq))
        except KeyNotFoundError:
            return None
        except Exception as err:
            log.warning("cannot read outbound state of %d: %s", stream_seq, err)
            return None
        try:
            return JobState(**json.loads(entry.value or b"{}"))
        except (TypeError, ValueError):
            return None

    async def put(self, stream_seq: int, state: JobState) -> None:
        try:
            await self.kv.put(key_for(stream_seq), json.dumps(asdict(state)).encode())
        except Exception as err:  # only the description is lost
            log.warning("cannot record outbound state of %d: %s", stream_seq, err)

    async def delete(self, stream_seq: int) -> None:
        try:
            await self.kv.delete(key_for(stream_seq))
        except Exception as err:
            log.warning("cannot clear outbound state of %d: %s", stream_seq, err)
