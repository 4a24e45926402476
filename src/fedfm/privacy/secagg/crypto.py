"""The cryptographic primitives of secure aggregation, all from the ``cryptography`` package.

- key agreement: X25519 (Bernstein 2006), raw 32-byte public keys;
- a shared secret is turned into a key by HKDF-SHA256 (RFC 5869) with a purpose label, so
  the mask seed and the encryption key of the same pair differ;
- the mask PRG: the ChaCha20 keystream under a 32-byte seed, read as little-endian
  uint32 words (one word per coordinate);
- shares travel encrypted and authenticated with AES-256-GCM (a tampered ciphertext fails
  its tag, so a malformed share is detected, not used).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw

__all__ = ["InvalidTag", "agree", "decrypt", "encrypt", "keypair", "prg", "private_bytes", "public_of"]


def keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 keys."""
    sk = X25519PrivateKey.generate()
    return private_bytes(sk), sk.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends of the pair derive alike: HKDF-SHA256(X25519(sk, pk), info=purpose)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedfm-secagg/" + purpose).derive(shared)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 words from a 32-byte seed (ChaCha20 keystream, nonce 0)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * length)), dtype="<u4").astype(np.uint32)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Raises ``InvalidTag`` when the ciphertext or its associated data was altered."""
    return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)
