"""Backend selection by URL settings only.

blob_url: ``file:///PATH`` (or empty: data_dir/blobs) → FileBlobStore; ``s3://...`` →
S3BlobStore. metadata_db_url: ``sqlite:///PATH`` (or empty) → SQLiteMetadataStore;
``scylla://...`` → ScyllaMetadataStore (scylla-driver imported only then).
"""

from __future__ import annotations

import asyncio

from mailgrid.errors import StorageFull
from mailgrid.settings import Settings
from metadata_svc.blobs_fs import FileBlobStore
from metadata_svc.blobs_s3 import S3BlobStore
from metadata_svc.ports import BlobStore, MetadataStore
from metadata_svc.store_sqlite import SQLiteMetadataStore


def blob_store_for(settings: Settings) -> BlobStore:
    """The blob store ``settings.blob_url`` names (nothing is contacted yet)."""
    if settings.blob_url.startswith("s3://"):
        return S3BlobStore.from_url(settings.blob_url)
    return FileBlobStore(settings.blob_dir)


def describe_blob_store(blobs: BlobStore) -> str:
    """Where the blobs live, for logs (no credentials)."""
    if isinstance(blobs, S3BlobStore):
        return f"s3://{blobs.location.endpoint}/{blobs.bucket}"
    if isinstance(blobs, FileBlobStore):
        return str(blobs.root)
    return type(blobs).__name__


async def prepare_blob_store(blobs: BlobStore) -> None:
    """Creates the directory or bucket; StorageFull if it cannot be created."""
    if isinstance(blobs, S3BlobStore):
        await blobs.ensure_bucket()
    elif isinstance(blobs, FileBlobStore):
        try:
            await asyncio.to_thread(blobs.root.mkdir, parents=True, exist_ok=True)
        except OSError as err:
            raise StorageFull(f"storage full: cannot create {blobs.root}: "
                              f"{err.strerror}") from err


async def open_metadata_store(settings: Settings) -> MetadataStore:
    """Opens the metadata store ``settings.metadata_db_url`` names (schema must exist on
    ScyllaDB: ``mailgrid migrate``; SQLite creates its own)."""
    if settings.metadata_db_url.startswith("scylla://"):
        from metadata_svc.store_scylla import ScyllaLocation, ScyllaMetadataStore

        return await ScyllaMetadataStore.open(
            ScyllaLocation.from_url(settings.metadata_db_url), settings.scylla_consistency)
    return await SQLiteMetadataStore.open(settings.metadata_db_path)


def describe_metadata_store(settings: Settings) -> str:
    if settings.metadata_db_url.startswith("scylla://"):
        return settings.metadata_db_url.split("?")[0]
    return str(settings.metadata_db_path)


async def migrate(settings: Settings) -> list[str]:
    """Creates or updates the metadata schema; returns what was run (for the CLI)."""
    if settings.metadata_db_url.startswith("scylla://"):
        from metadata_svc.store_scylla import ScyllaLocation, parse_replication
        from metadata_svc.store_scylla import migrate as migrate_scylla

        return await migrate_scylla(ScyllaLocation.from_url(settings.metadata_db_url),
                                    parse_replication(settings.scylla_replication))
    store = await SQLiteMetadataStore.open(settings.metadata_db_path)  # creates the tables
    await store.close()
    return [f"SQLite schema ready in {settings.metadata_db_path}"]
