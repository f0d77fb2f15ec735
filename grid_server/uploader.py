"""The uploader: closed files' new content to the grid, by a pool of workers, with failures kept as state.

The queue holds each local file at most once (queued again while waiting, it keeps its place), so it is bounded by
the local copies on disk, and a file is taken from it only when a worker is free. An upload makes a new immutable
file (CHK, or LIT when small), or publishes a new version to a mutable file's write cap. Content written again
during its upload is not taken as uploaded: its last close queues it again. A failed upload backs off (retries.py)
and is tried again by `retries`; who owns the content and what its new cap changes is the filesystem's, given as
callables.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from lafs_core.caps import Cap, MutableWriteCap
from lafs_core.grid.grid import Grid
from lafs_core.grid.mutable_io import overwrite
from lafs_core.grid.upload import file_chunks, upload_immutable

from .local_files import LocalFile
from .retry_timer import RetryTimer


class Uploader:
    """`wanted(local)`: whether the content is still to be uploaded (closed, changed, and reachable by a name);
    `mutable_cap(local)`: the write cap to publish it to, if a mutable file's; `uploaded(local, version, cap)`:
    the content of that version is on the grid at cap; `skipped()`: a queued file needed no upload after all;
    `find(file_id)`: the local file with that id, if it is still there."""

    def __init__(
        self,
        grid: Grid,
        workers: int,
        wanted: Callable[[LocalFile], bool],
        mutable_cap: Callable[[LocalFile], MutableWriteCap | None],
        uploaded: Callable[[LocalFile, int, Cap], None],
        skipped: Callable[[], None],
        find: Callable[[str], LocalFile | None],
    ) -> None:
        self.grid = grid
        self.workers = workers
        self._wanted, self._mutable_cap, self._uploaded, self._skipped, self._find = (
            wanted,
            mutable_cap,
            uploaded,
            skipped,
            find,
        )
        self._queue: dict[str, LocalFile] = {}  # by id, in the order queued
        self._queue_grew = trio.Event()
        self._locks: dict[str, trio.Lock] = {}  # one upload of a file at a time (a worker's, or an fsync's)
        self._uploading: set[str] = set()
        self.retries: RetryTimer[str] = RetryTimer(self._retry)

    def queue(self, local: LocalFile) -> None:
        if local.id not in self._queue:
            self._queue[local.id] = local
            self._queue_grew.set()
            self._queue_grew = trio.Event()

    def queued(self, file_id: str) -> bool:
        return file_id in self._queue

    def waiting(self) -> int:
        return len(self._queue)

    def in_flight(self) -> int:
        return len(self._uploading)

    def forget(self, file_id: str) -> None:
        """The local file is gone: nothing of it is left to upload, and no failure to show."""
        self._locks.pop(file_id, None)
        self.retries.failures.succeeded(file_id)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.retries.run)
            for _ in range(self.workers):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            while not self._queue:
                await self._queue_grew.wait()
            file_id = next(iter(self._queue))
            local = self._queue.pop(file_id)
            if self._wanted(local):
                await self.upload(local)
            else:
                self.retries.failures.succeeded(local.id)
                self._skipped()

    def _retry(self, file_id: str) -> None:
        local = self._find(file_id)
        if local is not None and local.dirty and local.writers == 0:
            self.queue(local)
        else:  # written again (its last close queues it) or gone
            self.retries.failures.succeeded(file_id)

    async def upload(self, local: LocalFile) -> None:
        """Upload the local file's current content, unless it is already on the grid or being uploaded (then wait
        for that upload). A failure is kept in `retries`, not raised."""
        async with self._locks.setdefault(local.id, trio.Lock()):
            if not local.dirty or local.fd < 0:
                return
            version, size = local.version, local.size
            mutable = self._mutable_cap(local)
            self._uploading.add(local.id)
            try:
                if mutable is not None:
                    data = await trio.to_thread.run_sync(local.pread, 0, size)
                    await overwrite(self.grid, mutable, data)
                    cap: Cap = mutable
                else:
                    cap = await upload_immutable(self.grid, size, file_chunks(local.path))
            except Exception as exc:  # a background upload must never take the mount down
                if local.version == version:  # (else changed under the upload: the next close uploads it again)
                    self.retries.failed(local.id, exc, "upload")
                return
            finally:
                self._uploading.discard(local.id)
            self.retries.failures.succeeded(local.id)
            if local.version == version:  # (else written again meanwhile: the next close uploads the newer content)
                self._uploaded(local, version, cap)
