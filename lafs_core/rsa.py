"""RSA for mutable files (`src/allmydata/crypto/rsa.py`): 2048-bit keys, PKCS#8 / SPKI DER, PSS signatures.

New keys use e = 65537; reading accepts any public exponent, because old shares (the legacy vectors) used 17.
Signatures are RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt, exactly as Tahoe makes them.
"""

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from .errors import FormatError

KEY_BITS = 2048
PUBLIC_EXPONENT = 65537
PSS_SALT_LENGTH = 32

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)


def generate_private_key() -> RSAPrivateKey:
    """A new 2048-bit key; slow (tens to hundreds of milliseconds), so callers keep a pool."""
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS)


def private_key_der(key: RSAPrivateKey) -> bytes:
    """PKCS#8 DER, unencrypted: the bytes the writekey is hashed from."""
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_der(key: RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo DER: the bytes the fingerprint is hashed from and shares carry."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key_der(der: bytes) -> RSAPrivateKey:
    """Load a PKCS#8 DER private key, which must be RSA-2048.

    OpenSSL's key check (primality of the factors) is skipped: it costs ~35 ms, paid once per mutable file a
    process writes (grid.known_writers keeps the loaded key), and buys nothing here. Callers load only keys
    they made or whose bytes hash to the write cap's writekey, so the key is the one the file's creator chose;
    it is used only to sign, and every reader verifies signatures.
    """
    try:
        key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"not a PKCS#8 private key: {exc}") from None
    if not isinstance(key, RSAPrivateKey) or key.key_size != KEY_BITS:
        raise FormatError(f"private key is not RSA-{KEY_BITS}")
    return key


def load_private_key_pem(pem: bytes) -> RSAPrivateKey:
    """Load a PEM private key (PKCS#1 or PKCS#8), as in Tahoe's test vectors."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, RSAPrivateKey) or key.key_size != KEY_BITS:
        raise FormatError(f"private key is not RSA-{KEY_BITS}")
    return key


def load_public_key_der(der: bytes) -> RSAPublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"not an SPKI public key: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise FormatError("public key is not RSA")
    return key


def sign(key: RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, _PSS, hashes.SHA256())


def verify(key: RSAPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True
