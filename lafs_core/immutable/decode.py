"""Verifying CHK decoder, sans-IO: it says which byte ranges of which shares it needs, the caller fetches them.

`ChkReader.segment(n)` is a generator: it yields a `FetchBatch` (share number -> spans to read, all of which
may be fetched in parallel), is sent back the results, and finally returns the segment's plaintext. The same
generator is driven synchronously over local readers (`drive`) and asynchronously over storage servers by the
grid layer, so the checking logic exists once.

Checks run in Tahoe's order: the UEB against the cap, each share's hash chain against the UEB's share root,
each block against its share's block tree, and each decoded segment against the crypttext tree. A share that
fails a check is dropped, recorded in `bad_shares` with the reason, and replaced by another; a share that
cannot be read goes to `unavailable`. If fewer than k usable shares remain, NotEnoughSharesError says why.
"""

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ..caps import ChkCap
from ..codec import CrsCodec
from ..crypto import AesCtr
from ..errors import BadShareError, FormatError, LafsError, NotEnoughSharesError
from ..hashes import HASH_SIZE, block_hash, crypttext_segment_hash, uri_extension_hash
from ..hashtree import BadHashError, IncompleteHashTree, NotEnoughHashesError, tree_size
from .layout import (
    HEADER_READ_SIZE,
    MAX_UEB_SIZE,
    SHARE_HASH_ENTRY,
    ShareOffsets,
    UriExtension,
    expected_offsets,
    num_share_hashes,
    parse_header,
    parse_share_hash_chain,
    parse_uri_extension,
)
from .params import DEFAULT_MAX_SEGMENT_SIZE, ChkParameters

Span = tuple[int, int]
"""(offset, length) within one share."""

WHOLE_TREE_LIMIT = 64 * 1024
"""Hash-tree regions up to this size are read whole on first use; bigger ones node by node."""

WHOLE_SHARE_LIMIT = 128 * 1024
"""Shares expected to be at most this size are read in one request when first opened."""

_MAX_CHAIN_BYTES = num_share_hashes(256) * SHARE_HASH_ENTRY.size


@dataclass
class FetchBatch:
    """Reads the decoder needs next: share number -> spans.

    Results go back as share number -> list of bytes (one per span; short at the end of a share) or the
    exception that prevented reading that share.
    """

    requests: dict[int, list[Span]] = field(default_factory=dict)


FetchResults = Mapping[int, list[bytes] | BaseException]


class CorruptFileError(LafsError):
    """The UEB matches the cap but describes an impossible file: the uploader wrote garbage."""


class _ByteCache:
    """Spans of one share already fetched and not yet used up."""

    def __init__(self) -> None:
        self._chunks: dict[int, bytes] = {}

    def add(self, offset: int, data: bytes) -> None:
        if data and len(data) > len(self._chunks.get(offset, b"")):
            self._chunks[offset] = data

    def get(self, offset: int, length: int) -> bytes | None:
        for start, data in self._chunks.items():
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start : offset - start + length]
        return None

    def at(self, offset: int) -> bytes | None:
        """The chunk read starting exactly at `offset`, whatever its length."""
        return self._chunks.get(offset)

    def discard(self, offset: int) -> None:
        self._chunks.pop(offset, None)


class _Share:
    """What is known of one share: fetched bytes, its header, and its checked block tree."""

    def __init__(self, shnum: int) -> None:
        self.shnum = shnum
        self.cache = _ByteCache()
        self.offsets: ShareOffsets | None = None
        self.block_tree: IncompleteHashTree | None = None
        self.last_requested: list[Span] = []

    def node_spans(self, region_start: int, num_nodes: int, nodes: Iterable[int]) -> list[Span]:
        """Spans covering the given nodes of a hash-tree region, minus those already fetched."""
        wanted = sorted(n for n in nodes if self.cache.get(region_start + n * HASH_SIZE, HASH_SIZE) is None)
        if not wanted:
            return []
        if num_nodes * HASH_SIZE <= WHOLE_TREE_LIMIT:
            return [(region_start, num_nodes * HASH_SIZE)]
        spans: list[Span] = []
        for n in wanted:
            offset = region_start + n * HASH_SIZE
            if spans and sum(spans[-1]) == offset:
                spans[-1] = (spans[-1][0], spans[-1][1] + HASH_SIZE)
            else:
                spans.append((offset, HASH_SIZE))
        return spans

    def nodes(self, region_start: int, nodes: Iterable[int]) -> dict[int, bytes]:
        found = {}
        for n in nodes:
            value = self.cache.get(region_start + n * HASH_SIZE, HASH_SIZE)
            if value is None:
                raise BadShareError(self.shnum, f"hash node {n} missing (share truncated)")
            found[n] = value
        return found


class ChkReader:
    """Verified random-access reading of one CHK file from whichever of its shares are offered."""

    def __init__(self, cap: ChkCap, shnums: Iterable[int] = ()) -> None:
        self.cap = cap
        self.ueb: UriExtension | None = None
        self.params: ChkParameters | None = None
        self.bad_shares: dict[int, str] = {}
        self.unavailable: dict[int, str] = {}
        self._shares: dict[int, _Share] = {}
        self._order: list[int] = []
        self._share_tree = IncompleteHashTree(cap.total)
        self._crypttext_tree = IncompleteHashTree(1)
        self._codecs: dict[int, CrsCodec] = {}
        self.add_shares(shnums)

    # --- share bookkeeping ---------------------------------------------------------------------------------
    def add_shares(self, shnums: Iterable[int]) -> None:
        """Offer more shares, in order of preference. Numbers outside 0..N-1 are ignored."""
        for shnum in shnums:
            if 0 <= shnum < self.cap.total and shnum not in self._shares:
                self._shares[shnum] = _Share(shnum)
                self._order.append(shnum)

    def retry_unavailable(self, shnums: Iterable[int]) -> None:
        """Make shares that could not be read candidates again (say, another server holds them)."""
        for shnum in shnums:
            self.unavailable.pop(shnum, None)

    @property
    def usable_shares(self) -> list[int]:
        return [s for s in self._order if s not in self.bad_shares and s not in self.unavailable]

    def _choose(self, count: int, exclude: Iterable[int] = ()) -> list[int]:
        excluded = set(exclude)
        usable = [s for s in self.usable_shares if s not in excluded]
        if len(usable) < count:
            dropped = {**self.unavailable, **self.bad_shares}
            reasons = "".join(f"; share {s}: {r}" for s, r in sorted(dropped.items()))
            raise NotEnoughSharesError(
                f"{len(usable) + len(excluded)} usable shares of the {self.cap.needed} needed "
                f"({len(self._shares)} found{reasons})"
            )
        ready = [s for s in usable if self._shares[s].block_tree is not None]
        return (ready + [s for s in usable if s not in ready])[:count]

    def _drop(self, shnum: int, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, BadShareError) else str(exc)
        self.bad_shares.setdefault(shnum, reason)

    # --- opening a share: header, hash chain, UEB, block-tree root --------------------------------------------
    def _setup_needs(self, share: _Share) -> list[Span]:
        """Spans still needed before the share's block-tree root is checked; empty once it is."""
        if share.block_tree is not None:
            return []
        if share.offsets is None:
            first = share.cache.at(0)
            if first is None:
                return self._first_reads()
            share.offsets = parse_header(first)
        off = share.offsets
        if off.uri_extension - off.share_hashes > _MAX_CHAIN_BYTES:
            raise FormatError("share hash chain region is implausibly large")
        needs: list[Span] = []
        if share.cache.get(off.share_hashes, off.uri_extension + off.fieldsize - off.share_hashes) is None:
            needs.append((off.share_hashes, off.uri_extension + off.fieldsize + MAX_UEB_SIZE - off.share_hashes))
        if share.cache.get(off.block_hashes, HASH_SIZE) is None:
            needs.append((off.block_hashes, HASH_SIZE))
        if not needs:
            self._finish_setup(share)
        return needs

    def _first_reads(self) -> list[Span]:
        """The whole share when small, else the header plus where chain, UEB and root are likely to be.

        The guess assumes the default segment size; if it is wrong the extra bytes are simply not used and
        the real spans are read next, so a guess costs at most one round trip.
        """
        cap = self.cap
        guess = expected_offsets(ChkParameters.for_size(cap.size, cap.needed, cap.total, DEFAULT_MAX_SEGMENT_SIZE))
        tail = (guess.share_hashes, guess.uri_extension + guess.fieldsize + MAX_UEB_SIZE - guess.share_hashes)
        if sum(tail) <= WHOLE_SHARE_LIMIT:
            return [(0, sum(tail))]
        return [(0, HEADER_READ_SIZE), tail, (guess.block_hashes, HASH_SIZE)]

    def _finish_setup(self, share: _Share) -> None:
        off = share.offsets
        assert off is not None
        ueb_length = int.from_bytes(share.cache.get(off.uri_extension, off.fieldsize) or b"", "big")
        if ueb_length >= MAX_UEB_SIZE:
            raise FormatError(f"UEB length {ueb_length} is too large")
        ueb_bytes = share.cache.get(off.uri_extension + off.fieldsize, ueb_length)
        if ueb_bytes is None:
            raise FormatError("share ends inside its UEB")
        if uri_extension_hash(ueb_bytes) != self.cap.ueb_hash:
            raise FormatError("UEB does not match the cap's UEB hash")
        if self.params is None:
            self._accept_ueb(parse_uri_extension(ueb_bytes))
        assert self.params is not None
        if off != expected_offsets(self.params, off.version):
            raise FormatError("share layout does not match the file's encoding parameters")
        chain_bytes = share.cache.get(off.share_hashes, off.uri_extension - off.share_hashes)
        root = share.cache.get(off.block_hashes, HASH_SIZE)
        assert chain_bytes is not None and root is not None
        try:
            self._share_tree.set_hashes(parse_share_hash_chain(chain_bytes), leaves={share.shnum: root})
        except (BadHashError, NotEnoughHashesError) as exc:
            raise FormatError(f"share hash chain does not check: {exc}") from None
        tree = IncompleteHashTree(self.params.num_segments)
        tree.set_hashes({0: root})
        share.block_tree = tree

    def _accept_ueb(self, ueb: UriExtension) -> None:
        cap = self.cap
        if (ueb.needed_shares, ueb.total_shares, ueb.size) != (cap.needed, cap.total, cap.size):
            raise CorruptFileError("UEB disagrees with the cap on k, N or size")
        try:
            params = ChkParameters(cap.needed, cap.total, ueb.segment_size, cap.size)
        except ValueError as exc:
            raise CorruptFileError(f"UEB has impossible parameters: {exc}") from None
        if ueb.num_segments != params.num_segments or ueb.codec_name != b"crs":
            raise CorruptFileError("UEB segment count or codec is inconsistent")
        if (ueb.codec_params, ueb.tail_codec_params) != (params.codec_params(), params.tail_codec_params()):
            raise CorruptFileError("UEB codec parameters are inconsistent")
        self.ueb = ueb
        self.params = params
        self._share_tree.set_hashes({0: ueb.share_root_hash})
        self._crypttext_tree = IncompleteHashTree(params.num_segments)
        self._crypttext_tree.set_hashes({0: ueb.crypttext_root_hash})

    # --- reading -------------------------------------------------------------------------------------------
    def open(self) -> Generator[FetchBatch, FetchResults, ChkParameters]:
        """Learn the file's parameters by setting up k shares, without reading any block."""
        while True:
            batch = self._collect(self._choose(self.cap.needed), self._setup_needs)
            if batch is None:
                continue
            if not batch.requests:
                assert self.params is not None
                return self.params
            self._receive(batch, (yield batch))

    def segment(self, segnum: int) -> Generator[FetchBatch, FetchResults, bytes]:
        """Fetch, check, decode and decrypt one segment; returns its plaintext."""
        params = self.params or (yield from self.open())
        if not 0 <= segnum < params.num_segments:
            raise IndexError(f"segment {segnum} out of range (file has {params.num_segments})")
        blocks: dict[int, bytes] = {}
        while True:
            chosen = self._choose(params.needed - len(blocks), exclude=blocks)
            batch = self._collect(chosen, self._setup_needs)
            if batch is None:
                continue
            if batch.requests:
                self._receive(batch, (yield batch))
                continue
            provider = chosen[0] if self._crypttext_tree.needed_hashes(segnum) and chosen else None
            batch = self._collect(chosen, lambda share, p=provider: self._segment_needs(share, segnum, p))
            if batch is None:
                continue
            if batch.requests:
                self._receive(batch, (yield batch))
            crypttext_nodes: dict[int, bytes] = {}
            for shnum in chosen:
                if shnum in self.unavailable or shnum in self.bad_shares:
                    continue
                share = self._shares[shnum]
                try:
                    blocks[shnum] = self._checked_block(share, segnum)
                    if shnum == provider:
                        crypttext_nodes = share.nodes(
                            share.offsets.crypttext_hash_tree,  # type: ignore[union-attr]
                            self._crypttext_tree.needed_hashes(segnum),
                        )
                except (BadShareError, FormatError) as exc:
                    self._drop(shnum, exc)
                    blocks.pop(shnum, None)
            if len(blocks) < params.needed or (provider is not None and provider not in blocks):
                continue
            try:
                return self._decode(segnum, blocks, crypttext_nodes, provider)
            except BadShareError as exc:
                self._drop(exc.shnum, exc)
                blocks.pop(exc.shnum, None)

    def read(self, start: int, end: int) -> Generator[FetchBatch, FetchResults, bytes]:
        """Plaintext bytes [start, end), fetching only the segments that cover them."""
        end = min(end, self.cap.size)
        if start >= end:
            return b""
        params = self.params or (yield from self.open())
        pieces = []
        for segnum in range(start // params.segment_size, (end - 1) // params.segment_size + 1):
            data = yield from self.segment(segnum)
            seg_start = segnum * params.segment_size
            pieces.append(data[max(start - seg_start, 0) : end - seg_start])
        return b"".join(pieces)

    def _collect(self, chosen: list[int], needs_of: Callable[[_Share], list[Span]]) -> FetchBatch | None:
        """Ask each chosen share what it needs; None when one turned out bad (so choose again)."""
        batch = FetchBatch()
        for shnum in chosen:
            share = self._shares[shnum]
            try:
                spans = needs_of(share)
                if spans and spans == share.last_requested:
                    raise FormatError("share is truncated")
            except (FormatError, BadShareError) as exc:
                self._drop(shnum, exc)
                return None
            if spans:
                batch.requests[shnum] = spans
        return batch

    def _receive(self, batch: FetchBatch, results: FetchResults) -> None:
        for shnum, spans in batch.requests.items():
            share = self._shares[shnum]
            share.last_requested = spans
            got = results.get(shnum)
            if not isinstance(got, list) or len(got) != len(spans):
                self.unavailable.setdefault(shnum, f"read failed: {got!r}")
                continue
            for (offset, _length), data in zip(spans, got, strict=True):
                share.cache.add(offset, bytes(data))

    def _segment_needs(self, share: _Share, segnum: int, provider: int | None) -> list[Span]:
        params, off, tree = self.params, share.offsets, share.block_tree
        assert params is not None and off is not None and tree is not None
        block = (off.data + segnum * params.block_size, params.block_length(segnum))
        spans = [] if share.cache.get(*block) is not None else [block]
        num_nodes = tree_size(params.num_segments)
        spans += share.node_spans(off.block_hashes, num_nodes, tree.needed_hashes(segnum))
        if share.shnum == provider:
            spans += share.node_spans(off.crypttext_hash_tree, num_nodes, self._crypttext_tree.needed_hashes(segnum))
        return spans

    def _checked_block(self, share: _Share, segnum: int) -> bytes:
        params, off, tree = self.params, share.offsets, share.block_tree
        assert params is not None and off is not None and tree is not None
        block_offset = off.data + segnum * params.block_size
        block = share.cache.get(block_offset, params.block_length(segnum))
        share.cache.discard(block_offset)  # a block is used once; keep the cache to metadata
        if block is None:
            raise BadShareError(share.shnum, "share is truncated (block missing)")
        nodes = share.nodes(off.block_hashes, tree.needed_hashes(segnum))
        try:
            tree.set_hashes(nodes, leaves={segnum: block_hash(block)})
        except (BadHashError, NotEnoughHashesError) as exc:
            raise BadShareError(share.shnum, f"block {segnum} fails its hash check: {exc}") from None
        return block

    def _decode(self, segnum: int, blocks: dict[int, bytes], nodes: dict[int, bytes], provider: int | None):
        params = self.params
        assert params is not None
        start, end = params.segment_span(segnum)
        padded_size = params.padded_tail_size if segnum == params.num_segments - 1 else params.segment_size
        codec = self._codecs.get(padded_size)
        if codec is None:
            codec = self._codecs[padded_size] = CrsCodec(padded_size, params.needed, params.total)
        crypttext = codec.decode(blocks)[: end - start]
        try:
            self._crypttext_tree.set_hashes(nodes, leaves={segnum: crypttext_segment_hash(crypttext)})
        except (BadHashError, NotEnoughHashesError) as exc:
            if provider is None:
                raise CorruptFileError(f"segment {segnum} fails the crypttext hash check") from None
            raise BadShareError(provider, f"crypttext hash tree does not check: {exc}") from None
        return AesCtr(self.cap.key, start).update(crypttext)


# --- synchronous driving -----------------------------------------------------------------------------------
T = TypeVar("T")
ShareReadFn = Callable[[int, int], bytes]
"""read(offset, length) -> bytes of one share; short at its end."""


def drive(steps: Generator[FetchBatch, FetchResults, T], readers: Mapping[int, ShareReadFn]) -> T:
    """Run a decoder generator to completion, serving its reads from local reader functions."""
    try:
        batch = next(steps)
        while True:
            results: dict[int, list[bytes] | BaseException] = {}
            for shnum, spans in batch.requests.items():
                try:
                    results[shnum] = [readers[shnum](offset, length) for offset, length in spans]
                except (OSError, KeyError) as exc:
                    results[shnum] = exc
            batch = steps.send(results)
    except StopIteration as done:
        return done.value


def read_shares(cap: ChkCap, shares: Mapping[int, bytes | ShareReadFn], start: int = 0, end: int | None = None):
    """Plaintext [start, end) of a CHK file from in-memory shares or reader functions, verified."""
    readers = {shnum: (source if callable(source) else _bytes_reader(source)) for shnum, source in shares.items()}
    reader = ChkReader(cap, sorted(readers))
    return drive(reader.read(start, cap.size if end is None else end), readers)


def _bytes_reader(data: bytes) -> ShareReadFn:
    return lambda offset, length: data[offset : offset + length]
