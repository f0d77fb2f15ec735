"""Finding and reading the current version of a mutable file (the pure half of `servermap.py`, `retrieve.py`).

`ServerMap` takes the first bytes of every share the servers hold, checks each share's public key against the
cap's fingerprint and its signature over the signed prefix, and groups the good ones by version. The best
version is the highest (seqnum, root hash) that has k distinct shares. `MutableReader` then reads segments of
that version through the engine of `lafs_core.block_reader`, checking each share's hash chain against the
signed root hash and each block against the share's block tree, then decoding and decrypting.
"""

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from .. import rsa
from ..block_reader import BlockReader, ShareState
from ..caps import MutableReadCap, MutableVerifierCap, MutableWriteCap
from ..codec import CrsCodec
from ..crypto import aes_ctr
from ..errors import BadShareError, FormatError, LafsError
from ..fetch import ShareReadFn, Span, bytes_reader, drive
from ..hashes import HASH_SIZE, SALT_SIZE, ssk_pubkey_fingerprint_hash, ssk_readkey_data_hash
from ..hashtree import BadHashError, HashTree, IncompleteHashTree, NotEnoughHashesError, roundup_pow2, tree_size
from .encode import leaf_hash
from .layout import (
    MDMF_CHECKSTRING_SIZE,
    MDMF_VERSION,
    SDMF_CHECKSTRING_SIZE,
    SDMF_VERSION,
    NeedMoreData,
    ShareHeader,
    SignedPrefix,
    block_offset,
    next_multiple,
    parse_share_header,
)

INITIAL_READ_SIZE = 4000
"""Bytes read from the start of each share when mapping: the whole header of any share, and all of a small one."""

AnyMutableCap = MutableWriteCap | MutableReadCap | MutableVerifierCap


@dataclass(frozen=True, order=True)
class ShareRef:
    """One share on one server: the same share number may sit on several servers, in different versions."""

    server: str
    shnum: int

    def __str__(self) -> str:
        return f"{self.shnum} on {self.server}"


@dataclass
class ServerMap:
    """What the servers hold of one mutable file, every share checked before it is believed."""

    fingerprint: bytes
    headers: dict[ShareRef, ShareHeader] = field(default_factory=dict)
    raw: dict[ShareRef, bytes] = field(default_factory=dict)
    bad_shares: dict[ShareRef, str] = field(default_factory=dict)
    servers_seen: set[str] = field(default_factory=set)
    unanswered: dict[str, str] = field(default_factory=dict)
    """Servers that did not answer, and why (the message names the server)."""

    def add_server(self, server: str) -> None:
        """Record that a server answered (with or without shares), so a publish knows it is reachable."""
        self.servers_seen.add(server)

    def add_share(self, ref: ShareRef, data: bytes) -> ShareHeader | None:
        """Check and record the first bytes of a share; NeedMoreData if more must be read first.

        Returns the header, or None if the share is bad (recorded in `bad_shares` with the reason).
        """
        self.servers_seen.add(ref.server)
        try:
            header = parse_share_header(data)
            if ssk_pubkey_fingerprint_hash(header.verification_key) != self.fingerprint:
                raise FormatError("public key does not match the cap's fingerprint")
            if not rsa.verify(rsa.load_public_key_der(header.verification_key), header.signature, header.signed_bytes):
                raise FormatError("signature does not verify")
        except NeedMoreData:
            raise
        except FormatError as exc:
            self.bad_shares[ref] = str(exc)
            self.headers.pop(ref, None)
            self.raw[ref] = data
            return None
        self.headers[ref] = header
        self.raw[ref] = data
        return header

    def versions(self) -> dict[SignedPrefix, list[ShareRef]]:
        grouped: dict[SignedPrefix, list[ShareRef]] = {}
        for ref, header in sorted(self.headers.items()):
            grouped.setdefault(header.prefix, []).append(ref)
        return grouped

    def recoverable(self) -> list[SignedPrefix]:
        """Versions with at least k distinct share numbers, best first."""
        good = [v for v, refs in self.versions().items() if len({r.shnum for r in refs}) >= v.needed]
        return sorted(good, key=lambda v: (v.seqnum, v.root_hash), reverse=True)

    def best_version(self) -> SignedPrefix | None:
        recoverable = self.recoverable()
        return recoverable[0] if recoverable else None

    def highest_seqnum(self) -> int:
        return max((h.prefix.seqnum for h in self.headers.values()), default=0)

    def checkstring(self, ref: ShareRef) -> bytes | None:
        """The checkstring of the share at `ref`, if one was seen there (even a bad share has one to test)."""
        header = self.headers.get(ref)
        if header:
            return header.prefix.checkstring()
        raw = self.raw.get(ref)
        if not raw:
            return None
        return raw[: SDMF_CHECKSTRING_SIZE if raw[0] == SDMF_VERSION else MDMF_CHECKSTRING_SIZE]

    def shares_of(self, version: SignedPrefix) -> list[ShareRef]:
        return self.versions().get(version, [])


class UnrecoverableFileError(LafsError):
    """No version of the mutable file has k good shares."""


@dataclass
class _Plan:
    """The salt of the segment being read (MDMF keeps one per segment, checked with each block)."""

    salt: bytes | None = None


class MutableReader(BlockReader[_Plan]):
    """Verified reading of one version of a mutable file from the shares a ServerMap found."""

    def __init__(self, readkey: bytes, servermap: ServerMap, version: SignedPrefix) -> None:
        super().__init__(version.needed)
        self.readkey = readkey
        self.version = version
        self._headers: dict[Hashable, ShareHeader] = {}  # keyed as ShareState.key: ShareRef
        self._share_tree = IncompleteHashTree(version.total)
        self._share_tree.set_hashes({0: version.root_hash})
        self._codecs: dict[int, CrsCodec] = {}
        for ref in servermap.shares_of(version):
            self._headers[ref] = servermap.headers[ref]
            self.add_share(ref, ref.shnum)
            self._shares[ref].cache.add(0, servermap.raw[ref])

    @property
    def num_segments(self) -> int:
        return self.version.num_segments

    @property
    def segment_size(self) -> int:
        return self.version.segment_size

    @property
    def size(self) -> int:
        return self.version.data_length

    def _block_tree_start(self, share: ShareState) -> int:
        return self._headers[share.key].offsets.block_hash_tree

    def _setup_needs(self, share: ShareState) -> list[Span]:
        if share.ready:
            return []
        start = self._block_tree_start(share)
        root = share.cache.get(start, HASH_SIZE)
        if root is None:
            return share.cache.node_spans(start, tree_size(self.num_segments), [0])
        header = self._headers[share.key]
        if share.shnum >= self.version.total:
            raise FormatError(f"share number {share.shnum} is not below N={self.version.total}")
        try:
            self._share_tree.set_hashes(dict(header.share_hash_chain), leaves={share.shnum: root})
        except (BadHashError, NotEnoughHashesError) as exc:
            raise FormatError(f"share hash chain does not check: {exc}") from None
        tree = IncompleteHashTree(self.num_segments)
        tree.set_hashes({0: root})
        share.block_tree = tree
        return []

    def _block_span(self, share: ShareState, segnum: int) -> Span:
        """The block of a segment, with its salt in front for MDMF."""
        offset = block_offset(self.version, self._headers[share.key].offsets, segnum)
        length = self.version.block_length(segnum)
        if self.version.version == MDMF_VERSION:
            return offset - SALT_SIZE, length + SALT_SIZE
        return offset, length

    def _plan(self, segnum: int, chosen: list[ShareState]) -> _Plan:
        return _Plan(None if self.version.version == MDMF_VERSION else self.version.salt)

    def _segment_needs(self, share: ShareState, segnum: int, plan: _Plan) -> list[Span]:
        assert share.block_tree is not None
        span = self._block_span(share, segnum)
        spans = [] if share.cache.get(*span) is not None else [span]
        nodes = share.block_tree.needed_hashes(segnum)
        return spans + share.cache.node_spans(self._block_tree_start(share), tree_size(self.num_segments), nodes)

    def _checked_block(self, share: ShareState, segnum: int, plan: _Plan) -> bytes:
        offset, length = self._block_span(share, segnum)
        data = share.cache.get(offset, length)
        share.cache.discard(offset)  # a block is used once; keep the cache to metadata
        if data is None:
            raise BadShareError(share.key, "share is truncated (block missing)")
        if self.version.version == MDMF_VERSION:
            salt, block = data[:SALT_SIZE], data[SALT_SIZE:]
        else:
            salt, block = self.version.salt or b"", data
        share.check_block(self._block_tree_start(share), segnum, leaf_hash(self.version.version, salt, block))
        plan.salt = salt  # checked by the block hash, so every good share agrees on it
        return block

    def _decode(self, segnum: int, blocks: dict[int, bytes], plan: _Plan) -> bytes:
        start, end = self.version.segment_span(segnum)
        padded = next_multiple(end - start, self.needed)
        codec = self._codecs.get(padded)
        if codec is None:
            codec = self._codecs[padded] = CrsCodec(padded, self.needed, self.version.total)
        crypttext = codec.decode(blocks)[: end - start]
        assert plan.salt is not None
        return aes_ctr(ssk_readkey_data_hash(plan.salt, self.readkey), crypttext)


def readkey_of(cap: AnyMutableCap) -> bytes:
    if isinstance(cap, MutableVerifierCap):
        raise LafsError("a verify cap cannot decrypt the file")
    return cap.readkey


def map_shares(cap: AnyMutableCap, shares: Mapping[ShareRef, bytes]) -> ServerMap:
    """A ServerMap over shares held in memory (whole share bytes)."""
    servermap = ServerMap(cap.fingerprint)
    for ref, data in shares.items():
        servermap.add_share(ref, data[:INITIAL_READ_SIZE] if len(data) > INITIAL_READ_SIZE else data)
    return servermap


def read_mutable(cap: MutableWriteCap | MutableReadCap, shares: Mapping[ShareRef, bytes | ShareReadFn]) -> bytes:
    """The best version's plaintext from shares in memory or behind reader functions, fully verified."""
    readers: dict[Hashable, ShareReadFn] = {
        ref: (src if callable(src) else bytes_reader(src)) for ref, src in shares.items()
    }
    servermap = ServerMap(cap.fingerprint)
    for ref in shares:
        read = readers[ref]
        data = read(0, INITIAL_READ_SIZE)
        try:
            servermap.add_share(ref, data)
        except NeedMoreData as exc:  # a header larger than the first read
            servermap.add_share(ref, read(0, exc.length))
    version = servermap.best_version()
    if version is None:
        raise UnrecoverableFileError(_unrecoverable_reason(servermap))
    reader = MutableReader(readkey_of(cap), servermap, version)
    return drive(reader.read(0, version.data_length), readers)


def _unrecoverable_reason(servermap: ServerMap) -> str:
    parts = [f"{len(servermap.headers)} good shares in {len(servermap.versions())} versions"]
    parts += [f"share {ref}: {reason}" for ref, reason in sorted(servermap.bad_shares.items())]
    return "no recoverable version: " + "; ".join(parts)


def checked_block_tree_leaves(version: SignedPrefix, header: ShareHeader, shnum: int, tree_bytes: bytes) -> list[bytes]:
    """The leaves of a share's whole block hash tree, after checking the tree against the signed root hash.

    An MDMF update keeps the leaves of the segments it does not rewrite, so they must be right.
    """
    nodes = [tree_bytes[i : i + HASH_SIZE] for i in range(0, len(tree_bytes), HASH_SIZE)]
    count = version.num_segments
    if len(tree_bytes) != tree_size(count) * HASH_SIZE:
        raise FormatError("block hash tree has the wrong size")
    first = roundup_pow2(count) - 1
    leaves = nodes[first : first + count]
    if list(HashTree(leaves)) != nodes:
        raise FormatError("block hash tree is not consistent with its leaves")
    share_tree = IncompleteHashTree(version.total)
    share_tree.set_hashes({0: version.root_hash})
    try:
        share_tree.set_hashes(dict(header.share_hash_chain), leaves={shnum: nodes[0]})
    except (BadHashError, NotEnoughHashesError) as exc:
        raise FormatError(f"block hash tree root does not chain to the signed root: {exc}") from None
    return leaves
