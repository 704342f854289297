"""Ed25519 keys of the audit trail: sign, verify, fingerprint (needs ``cryptography``).

The server signs with an :class:`AuditSigningKey` (every audit event, the chain head and forgetting
certificates; the messages are in :mod:`protos.audit_chain`); anyone holding its
:class:`AuditPublicKey` (PEM, SubjectPublicKeyInfo) verifies offline. A key's fingerprint is the
SHA-256 (hex) of its raw 32-byte public key. Signatures travel as 128 lowercase hex digits, and only
that spelling verifies (so no signature has two spellings).
"""

from __future__ import annotations

import hashlib
import re

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


class AuditPublicKey:
    """A public audit key: verifies what the matching :class:`AuditSigningKey` signed."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self.raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def from_pem(cls, pem: bytes | str) -> AuditPublicKey:
        """Loads a PEM public key (``-----BEGIN PUBLIC KEY-----``).

        Raises:
            ValueError: It is not PEM, or not an Ed25519 key.
        """
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise ValueError(f"not a PEM public key: {error}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"the audit key must be Ed25519, got {type(key).__name__}")
        return cls(key)

    @property
    def pem(self) -> str:
        """The key as PEM (SubjectPublicKeyInfo)."""
        encoded = self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return encoded.decode()

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the raw 32-byte public key."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether ``signature`` (128 lowercase hex digits) is this key's signature of ``message``."""
        if not _SIGNATURE.match(signature):
            return False
        try:
            self._key.verify(bytes.fromhex(signature), message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuditPublicKey) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"AuditPublicKey({self.fingerprint[:16]}…)"


class AuditSigningKey:
    """The server's private audit key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = AuditPublicKey(key.public_key())

    @classmethod
    def generate(cls) -> AuditSigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> AuditSigningKey:
        """Loads an unencrypted PKCS#8 PEM private key (as ``openssl genpkey -algorithm ed25519`` writes).

        Raises:
            ValueError: It is not an unencrypted PEM private key, or not Ed25519.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise ValueError(f"not an unencrypted PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"the audit key must be Ed25519, got {type(key).__name__}")
        return cls(key)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for the key file, mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> str:
        """The signature of ``message``, as 128 lowercase hex digits."""
        return self._key.sign(message).hex()

    def __repr__(self) -> str:
        return f"AuditSigningKey(public {self.public_key.fingerprint[:16]}…)"
