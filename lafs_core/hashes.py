"""Tahoe's tagged hashes (`src/allmydata/util/hashutil.py`), every one of them, by purpose.

All are SHA-256d over a netstring-framed tag followed by the value. The tag prefix is hashed once per tag and
copied per call, which keeps the per-block cost to the SHA-256 of the data itself.
"""

import hashlib
from collections.abc import Iterable

from .netstring import netstring

KEY_SIZE = 16
HASH_SIZE = 32
SALT_SIZE = 16


def sha256d(data: bytes) -> bytes:
    """SHA256(SHA256(data))."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


class TaggedHasher:
    """An incremental tagged hash: feed data in pieces, take a (truncated) SHA-256d digest."""

    __slots__ = ("_inner", "_truncate")

    def __init__(self, tag: bytes, truncate: int | None = None) -> None:
        self._inner = hashlib.sha256(netstring(tag))
        self._truncate = truncate

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.update(data)

    def digest(self) -> bytes:
        return hashlib.sha256(self._inner.digest()).digest()[: self._truncate]


class _Tag:
    """A tag whose netstring prefix is pre-hashed, for hashing many short values cheaply."""

    __slots__ = ("_prefix", "_truncate")

    def __init__(self, tag: bytes, truncate: int | None = None) -> None:
        self._prefix = hashlib.sha256(netstring(tag))
        self._truncate = truncate

    def __call__(self, *values: bytes | memoryview) -> bytes:
        h = self._prefix.copy()
        for value in values:
            h.update(value)
        return hashlib.sha256(h.digest()).digest()[: self._truncate]


def tagged_hash(tag: bytes, value: bytes, truncate: int | None = None) -> bytes:
    """SHA256d(ns(tag) + value)[:truncate]."""
    return sha256d(netstring(tag) + value)[:truncate]


def tagged_pair_hash(tag: bytes, a: bytes, b: bytes, truncate: int | None = None) -> bytes:
    """SHA256d(ns(tag) + ns(a) + ns(b))[:truncate]."""
    return sha256d(netstring(tag) + netstring(a) + netstring(b))[:truncate]


# --- immutable files -------------------------------------------------------------------------------------------
_storage_index = _Tag(b"allmydata_immutable_key_to_storage_index_v1", KEY_SIZE)
_block = _Tag(b"allmydata_encoded_subshare_v1")
_uri_extension = _Tag(b"allmydata_uri_extension_v1")
_crypttext = _Tag(b"allmydata_crypttext_v1")
_crypttext_segment = _Tag(b"allmydata_crypttext_segment_v1")
_plaintext = _Tag(b"allmydata_plaintext_v1")
_plaintext_segment = _Tag(b"allmydata_plaintext_segment_v1")

CRYPTTEXT_TAG = b"allmydata_crypttext_v1"


def storage_index_hash(key: bytes) -> bytes:
    """CHK storage index: 16 bytes derived from the encryption key."""
    return _storage_index(key)


def block_hash(block: bytes | memoryview) -> bytes:
    """Leaf of a block hash tree (CHK, SDMF); MDMF passes salt and block together."""
    return _block(block)


def salted_block_hash(salt: bytes, block: bytes) -> bytes:
    """MDMF block hash: the salt is hashed in front of the block."""
    return _block(salt, block)


def uri_extension_hash(ueb: bytes) -> bytes:
    """The UEB hash that a CHK cap commits to."""
    return _uri_extension(ueb)


def crypttext_hash(ciphertext: bytes) -> bytes:
    """Whole-file ciphertext hash (use `crypttext_hasher` to stream)."""
    return _crypttext(ciphertext)


def crypttext_hasher() -> TaggedHasher:
    return TaggedHasher(CRYPTTEXT_TAG)


def crypttext_segment_hash(segment: bytes) -> bytes:
    """Leaf of the crypttext hash tree, over the unpadded segment ciphertext."""
    return _crypttext_segment(segment)


def plaintext_hash(data: bytes) -> bytes:
    return _plaintext(data)


def plaintext_segment_hash(data: bytes) -> bytes:
    return _plaintext_segment(data)


def convergence_tag(convergence: bytes, needed: int, total: int, segment_size: int) -> bytes:
    """The tag of the convergent-key hash; it carries the secret and the encoding parameters."""
    if not 1 <= needed <= total <= 256:
        raise ValueError(f"bad encoding parameters k={needed} N={total}")
    params = b"%d,%d,%d" % (needed, total, segment_size)
    return b"allmydata_immutable_content_to_key_with_added_secret_v1+" + netstring(convergence) + netstring(params)


def convergence_hasher(convergence: bytes, needed: int, total: int, segment_size: int) -> TaggedHasher:
    """Streaming hasher of the plaintext whose digest is the 16-byte convergent encryption key."""
    return TaggedHasher(convergence_tag(convergence, needed, total, segment_size), KEY_SIZE)


def convergence_hash(
    needed: int, total: int, segment_size: int, data: bytes | Iterable[bytes], convergence: bytes
) -> bytes:
    """Convergent key of `data` (bytes or an iterable of chunks)."""
    hasher = convergence_hasher(convergence, needed, total, segment_size)
    for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        hasher.update(chunk)
    return hasher.digest()


# --- Merkle trees ----------------------------------------------------------------------------------------------
_empty_leaf = _Tag(b"Merkle tree empty leaf")
_MERKLE_NODE_PREFIX = netstring(b"Merkle tree internal node")


def empty_leaf_hash(index: int) -> bytes:
    return _empty_leaf(b"%d" % index)


def merkle_pair_hash(left: bytes, right: bytes) -> bytes:
    return sha256d(_MERKLE_NODE_PREFIX + netstring(left) + netstring(right))


# --- mutable files ---------------------------------------------------------------------------------------------
_ssk_writekey = _Tag(b"allmydata_mutable_privkey_to_writekey_v1", KEY_SIZE)
_ssk_readkey = _Tag(b"allmydata_mutable_writekey_to_readkey_v1", KEY_SIZE)
_ssk_storage_index = _Tag(b"allmydata_mutable_readkey_to_storage_index_v1", KEY_SIZE)
_ssk_fingerprint = _Tag(b"allmydata_mutable_pubkey_to_fingerprint_v1")
_ssk_write_enabler_master = _Tag(b"allmydata_mutable_writekey_to_write_enabler_master_v1")


def ssk_writekey_hash(privkey_der: bytes) -> bytes:
    return _ssk_writekey(privkey_der)


def ssk_readkey_hash(writekey: bytes) -> bytes:
    return _ssk_readkey(writekey)


def ssk_storage_index_hash(readkey: bytes) -> bytes:
    return _ssk_storage_index(readkey)


def ssk_pubkey_fingerprint_hash(pubkey_der: bytes) -> bytes:
    return _ssk_fingerprint(pubkey_der)


def ssk_readkey_data_hash(salt: bytes, readkey: bytes) -> bytes:
    """The AES key of one SDMF version or one MDMF segment: salt first, then readkey."""
    return tagged_pair_hash(b"allmydata_mutable_readkey_to_datakey_v1", salt, readkey, KEY_SIZE)


def ssk_write_enabler_master_hash(writekey: bytes) -> bytes:
    return _ssk_write_enabler_master(writekey)


def ssk_write_enabler_hash(writekey: bytes, server_id: bytes) -> bytes:
    """Write enabler for one server; `server_id` is the server's 20-byte TubID."""
    wem = ssk_write_enabler_master_hash(writekey)
    return tagged_pair_hash(b"allmydata_mutable_write_enabler_master_and_nodeid_to_write_enabler_v1", wem, server_id)


# --- directories -----------------------------------------------------------------------------------------------
def mutable_rwcap_salt_hash(child_rw_uri: bytes) -> bytes:
    """Deterministic salt for a child write cap stored in a mutable directory."""
    return tagged_hash(b"allmydata_dirnode_child_rwcap_to_salt_v1", child_rw_uri, 16)


def mutable_rwcap_key_hash(salt: bytes, dir_writekey: bytes) -> bytes:
    return tagged_pair_hash(
        b"allmydata_mutable_writekey_and_salt_to_dirnode_child_capkey_v1", salt, dir_writekey, KEY_SIZE
    )


def tahoe_hmac(key: bytes, data: bytes) -> bytes:
    """Tahoe's dirnode MAC. Not RFC 2104: the key is XORed without being padded to the block size."""
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


# --- leases ----------------------------------------------------------------------------------------------------
def my_renewal_secret_hash(lease_secret: bytes) -> bytes:
    """Client renewal secret. Tahoe swaps tag and value here: the secret is the tag."""
    return tagged_hash(lease_secret, b"allmydata_client_renewal_secret_v1")


def my_cancel_secret_hash(lease_secret: bytes) -> bytes:
    """Client cancel secret (tag and value swapped, as for renewal)."""
    return tagged_hash(lease_secret, b"allmydata_client_cancel_secret_v1")


def file_renewal_secret_hash(client_renewal_secret: bytes, storage_index: bytes) -> bytes:
    return tagged_pair_hash(b"allmydata_file_renewal_secret_v1", client_renewal_secret, storage_index)


def file_cancel_secret_hash(client_cancel_secret: bytes, storage_index: bytes) -> bytes:
    return tagged_pair_hash(b"allmydata_file_cancel_secret_v1", client_cancel_secret, storage_index)


def bucket_renewal_secret_hash(file_renewal_secret: bytes, server_lease_seed: bytes) -> bytes:
    return tagged_pair_hash(b"allmydata_bucket_renewal_secret_v1", file_renewal_secret, server_lease_seed)


def bucket_cancel_secret_hash(file_cancel_secret: bytes, server_lease_seed: bytes) -> bytes:
    return tagged_pair_hash(b"allmydata_bucket_cancel_secret_v1", file_cancel_secret, server_lease_seed)


# --- servers ---------------------------------------------------------------------------------------------------
def permute_server_hash(storage_index: bytes, permutation_seed: bytes) -> bytes:
    """Position of a server on a storage index's permuted ring (plain SHA-1)."""
    return hashlib.sha1(storage_index + permutation_seed).digest()
