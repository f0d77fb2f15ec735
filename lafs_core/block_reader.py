"""The engine shared by the CHK and mutable readers: pick k shares, fetch, verify, replace bad ones, decode.

A concrete reader says what a share needs before its blocks can be trusted (`_setup_needs`), what a segment
needs (`_segment_needs`), how a block is checked (`_checked_block`) and how k blocks become plaintext
(`_decode`). The engine does the rest in the sans-IO protocol of `lafs_core.fetch`: choosing shares with
distinct numbers, preferring ones already set up, retrying after a share turns out bad or unreadable, and
detecting truncated shares (a span needed again after it already came back short).

Shares are named by keys: the share number for CHK files, (server, number) for mutable ones.
"""

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Hashable, Iterable
from typing import Generic, TypeVar

from .errors import BadShareError, FormatError, NotEnoughSharesError
from .fetch import ByteCache, FetchBatch, FetchResults, Span
from .hashes import HASH_SIZE
from .hashtree import BadHashError, IncompleteHashTree, NotEnoughHashesError


class ShareState:
    """What a reader knows of one share: fetched bytes and, once set up, its trusted block-tree root."""

    def __init__(self, key: Hashable, shnum: int) -> None:
        self.key = key
        self.shnum = shnum
        self.cache = ByteCache()
        self.block_tree: IncompleteHashTree | None = None
        self.short_spans: set[Span] = set()  # spans whose read came back short: the share ends inside them

    @property
    def ready(self) -> bool:
        return self.block_tree is not None

    def nodes(self, region_start: int, nodes: Iterable[int]) -> dict[int, bytes]:
        found = self.cache.nodes(region_start, nodes)
        if found is None:
            raise BadShareError(self.key, "hash node missing (share truncated)")
        return found

    def check_block(self, tree_start: int, segnum: int, leaf: bytes) -> None:
        """Check a block's leaf hash against this share's block tree (nodes read from `tree_start`)."""
        assert self.block_tree is not None
        nodes = self.nodes(tree_start, self.block_tree.needed_hashes(segnum))
        try:
            self.block_tree.set_hashes(nodes, leaves={segnum: leaf})
        except (BadHashError, NotEnoughHashesError) as exc:
            raise BadShareError(self.key, f"block {segnum} fails its hash check: {exc}") from None


PlanT = TypeVar("PlanT")
"""Per-segment state a concrete reader keeps between its hooks."""


class BlockReader(ABC, Generic[PlanT]):
    """Verified reading of segments from whichever shares are offered (any k with distinct numbers)."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.bad_shares: dict[Hashable, str] = {}
        self.unavailable: dict[Hashable, str] = {}
        self._shares: dict[Hashable, ShareState] = {}
        self._order: list[Hashable] = []

    # --- what a concrete reader supplies -----------------------------------------------------------------
    @property
    @abstractmethod
    def num_segments(self) -> int:
        """Known once `open` has run."""

    @property
    @abstractmethod
    def segment_size(self) -> int:
        """Plaintext bytes per segment; known once `open` has run."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Plaintext bytes of the whole file."""

    @abstractmethod
    def _block_tree_start(self, share: ShareState) -> int:
        """Where the share's block hash tree starts (its header is parsed once the share is set up)."""

    @abstractmethod
    def _setup_needs(self, share: ShareState) -> list[Span]:
        """Spans still needed to make the share ready (`share.block_tree` set); raise FormatError if bad."""

    @abstractmethod
    def _plan(self, segnum: int, chosen: list[ShareState]) -> PlanT:
        """Per-segment state shared by the hooks below (the CHK reader keeps its crypttext-tree source here)."""

    @abstractmethod
    def _segment_needs(self, share: ShareState, segnum: int, plan: PlanT) -> list[Span]: ...

    @abstractmethod
    def _checked_block(self, share: ShareState, segnum: int, plan: PlanT) -> bytes: ...

    @abstractmethod
    def _decode(self, segnum: int, blocks: dict[int, bytes], plan: PlanT) -> bytes:
        """Plaintext of the segment from k checked blocks; raise BadShareError to blame a share."""

    # --- share bookkeeping -------------------------------------------------------------------------------
    def add_share(self, key: Hashable, shnum: int) -> None:
        """Offer a share; earlier offers are preferred."""
        if key not in self._shares:
            self._shares[key] = ShareState(key, shnum)
            self._order.append(key)

    def retry_unavailable(self, keys: Iterable[Hashable]) -> None:
        """Make shares that could not be read candidates again."""
        for key in keys:
            self.unavailable.pop(key, None)

    @property
    def usable_shares(self) -> list[Hashable]:
        return [k for k in self._order if k not in self.bad_shares and k not in self.unavailable]

    def _choose(self, count: int, exclude_shnums: Iterable[int] = ()) -> list[ShareState]:
        """`count` usable shares with distinct numbers not in `exclude_shnums`, set-up ones first."""
        taken = set(exclude_shnums)
        candidates = [self._shares[k] for k in self.usable_shares]
        chosen: list[ShareState] = []
        for share in [s for s in candidates if s.ready] + [s for s in candidates if not s.ready]:
            if len(chosen) < count and share.shnum not in taken:
                chosen.append(share)
                taken.add(share.shnum)
        if len(chosen) < count:
            raise self._shortage()
        return chosen

    def _shortage(self) -> NotEnoughSharesError:
        """Why fewer than k usable shares are left."""
        dropped = {**self.unavailable, **self.bad_shares}
        reasons = "".join(f"; share {k}: {r}" for k, r in dropped.items())
        distinct = len({self._shares[k].shnum for k in self.usable_shares})
        return NotEnoughSharesError(
            f"{distinct} usable shares of the {self.needed} needed ({len(self._shares)} found{reasons})"
        )

    @property
    def corrupt_shares(self) -> dict[Hashable, str]:
        """The bad shares that are evidence of corruption, to report to their servers: all of them, unless a
        reader knows some failed only because the cap names another file."""
        return self.bad_shares

    def _drop(self, key: Hashable, exc: Exception) -> None:
        self.bad_shares.setdefault(key, exc.reason if isinstance(exc, BadShareError) else str(exc))

    def _collect(self, chosen: list[ShareState], needs_of: Callable[[ShareState], list[Span]]) -> FetchBatch | None:
        """Ask each chosen share what it needs; None when one turned out bad (so choose again)."""
        batch = FetchBatch()
        for share in chosen:
            try:
                spans = needs_of(share)
                if any(span in share.short_spans for span in spans):
                    raise FormatError("share is truncated")
            except (FormatError, BadShareError) as exc:
                self._drop(share.key, exc)
                return None
            if spans:
                batch.requests[share.key] = spans
        return batch

    def _receive(self, batch: FetchBatch, results: FetchResults) -> None:
        for key, spans in batch.requests.items():
            share = self._shares[key]
            got = results.get(key)
            if not isinstance(got, list) or len(got) != len(spans):
                self.unavailable.setdefault(key, f"read failed: {got!r}")
                continue
            for (offset, length), data in zip(spans, got, strict=True):
                share.cache.add(offset, bytes(data))
                if len(data) < length:
                    share.short_spans.add((offset, length))

    # --- reading -----------------------------------------------------------------------------------------
    def _setup(self, chosen: list[ShareState]) -> Generator[FetchBatch, FetchResults, bool]:
        """Make the chosen shares ready; False if one turned out bad (choose again)."""
        while True:
            batch = self._collect(chosen, self._setup_needs)
            if batch is None:
                return False
            if not batch.requests:
                return True
            self._receive(batch, (yield batch))
            if any(share.key in self.unavailable for share in chosen):
                return False

    def open(self) -> Generator[FetchBatch, FetchResults, None]:
        """Set up k shares, which teaches the reader the file's parameters, without reading a block."""
        while not (yield from self._setup(self._choose(self.needed))):
            pass

    def segment(self, segnum: int) -> Generator[FetchBatch, FetchResults, bytes]:
        """Fetch, check, decode and decrypt one segment; returns its plaintext."""
        yield from self.open()
        if not 0 <= segnum < self.num_segments:
            raise IndexError(f"segment {segnum} out of range (file has {self.num_segments})")
        blocks: dict[int, bytes] = {}
        while True:
            chosen = self._choose(self.needed - len(blocks), exclude_shnums=blocks)
            if not (yield from self._setup(chosen)):
                continue
            plan = self._plan(segnum, chosen)
            batch = self._collect(chosen, functools.partial(self._segment_needs, segnum=segnum, plan=plan))
            if batch is None:
                continue
            if batch.requests:
                self._receive(batch, (yield batch))
            for share in chosen:
                if share.key in self.unavailable:
                    continue
                try:
                    blocks[share.shnum] = self._checked_block(share, segnum, plan)
                except (BadShareError, FormatError) as exc:
                    self._drop(share.key, exc)
            if len(blocks) < self.needed:
                continue
            try:
                return self._decode(segnum, blocks, plan)
            except BadShareError as exc:
                self._drop(exc.share, exc)
                blocks.pop(self._shares[exc.share].shnum, None)

    def verify_share(self, key: Hashable) -> Generator[FetchBatch, FetchResults, str | None]:
        """Check one share whole, as Tahoe's verifier does: set it up (its hash chain against the root the cap or
        the signature vouches for), then read every block and check it against the share's block tree.

        Then every node of the stored block tree is checked too, used by a block or not. Returns None for a good
        share, else why it is not: one that failed a check is also in `bad_shares`
        (corrupt), one that could not be read in `unavailable`. Needs no other share and decodes nothing, so
        each share is judged on its own bytes."""
        share = self._shares[key]
        if not (yield from self._setup([share])):
            return self._verdict(key)
        for segnum in range(self.num_segments):
            plan = self._plan(segnum, [])
            batch = self._collect([share], functools.partial(self._segment_needs, segnum=segnum, plan=plan))
            if batch is None:
                return self._verdict(key)
            if batch.requests:
                self._receive(batch, (yield batch))
                if key in self.unavailable:
                    return self._verdict(key)
            try:
                self._checked_block(share, segnum, plan)
            except (BadShareError, FormatError) as exc:
                self._drop(key, exc)
                return self._verdict(key)
        assert share.block_tree is not None
        return (yield from self._check_stored_tree(key, self._block_tree_start(share), share.block_tree, "block"))

    def _check_stored_tree(
        self, key: Hashable, start: int, tree: IncompleteHashTree, name: str
    ) -> Generator[FetchBatch, FetchResults, str | None]:
        """Check every node of a hash tree the share stores from `start` against `tree` (whose root is trusted),
        as Tahoe's verifier does: a reader uses only the nodes a block needs, but a bad copy of any other would
        mislead the next reader that needs it. Returns None, or why the share is bad."""
        share = self._shares[key]
        span = (start, len(tree) * HASH_SIZE)
        if share.cache.get(*span) is None:
            batch = FetchBatch({key: [span]})
            self._receive(batch, (yield batch))
            if key in self.unavailable:
                return self._verdict(key)
        region = share.cache.get(*span)
        share.cache.discard(start)
        try:
            if region is None:
                raise FormatError(f"share is truncated ({name} hash tree missing)")
            tree.set_hashes({i: region[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(len(tree))})
        except (BadHashError, NotEnoughHashesError, FormatError) as exc:
            self._drop(key, FormatError(f"{name} hash tree does not check: {exc}"))
            return self._verdict(key)
        return None

    def _verdict(self, key: Hashable) -> str:
        return self.bad_shares.get(key) or self.unavailable.get(key) or "share could not be checked"

    def read(self, start: int, end: int) -> Generator[FetchBatch, FetchResults, bytes]:
        """Plaintext bytes [start, end), fetching only the segments that cover them."""
        end = min(end, self.size)
        if start >= end:
            return b""
        yield from self.open()
        segsize = self.segment_size
        pieces = []
        for segnum in range(start // segsize, (end - 1) // segsize + 1):
            data = yield from self.segment(segnum)
            seg_start = segnum * segsize
            pieces.append(data[max(start - seg_start, 0) : end - seg_start])
        return b"".join(pieces)
