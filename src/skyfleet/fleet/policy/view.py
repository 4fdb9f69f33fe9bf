"""The spec as a policy sees it at one moment: manual pins and pools without capacity applied.

Pure. Used by the live controller (``fleet/controller.py``) and the simulator (``planner/simulator.py``) alike,
so a capacity shortage is handled the same way in both: the policy sees the pool unable to grow past the
replicas it has, and places the rest in the other pools (spot before on-demand, as always). The result is a
view, not a new spec: it is not validated again (a capped pool may fall below a schedule's minimum).
"""

from __future__ import annotations

from collections.abc import Mapping

from skyfleet.fleet.spec import ModelFleet

__all__ = ["constrained"]


def constrained(spec: ModelFleet, *, pins: Mapping[str, int] | None = None,
                capped: Mapping[str, int] | None = None) -> ModelFleet:
    """``spec`` with each pinned pool fixed at its pin (min = max, within its max) and each capped pool's max
    lowered to its cap (its min too, if above); the on-demand floor lowered to what the on-demand pools can
    still hold. Pins win over caps. Unchanged (the same object) when nothing applies."""
    pins, capped = pins or {}, capped or {}
    pools = []
    changed = False
    for p in spec.pools:
        if p.name in pins:
            n = min(pins[p.name], p.max)
            pools.append(p.model_copy(update={"min": n, "max": n}))
            changed = True
        elif p.name in capped:
            cap = max(0, min(capped[p.name], p.max))
            pools.append(p.model_copy(update={"max": cap, "min": min(p.min, cap)}))
            changed = True
        else:
            pools.append(p)
    if not changed:
        return spec
    floor = min(spec.on_demand_floor, sum(p.max for p in pools if p.tier == "on-demand"))
    return spec.model_copy(update={"pools": tuple(pools), "on_demand_floor": floor})
