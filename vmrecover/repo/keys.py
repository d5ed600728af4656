"""Encryption keys of a repository.

A repository with ``aes-256-gcm`` has two random 256-bit keys: ``enc_key`` encrypts chunk payloads
(AES-256-GCM) and ``id_key`` keys the chunk digests (HMAC-SHA256), so that equal plaintext gives
unrelated chunk names under different keys and chunk names reveal nothing about contents.

Both keys are stored in ``repo.toml`` wrapped with AES-256-GCM under a key derived from the passphrase
with scrypt (n=2**15, r=8, p=1: ~100 ms and 32 MiB here); the repository id is the wrapping's
associated data, so a key block copied from another repository does not open this one.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import AuthError

PASSPHRASE_ENV = "VMRECOVER_PASSPHRASE"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


@dataclass(frozen=True)
class Keys:
    enc_key: bytes
    id_key: bytes


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def new_keys(passphrase: str, repo_id: str) -> tuple[Keys, dict[str, Any]]:
    """Make fresh keys and the ``[encryption]`` table that stores them wrapped."""
    keys = Keys(os.urandom(32), os.urandom(32))
    salt, nonce = os.urandom(16), os.urandom(12)
    wrapped = AESGCM(_kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, keys.enc_key + keys.id_key, repo_id.encode()
    )
    table = {
        "mode": "aes-256-gcm",
        "kdf": "scrypt",
        "scrypt_n": SCRYPT_N,
        "scrypt_r": SCRYPT_R,
        "scrypt_p": SCRYPT_P,
        "salt": salt.hex(),
        "wrapped_keys": (nonce + wrapped).hex(),
    }
    return keys, table


def unwrap_keys(table: dict[str, Any], passphrase: str, repo_id: str, repo_path: str) -> Keys:
    blob = bytes.fromhex(table["wrapped_keys"])
    kek = _kek(
        passphrase, bytes.fromhex(table["salt"]), table["scrypt_n"], table["scrypt_r"], table["scrypt_p"]
    )
    try:
        raw = AESGCM(kek).decrypt(blob[:12], blob[12:], repo_id.encode())
    except InvalidTag:
        raise AuthError(
            f"wrong passphrase for repository {repo_path}",
            hint=f"check {PASSPHRASE_ENV} or the passphrase you typed",
        ) from None
    return Keys(raw[:32], raw[32:])


def ask_passphrase(repo_path: str, *, confirm: bool = False) -> str:
    """The passphrase from VMRECOVER_PASSPHRASE, else from a prompt on the terminal."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise AuthError(
                f"{PASSPHRASE_ENV} is set but empty", hint="set it to the repository's passphrase"
            )
        return env
    if not sys.stdin.isatty():
        raise AuthError(
            f"repository {repo_path} is encrypted and no passphrase was given",
            hint=f"set {PASSPHRASE_ENV} or run the command on a terminal",
        )
    first = getpass.getpass(f"Passphrase for {repo_path}: ")
    if not first:
        raise AuthError("an empty passphrase is not allowed")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise AuthError("the passphrases did not match", hint="run the command again")
    return first
