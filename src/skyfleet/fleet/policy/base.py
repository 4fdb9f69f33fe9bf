"""What every scaling policy takes and returns: :class:`Decision` and :class:`PolicyState` are data.

``decide(spec, window, catalog, now, state) -> (decision, next_state)`` is pure: the same inputs give the
same outputs, nothing is read from the clock or the network, nothing is mutated. ``now`` is wall-clock
epoch seconds (``Clock.wall()``): schedules are calendar times, and the state is persisted and must keep
its meaning across a controller restart (:meth:`PolicyState.to_json` / :meth:`PolicyState.from_json`
round-trip exactly, so a restarted controller decides exactly what the old one would have).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.policy.signals import WindowSnapshot
    from skyfleet.fleet.spec import ModelFleet

__all__ = ["Decision", "Policy", "PolicyState", "StateError"]

#: Version of the persisted :class:`PolicyState` layout.
STATE_VERSION = 1
#: Most recommendations kept in the state (the controller ticks every few seconds; this covers hours).
MAX_HISTORY = 4096


class StateError(ValueError):
    """A persisted policy state that cannot be read (another version, or damaged)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the fleet of one model should be now; the actuator makes it so.

    ``desired``: replicas per pool (every pool of the spec). ``drain``: replicas to take out of routing
    and stop (only replicas seen in the window; one never seen is stopped by the actuator first).
    ``direction``: +1 up, -1 down, 0 unchanged total. ``inputs``: the numbers the decision was made from
    (numbers or None only), recorded with it.
    """

    desired: Mapping[str, int]
    drain: tuple[str, ...] = ()
    reason: str = ""
    direction: int = 0
    inputs: Mapping[str, float | int | None] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.desired.values())

    def to_json(self) -> dict[str, Any]:
        return {"desired": dict(sorted(self.desired.items())), "drain": list(self.drain), "reason": self.reason,
                "direction": self.direction}


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What a policy remembers between decisions (persisted by the controller after each one).

    ``desired``: the last decision's replicas per pool (None: no decision yet). ``history``: recent
    (time, recommended total) pairs, for the stabilisation windows. ``last_change_at`` /
    ``last_direction``: the last change of the total, for the cooldown. ``idle_since``: start of the
    current idle period (None: not idle), for scale-to-zero.
    """

    desired: Mapping[str, int] | None = None
    history: tuple[tuple[float, int], ...] = ()
    last_change_at: float | None = None
    last_direction: int = 0
    idle_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "desired": dict(sorted(self.desired.items())) if self.desired is not None else None,
            "history": [[t, w] for t, w in self.history],
            "last_change_at": self.last_change_at,
            "last_direction": self.last_direction,
            "idle_since": self.idle_since,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicyState:
        try:
            if data.get("version") != STATE_VERSION:
                raise StateError(f"policy state version {data.get('version')!r}, expected {STATE_VERSION}")
            desired = data["desired"]
            state = cls(
                desired=None if desired is None else {str(k): _count(v) for k, v in desired.items()},
                history=tuple((_time(t), _count(w)) for t, w in data["history"])[-MAX_HISTORY:],
                last_change_at=None if data["last_change_at"] is None else _time(data["last_change_at"]),
                last_direction=int(data["last_direction"]),
                idle_since=None if data["idle_since"] is None else _time(data["idle_since"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"unreadable policy state: {exc}") from None
        if state.last_direction not in (-1, 0, 1):
            raise StateError(f"unreadable policy state: last_direction {state.last_direction}")
        return state


def _count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"expected a count, got {v!r}")
    return v


def _time(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"expected a time, got {v!r}")
    return float(v)


class Policy(Protocol):
    name: str

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        """The decision for one model's fleet at ``now`` (epoch seconds) and the state to keep."""
        ...
