"""BlobStore on any S3 API (MinIO, AWS S3, Ceph RGW...) with the minio client.

Objects are named by their content address (lowercase sha256 hex). The key is known only
once every byte has been seen, so a put first spools the bytes to a local temporary file
(in memory up to SPOOL_IN_MEMORY, on disk beyond) while hashing them, then uploads them
under their final name. The alternative, streaming to a temporary object and
server-side copying it to its content name, sends every blob twice through the S3 cluster
and leaves temporary objects behind when we crash; blobs here are bounded by
max_message_size (25 MiB by default), so one local spool is the cheaper choice. The
upload is multipart above ``part_size`` (the minio client uploads parts in parallel), and
S3 makes an object visible only once its upload completed, so a key never holds a partial
blob.

Last-write time: S3 cannot touch an object, and Last-Modified has one-second precision.
Each object carries its last-write time in user metadata (x-amz-meta-mailgrid-written);
a put of existing bytes refreshes it with a server-side copy of the object onto itself
(metadata replaced), which sends no blob bytes.

Conditional delete (``not_written_since``): S3 has no "delete if not modified since", so
stat + delete is made atomic against puts of the same key within this process (striped
locks). Two metadata_svc processes sharing one bucket both run the garbage collector;
between one's stat and delete, a put by the other could be lost. deploy/README.md says to
run blob GC in one instance (blob_gc_interval 0 elsewhere) for that reason.

The minio client is synchronous: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.error import MinioException, S3Error, ServerError

from mailgrid.errors import InvalidArgument, MailgridError, NotFound, StorageFull, Unavailable
from mailgrid.grpcutil import CHUNK_SIZE
from metadata_svc.blobs_fs import is_blob_key
from metadata_svc.ports import BlobRef

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# S3's smallest multipart part (except the last one).
MIN_PART_SIZE = 5 * MiB
# Bytes of a put kept in memory before the spool moves to a temporary file.
SPOOL_IN_MEMORY = 8 * MiB
# User metadata holding the Unix time the blob was last written or refreshed.
WRITTEN_META = "mailgrid-written"
_WRITTEN_HEADER = f"x-amz-meta-{WRITTEN_META}"

# S3 error codes meaning "this store cannot take bytes now" (contract: StorageFull, which
# the mail system answers with a temporary 452 4.3.1).
_STORAGE_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "NoSuchBucket", "QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded",
    "XMinioBucketQuotaExceeded", "EntityTooLarge",
}
# S3 error codes meaning "try again later".
_UNAVAILABLE_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}

T = TypeVar("T")


@dataclass(frozen=True)
class S3Location:
    """What ``s3://ACCESS:SECRET@HOST:PORT/BUCKET?secure=false&region=R`` names."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    secure: bool = True
    region: str | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.hostname:
            raise ValueError(f"unsupported blob URL {_redacted(url)!r}: expected "
                             "s3://ACCESS:SECRET@HOST:PORT/BUCKET[?secure=false]")
        bucket = parts.path.strip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"blob URL {_redacted(url)!r} must name one bucket")
        query = parse_qs(parts.query)
        secure = query.get("secure", ["true"])[-1].lower() not in {"false", "0", "no"}
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        endpoint = f"{host}:{parts.port}" if parts.port else host
        return cls(endpoint=endpoint, bucket=bucket,
                   access_key=unquote(parts.username or ""),
                   secret_key=unquote(parts.password or ""), secure=secure,
                   region=query.get("region", [None])[-1])


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class S3BlobStore:
    """Content-addressed blobs in one S3 bucket (see module doc)."""

    def __init__(self, location: S3Location, *, part_size: int = 16 * MiB,
                 retries: int = 3, timeout: float = 30.0) -> None:
        if part_size < MIN_PART_SIZE:
            raise InvalidArgument(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.location = location
        self.bucket = location.bucket
        self.part_size = part_size
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
            maxsize=16,
            retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(location.endpoint, access_key=location.access_key,
                            secret_key=location.secret_key, secure=location.secure,
                            region=location.region, http_client=http)
        # Stripes of locks by key prefix: "refresh or upload" and "delete if stale" of one
        # key never interleave within this process.
        self._locks = [threading.Lock() for _ in range(256)]

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        return cls(S3Location.from_url(url))

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[int(key[:2], 16)]

    async def ensure_bucket(self) -> None:
        """Creates the bucket if it is missing (StorageFull if we may not)."""
        def ensure() -> None:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
                log.info("created S3 bucket %s on %s", self.bucket, self.location.endpoint)

        await self._call(ensure)

    async def put(self, chunks: AsyncIterable[bytes]) -> BlobRef:
        digest = hashlib.sha256()
        size = 0
        spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))  # noqa: SIM115
        try:
            async for chunk in chunks:
                if chunk:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(spool.write, chunk)
            key = digest.hexdigest()
            await self._call(self._store, spool, key, size)
        finally:
            await asyncio.to_thread(spool.close)
        return BlobRef(key, size)

    async def put_bytes(self, data: bytes) -> BlobRef:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put(one())

    async def put_many(self, blobs: Sequence[bytes]) -> list[BlobRef]:
        # Each object PUT is durable on its own in S3; concurrency is what saves time.
        return list(await asyncio.gather(*(self.put_bytes(data) for data in blobs)))

    async def open(self, key: str) -> AsyncIterator[bytes]:
        if not is_blob_key(key):
            raise NotFound(f"no blob {key!r}")
        response = await self._call(self.client.get_object, self.bucket, key)
        try:
            while chunk := await self._call(response.read, CHUNK_SIZE):
                yield chunk
        finally:
            await asyncio.to_thread(_release, response)

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self._read_whole(key) for key in keys)))

    async def _read_whole(self, key: str) -> bytes | None:
        try:
            return b"".join([chunk async for chunk in self.open(key)])
        except NotFound:
            return None

    async def exists(self, key: str) -> bool:
        if not is_blob_key(key):
            return False
        try:
            await self._call(self.client.stat_object, self.bucket, key)
        except NotFound:
            return False
        return True

    async def last_write(self, key: str) -> float:
        if not is_blob_key(key):
            raise NotFound(f"no blob {key!r}")
        return await self._call(self._last_write, key)

    async def delete(self, key: str, *, not_written_since: float | None = None) -> bool:
        if not is_blob_key(key):
            return False
        return await self._call(self._delete, key, not_written_since)

    async def set_last_write(self, key: str, when: float) -> None:
        """Rewrites the blob's last-write time (operators and tests; no bytes move)."""
        await self._call(self._copy_onto_itself, key, when)

    # blocking helpers, run in worker threads

    def _store(self, spool: BinaryIO, key: str, size: int) -> None:
        with self._lock(key):
            if self._stat(key) is not None:
                # Stored already: keep one copy, and tell the collector it is wanted.
                self._copy_onto_itself(key, time.time())
                return
            spool.seek(0)
            self.client.put_object(
                self.bucket, key, spool, size, part_size=self.part_size,
                metadata={WRITTEN_META: _format_time(time.time())})

    def _copy_onto_itself(self, key: str, when: float) -> None:
        # S3 refuses a copy onto itself unless something changes: the metadata does.
        self.client.copy_object(
            self.bucket, key, CopySource(self.bucket, key),
            metadata={WRITTEN_META: _format_time(when)}, metadata_directive=REPLACE)

    def _stat(self, key: str) -> Any:
        try:
            return self.client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in _MISSING_CODES:
                return None
            raise

    def _last_write(self, key: str) -> float:
        stat = self._stat(key)
        if stat is None:
            raise NotFound(f"no blob {key}")
        written = (stat.metadata or {}).get(_WRITTEN_HEADER)
        if written:
            return float(written)
        # Put by something else than this adapter: Last-Modified is what S3 knows.
        return float(stat.last_modified.timestamp()) if stat.last_modified else 0.0

    def _delete(self, key: str, not_written_since: float | None) -> bool:
        with self._lock(key):
            try:
                written = self._last_write(key)
            except NotFound:
                return False
            if not_written_since is not None and written >= not_written_since:
                return False
            self.client.remove_object(self.bucket, key)
            return True

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(func, *args)
        except MailgridError:
            raise
        except Exception as err:
            translated = self._translate(err)
            if translated is None:
                raise
            raise translated from err

    def _translate(self, err: Exception) -> MailgridError | None:
        where = f"S3 {self.location.endpoint}/{self.bucket}"
        if isinstance(err, S3Error):
            if err.code in _MISSING_CODES:
                return NotFound(f"no blob {err.object_name or ''}".rstrip())
            if err.code in _STORAGE_CODES:
                return StorageFull(f"storage full: {where} refuses writes: "
                                   f"{err.code}: {err.message}")
            if err.code in _UNAVAILABLE_CODES:
                return Unavailable(f"{where} is unavailable: {err.code}: {err.message}")
            return MailgridError(f"{where} failed: {err.code}: {err.message}")
        if isinstance(err, ServerError | MinioException | urllib3.exceptions.HTTPError
                      | OSError):
            return Unavailable(f"{where} is unreachable: {type(err).__name__}: {err}")
        return None


def _format_time(when: float) -> str:
    return f"{when:.6f}"


def _release(response: Any) -> None:
    response.close()
    response.release_conn()
