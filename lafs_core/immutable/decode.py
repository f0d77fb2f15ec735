"""Verifying CHK decoder, sans-IO: it says which byte ranges of which shares it needs, the caller fetches them.

`ChkReader.segment(n)` is a generator in the protocol of `lafs_core.fetch`: it yields the reads it needs
(share number -> spans), is sent back the bytes, and finally returns the segment's plaintext. The same
generator is driven synchronously over local readers (`fetch.drive`) and asynchronously over storage servers by
the grid layer, so the checking logic exists once.

Checks run in Tahoe's order: the UEB against the cap, each share's hash chain against the UEB's share root,
each block against its share's block tree, and each decoded segment against the crypttext tree. A share that
fails a check is dropped, recorded in `bad_shares` with the reason, and replaced by another; a share that
cannot be read goes to `unavailable`. If fewer than k usable shares remain, NotEnoughSharesError says why.
"""

from collections.abc import Generator, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from ..block_reader import BlockReader, ShareState
from ..caps import ChkCap
from ..codec import CrsCodec
from ..crypto import AesCtr
from ..errors import BadShareError, FormatError, LafsError, NotEnoughSharesError
from ..fetch import FetchBatch, FetchResults, ShareReadFn, Span, bytes_reader, drive
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

WHOLE_SHARE_LIMIT = 128 * 1024
"""Shares expected to be at most this size are read in one request when first opened."""

_MAX_CHAIN_BYTES = num_share_hashes(256) * SHARE_HASH_ENTRY.size


class CorruptFileError(LafsError):
    """The UEB matches the cap but describes an impossible file: the uploader wrote garbage."""


class CapMismatchError(NotEnoughSharesError):
    """Shares lie under the cap's storage index, but not one carries the UEB the cap's hash names: the cap matches
    no file (one mistyped character does this). The shares are not corrupt; some shares failing while others
    match would be corruption, and is reported as such."""


@dataclass
class _SegmentPlan:
    """Which share supplies the crypttext-tree nodes this segment needs, and the nodes once read."""

    provider: ShareState | None
    crypttext_nodes: dict[int, bytes] = field(default_factory=dict)


class ChkReader(BlockReader[_SegmentPlan]):
    """Verified random-access reading of one CHK file from whichever of its shares are offered."""

    def __init__(self, cap: ChkCap, shnums: Iterable[int] = ()) -> None:
        super().__init__(cap.needed)
        self.cap = cap
        self.ueb: UriExtension | None = None
        self.params: ChkParameters | None = None
        self._offsets: dict[Hashable, ShareOffsets] = {}
        self._share_tree = IncompleteHashTree(cap.total)
        self._crypttext_tree = IncompleteHashTree(1)
        self._codecs: dict[int, CrsCodec] = {}
        self._ueb_mismatches: set[Hashable] = set()
        self.add_shares(shnums)

    def add_shares(self, shnums: Iterable[int]) -> None:
        """Offer more shares named by their numbers, in order of preference."""
        for shnum in shnums:
            self.add_share(shnum, shnum)

    def add_share(self, key: Hashable, shnum: int) -> None:
        """Offer one share (copies on different servers get different keys). Numbers outside 0..N-1 are ignored."""
        if 0 <= shnum < self.cap.total:
            super().add_share(key, shnum)

    @property
    def _matches_no_share(self) -> bool:
        """Whether every share that failed did so only because its UEB is not the one the cap names, and no
        share's is: the cap is wrong, not the shares."""
        return self.ueb is None and bool(self.bad_shares) and self.bad_shares.keys() <= self._ueb_mismatches

    def _choose(self, count: int, exclude_shnums: Iterable[int] = ()) -> list[ShareState]:
        """As the engine chooses; but while no share has matched the cap, too few shares left to decode are
        still opened, since whether any of them matches tells a mistyped cap from corrupt shares."""
        try:
            return super()._choose(count, exclude_shnums)
        except NotEnoughSharesError:
            unchecked = [self._shares[key] for key in self.usable_shares if not self._shares[key].ready]
            if self.ueb is None and unchecked:
                return unchecked
            raise

    def _shortage(self) -> NotEnoughSharesError:
        if self._matches_no_share:
            return CapMismatchError(
                "no file on the grid matches this cap (its shares' keys do not match: the cap may be mistyped)"
            )
        return super()._shortage()

    @property
    def corrupt_shares(self) -> dict[Hashable, str]:
        return {} if self._matches_no_share else self.bad_shares

    @property
    def num_segments(self) -> int:
        assert self.params is not None, "open() first"
        return self.params.num_segments

    @property
    def segment_size(self) -> int:
        assert self.params is not None, "open() first"
        return self.params.segment_size

    @property
    def size(self) -> int:
        return self.cap.size

    # --- opening a share: header, hash chain, UEB, block-tree root --------------------------------------------
    def _setup_needs(self, share: ShareState) -> list[Span]:
        if share.ready:
            return []
        off = self._offsets.get(share.key)
        if off is None:
            first = share.cache.at(0)
            if first is None:
                return self._first_reads()
            off = self._offsets[share.key] = parse_header(first)
        if off.uri_extension - off.share_hashes > _MAX_CHAIN_BYTES:
            raise FormatError("share hash chain region is implausibly large")
        needs: list[Span] = []
        if share.cache.get(off.share_hashes, off.uri_extension + off.fieldsize - off.share_hashes) is None:
            needs.append((off.share_hashes, off.uri_extension + off.fieldsize + MAX_UEB_SIZE - off.share_hashes))
        if share.cache.get(off.block_hashes, HASH_SIZE) is None:
            needs.append((off.block_hashes, HASH_SIZE))
        if not needs:
            self._finish_setup(share, off)
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

    def _finish_setup(self, share: ShareState, off: ShareOffsets) -> None:
        ueb_length = int.from_bytes(share.cache.get(off.uri_extension, off.fieldsize) or b"", "big")
        if ueb_length >= MAX_UEB_SIZE:
            raise FormatError(f"UEB length {ueb_length} is too large")
        ueb_bytes = share.cache.get(off.uri_extension + off.fieldsize, ueb_length)
        if ueb_bytes is None:
            raise FormatError("share ends inside its UEB")
        if uri_extension_hash(ueb_bytes) != self.cap.ueb_hash:
            self._ueb_mismatches.add(share.key)
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

    # --- verifying one share whole ------------------------------------------------------------------------
    def verify_share(self, key: Hashable) -> Generator[FetchBatch, FetchResults, str | None]:
        """As the engine verifies a share, then also its copy of the crypttext hash tree against the UEB's root,
        as Tahoe's verifier does (a download trusts one share's copy at a time, node by node)."""
        reason = yield from super().verify_share(key)
        if reason is not None:
            return reason
        assert self.ueb is not None and self.params is not None
        crypttext_tree = IncompleteHashTree(self.params.num_segments)
        crypttext_tree.set_hashes({0: self.ueb.crypttext_root_hash})
        start = self._offsets[key].crypttext_hash_tree
        return (yield from self._check_stored_tree(key, start, crypttext_tree, "crypttext"))

    def _block_tree_start(self, share: ShareState) -> int:
        return self._offsets[share.key].block_hashes

    # --- segments ------------------------------------------------------------------------------------------
    def _plan(self, segnum: int, chosen: list[ShareState]) -> _SegmentPlan:
        needs_nodes = bool(self._crypttext_tree.needed_hashes(segnum))
        return _SegmentPlan(chosen[0] if needs_nodes and chosen else None)

    def _block_span(self, share: ShareState, segnum: int) -> Span:
        assert self.params is not None
        return (self._offsets[share.key].data + segnum * self.params.block_size, self.params.block_length(segnum))

    def _segment_needs(self, share: ShareState, segnum: int, plan: _SegmentPlan) -> list[Span]:
        assert self.params is not None and share.block_tree is not None
        off = self._offsets[share.key]
        block = self._block_span(share, segnum)
        spans = [] if share.cache.get(*block) is not None else [block]
        num_nodes = tree_size(self.params.num_segments)
        spans += share.cache.node_spans(off.block_hashes, num_nodes, share.block_tree.needed_hashes(segnum))
        if share is plan.provider:
            needed = self._crypttext_tree.needed_hashes(segnum)
            spans += share.cache.node_spans(off.crypttext_hash_tree, num_nodes, needed)
        return spans

    def _checked_block(self, share: ShareState, segnum: int, plan: _SegmentPlan) -> bytes:
        off = self._offsets[share.key]
        block_offset, length = self._block_span(share, segnum)
        block = share.cache.get(block_offset, length)
        share.cache.discard(block_offset)  # a block is used once; keep the cache to metadata
        if block is None:
            raise BadShareError(share.key, "share is truncated (block missing)")
        share.check_block(off.block_hashes, segnum, block_hash(block))
        if share is plan.provider:
            plan.crypttext_nodes = share.nodes(off.crypttext_hash_tree, self._crypttext_tree.needed_hashes(segnum))
        return block

    def _decode(self, segnum: int, blocks: dict[int, bytes], plan: _SegmentPlan) -> bytes:
        params = self.params
        assert params is not None
        start, end = params.segment_span(segnum)
        padded_size = params.padded_tail_size if segnum == params.num_segments - 1 else params.segment_size
        codec = self._codecs.get(padded_size)
        if codec is None:
            codec = self._codecs[padded_size] = CrsCodec(padded_size, params.needed, params.total)
        crypttext = codec.decode(blocks)[: end - start]
        try:
            self._crypttext_tree.set_hashes(plan.crypttext_nodes, leaves={segnum: crypttext_segment_hash(crypttext)})
        except (BadHashError, NotEnoughHashesError) as exc:
            if plan.provider is None:
                raise CorruptFileError(f"segment {segnum} fails the crypttext hash check") from None
            raise BadShareError(plan.provider.key, f"crypttext hash tree does not check: {exc}") from None
        return AesCtr(self.cap.key, start).update(crypttext)


def read_shares(
    cap: ChkCap, shares: Mapping[int, bytes | ShareReadFn], start: int = 0, end: int | None = None
) -> bytes:
    """Plaintext [start, end) of a CHK file from in-memory shares or reader functions, verified."""
    readers: dict[Hashable, ShareReadFn] = {
        shnum: (source if callable(source) else bytes_reader(source)) for shnum, source in shares.items()
    }
    reader = ChkReader(cap, sorted(shares))
    return drive(reader.read(start, cap.size if end is None else end), readers)
