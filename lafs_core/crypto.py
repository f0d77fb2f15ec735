"""AES-128-CTR as Tahoe uses it: a zero IV taken as one 128-bit big-endian counter over the whole stream.

Random access to byte `offset` starts the counter at `offset // 16` and drops `offset % 16` keystream bytes,
which is how a reader decrypts one segment without the ones before it.
"""

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .hashes import KEY_SIZE

_BLOCK = 16


class AesCtr:
    """A CTR keystream positioned at a byte offset; `update` encrypts (or decrypts) the next bytes."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, offset: int = 0) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-128 key must be {KEY_SIZE} bytes, got {len(key)}")
        counter = (offset // _BLOCK).to_bytes(_BLOCK, "big")
        self._ctx = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        skip = offset % _BLOCK
        if skip:
            self._ctx.update(bytes(skip))

    def update(self, data: bytes | memoryview) -> bytes:
        return self._ctx.update(data)


def aes_ctr(key: bytes, data: bytes, offset: int = 0) -> bytes:
    """Encrypt or decrypt `data`, which sits at byte `offset` of the stream."""
    return AesCtr(key, offset).update(data)
