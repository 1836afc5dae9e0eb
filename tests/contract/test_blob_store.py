"""The BlobStore contract (metadata_svc.ports.BlobStore), run against every adapter.

An adapter's test class supplies the ``blobs`` and ``unwritable_blobs`` fixtures and
inherits every test (James's BlobStoreDAOContract pattern).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailgrid.errors import NotFound, StorageFull
from metadata_svc.blobs_fs import FileBlobStore
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
        assert blobs.temp_files() == []

    async def test_a_failed_put_leaves_no_temp_file(self, blobs: FileBlobStore) -> None:
        async def broken() -> AsyncIterator[bytes]:
            yield b"partial"
            raise ConnectionError("client went away")

        with pytest.raises(ConnectionError):
            await blobs.put(broken())
        assert blobs.temp_files() == []
