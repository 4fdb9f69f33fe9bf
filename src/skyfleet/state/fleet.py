"""The fleet controller's records: the policy state of each model and the history of its decisions.

:meth:`FleetRepository.record` saves a decision and the state after it in one transaction, so a
restarted controller always resumes from the state of the last decision it recorded. The inputs of a
decision are numbers (or null) only, never text: they go to ``skyfleet fleet history`` and the admin API.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from skyfleet.state.access import Database
from skyfleet.state.models import FleetDecision, FleetState

__all__ = ["DecisionRecord", "FleetRepository", "numbers_only"]

LIST_LIMIT_MAX = 1000


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    id: int
    model: str
    at: datetime
    inputs: dict[str, float | int | None]
    decision: dict[str, Any]
    reason: str


def numbers_only(inputs: Mapping[str, Any]) -> dict[str, float | int | None]:
    """``inputs`` checked to be numbers or None (non-finite numbers become None); ValueError otherwise."""
    out: dict[str, float | int | None] = {}
    for key, value in inputs.items():
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            out[str(key)] = value
        elif isinstance(value, float):
            out[str(key)] = value if math.isfinite(value) else None
        else:
            raise ValueError(f"decision input {key!r} is not a number")
    return out


class FleetRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._db = Database(engine)

    async def load_state(self, model: str) -> dict[str, Any] | None:
        """The saved policy state of ``model`` (a JSON object), None if there is none."""
        async with self._db.session() as session:
            raw = (await session.execute(select(FleetState.state).where(FleetState.model == model))).scalar()
        return None if raw is None else _object(raw)

    async def save_state(self, model: str, state: Mapping[str, Any], at: datetime) -> None:
        async with self._db.session(write=True) as session:
            await _upsert_state(session, model, state, at)

    async def record(self, model: str, at: datetime, *, inputs: Mapping[str, Any], decision: Mapping[str, Any],
                     reason: str, state: Mapping[str, Any]) -> int:
        """Append a decision and save the state after it, in one transaction; the decision's id."""
        row = _decision_row(model, at, inputs, decision, reason)
        async with self._db.session(write=True) as session:
            result = await session.execute(FleetDecision.__table__.insert().values(row)
                                           .returning(FleetDecision.id))
            await _upsert_state(session, model, state, at)
            return int(result.scalar_one())

    async def append_decision(self, model: str, at: datetime, *, inputs: Mapping[str, Any],
                              decision: Mapping[str, Any], reason: str) -> int:
        row = _decision_row(model, at, inputs, decision, reason)
        async with self._db.session(write=True) as session:
            result = await session.execute(FleetDecision.__table__.insert().values(row)
                                           .returning(FleetDecision.id))
            return int(result.scalar_one())

    async def list_decisions(self, model: str | None = None, *, limit: int = 100,
                             before_id: int | None = None) -> list[DecisionRecord]:
        """Newest first; ``before_id`` pages back (ids only grow)."""
        limit = max(1, min(limit, LIST_LIMIT_MAX))
        query = select(FleetDecision).order_by(FleetDecision.id.desc()).limit(limit)
        if model is not None:
            query = query.where(FleetDecision.model == model)
        if before_id is not None:
            query = query.where(FleetDecision.id < before_id)
        async with self._db.session() as session:
            rows = (await session.execute(query)).scalars().all()
            return [DecisionRecord(r.id, r.model, r.at, _object(r.inputs), _object(r.decision), r.reason)
                    for r in rows]

    async def prune_decisions(self, older_than: datetime) -> int:
        """Delete decisions before ``older_than``; how many."""
        async with self._db.session(write=True) as session:
            result = await session.execute(delete(FleetDecision).where(FleetDecision.at < older_than))
            return max(0, result.rowcount or 0)  # type: ignore[attr-defined]


def _decision_row(model: str, at: datetime, inputs: Mapping[str, Any], decision: Mapping[str, Any],
                  reason: str) -> dict[str, Any]:
    return {"model": model, "at": at, "inputs": json.dumps(numbers_only(inputs), allow_nan=False),
            "decision": json.dumps(dict(decision), allow_nan=False, sort_keys=True), "reason": reason}


async def _upsert_state(session: AsyncSession, model: str, state: Mapping[str, Any], at: datetime) -> None:
    text = json.dumps(dict(state), allow_nan=False, sort_keys=True)
    name = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = (postgresql.insert if name == "postgresql" else sqlite.insert)(FleetState)
    stmt = insert.values(model=model, state=text, updated_at=at)
    await session.execute(stmt.on_conflict_do_update(index_elements=[FleetState.model],
                                                     set_={"state": text, "updated_at": at}))


def _object(raw: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("stored fleet record is not a JSON object")
    return value
