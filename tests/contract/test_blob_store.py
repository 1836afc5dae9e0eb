"""The BlobStore contract (metadata_svc.ports.BlobStore), run against every adapter.

An adapter's test class supplies the ``blobs`` and ``unwritable_blobs`` fixtures and
inherits every test (James's BlobStoreDAOContract pattern).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailgrid.errors import NotFound, StorageFull, Unavailable
from mailgrid.natsd import free_port
from mailgrid.settings import Settings
from metadata_svc.backends import blob_store_for
from metadata_svc.blobs_fs import FileBlobStore, _makedirs
from metadata_svc.blobs_s3 import MIN_PART_SIZE, S3BlobStore, S3Location
from metadata_svc.ports import BlobStore

MiB = 1024 * 1024


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _read(blobs: BlobStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in blobs.open(key)])


class BlobStoreContract:
    @pytest.fixture
    def blobs(self) -> BlobStore:
        raise NotImplementedError

    @pytest.fixture
    def unwritable_blobs(self) -> BlobStore:
        """A store of this kind that cannot write (full, read-only or not creatable)."""
        raise NotImplementedError

    async def test_key_is_the_sha256_hex_of_the_bytes(self, blobs: BlobStore) -> None:
        ref = await blobs.put_bytes(b"hello")
        assert ref.key == hashlib.sha256(b"hello").hexdigest()
        assert ref.size == 5

    async def test_same_bytes_get_the_same_key_and_read_back(self, blobs: BlobStore) -> None:
        first = await blobs.put_bytes(b"same bytes")
        second = await blobs.put(_chunks(b"same bytes", 3))
        assert first == second
        assert await _read(blobs, first.key) == b"same bytes"

    async def test_put_many_stores_each_once_with_refs_in_order(self, blobs: BlobStore) -> None:
        existing = await blobs.put_bytes(b"already here")
        refs = await blobs.put_many([b"first", b"already here", b"second", b"first"])
        assert [r.key for r in refs] == [hashlib.sha256(d).hexdigest() for d in
                                         (b"first", b"already here", b"second", b"first")]
        assert refs[1] == existing and refs[0] == refs[3]
        assert [await _read(blobs, r.key) for r in refs] == [
            b"first", b"already here", b"second", b"first"]
        assert await blobs.put_many([]) == []

    async def test_big_blob_round_trips_in_chunks_of_at_most_one_mib(
            self, blobs: BlobStore) -> None:
        data = os.urandom(5 * MiB + 123)
        ref = await blobs.put(_chunks(data, 64 * 1024))
        assert ref.size == len(data)
        chunks = [chunk async for chunk in blobs.open(ref.key)]
        assert all(len(chunk) <= MiB for chunk in chunks)
        assert len(chunks) >= 6
        assert b"".join(chunks) == data

    async def test_empty_blob_is_stored(self, blobs: BlobStore) -> None:
        ref = await blobs.put_bytes(b"")
        assert ref.size == 0
        assert await _read(blobs, ref.key) == b""

    async def test_read_many_answers_each_in_order_and_none_for_missing(
            self, blobs: BlobStore) -> None:
        big = os.urandom(3 * MiB)
        small, large = await blobs.put_many([b"small", big])
        assert await blobs.read_many([large.key, "0" * 64, small.key, "bad key"]) == [
            big, None, b"small", None]

    async def test_reading_a_missing_key_raises_not_found(self, blobs: BlobStore) -> None:
        with pytest.raises(NotFound):
            await _read(blobs, "0" * 64)

    async def test_reading_a_malformed_key_raises_not_found(self, blobs: BlobStore) -> None:
        with pytest.raises(NotFound):
            await _read(blobs, "../../etc/passwd")

    async def test_exists_and_delete(self, blobs: BlobStore) -> None:
        ref = await blobs.put_bytes(b"to delete")
        assert await blobs.exists(ref.key)
        assert await blobs.delete(ref.key)
        assert not await blobs.exists(ref.key)
        assert not await blobs.delete(ref.key)
        with pytest.raises(NotFound):
            await _read(blobs, ref.key)

    async def test_delete_spares_a_blob_written_since_the_cutoff(
            self, blobs: BlobStore) -> None:
        ref = await blobs.put_bytes(b"fresh")
        cutoff = await blobs.last_write(ref.key)
        assert not await blobs.delete(ref.key, not_written_since=cutoff)
        assert await blobs.exists(ref.key)
        assert await blobs.delete(ref.key, not_written_since=cutoff + 1)

    async def test_putting_existing_bytes_refreshes_the_last_write(
            self, blobs: BlobStore) -> None:
        ref = await blobs.put_bytes(b"refreshed")
        await self.age(blobs, ref.key, 3600)
        old = await blobs.last_write(ref.key)
        await blobs.put_bytes(b"refreshed")
        assert await blobs.last_write(ref.key) > old

    async def test_unwritable_store_raises_storage_full(
            self, unwritable_blobs: BlobStore) -> None:
        with pytest.raises(StorageFull) as caught:
            await unwritable_blobs.put_bytes(b"nowhere to go")
        assert caught.value.detail.startswith("storage full")
        with pytest.raises(StorageFull) as caught:
            await unwritable_blobs.put_many([b"nowhere", b"to go"])
        assert caught.value.detail.startswith("storage full")

    async def age(self, blobs: BlobStore, key: str, seconds: float) -> None:
        """Makes the blob look last written ``seconds`` ago (adapter hook)."""
        raise NotImplementedError


class TestFileBlobStore(BlobStoreContract):
    @pytest.fixture
    def blobs(self, tmp_path: Path) -> FileBlobStore:
        return FileBlobStore(tmp_path / "blobs")

    @pytest.fixture
    def unwritable_blobs(self, tmp_path: Path) -> FileBlobStore:
        # Tests run as root, where a read-only mode does not stop writes; a root whose
        # parent is a regular file cannot be created by anyone (ENOTDIR).
        (tmp_path / "a-file").write_bytes(b"")
        return FileBlobStore(tmp_path / "a-file" / "blobs")

    async def age(self, blobs: BlobStore, key: str, seconds: float) -> None:
        assert isinstance(blobs, FileBlobStore)
        past = time.time() - seconds
        os.utime(blobs.path(key), (past, past))

    async def test_layout_is_two_levels_of_hash_prefix(self, blobs: FileBlobStore) -> None:
        ref = await blobs.put_bytes(b"layout")
        assert blobs.path(ref.key) == blobs.root / ref.key[:2] / ref.key[2:4] / ref.key
        assert blobs.path(ref.key).read_bytes() == b"layout"

    async def test_no_temp_files_are_left_behind(self, blobs: FileBlobStore) -> None:
        await blobs.put_bytes(b"one")
        await blobs.put_bytes(b"one")
        await blobs.put(_chunks(os.urandom(MiB), 4096))
        await blobs.put_many([b"one", b"two", os.urandom(MiB)])
        assert blobs.temp_files() == []

    async def test_directories_removed_by_hand_are_made_again(
            self, blobs: FileBlobStore) -> None:
        # The store remembers which fan-out directories it made; one removed under it
        # (an operator cleaning up) must not make later puts fail.
        first = await blobs.put_many([b"first"])
        shutil.rmtree(blobs.root)
        again = await blobs.put_many([b"first", b"second"])
        assert again[0] == first[0]
        for ref, data in zip(again, [b"first", b"second"], strict=True):
            assert blobs.path(ref.key).read_bytes() == data
        assert blobs.temp_files() == []

    def test_made_directories_name_each_parent_whose_entries_changed(
            self, tmp_path: Path) -> None:
        # Without syncfs these are the directories fsynced to make a rename durable.
        assert _makedirs(str(tmp_path / "ab" / "cd")) == [str(tmp_path),
                                                          str(tmp_path / "ab")]
        assert _makedirs(str(tmp_path / "ab" / "ce")) == [str(tmp_path / "ab")]
        assert _makedirs(str(tmp_path / "ab" / "ce")) == []
        assert (tmp_path / "ab" / "cd").is_dir() and (tmp_path / "ab" / "ce").is_dir()
        (tmp_path / "a-file").write_bytes(b"")
        with pytest.raises(NotADirectoryError):
            _makedirs(str(tmp_path / "a-file" / "ab"))

    async def test_a_failed_put_leaves_no_temp_file(self, blobs: FileBlobStore) -> None:
        async def broken() -> AsyncIterator[bytes]:
            yield b"partial"
            raise ConnectionError("client went away")

        with pytest.raises(ConnectionError):
            await blobs.put(broken())
        assert blobs.temp_files() == []


class TestS3BlobStore(BlobStoreContract):
    """The S3 adapter against a real S3-API server process (moto_server, see conftest)."""

    @pytest.fixture
    async def blobs(self, s3_server: str) -> S3BlobStore:
        store = _s3_store(s3_server, f"blobs-{uuid.uuid4().hex[:12]}")
        await store.ensure_bucket()
        return store

    @pytest.fixture
    def unwritable_blobs(self, s3_server: str) -> S3BlobStore:
        # A bucket that does not exist (and is not created) takes no bytes: NoSuchBucket.
        return _s3_store(s3_server, f"missing-{uuid.uuid4().hex[:12]}")

    async def age(self, blobs: BlobStore, key: str, seconds: float) -> None:
        assert isinstance(blobs, S3BlobStore)
        await blobs.set_last_write(key, time.time() - seconds)

    async def test_big_blob_is_uploaded_in_parts(self, blobs: S3BlobStore) -> None:
        data = os.urandom(MIN_PART_SIZE + 1)
        ref = await blobs.put(_chunks(data, 256 * 1024))
        stat = await asyncio.to_thread(blobs.client.stat_object, blobs.bucket, ref.key)
        # A multipart upload's ETag is "<md5 of part md5s>-<number of parts>".
        assert str(stat.etag).endswith("-2")
        assert await _read(blobs, ref.key) == data

    async def test_objects_are_named_by_content_only(self, blobs: S3BlobStore) -> None:
        first = await blobs.put_bytes(b"one")
        await blobs.put_bytes(b"one")
        second = await blobs.put(_chunks(b"two" * 1000, 7))
        names = await asyncio.to_thread(
            lambda: sorted(o.object_name for o in blobs.client.list_objects(blobs.bucket)))
        assert names == sorted([first.key, second.key])

    async def test_unreachable_server_raises_unavailable(self) -> None:
        store = _s3_store(f"127.0.0.1:{free_port()}", "nobody-listens")
        with pytest.raises(Unavailable):
            await store.put_bytes(b"lost?")
        with pytest.raises(Unavailable):
            await store.exists(hashlib.sha256(b"lost?").hexdigest())

    def test_blob_url_selects_the_adapter(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path,
                            blob_url="s3://AK:S%2FK@minio.internal:9000/mail?secure=false")
        store = blob_store_for(settings)
        assert isinstance(store, S3BlobStore)
        assert store.location == S3Location("minio.internal:9000", "mail", "AK", "S/K",
                                            secure=False)
        assert isinstance(blob_store_for(Settings(data_dir=tmp_path)), FileBlobStore)
        with pytest.raises(ValueError, match="one bucket"):
            S3Location.from_url("s3://AK:SK@host:9000/")


def _s3_store(endpoint: str, bucket: str) -> S3BlobStore:
    return S3BlobStore(S3Location(endpoint, bucket, "testing", "testing", secure=False),
                       part_size=MIN_PART_SIZE, retries=0)
