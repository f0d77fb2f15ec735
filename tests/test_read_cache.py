"""The read cache over real in-process local grids: right bytes always, only the segments needed, readahead,
LRU eviction under the size bound, persistence across restarts, and damaged cache files never served."""

import errno
import logging
import os
import random
import shutil
import stat

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grid_server.read_cache import CacheInUseError, ReadCache
from grid_server.read_cache_format import HEADER_SIZE, SLOT_SIZE
from lafs_core import base32
from lafs_core.caps import ChkCap, LiteralCap
from lafs_core.errors import NotEnoughSharesError
from lafs_core.grid.upload import bytes_chunks, upload_immutable

from .grid_helpers import local_grid

SEG = 60_000  # a multiple of k=3, so it is the segment size exactly
BIG = 10**9


def make_grid(root):
    grid = local_grid(root)
    grid.max_segment_size = SEG
    return grid


def upload(grid, data: bytes) -> ChkCap:
    cap = trio.run(upload_immutable, grid, len(data), bytes_chunks(data))
    assert isinstance(cap, ChkCap)
    return cap


def entry_files(directory, cap):
    stem = next(p.stem for p in directory.glob("*.meta") if p.stem.startswith(base32.encode(cap.storage_index)))
    return directory / f"{stem}.data", directory / f"{stem}.meta"


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x55
    path.write_bytes(bytes(raw))


async def wait_until(predicate, timeout=10):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def read_all(cache, cap, chunk=16 * 1024):
    out = bytearray()
    while len(out) < cap.size:
        out += await cache.read(cap, len(out), chunk)
    return bytes(out)


def gate_reads(grid, storage_index):
    """Make share reads of one file wait until the returned event is set (to hold a read in flight)."""
    gate = trio.Event()
    for server in grid.servers:
        original = server.read_immutable_share

        async def gated(si, shnum, offset, length, original=original):
            if si == storage_index and not gate.is_set():
                await gate.wait()
            return await original(si, shnum, offset, length)

        server.read_immutable_share = gated
    return gate


@pytest.fixture
def file10(tmp_path):
    """A grid holding a 10-segment file whose last segment is short."""
    grid = make_grid(tmp_path / "grid")
    data = random.Random(10).randbytes(9 * SEG + 12_345)
    return grid, upload(grid, data), data


# --- right bytes -------------------------------------------------------------------------------------------
SHARED_SIZE = 7 * SEG + 777


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    grid = make_grid(root / "grid")
    data = random.Random(7).randbytes(SHARED_SIZE)
    return root, grid, upload(grid, data), data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reads=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, SHARED_SIZE + 10)), st.integers(0, 3 * SEG)),
        min_size=1,
        max_size=10,
    ),
    max_bytes=st.sampled_from([0, SEG, 3 * SEG + 5, BIG]),
    readahead=st.sampled_from([0, SEG, 4 * SEG]),
)
def test_random_reads_return_the_plaintext(shared, reads, max_bytes, readahead):
    """Offsets None continue where the last read ended (sequential, so readahead runs); the cache directory
    is shared by all examples, so each starts from what earlier ones (with other limits) left behind."""
    root, grid, cap, data = shared

    async def main():
        async with ReadCache(root / "cache", grid, max_bytes, readahead_bytes=readahead) as cache:
            position = 0
            for offset, size in reads:
                offset = position if offset is None else offset
                assert await cache.read(cap, offset, size) == data[offset : offset + size]
                assert cache.cached_bytes() <= max_bytes
                position = offset + size
            await trio.sleep(0.01)  # let some readahead land before closing cancels the rest
            assert cache.cached_bytes() <= max_bytes

    trio.run(main)


def test_reads_clip_to_the_file_and_literal_caps_work(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG) as cache:
            assert await cache.read(cap, cap.size - 10, 1000) == data[-10:]
            assert await cache.read(cap, cap.size, 10) == b""
            assert await cache.read(cap, cap.size + 5, 10) == b""
            assert await cache.read(cap, 5, 0) == b""
            assert await cache.read(cap, 0, cap.size) == data
            assert await cache.read(LiteralCap(b"tiny file"), 2, 3) == b"ny "
            with pytest.raises(ValueError):
                await cache.read(cap, -1, 5)

    trio.run(main)


# --- only what is needed ---------------------------------------------------------------------------------
def test_fetches_only_the_segments_a_read_covers(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG) as cache:
            assert await cache.read(cap, 3 * SEG + 10, 100) == data[3 * SEG + 10 : 3 * SEG + 110]
            await cache.wait_idle()  # the disk write may finish after the read returned
            assert cache.cached_segments(cap) == [3]
            assert await cache.read(cap, 7 * SEG - 50, 100) == data[7 * SEG - 50 : 7 * SEG + 50]
            await cache.wait_idle()
            assert cache.cached_segments(cap) == [3, 6, 7]
            assert cache.stats.segments_fetched == 3
            assert cache.cached_bytes() == 3 * SEG
            assert await cache.read(cap, 3 * SEG, SEG) == data[3 * SEG : 4 * SEG]
            assert cache.stats.segments_fetched == 3  # served from disk
            assert cache.stats.disk_reads == 1

    trio.run(main)
    data_file, _meta = entry_files(tmp_path / "cache", cap)
    assert data_file.stat().st_blocks * 512 < 4 * SEG  # sparse: only three segments allocated


def test_concurrent_reads_of_a_segment_fetch_it_once(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG) as cache:
            results = {}

            async def one(i):  # no read starts where another ends: that would look sequential
                results[i] = await cache.read(cap, 5 * SEG + i * 1000, 500)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert all(results[i] == data[5 * SEG + i * 1000 : 5 * SEG + i * 1000 + 500] for i in range(8))
            assert cache.stats.segments_fetched == 1

    trio.run(main)


# --- readahead -------------------------------------------------------------------------------------------
def test_sequential_reads_trigger_readahead(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG, readahead_bytes=3 * SEG) as cache:
            assert await cache.read(cap, 0, 4096) == data[:4096]
            await trio.sleep(0.1)
            assert cache.cached_segments(cap) == [0]  # one read is not a pattern yet
            assert await cache.read(cap, 4096, 4096) == data[4096:8192]  # continues: sequential
            await wait_until(lambda: cache.cached_segments(cap) == [0, 1, 2, 3])
            await trio.sleep(0.1)
            assert cache.cached_segments(cap) == [0, 1, 2, 3]
            assert cache.stats.readahead_fetched == 3
            position = 8192
            while position < SEG + 10:  # crossing into segment 1 moves the window to 2..4
                assert await cache.read(cap, position, 16384) == data[position : position + 16384]
                position += 16384
            await wait_until(lambda: 4 in cache.cached_segments(cap))
            assert await cache.read(cap, 8 * SEG, 10) == data[8 * SEG : 8 * SEG + 10]  # a jump: no readahead
            await trio.sleep(0.1)
            assert cache.cached_segments(cap) == [0, 1, 2, 3, 4, 8]
            assert cache.stats.segments_fetched == 6  # each segment once, readahead or not

    trio.run(main)


def test_readahead_and_foreground_share_fetches(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG, readahead_bytes=4 * SEG) as cache:
            assert await read_all(cache, cap, chunk=5000) == data
            await trio.sleep(0.1)
            assert cache.stats.segments_fetched == 10
            assert cache.stats.readahead_fetched > 0

    trio.run(main)


# --- eviction --------------------------------------------------------------------------------------------
def test_eviction_keeps_the_bound_in_lru_order(tmp_path):
    grid = make_grid(tmp_path / "grid")
    files = {name: random.Random(name).randbytes(2 * SEG) for name in "ABCD"}
    caps = {name: upload(grid, data) for name, data in files.items()}
    directory = tmp_path / "cache"

    async def main():
        async with ReadCache(directory, grid, 6 * SEG) as cache:
            for name in "ABC":
                assert await cache.read(caps[name], 0, 2 * SEG) == files[name]
                await cache.wait_idle()
            assert await cache.read(caps["A"], 5, 5) == files["A"][5:10]  # A is now more recent than B
            assert await cache.read(caps["D"], 0, 2 * SEG) == files["D"]
            await cache.wait_idle()
            assert cache.cached_segments(caps["B"]) == []
            assert all(cache.cached_segments(caps[name]) == [0, 1] for name in "ACD")
            assert cache.cached_bytes() == 6 * SEG
            assert cache.stats.evicted_files == 1

    trio.run(main)
    stems = {p.name.split("-")[0] for p in directory.glob("*.data")}
    assert stems == {base32.encode(caps[name].storage_index) for name in "ACD"}


def test_a_file_with_a_read_in_flight_is_not_evicted(tmp_path):
    grid = make_grid(tmp_path / "grid")
    # A's shares are too big to be read whole when first opened, so its segment 1 needs share reads
    files = {name: random.Random(name).randbytes((8 if name == "A" else 2) * SEG) for name in "ACD"}
    caps = {name: upload(grid, data) for name, data in files.items()}

    async def main():
        async with ReadCache(tmp_path / "cache", grid, 4 * SEG) as cache:
            assert await cache.read(caps["A"], 0, 10) == files["A"][:10]
            assert await cache.read(caps["C"], 0, 2 * SEG) == files["C"]
            await cache.wait_idle()
            gate = gate_reads(grid, caps["A"].storage_index)
            got = {}

            async def slow_read():
                got["A"] = await cache.read(caps["A"], SEG, SEG)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_read)
                await trio.sleep(0.05)
                assert await cache.read(caps["C"], 0, 10) == files["C"][:10]  # A is least recent, but busy
                assert await cache.read(caps["D"], 0, 2 * SEG) == files["D"]
                await cache.wait_idle()
                assert cache.cached_segments(caps["A"]) == [0]
                assert cache.cached_segments(caps["C"]) == []
                gate.set()
            assert got["A"] == files["A"][SEG : 2 * SEG]
            await cache.wait_idle()
            assert cache.cached_segments(caps["A"]) == [0, 1]
            assert cache.cached_bytes() <= 4 * SEG

    trio.run(main)


def test_a_file_bigger_than_the_cache_streams_within_the_bound(tmp_path):
    grid = make_grid(tmp_path / "grid")
    data = random.Random(12).randbytes(12 * SEG)
    cap = upload(grid, data)

    async def main():
        async with ReadCache(tmp_path / "cache", grid, 4 * SEG, readahead_bytes=2 * SEG) as cache:
            out = bytearray()
            while len(out) < len(data):
                out += await cache.read(cap, len(out), 16 * 1024)
                assert cache.cached_bytes() <= 4 * SEG
            assert bytes(out) == data
            await trio.sleep(0.1)
            assert cache.stats.evicted_segments >= 8
            assert cache.stats.segments_fetched == 12  # what was read ahead was not evicted before its use
            assert cache.cached_segments(cap)[-1] == 11

    trio.run(main)
    data_file, _meta = entry_files(tmp_path / "cache", cap)
    assert data_file.stat().st_size == len(data)
    assert data_file.stat().st_blocks * 512 <= 4 * SEG + 64 * 1024  # holes punched for evicted segments


def test_max_bytes_zero_caches_nothing_on_disk(file10, tmp_path):
    grid, cap, data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, 0, readahead_bytes=2 * SEG) as cache:
            assert await read_all(cache, cap) == data
            assert await cache.read(cap, 3 * SEG, 100) == data[3 * SEG : 3 * SEG + 100]
            assert cache.cached_bytes() == 0
            assert cache.stats.segments_fetched == 10  # the memory buffer still saves refetching
            assert cache.stats.memory_reads > 10

    trio.run(main)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["lock"]


def test_a_smaller_limit_at_start_up_evicts_least_recently_read(tmp_path):
    grid = make_grid(tmp_path / "grid")
    files = {name: random.Random(name).randbytes(2 * SEG) for name in "AB"}
    caps = {name: upload(grid, data) for name, data in files.items()}
    directory = tmp_path / "cache"

    async def fill():
        async with ReadCache(directory, grid, BIG) as cache:
            for name in "AB":
                await cache.read(caps[name], 0, 2 * SEG)
                await cache.wait_idle()
            await trio.sleep(0.01)
            await cache.read(caps["A"], 0, 10)

    async def reopen():
        async with ReadCache(directory, grid, 3 * SEG) as cache:
            assert cache.cached_segments(caps["A"]) == [0, 1]
            assert cache.cached_segments(caps["B"]) == []
            assert cache.cached_bytes() == 2 * SEG

    trio.run(fill)
    trio.run(reopen)


# --- persistence and damage ------------------------------------------------------------------------------
def cache_whole_file(directory, grid, cap, data):
    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            assert await cache.read(cap, 0, cap.size) == data

    trio.run(main)


def test_content_survives_a_restart_without_the_grid(file10, tmp_path):
    grid, cap, data = file10
    other = upload(grid, b"not cached" * 10_000)
    cache_whole_file(tmp_path / "cache", grid, cap, data)
    shutil.rmtree(tmp_path / "grid")
    empty = make_grid(tmp_path / "empty")

    async def main():
        async with ReadCache(tmp_path / "cache", empty, BIG) as cache:
            assert cache.cached_segments(cap) == list(range(10))
            assert cache.cached_bytes() == len(data)
            assert await read_all(cache, cap, chunk=7000) == data
            assert await cache.read(cap, 0, cap.size) == data
            assert cache.stats.segments_fetched == 0
            with pytest.raises(NotEnoughSharesError):
                await cache.read(other, 0, 10)

    trio.run(main)


def test_damaged_slots_and_truncated_data_read_as_absent(file10, tmp_path):
    grid, cap, data = file10
    directory = tmp_path / "cache"
    cache_whole_file(directory, grid, cap, data)
    data_file, meta_file = entry_files(directory, cap)
    flip(meta_file, HEADER_SIZE + 2 * SLOT_SIZE + 5)  # a digest byte of segment 2
    flip(meta_file, HEADER_SIZE + 4 * SLOT_SIZE + SLOT_SIZE - 1)  # the check of segment 4
    raw = bytearray(meta_file.read_bytes())
    raw[HEADER_SIZE + 6 * SLOT_SIZE + 20 : HEADER_SIZE + 7 * SLOT_SIZE] = bytes(SLOT_SIZE - 20)  # torn slot 6
    meta_file.write_bytes(bytes(raw))
    os.truncate(data_file, 8 * SEG + 100)  # segment 8 only partly there, 9 not at all

    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            assert cache.cached_segments(cap) == [0, 1, 3, 5, 7]
            assert await cache.read(cap, 0, cap.size) == data
            await cache.wait_idle()
            assert cache.stats.segments_fetched == 5
            assert cache.cached_segments(cap) == list(range(10))

    trio.run(main)


def test_damaged_data_is_refetched_or_refused_never_served(file10, tmp_path, caplog):
    grid, cap, data = file10
    directory = tmp_path / "cache"
    cache_whole_file(directory, grid, cap, data)
    data_file, _meta = entry_files(directory, cap)
    flip(data_file, SEG + 1234)  # inside segment 1
    with open(data_file, "r+b") as f:  # segment 3 lost to a crash: a hole where its slot says data is
        f.seek(3 * SEG)
        f.write(bytes(SEG))

    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            assert cache.cached_segments(cap) == list(range(10))
            assert await cache.read(cap, SEG + 1000, 500) == data[SEG + 1000 : SEG + 1500]
            assert await cache.read(cap, 3 * SEG + 5, 10) == data[3 * SEG + 5 : 3 * SEG + 15]
            assert cache.stats.discarded_segments == 2
            assert cache.stats.segments_fetched == 2
            assert await cache.read(cap, 0, cap.size) == data

    with caplog.at_level(logging.INFO):
        trio.run(main)
    assert "damaged" in caplog.text
    key = base32.encode(cap.key)
    assert key not in caplog.text and cap.to_string() not in caplog.text

    # and with the grid gone, a damaged segment is an error, not wrong bytes
    flip(data_file, 5 * SEG + 1)
    empty = make_grid(tmp_path / "empty")

    async def offline():
        async with ReadCache(directory, empty, BIG) as cache:
            assert await cache.read(cap, 4 * SEG, 100) == data[4 * SEG : 4 * SEG + 100]
            with pytest.raises(NotEnoughSharesError):
                await cache.read(cap, 5 * SEG + 10, 10)
            assert await cache.read(cap, 6 * SEG, SEG) == data[6 * SEG : 7 * SEG]

    trio.run(offline)


def test_bad_headers_and_stray_files_are_discarded(file10, tmp_path):
    grid, cap, data = file10
    directory = tmp_path / "cache"
    second = random.Random(2).randbytes(3 * SEG)
    cap2 = upload(grid, second)

    async def fill():
        async with ReadCache(directory, grid, BIG) as cache:
            assert await cache.read(cap, 0, cap.size) == data
            assert await cache.read(cap2, 0, cap2.size) == second

    trio.run(fill)
    _data_file, meta_file = entry_files(directory, cap)
    data2, meta2 = entry_files(directory, cap2)
    flip(meta_file, 30)  # inside the header (the UEB hash)
    os.replace(data2, data2.with_name("aaaa-bbbb.data"))  # an entry under a name its header does not match
    os.replace(meta2, meta2.with_name("aaaa-bbbb.meta"))
    (directory / "zzzz-orphan.data").write_bytes(b"x" * 100)
    (directory / "junk-junk.meta").write_bytes(os.urandom(500))

    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            assert cache.cached_bytes() == 0
            assert cache.cached_segments(cap) == []
            assert sorted(p.name for p in directory.iterdir()) == ["lock"]
            assert await cache.read(cap, 100, 200) == data[100:300]
            assert await cache.read(cap2, 0, cap2.size) == second

    trio.run(main)


# --- files, names, permissions, management ---------------------------------------------------------------
def test_directory_and_files_are_private_and_named_by_storage_index(file10, tmp_path):
    grid, cap, data = file10
    directory = tmp_path / "private" / "blackmatch" / "cache"
    directory.parent.mkdir(parents=True)
    directory.mkdir(mode=0o755)
    old = os.umask(0)
    try:
        cache_whole_file(directory, grid, cap, data)
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = [p.name for p in directory.iterdir()]
    assert len(names) == 3
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data_file, _meta_file = entry_files(directory, cap)
    assert data_file.name.startswith(base32.encode(cap.storage_index))
    key = base32.encode(cap.key)
    assert not any(key in name or key[:10] in name for name in names)


def test_drop_and_clear(file10, tmp_path):
    grid, cap, data = file10
    other_data = random.Random(3).randbytes(2 * SEG)
    other = upload(grid, other_data)
    directory = tmp_path / "cache"

    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            await cache.read(cap, 0, cap.size)
            await cache.read(other, 0, other.size)
            await cache.wait_idle()
            cache.drop(cap)
            assert cache.cached_segments(cap) == []
            assert cache.cached_bytes() == 2 * SEG
            assert len(list(directory.glob("*.data"))) == 1
            assert await cache.read(cap, 5, 10) == data[5:15]
            await cache.wait_idle()
            assert cache.cached_segments(cap) == [0]
            cache.clear()
            assert cache.cached_bytes() == 0
            assert sorted(p.name for p in directory.iterdir()) == ["lock"]
            assert await cache.read(other, SEG, 10) == other_data[SEG : SEG + 10]

    trio.run(main)


def test_drop_during_a_read_in_flight(file10, tmp_path):
    grid, cap, data = file10
    directory = tmp_path / "cache"

    async def main():
        async with ReadCache(directory, grid, BIG) as cache:
            await cache.read(cap, 0, 10)
            gate = gate_reads(grid, cap.storage_index)
            got = {}

            async def slow_read():
                got["x"] = await cache.read(cap, 0, 2 * SEG)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_read)
                await trio.sleep(0.05)
                cache.drop(cap)
                gate.set()
            assert got["x"] == data[: 2 * SEG]
            assert cache.cached_bytes() == 0
            assert await cache.read(cap, SEG, SEG) == data[SEG : 2 * SEG]
            assert await cache.read(cap, 0, cap.size) == data

    trio.run(main)


def test_one_cache_per_directory(file10, tmp_path):
    grid, _cap, _data = file10

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG):
            with pytest.raises(CacheInUseError):
                async with ReadCache(tmp_path / "cache", grid, BIG):
                    pass
        async with ReadCache(tmp_path / "cache", grid, BIG):
            pass

    trio.run(main)


def test_open_files_stay_bounded(tmp_path):
    grid = make_grid(tmp_path / "grid")
    files = [random.Random(i).randbytes(SEG + 1 + i) for i in range(6)]
    caps = [upload(grid, data) for data in files]

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG, max_open_files=2) as cache:
            for cap, data in zip(caps, files, strict=True):
                assert await cache.read(cap, 0, cap.size) == data
                assert len(cache._open) <= 2
            for cap, data in zip(caps, files, strict=True):  # reopened from disk on demand
                assert await cache.read(cap, SEG - 5, 10) == data[SEG - 5 : SEG + 5]
            assert cache.stats.segments_fetched == 12

    trio.run(main)


def test_unrecoverable_file_is_an_error_and_recovers_later(file10, tmp_path):
    grid, cap, data = file10
    stash = tmp_path / "stash"
    shutil.move(tmp_path / "grid", stash)

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG) as cache:
            with pytest.raises(NotEnoughSharesError):
                await cache.read(cap, 0, 10)
            failures = []

            async def one(i):  # concurrent readers of one segment: each fails (none waits forever)
                try:
                    await cache.read(cap, i * 100, 50)
                except NotEnoughSharesError as exc:
                    failures.append(exc)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(5):
                        nursery.start_soon(one, i)
            assert len(failures) == 5
            shutil.move(stash, tmp_path / "grid")
            assert await cache.read(cap, 0, 10) == data[:10]  # shares are looked for again

    trio.run(main)


def test_refetching_a_segment_does_not_blame_good_shares(tmp_path):
    """A segment fetched again (here: pushed out of the memory buffer) must not look like truncated shares."""
    grid = make_grid(tmp_path / "grid")
    files = [random.Random(i).randbytes(8 * SEG) for i in range(2)]
    caps = [upload(grid, data) for data in files]

    async def main():
        async with ReadCache(tmp_path / "cache", grid, 0, memory_bytes=SEG) as cache:
            for _ in range(5):
                for cap, data in zip(caps, files, strict=True):
                    assert await cache.read(cap, 3 * SEG + 7, 100) == data[3 * SEG + 7 : 3 * SEG + 107]
            assert cache.stats.segments_fetched == 10

    trio.run(main)
    assert list(tmp_path.glob("grid/server-*/corruption-advisories/*")) == []


def test_write_errors_fall_back_to_memory(file10, tmp_path, monkeypatch):
    grid, cap, data = file10
    import grid_server.read_cache_fetcher as module

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "write_segment", full)

    async def main():
        async with ReadCache(tmp_path / "cache", grid, BIG) as cache:
            assert await cache.read(cap, 0, cap.size) == data
            await cache.wait_idle()
            assert cache.cached_bytes() == 0
            assert cache.cached_segments(cap) == []

    trio.run(main)


def test_accounting_adds_up_through_concurrent_reads_eviction_and_drops(tmp_path):
    grid = make_grid(tmp_path / "grid")
    files = [random.Random(20 + i).randbytes((3 + 2 * i) * SEG + i) for i in range(3)]
    caps = [upload(grid, data) for data in files]

    async def main():
        async with ReadCache(tmp_path / "cache", grid, 4 * SEG, readahead_bytes=2 * SEG) as cache:

            async def stream(cap, data):
                assert await read_all(cache, cap, chunk=20_000) == data
                cache.check()

            async with trio.open_nursery() as nursery:
                for cap, data in zip(caps, files, strict=True):
                    nursery.start_soon(stream, cap, data)
            cache.check()
            cache.drop(caps[0])
            cache.check()
            await cache.wait_idle()
            cache.check()
            assert cache.cached_bytes() <= 4 * SEG

    trio.run(main)
