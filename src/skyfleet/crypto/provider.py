"""Compatibility module: the key providers live in :mod:`skyfleet.crypto.providers`."""

from skyfleet.crypto.providers.base import KeyProvider, RotatingKeyProvider
from skyfleet.crypto.providers.local import LocalKeyProvider

__all__ = ["KeyProvider", "LocalKeyProvider", "RotatingKeyProvider"]
