"""The key ladder of a mutable file: private key -> writekey -> readkey -> storage index, plus fingerprint.

A write cap holds the writekey and fingerprint; the private key itself travels encrypted (with the writekey)
inside every share, so a writer recovers it from the grid. Each server gets its own write enabler, derived from
the writekey and the server's 20-byte TubID, which is what lets other Tahoe clients update the same slot.
"""

from dataclasses import dataclass
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from .. import rsa
from ..caps import MdmfWriteCap, MutableWriteCap, SskWriteCap
from ..crypto import aes_ctr
from ..errors import FormatError
from ..hashes import (
    ssk_pubkey_fingerprint_hash,
    ssk_readkey_hash,
    ssk_storage_index_hash,
    ssk_write_enabler_hash,
    ssk_writekey_hash,
)

SDMF = "SDMF"
MDMF = "MDMF"


@dataclass(frozen=True)
class WriterKeys:
    """Everything a writer of one mutable file needs: the key pair and the values derived from it."""

    private_key_der: bytes
    public_key_der: bytes

    @classmethod
    def from_private_key(cls, key: RSAPrivateKey) -> "WriterKeys":
        return cls(rsa.private_key_der(key), rsa.public_key_der(key.public_key()))

    @property
    def writekey(self) -> bytes:
        return ssk_writekey_hash(self.private_key_der)

    @property
    def readkey(self) -> bytes:
        return ssk_readkey_hash(self.writekey)

    @property
    def storage_index(self) -> bytes:
        return ssk_storage_index_hash(self.readkey)

    @property
    def fingerprint(self) -> bytes:
        return ssk_pubkey_fingerprint_hash(self.public_key_der)

    @property
    def encrypted_private_key(self) -> bytes:
        """The private key as stored in shares: AES-CTR under the writekey."""
        return aes_ctr(self.writekey, self.private_key_der)

    def cap(self, file_format: str = SDMF) -> MutableWriteCap:
        cls = MdmfWriteCap if file_format == MDMF else SskWriteCap
        return cls(self.writekey, self.fingerprint)

    @cached_property
    def private_key(self) -> RSAPrivateKey:
        """The loaded key, kept: a writer signs with it on every publish."""
        return rsa.load_private_key_der(self.private_key_der)


def decrypt_private_key(writekey: bytes, encrypted: bytes) -> bytes:
    """Recover the PKCS#8 DER private key from a share's encrypted copy."""
    return aes_ctr(writekey, encrypted)


def writer_keys_from_share(cap: MutableWriteCap, encrypted_private_key: bytes) -> WriterKeys:
    """Rebuild the writer's keys from a write cap and the encrypted key in one of its shares.

    The decrypted key must hash back to the cap's writekey, so a share with a bad copy is caught here.
    """
    der = decrypt_private_key(cap.writekey, encrypted_private_key)
    if ssk_writekey_hash(der) != cap.writekey:
        raise FormatError("the share's encrypted private key does not match the write cap")
    key = rsa.load_private_key_der(der)
    keys = WriterKeys(der, rsa.public_key_der(key.public_key()))
    if keys.fingerprint != cap.fingerprint:
        raise FormatError("the share's private key does not match the cap's fingerprint")
    return keys


def write_enabler(writekey: bytes, server_tubid: bytes) -> bytes:
    """The secret that authorises writes to this file's slot on one server (its 20-byte TubID)."""
    return ssk_write_enabler_hash(writekey, server_tubid)
