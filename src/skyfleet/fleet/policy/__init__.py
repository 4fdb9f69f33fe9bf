"""Scaling policies: pure functions from (spec, observed window, catalog, now, state) to a decision.

A policy is chosen per model by name (``ModelFleet.policy``); :func:`load_policy` builds one. The
controller records each decision with its inputs; the planner/simulator replays the same classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from skyfleet.config import ConfigError

if TYPE_CHECKING:
    from skyfleet.fleet.policy.base import Policy

__all__ = ["load_policy", "policy_names"]


def _default() -> Policy:
    from skyfleet.fleet.policy.default import DefaultPolicy

    return DefaultPolicy()


def _factories() -> dict[str, Callable[[], Policy]]:
    # The table of policies by name; add a policy here (a new module in this package).
    return {"default": _default}


def policy_names() -> list[str]:
    return sorted(_factories())


def load_policy(name: str) -> Policy:
    """A fresh instance of the policy called ``name``; :class:`ConfigError` listing the known ones."""
    factory = _factories().get(name)
    if factory is None:
        raise ConfigError(f"unknown fleet policy {name!r}; known: {', '.join(policy_names())}")
    return factory()
