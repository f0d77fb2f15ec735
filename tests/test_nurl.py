"""NURLs and fURLs: Tahoe's SPKI-hash vectors, the real 1.20 announcements, and malformed input."""

import base64
import hashlib

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from lafs_core import base32
from lafs_core.errors import FormatError
from lafs_core.nurl import (
    Nurl,
    format_furl,
    format_nurl,
    parse_furl,
    parse_nurl,
    spki_hash,
    subject_public_key_info,
    tubid,
)

from .shared_data import SAMPLE_GRID, load_yaml


def _vectors():
    return load_yaml("spki-hash-test-vectors.yaml")["vector"]


def _announcements():
    with (SAMPLE_GRID / "announcements.yaml").open() as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("index", range(3))
def test_spki_hash_vectors(index):
    vector = _vectors()[index]
    der = x509.load_pem_x509_certificate(vector["certificate"].encode()).public_bytes(Encoding.DER)
    assert subject_public_key_info(der) == base64.b64decode(vector["expected-spki"])
    assert spki_hash(der) == vector["expected-hash"]
    assert len(spki_hash(der)) == 43


def test_all_three_vectors_are_distinct():
    assert len({v["expected-hash"] for v in _vectors()}) == 3


def test_tubid_is_sha1_of_the_certificate():
    der = x509.load_pem_x509_certificate(_vectors()[0]["certificate"].encode()).public_bytes(Encoding.DER)
    assert tubid(der) == hashlib.sha1(der).digest()


@pytest.mark.parametrize("entry", _announcements(), ids=lambda e: e["ann"]["nickname"])
def test_real_announcements_round_trip(entry):
    ann = entry["ann"]
    (nurl_text,) = ann["anonymous-storage-NURLs"]
    nurl = parse_nurl(nurl_text)
    assert str(nurl) == nurl_text
    assert nurl.host == "127.0.0.1" and nurl.scheme == "pb"
    assert format_nurl(nurl.spki_hash, nurl.host, nurl.port, nurl.swissnum) == nurl_text
    assert nurl.base_url == f"https://127.0.0.1:{nurl.port}"

    furl = parse_furl(ann["anonymous-storage-FURL"])
    assert len(furl.tubid) == 20
    assert str(furl) == ann["anonymous-storage-FURL"]
    assert furl.tcp_addresses() == [("127.0.0.1", nurl.port)]
    assert furl.swissnum == nurl.swissnum  # the same service, two protocols
    assert format_furl(furl.tubid, "127.0.0.1", nurl.port, furl.swissnum) == ann["anonymous-storage-FURL"]


def test_ipv6_and_tor():
    pin = "nk9X4S9fQkuC9YyHOH7XBglP0duFsbF-rIMyPTa19qI"
    nurl = parse_nurl(f"pb://{pin}@[::1]:8098/swiss#v=1")
    assert nurl.host == "::1" and nurl.base_url == "https://[::1]:8098"
    assert format_nurl(pin, "::1", 8098, "swiss") == f"pb://{pin}@[::1]:8098/swiss#v=1"
    assert parse_nurl(f"pb+tor://{pin}@abcdefgh.onion:80/swiss#v=1").scheme == "pb+tor"
    furl = parse_furl("pb://q63pujj4vpdbk2jezyf2jftsvul5pg2j@tcp:[::1]:1,tor:x.onion:2,host.example:3/s")
    assert furl.tcp_addresses() == [("::1", 1), ("host.example", 3)]
    assert parse_furl("pb://Q63PUJJ4VPDBK2JEZYF2JFTSVUL5PG2J@/s").location_hints == ()


PIN = "nk9X4S9fQkuC9YyHOH7XBglP0duFsbF-rIMyPTa19qI"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"http://{PIN}@127.0.0.1:1/s#v=1", "pb://"),
        (f"pb://{PIN}@127.0.0.1:1/s", "#v=1"),
        (f"pb://{PIN}@127.0.0.1:1/s#v=2", "#v=1"),
        (f"pb://{PIN[:-1]}@127.0.0.1:1/s#v=1", "43"),
        (f"pb://{PIN[:-1]}!@127.0.0.1:1/s#v=1", "43"),
        (f"pb://{PIN[:-1]}J@127.0.0.1:1/s#v=1", "canonical"),
        (f"pb://{PIN}@127.0.0.1/s#v=1", "HOST:PORT"),
        (f"pb://{PIN}@127.0.0.1:0/s#v=1", "port"),
        (f"pb://{PIN}@127.0.0.1:65536/s#v=1", "port"),
        (f"pb://{PIN}@127.0.0.1:x/s#v=1", "port"),
        (f"pb://{PIN}@bad host:1/s#v=1", "host"),
        (f"pb://{PIN}@[::zz]:1/s#v=1", "IPv6"),
        (f"pb://{PIN}@127.0.0.1:1/#v=1", "swissnum"),
        (f"pb://{PIN}@127.0.0.1:1/a/b#v=1", "one swissnum"),
        (f"pb://{PIN}@127.0.0.1:1#v=1", "one swissnum"),
        ("pb://127.0.0.1:1/s#v=1", "spki-hash"),
    ],
)
def test_malformed_nurls(text, message):
    with pytest.raises(FormatError, match=message):
        parse_nurl(text)


@pytest.mark.parametrize(
    "text",
    [
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2@tcp:127.0.0.1:1/s",  # 31 characters
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2j1@tcp:127.0.0.1:1/s",
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg21@tcp:127.0.0.1:1/s",  # "1" is not base32
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2j@tcp:127.0.0.1/s",
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2j@tcp:127.0.0.1:1",
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2jtcp:127.0.0.1:1/s",
        "http://q63pujj4vpdbk2jezyf2jftsvul5pg2j@tcp:127.0.0.1:1/s",
        "pb://q63pujj4vpdbk2jezyf2jftsvul5pg2j@tcp:127.0.0.1:1/s#v=1",
    ],
)
def test_malformed_furls(text):
    with pytest.raises(FormatError):
        parse_furl(text)


def test_non_text_and_bad_certificates():
    with pytest.raises(FormatError):
        parse_nurl(b"pb://x")  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        spki_hash(b"not a certificate")
    with pytest.raises(FormatError):
        format_furl(b"short", "h", 1, "s")
    with pytest.raises(FormatError):
        format_nurl(PIN, "h", 1, "s/x")


def test_base32_tubid_is_what_the_fixtures_use():
    furl = parse_furl(_announcements()[0]["ann"]["anonymous-storage-FURL"])
    assert base32.encode(furl.tubid) == "q63pujj4vpdbk2jezyf2jftsvul5pg2j"
    assert Nurl(PIN, "::1", 1, "s").base_url == "https://[::1]:1"
