"""The one error every cryptographic failure collapses into."""

from __future__ import annotations


class DecryptionError(Exception):
    """Ciphertext could not be decrypted: wrong key, tampered bytes, wrong AAD, wrong tenant,
    unknown format or a shredded key. Deliberately opaque (like Fernet's ``InvalidToken``):
    the message never says which, and callers must fail closed."""

    MESSAGE = "ciphertext could not be decrypted"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)
