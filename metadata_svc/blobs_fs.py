"""BlobStore on a local filesystem: blobs/ab/cd/<sha256>, written to a temp file and renamed.

A blob is never written in place: bytes go to a temp file in the same filesystem, the
file is fsynced, renamed into place and its directory fsynced, so after a crash a key
holds either nothing or the whole blob. All file I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path

from mailgrid.errors import NotFound, StorageFull
from mailgrid.grpcutil import CHUNK_SIZE
from metadata_svc.ports import BlobRef

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{64}")
# Failures that mean "this store cannot take bytes now": the mail system answers with a
# temporary 452 4.3.1 (RFC 3463: insufficient system storage) and the sender retries.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.ENOTDIR}


def is_blob_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


class FileBlobStore:
    """Content-addressed blobs under ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        # Serializes "rename into place / refresh" against "delete if stale", so the
        # garbage collector never deletes bytes a put has just refreshed.
        self._lock = threading.Lock()
        self._root_name = os.fspath(root)
        # Directories known to exist (the temp dir and the fan-out ones): the store never
        # removes one, so each is made once instead of stat'ed for every blob; one
        # removed by hand is made again when a write into it fails.
        self._made: set[str] = set()
        self._temp_names = itertools.count()

    def path(self, key: str) -> Path:
        return Path(self._dest(key))

    def _dest(self, key: str) -> str:
        # Plain string joins: this runs for every blob of every batch.
        return f"{self._root_name}/{key[:2]}/{key[2:4]}/{key}"

    async def put(self, chunks: AsyncIterable[bytes]) -> BlobRef:
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = await asyncio.to_thread(self._create_temp)
        try:
            async for chunk in chunks:
                if chunk:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(_write_all, fd, chunk)
            await asyncio.to_thread(_fsync, fd)
        except BaseException:
            await asyncio.to_thread(_discard, fd, tmp_name)
            raise
        key = digest.hexdigest()
        await asyncio.to_thread(self._finish, fd, tmp_name, key)
        return BlobRef(key, size)

    async def put_bytes(self, data: bytes) -> BlobRef:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put(one())

    async def put_many(self, blobs: Sequence[bytes]) -> list[BlobRef]:
        if not blobs:
            return []
        return await asyncio.to_thread(self._put_many, blobs)

    async def open(self, key: str) -> AsyncIterator[bytes]:
        if not is_blob_key(key):
            raise NotFound(f"no blob {key!r}")
        try:
            file = await asyncio.to_thread(self.path(key).open, "rb")
        except FileNotFoundError:
            raise NotFound(f"no blob {key}") from None
        try:
            while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await asyncio.to_thread(lambda: [self._read_whole(key) for key in keys])

    def _read_whole(self, key: str) -> bytes | None:
        if not is_blob_key(key):
            return None
        try:
            with open(self._dest(key), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    async def exists(self, key: str) -> bool:
        return is_blob_key(key) and await asyncio.to_thread(self.path(key).is_file)

    async def last_write(self, key: str) -> float:
        if not is_blob_key(key):
            raise NotFound(f"no blob {key!r}")
        try:
            stat = await asyncio.to_thread(self.path(key).stat)
        except FileNotFoundError:
            raise NotFound(f"no blob {key}") from None
        return stat.st_mtime

    async def delete(self, key: str, *, not_written_since: float | None = None) -> bool:
        if not is_blob_key(key):
            return False
        return await asyncio.to_thread(self._delete, key, not_written_since)

    # blocking helpers, run in worker threads

    def _create_temp(self) -> tuple[int, str]:
        """A new temp file, named by process and counter (O_EXCL: never another's)."""
        tmp = os.fspath(self._tmp)
        try:
            if tmp not in self._made:
                self._make_parent(tmp)
            while True:
                name = f"{tmp}/put-{os.getpid()}-{next(self._temp_names)}"
                try:
                    return os.open(name, _TEMP_FLAGS, 0o600), name
                except FileExistsError:  # left by a crashed process with our pid
                    continue
                except FileNotFoundError:  # removed by hand: made again, then retried
                    self._make_parent(tmp)
                    return os.open(name, _TEMP_FLAGS, 0o600), name
        except OSError as err:
            raise _storage_error(err) from err

    def _finish(self, fd: int, tmp_name: str, key: str) -> None:
        try:
            os.close(fd)
            # The rename is durable only once its directory (and any new parents) is synced.
            for directory in self._rename_all([(tmp_name, key)]):
                _fsync_dir(directory)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise _storage_error(err) from err

    def _put_many(self, blobs: Sequence[bytes]) -> list[BlobRef]:
        """Group commit: every new blob is written to a temp file, then ONE filesystem
        sync makes them all durable, then they are renamed into place and one more sync
        makes the names durable. Two syncs for the batch instead of two per blob; a crash
        in between leaves only temp files (swept later), never a partial blob under a key."""
        refs = [BlobRef(hashlib.sha256(data).hexdigest(), len(data)) for data in blobs]
        written: list[tuple[str, str]] = []  # (temp file, key)
        try:
            for ref, data in dict(zip(refs, blobs, strict=True)).items():
                if self._refresh(ref.key):
                    continue
                fd, tmp_name = self._create_temp()
                written.append((tmp_name, ref.key))
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            if written:
                _sync_files(self.root, [name for name, _ in written])
                renamed = self._rename_all(written)
                written = []
                _sync_files(self.root, [], directories=renamed)
        except OSError as err:
            raise _storage_error(err) from err
        finally:
            for tmp_name, _ in written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return refs

    def _refresh(self, key: str) -> bool:
        """True if ``key`` is stored already (its last-write time is then refreshed)."""
        dest = self._dest(key)
        with self._lock:
            try:
                os.utime(dest)
            except FileNotFoundError:
                return False
        return True

    def _rename_all(self, written: list[tuple[str, str]]) -> set[str]:
        """Moves temp files into place; returns the directories whose entries changed."""
        changed: set[str] = set()
        with self._lock:
            for tmp_name, key in written:
                dest = self._dest(key)
                if os.path.exists(dest):
                    # Stored already (another put of the same bytes won the race): keep
                    # one copy, and tell the collector it is wanted.
                    os.unlink(tmp_name)
                    os.utime(dest)
                    continue
                parent = os.path.dirname(dest)
                if parent not in self._made:
                    changed.update(self._make_parent(parent))
                try:
                    os.rename(tmp_name, dest)
                except FileNotFoundError:
                    # The directory was removed under us (by hand): make it again.
                    changed.update(self._make_parent(parent))
                    os.rename(tmp_name, dest)
                changed.add(parent)
        return changed

    def _make_parent(self, parent: str) -> list[str]:
        made = _makedirs(parent)
        self._made.add(parent)
        return made

    def _delete(self, key: str, not_written_since: float | None) -> bool:
        dest = self.path(key)
        with self._lock:
            try:
                if not_written_since is not None and dest.stat().st_mtime >= not_written_since:
                    return False
                dest.unlink()
            except FileNotFoundError:
                return False
        _fsync_dir(dest.parent)
        return True

    def temp_files(self) -> list[Path]:
        """Temp files of puts in progress (or left by a crash); for tests and operators."""
        return list(self._tmp.iterdir()) if self._tmp.is_dir() else []

    def remove_stale_temp_files(self, older_than: float = 24 * 3600.0) -> int:
        """Deletes temp files a crash left behind; returns how many."""
        cutoff = time.time() - older_than
        removed = 0
        for path in self.temp_files():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as err:
        raise _storage_error(err) from err


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        raise _storage_error(err) from err


def _sync_files(root: Path, files: list[str], directories: Iterable[str] = ()) -> None:
    """Makes ``files`` and ``directories`` durable: one syncfs(2) of the filesystem under
    ``root`` where Linux offers it (flushes every dirty page and inode there at once),
    else an fsync of each."""
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        return
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in directories:
        _fsync_dir(directory)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return syncfs


_syncfs = _load_syncfs()


def _discard(fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def _makedirs(directory: str) -> list[str]:
    """Creates ``directory`` and missing parents; returns the parents of the directories
    it made (whose entries changed). A mkdir first: most calls make one new fan-out
    directory under an existing one."""
    try:
        os.mkdir(directory)
    except FileExistsError:
        return []
    except FileNotFoundError:
        parent = os.path.dirname(directory) or "."
        if parent == directory:
            raise
        made = _makedirs(parent)
        try:
            os.mkdir(directory)
        except FileExistsError:  # made meanwhile by another put
            return made
        return [*made, parent]
    return [os.path.dirname(directory) or "."]


def _fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(err: OSError) -> Exception:
    if err.errno in _STORAGE_ERRNOS:
        return StorageFull(f"storage full: cannot write blob: {err.strerror}")
    return err
