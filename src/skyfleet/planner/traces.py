"""Request traces for the planner and the simulator: readers, scaling and slicing.

Three sources, one value (:class:`~skyfleet.planner.types.Trace`):

* :func:`read_azure_csv`: the Azure LLM inference trace (Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0):
  ``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock timestamps with 7 fractional digits.
* :func:`read_mooncake`: the Mooncake FAST'25 traces (kvcache-ai/Mooncake, Apache-2.0), either the gzip CSV
  in ``shared/data`` (``timestamp_ms,input_length,output_length,hash_ids``; hash ids space-separated) or
  the original JSONL (``timestamp``, ``input_length``, ``output_length``, ``hash_ids``). Blocks are 512
  tokens. The traces carry no session ids; prefix sharing is in ``hash_ids`` only.
* :func:`read_usage_records`: skyfleet's own ``usage_records`` table (what the gateway metered).

Every request must produce at least one token, so an output count of 0 is clamped to 1; the number of
clamped rows is in ``meta["clamped_output_tokens"]``. Bad input raises :class:`TraceError` naming the file,
the line (1-based, the header is line 1) and the column (1-based character offset of the field, and the
field's name). :func:`load_trace` picks a reader from a reference string; :func:`scale` and
:func:`time_slice` derive new traces and record what they did in ``meta``.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import gzip
import io
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from skyfleet.config import ConfigError
from skyfleet.planner.types import Trace

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TraceError",
    "load_trace",
    "read_azure_csv",
    "read_mooncake",
    "read_usage_records",
    "read_usage_records_async",
    "scale",
    "time_slice",
]

#: Tokens per prefix-block hash in the Mooncake traces (their README).
MOONCAKE_BLOCK_TOKENS = 512

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MOONCAKE_COLUMNS = ("timestamp_ms", "input_length", "output_length", "hash_ids")


class TraceError(ConfigError):
    """A trace that cannot be read; the message names the file, line and column."""


# -- helpers -----------------------------------------------------------------------------------------


def _where(path: str | Path, line: int, column: int | None = None, name: str | None = None) -> str:
    at = f"{path}:{line}" + (f":{column}" if column is not None else "")
    return at + (f": column '{name}'" if name else "")


def _field_offsets(text: str, sep: str = ",") -> list[int]:
    """1-based character column where each field of ``text`` starts."""
    cols = [1]
    for i, ch in enumerate(text):
        if ch == sep:
            cols.append(i + 2)
    return cols


def _count(value: str, where: Callable[[], str]) -> int:
    """``value`` as a token count; ``where()`` (only called on error) says where it was."""
    try:
        n = int(value)
    except ValueError:
        raise TraceError(f"{where()}: {value!r} is not a whole number of tokens") from None
    if n < 0:
        raise TraceError(f"{where()}: token count {n} is negative")
    return n


def _build(name: str, arrival: list[float], prompt: list[int], output: list[int], *,
           meta: dict[str, str], hash_ids: tuple[tuple[int, ...], ...] | None = None,
           block_tokens: int | None = None, tenant: tuple[str | None, ...] | None = None,
           start_epoch: float | None = None) -> Trace:
    out = np.asarray(output, dtype=np.int64)
    clamped = int(np.count_nonzero(out < 1))
    if clamped:
        out = np.maximum(out, 1)
    meta = dict(meta, rows=str(len(arrival)), clamped_output_tokens=str(clamped))
    return Trace(name=name, arrival_s=np.asarray(arrival, dtype=np.float64),
                 prompt_tokens=np.asarray(prompt, dtype=np.int64), output_tokens=out, hash_ids=hash_ids,
                 block_tokens=block_tokens, tenant=tenant, start_epoch=start_epoch, meta=meta)


def _header(path: str | Path, line: str, wanted: Sequence[str]) -> dict[str, int]:
    names = [c.strip() for c in line.rstrip("\r\n").split(",")]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise TraceError(f"{_where(path, 1, 1)}: missing column(s) {', '.join(missing)}; "
                         f"the header has {', '.join(names) or 'nothing'} (expected {', '.join(wanted)})")
    return {c: names.index(c) for c in wanted}


# -- Azure ---------------------------------------------------------------------------------------------


def _azure_epoch(stamp: str, days: dict[str, int]) -> float:
    """``YYYY-MM-DD HH:MM:SS[.fffffff]`` (UTC) -> epoch seconds; ValueError if malformed."""
    if len(stamp) < 19 or stamp[4] != "-" or stamp[7] != "-" or stamp[10] not in " T" or stamp[13] != ":" \
            or stamp[16] != ":":
        raise ValueError(stamp)
    day = stamp[:10]
    base = days.get(day)
    if base is None:
        base = calendar.timegm(datetime.strptime(day, "%Y-%m-%d").timetuple())
        days[day] = base
    h, m, s = int(stamp[11:13]), int(stamp[14:16]), int(stamp[17:19])
    if h > 23 or m > 59 or s > 60:
        raise ValueError(stamp)
    frac = 0.0
    if len(stamp) > 19:
        if stamp[19] != "." or not stamp[20:].isdigit():
            raise ValueError(stamp)
        frac = int(stamp[20:]) / 10 ** (len(stamp) - 20)
    return base + h * 3600 + m * 60 + s + frac


def read_azure_csv(path: str | Path) -> Trace:
    """Read the Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Timestamps are read as UTC; ``arrival_s`` is relative to the first row and ``start_epoch`` is the
    first row's epoch. Rows must be in time order. ``GeneratedTokens`` of 0 is clamped to 1 (counted in
    ``meta["clamped_output_tokens"]``). The trace has no session ids, hashes or tenants.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace file") from None
    lines = text.splitlines()
    if not lines:
        raise TraceError(f"{_where(p, 1)}: empty file (expected a header {','.join(_AZURE_COLUMNS)})")
    idx = _header(p, lines[0], _AZURE_COLUMNS)
    it, ic, ig = idx["TIMESTAMP"], idx["ContextTokens"], idx["GeneratedTokens"]
    width = max(it, ic, ig) + 1
    days: dict[str, int] = {}
    epochs: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    last = -math.inf
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        f = line.split(",")
        if len(f) < width:
            raise TraceError(f"{_where(p, n, len(line) + 1)}: {len(f)} field(s), expected {width}")
        stamp = f[it].strip()
        try:
            t = _azure_epoch(stamp, days)
        except ValueError:
            col = _field_offsets(line)[it]
            raise TraceError(f"{_where(p, n, col, 'TIMESTAMP')}: {stamp!r} is not a timestamp "
                             "'YYYY-MM-DD HH:MM:SS.fffffff'") from None
        if t < last:
            col = _field_offsets(line)[it]
            raise TraceError(f"{_where(p, n, col, 'TIMESTAMP')}: {stamp} is earlier than the row before; "
                             "the trace must be sorted by time")
        last = t
        try:
            c, g = int(f[ic]), int(f[ig])
            if c < 0 or g < 0:
                raise ValueError
        except ValueError:
            cols = _field_offsets(line)
            for i, name in ((ic, "ContextTokens"), (ig, "GeneratedTokens")):
                _count(f[i].strip(), lambda i=i, name=name, n=n, cols=cols: _where(p, n, cols[i], name))
            raise  # pragma: no cover - _count raised
        epochs.append(t)
        prompt.append(c)
        output.append(g)
    if not epochs:
        raise TraceError(f"{_where(p, 2)}: the trace has a header but no requests")
    first = epochs[0]
    arrival = (np.asarray(epochs, dtype=np.float64) - first).tolist()
    return _build(p.name, arrival, prompt, output, meta={"source": str(p), "format": "azure"},
                  start_epoch=first)


# -- Mooncake --------------------------------------------------------------------------------------------


def _open_text(p: Path) -> str:
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise TraceError(f"{p}: not a valid gzip file: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: not UTF-8 text: {exc}") from None


def _hash_list(value: object, where: Callable[[], str]) -> tuple[int, ...]:
    try:
        if isinstance(value, str):
            return tuple(int(x) for x in value.split())
        if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return tuple(value)
    except ValueError:
        pass
    raise TraceError(f"{where()}: {value!r} is not a list of integer block hashes")


def read_mooncake(path: str | Path) -> Trace:
    """Read a Mooncake trace: the gzip (or plain) CSV of ``shared/data``, or the original ``.jsonl``.

    ``arrival_s`` is ``timestamp_ms / 1000`` as given (already relative to the trace's start; not
    re-based); ``hash_ids`` are kept per request with ``block_tokens = 512``. No session ids (None) and no
    wall-clock start (``start_epoch`` None). Output lengths of 0 are clamped to 1.
    """
    p = Path(path)
    text = _open_text(p)
    first_line = text.lstrip()[:1]
    if first_line == "{" or p.name.endswith((".jsonl", ".jsonl.gz")):
        return _mooncake_jsonl(p, text)
    return _mooncake_csv(p, text)


def _mooncake_csv(p: Path, text: str) -> Trace:
    lines = text.splitlines()
    if not lines:
        raise TraceError(f"{_where(p, 1)}: empty file (expected a header with {', '.join(_MOONCAKE_COLUMNS)})")
    idx = _header(p, lines[0], _MOONCAKE_COLUMNS)
    header = [c.strip() for c in lines[0].split(",")]
    nblocks = header.index("num_hash_blocks") if "num_hash_blocks" in header else None
    arrival: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[tuple[int, ...]] = []
    last = 0.0
    for n, f in enumerate(csv.reader(io.StringIO("\n".join(lines[1:]))), start=2):
        if not f:
            continue
        if len(f) != len(header):
            raise TraceError(f"{_where(p, n)}: {len(f)} field(s), expected {len(header)}")

        def at(name: str, fields: list[str] = f, line: int = n) -> str:
            i = header.index(name)
            return _where(p, line, _field_offsets(",".join(fields))[i], name)

        try:
            t = float(f[idx["timestamp_ms"]]) / 1000.0
            if not math.isfinite(t):
                raise ValueError
        except ValueError:
            raise TraceError(f"{at('timestamp_ms')}: {f[idx['timestamp_ms']]!r} is not a number") from None
        if t < 0:
            raise TraceError(f"{at('timestamp_ms')}: negative timestamp {f[idx['timestamp_ms']]}")
        if t < last:
            raise TraceError(f"{at('timestamp_ms')}: {f[idx['timestamp_ms']]} is earlier than the row before; "
                             "the trace must be sorted by time")
        last = t
        prompt.append(_count(f[idx["input_length"]], lambda: at("input_length")))
        output.append(_count(f[idx["output_length"]], lambda: at("output_length")))
        h = _hash_list(f[idx["hash_ids"]], lambda: at("hash_ids"))
        if nblocks is not None and f[nblocks].strip() and int(f[nblocks]) != len(h):
            raise TraceError(f"{at('num_hash_blocks')}: says {f[nblocks]} blocks but hash_ids has {len(h)}")
        arrival.append(t)
        hashes.append(h)
    if not arrival:
        raise TraceError(f"{_where(p, 2)}: the trace has a header but no requests")
    return _build(p.name, arrival, prompt, output, meta={"source": str(p), "format": "mooncake-csv"},
                  hash_ids=tuple(hashes), block_tokens=MOONCAKE_BLOCK_TOKENS)


def _mooncake_jsonl(p: Path, text: str) -> Trace:
    arrival: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[tuple[int, ...]] = []
    last = 0.0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise TraceError(f"{_where(p, n, 1)}: not a JSON object: {exc}") from None
        if not isinstance(row, dict):
            raise TraceError(f"{_where(p, n, 1)}: not a JSON object")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in row:
                raise TraceError(f"{_where(p, n, 1)}: missing key '{key}'")
        t = row["timestamp"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise TraceError(f"{_where(p, n, 1, 'timestamp')}: {t!r} is not a number")
        t = float(t) / 1000.0
        if t < 0:
            raise TraceError(f"{_where(p, n, 1, 'timestamp')}: negative timestamp {row['timestamp']}")
        if t < last:
            raise TraceError(f"{_where(p, n, 1, 'timestamp')}: {row['timestamp']} is earlier than the line "
                             "before; the trace must be sorted by time")
        last = t
        counts = []
        for key in ("input_length", "output_length"):
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TraceError(f"{_where(p, n, 1, key)}: {v!r} is not a non-negative whole number")
            counts.append(v)
        arrival.append(t)
        prompt.append(counts[0])
        output.append(counts[1])
        hashes.append(_hash_list(row.get("hash_ids", []), lambda n=n: _where(p, n, 1, "hash_ids")))
    if not arrival:
        raise TraceError(f"{_where(p, 1)}: the trace has no requests")
    return _build(p.name, arrival, prompt, output, meta={"source": str(p), "format": "mooncake-jsonl"},
                  hash_ids=tuple(hashes), block_tokens=MOONCAKE_BLOCK_TOKENS)


# -- skyfleet's own usage records ---------------------------------------------------------------------------


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def read_usage_records_async(database_url: str, *, since: datetime | None = None,
                                   until: datetime | None = None, model: str | None = None) -> Trace:
    """Requests metered by skyfleet (``usage_records``), by start time in ``[since, until)`` (naive = UTC).

    One row per record, every status (what was offered, including requests that failed), ordered by
    ``started_at`` then request id. ``tenant`` is the tenant's name (its id when the tenant row is gone);
    ``output_tokens`` is ``completion_tokens`` (0 -> 1). ``start_epoch`` is the first record's start.
    """
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from skyfleet.state.db import make_engine
    from skyfleet.state.models import Tenant, UsageRecord

    since, until = _aware(since), _aware(until)
    stmt = (select(UsageRecord.started_at, UsageRecord.prompt_tokens, UsageRecord.completion_tokens,
                   UsageRecord.tenant_id, Tenant.name)
            .outerjoin(Tenant, Tenant.id == UsageRecord.tenant_id)
            .order_by(UsageRecord.started_at, UsageRecord.request_id))
    if since is not None:
        stmt = stmt.where(UsageRecord.started_at >= since)
    if until is not None:
        stmt = stmt.where(UsageRecord.started_at < until)
    if model is not None:
        stmt = stmt.where(UsageRecord.model == model)
    shown = make_url(database_url).render_as_string(hide_password=True)
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
    finally:
        await engine.dispose()
    if not rows:
        window = f" from {since.isoformat() if since else 'the start'} to {until.isoformat() if until else 'now'}"
        raise TraceError(f"{shown}: no usage records{window}" + (f" for model '{model}'" if model else ""))
    first = rows[0].started_at.timestamp()
    arrival = [r.started_at.timestamp() - first for r in rows]
    meta = {"source": f"usage:{shown}", "format": "usage"}
    if since is not None:
        meta["since"] = since.isoformat()
    if until is not None:
        meta["until"] = until.isoformat()
    if model is not None:
        meta["model"] = model
    return _build(f"usage:{model or 'all'}", arrival, [r.prompt_tokens for r in rows],
                  [r.completion_tokens for r in rows], meta=meta,
                  tenant=tuple(r.name if r.name is not None else r.tenant_id for r in rows), start_epoch=first)


def read_usage_records(database_url: str, *, since: datetime | None = None, until: datetime | None = None,
                       model: str | None = None) -> Trace:
    """:func:`read_usage_records_async` for synchronous callers (not from inside a running event loop)."""
    return asyncio.run(read_usage_records_async(database_url, since=since, until=until, model=model))


# -- references, scaling, slicing ------------------------------------------------------------------------------


def load_trace(ref: str) -> Trace:
    """A trace from a reference: ``azure:PATH``, ``mooncake:PATH``, ``usage:DATABASE_URL``, or a path whose
    suffix says the format (``.csv`` Azure; ``.csv.gz``, ``.jsonl``, ``.jsonl.gz`` Mooncake)."""
    kind, sep, rest = ref.partition(":")
    if sep and kind in ("azure", "mooncake", "usage"):
        if not rest:
            raise TraceError(f"trace reference '{ref}': nothing after '{kind}:'")
        if kind == "usage":
            return read_usage_records(rest)
        return read_azure_csv(rest) if kind == "azure" else read_mooncake(rest)
    name = Path(ref).name.lower()
    if name.endswith((".csv.gz", ".jsonl", ".jsonl.gz")):
        return read_mooncake(ref)
    if name.endswith(".csv"):
        return read_azure_csv(ref)
    raise TraceError(f"trace reference '{ref}': unknown format; use a .csv (Azure), .csv.gz or .jsonl "
                     "(Mooncake) file, or a prefix azure:PATH, mooncake:PATH, usage:DATABASE_URL")


def _note(meta: dict[str, str], key: str, value: str) -> dict[str, str]:
    out = dict(meta)
    out[key] = f"{out[key]};{value}" if key in out else value
    return out


def scale(trace: Trace, rate: float) -> Trace:
    """The same requests ``rate`` times as fast (arrivals divided by ``rate``; 2.0 doubles the load).

    ``meta["scale"]`` holds the overall factor (scalings compose) and ``meta["ops"]`` the history.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"scale: rate must be a positive finite number, not {rate!r}")
    total = float(trace.meta.get("scale", "1")) * rate
    meta = _note(trace.meta, "ops", f"scale({rate:g})")
    meta["scale"] = f"{total:g}"
    return Trace(name=trace.name, arrival_s=trace.arrival_s / rate, prompt_tokens=trace.prompt_tokens,
                 output_tokens=trace.output_tokens, hash_ids=trace.hash_ids, block_tokens=trace.block_tokens,
                 session=trace.session, tenant=trace.tenant, start_epoch=trace.start_epoch, meta=meta)


def _cut(values: tuple[object, ...] | None, lo: int, hi: int) -> tuple[object, ...] | None:
    return None if values is None else values[lo:hi]


def time_slice(trace: Trace, start_s: float, end_s: float) -> Trace:
    """The requests arriving in ``[start_s, end_s)``, with arrivals re-based so ``start_s`` becomes 0.

    The window, not the first request, is the new origin (a quiet start stays quiet), and
    ``start_epoch`` moves by ``start_s``. ``end_s`` may be ``math.inf``. May be empty.
    """
    if math.isnan(start_s) or math.isnan(end_s) or start_s < 0 or end_s < start_s:
        raise ValueError(f"time_slice: need 0 <= start_s <= end_s, not [{start_s}, {end_s})")
    lo = int(np.searchsorted(trace.arrival_s, start_s, side="left"))
    hi = int(np.searchsorted(trace.arrival_s, end_s, side="left"))
    meta = _note(trace.meta, "ops", f"slice({start_s:g},{end_s:g})")
    meta["rows"] = str(hi - lo)
    return Trace(
        name=trace.name, arrival_s=trace.arrival_s[lo:hi] - start_s, prompt_tokens=trace.prompt_tokens[lo:hi],
        output_tokens=trace.output_tokens[lo:hi], hash_ids=_cut(trace.hash_ids, lo, hi),  # type: ignore[arg-type]
        block_tokens=trace.block_tokens, session=_cut(trace.session, lo, hi),  # type: ignore[arg-type]
        tenant=_cut(trace.tenant, lo, hi),  # type: ignore[arg-type]
        start_epoch=None if trace.start_epoch is None else trace.start_epoch + start_s, meta=meta)
