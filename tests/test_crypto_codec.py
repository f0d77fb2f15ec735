import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lafs_core.codec import CrsCodec
from lafs_core.crypto import AesCtr, aes_ctr

KEY = bytes(range(16))


def test_aes_ctr_known_answer():
    # AES-128 of a zero counter block under this key, i.e. the first keystream block (FIPS-197 style check).
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ecb = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    first_block = ecb.update(bytes(16))
    second_block = ecb.update((1).to_bytes(16, "big"))
    assert aes_ctr(KEY, bytes(32)) == first_block + second_block


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=10**12))
def test_random_access_matches_the_stream(data, offset):
    # Decrypting at an offset equals taking that slice of the whole keystream.
    small = offset % 1000
    whole = aes_ctr(KEY, bytes(small) + data)
    assert aes_ctr(KEY, data, small) == whole[small:]
    # Far offsets: the counter is offset // 16, the skip offset % 16.
    block, skip = divmod(offset, 16)
    assert aes_ctr(KEY, data, offset) == aes_ctr(KEY, bytes(skip) + data, block * 16)[skip:]


def test_streaming_equals_one_shot():
    data = os.urandom(1000)
    stream = AesCtr(KEY)
    assert stream.update(data[:7]) + stream.update(data[7:500]) + stream.update(data[500:]) == aes_ctr(KEY, data)


def test_wrong_key_size():
    with pytest.raises(ValueError):
        AesCtr(b"short")


@given(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=12), st.data())
def test_any_k_blocks_rebuild_the_segment(k, extra, data):
    total = min(k + extra, 256)
    codec = CrsCodec(k * data.draw(st.integers(min_value=1, max_value=64)), k, total)
    segment = data.draw(st.binary(min_size=codec.segment_size, max_size=codec.segment_size))
    blocks = codec.encode(segment)
    assert len(blocks) == total
    assert b"".join(blocks[:k]) == segment  # systematic
    chosen = data.draw(st.lists(st.sampled_from(range(total)), min_size=k, max_size=k, unique=True))
    assert codec.decode({i: blocks[i] for i in chosen}) == segment


def test_codec_rejects_bad_parameters():
    with pytest.raises(ValueError):
        CrsCodec(10, 3, 10)  # segment not a multiple of k
    with pytest.raises(ValueError):
        CrsCodec(9, 3, 257)
    with pytest.raises(ValueError):
        CrsCodec(9, 4, 3)
