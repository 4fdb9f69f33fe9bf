"""Trace readers on the real public traces (shared/data), their error messages, skyfleet's own usage
records in a real SQLite store, and the scale / slice transforms (hypothesis properties)."""

from __future__ import annotations

import gzip
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert

from skyfleet.config import ConfigError
from skyfleet.planner.traces import (
    TraceError,
    load_trace,
    read_azure_csv,
    read_mooncake,
    read_usage_records_async,
    scale,
    time_slice,
)
from skyfleet.planner.types import Trace
from tests.planner.shared_data import DATA

AZURE = DATA / "azure_llm_2023_conv.csv"
CONV = DATA / "mooncake_fast25_conversation_trace.csv.gz"
SYNTH = DATA / "mooncake_fast25_synthetic_trace.csv.gz"


@pytest.fixture(scope="module", autouse=True)
def _data_present() -> None:
    if not AZURE.exists():
        pytest.fail(f"the shared data is missing: {DATA} (see shared/data/README.md)")


# -- the real traces -------------------------------------------------------------------------------------------


def test_azure_trace_matches_its_readme() -> None:
    t0 = time.perf_counter()
    tr = read_azure_csv(AZURE)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"19k rows took {elapsed:.2f} s"
    assert len(tr) == 19_366
    assert tr.start_epoch == pytest.approx(datetime(2023, 11, 16, 18, 15, 46, 680590, tzinfo=UTC).timestamp())
    # 18:15:46.6805900 -> 19:14:08.40 (README: ~58.4 min)
    assert tr.arrival_s[0] == 0.0 and tr.duration_s == pytest.approx(3501.72, abs=0.01)
    assert np.all(np.diff(tr.arrival_s) >= 0)
    assert round(float(tr.prompt_tokens.mean())) == 1155 and float(np.median(tr.prompt_tokens)) == 1020
    assert round(float(tr.output_tokens.mean())) == 211 and float(np.median(tr.output_tokens)) == 129
    assert tr.hash_ids is None and tr.session is None and tr.tenant is None
    assert tr.arrival_s.dtype == np.float64 and tr.prompt_tokens.dtype == np.int64
    assert tr.meta["format"] == "azure" and tr.meta["clamped_output_tokens"] == "0"


def test_mooncake_conversation_trace_matches_its_readme() -> None:
    tr = read_mooncake(CONV)
    assert len(tr) == 12_031 and tr.block_tokens == 512 and tr.start_epoch is None
    assert tr.arrival_s[0] == 0.0 and tr.duration_s == pytest.approx(3536.999)
    assert round(float(tr.prompt_tokens.mean())) == 12_035 and round(float(tr.output_tokens.mean())) == 343
    assert tr.hash_ids is not None and len(tr.hash_ids) == len(tr)
    refs = [h for ids in tr.hash_ids for h in ids]
    assert len(refs) == 288_500 and len(set(refs)) == 182_790
    assert all(ids[0] == 0 for ids in tr.hash_ids)  # a shared system prompt
    # a block is 512 tokens: the hashes cover the prompt
    assert all(len(ids) == math.ceil(n / 512) for ids, n in zip(tr.hash_ids[:500], tr.prompt_tokens[:500],
                                                                 strict=True))


def test_mooncake_synthetic_trace() -> None:
    tr = load_trace(str(SYNTH))
    assert len(tr) == 3_993 and tr.duration_s == pytest.approx(1022.025)
    assert round(float(tr.prompt_tokens.mean())) == 15_325 and round(float(tr.output_tokens.mean())) == 149


def test_mooncake_jsonl_reads_like_the_csv(tmp_path: Path) -> None:
    csv_trace = read_mooncake(CONV)
    lines = [orjson.dumps({"timestamp": round(float(t) * 1000), "input_length": int(i), "output_length": int(o),
                           "hash_ids": list(h)})
             for t, i, o, h in zip(csv_trace.arrival_s[:300], csv_trace.prompt_tokens[:300],
                                   csv_trace.output_tokens[:300], csv_trace.hash_ids[:300], strict=True)]
    plain = tmp_path / "conversation_trace.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    packed = tmp_path / "conversation_trace.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        tr = load_trace(str(path))
        assert tr.meta["format"] == "mooncake-jsonl"
        np.testing.assert_array_equal(tr.arrival_s, csv_trace.arrival_s[:300])
        np.testing.assert_array_equal(tr.prompt_tokens, csv_trace.prompt_tokens[:300])
        assert tr.hash_ids == csv_trace.hash_ids[:300]


def test_load_trace_prefixes_and_suffixes(tmp_path: Path) -> None:
    copy = tmp_path / "renamed.txt"
    copy.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    assert len(load_trace(f"azure:{copy}")) == 1
    assert load_trace(f"mooncake:{CONV}").block_tokens == 512
    with pytest.raises(TraceError, match="unknown format"):
        load_trace(str(copy))
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(str(tmp_path / "absent.csv"))
    assert issubclass(TraceError, ConfigError)


# -- errors name file, line and column ----------------------------------------------------------------------------

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(("body", "where", "what"), [
    ("TIMESTAMP,ContextTokens\n" + ROW, ":1:1", "missing column(s) GeneratedTokens"),
    (HEADER, ":2", "no requests"),
    ("", ":1", "empty file"),
    (HEADER + ROW + "2023-11-16 18:15:45.0000000,1,1\n", ":3:1: column 'TIMESTAMP'", "sorted"),
    (HEADER + ROW + "2023-11-16 18:15:47.1,abc,1\n", ":3:23: column 'ContextTokens'", "'abc' is not a whole"),
    (HEADER + ROW + "2023-11-16 18:15:47.1,5,-2\n", ":3:25: column 'GeneratedTokens'", "negative"),
    (HEADER + "2023-13-45 18:15:47,5,2\n", ":2:1: column 'TIMESTAMP'", "not a timestamp"),
    (HEADER + "yesterday,5,2\n", ":2:1: column 'TIMESTAMP'", "not a timestamp"),
    (HEADER + "2023-11-16 18:15:47,5\n", ":2:", "2 field(s), expected 3"),
])
def test_azure_errors(tmp_path: Path, body: str, where: str, what: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(TraceError) as err:
        read_azure_csv(path)
    assert f"{path}{where}" in str(err.value) and what in str(err.value)


MC_HEADER = "request_idx,timestamp_ms,input_length,output_length,num_hash_blocks,hash_ids\n"


@pytest.mark.parametrize(("body", "where", "what"), [
    ("request_idx,timestamp_ms,input_length\n0,0,5\n", ":1:1", "missing column(s) output_length, hash_ids"),
    (MC_HEADER + "0,10,5,1,1,0\n1,5,5,1,1,0\n", ":3:3: column 'timestamp_ms'", "sorted"),
    (MC_HEADER + "0,-10,5,1,1,0\n", ":2:3: column 'timestamp_ms'", "negative"),
    (MC_HEADER + "0,0,x,1,1,0\n", ":2:5: column 'input_length'", "'x' is not a whole"),
    (MC_HEADER + "0,0,5,-1,1,0\n", ":2:7: column 'output_length'", "negative"),
    (MC_HEADER + "0,0,5,1,2,0\n", "column 'num_hash_blocks'", "says 2 blocks but hash_ids has 1"),
    (MC_HEADER + "0,0,5,1,1,zero\n", "column 'hash_ids'", "not a list of integer block hashes"),
    (MC_HEADER, ":2", "no requests"),
])
def test_mooncake_csv_errors(tmp_path: Path, body: str, where: str, what: str) -> None:
    path = tmp_path / "m.csv.gz"
    path.write_bytes(gzip.compress(body.encode()))
    with pytest.raises(TraceError) as err:
        read_mooncake(path)
    assert f"{path}{where}" in str(err.value) or where in str(err.value)
    assert what in str(err.value)


@pytest.mark.parametrize(("body", "what"), [
    ('{"timestamp": 0, "input_length": 5}\n', ":1:1: missing key 'output_length'"),
    ('{"timestamp": 5, "input_length": 5, "output_length": 1}\n{"timestamp": 1, "input_length": 5, '
     '"output_length": 1}\n', ":2:1: column 'timestamp'"),
    ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}\n', ":1:1: column 'input_length'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}\nnot json\n', ":2:1: not a JSON object"),
])
def test_mooncake_jsonl_errors(tmp_path: Path, body: str, what: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(body)
    with pytest.raises(TraceError, match=None) as err:
        read_mooncake(path)
    assert f"{path}{what}" in str(err.value)


def test_zero_output_tokens_are_clamped_to_one(tmp_path: Path) -> None:
    path = tmp_path / "z.csv"
    path.write_text(HEADER + "2023-11-16 18:15:46.5,10,0\n2023-11-16 18:15:47,0,3\n")
    tr = read_azure_csv(path)
    assert tr.output_tokens.tolist() == [1, 3] and tr.prompt_tokens.tolist() == [10, 0]
    assert tr.meta["clamped_output_tokens"] == "1"
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 0.5])


# -- usage records from a real store --------------------------------------------------------------------------------


async def test_usage_records_from_a_real_sqlite_store(tmp_path: Path) -> None:
    from skyfleet.state import Store
    from skyfleet.state.models import Tenant, UsageRecord

    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    store = await Store.open(url)
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def rec(rid: str, tenant: str, at_s: float, prompt: int, completion: int, model: str = "m") -> dict[str, object]:
        start = t0 + timedelta(seconds=at_s)
        return {"request_id": rid, "tenant_id": tenant, "key_id": "key_1", "model": model, "route": "chat",
                "owner": "gw", "replica_id": "local-0", "pool": "local", "status": "completed", "http_status": 200,
                "started_at": start, "ended_at": start + timedelta(seconds=1), "ttft_ms": 10,
                "prompt_tokens": prompt, "cached_tokens": 0, "completion_tokens": completion,
                "charged_usd_micros": 1}

    try:
        async with store.engine.begin() as conn:
            await conn.execute(insert(Tenant), [{"id": "ten_a", "name": "acme", "created_at": t0}])
            await conn.execute(insert(UsageRecord), [
                rec("r3", "ten_a", 7.5, 30, 0),          # failed: no completion -> clamped to 1
                rec("r1", "ten_a", 0.0, 10, 5),
                rec("r2", "ten_gone", 2.25, 20, 6),      # its tenant row is gone: the id stands in
                rec("r4", "ten_a", 9.0, 40, 8, model="other"),
            ])
    finally:
        await store.close()

    tr = await read_usage_records_async(url)
    assert tr.arrival_s.tolist() == [0.0, 2.25, 7.5, 9.0]
    assert tr.prompt_tokens.tolist() == [10, 20, 30, 40] and tr.output_tokens.tolist() == [5, 6, 1, 8]
    assert tr.tenant == ("acme", "ten_gone", "acme", "acme") and tr.start_epoch == t0.timestamp()
    assert tr.meta["clamped_output_tokens"] == "1"

    window = await read_usage_records_async(url, since=t0 + timedelta(seconds=1),
                                            until=(t0 + timedelta(seconds=9)).replace(tzinfo=None), model="m")
    assert window.prompt_tokens.tolist() == [20, 30] and window.arrival_s.tolist() == [0.0, 5.25]
    assert window.start_epoch == (t0 + timedelta(seconds=2.25)).timestamp()
    with pytest.raises(TraceError, match="no usage records"):
        await read_usage_records_async(url, model="absent")


# -- scale and time_slice ---------------------------------------------------------------------------------------------


def _trace(arrivals: list[float]) -> Trace:
    a = np.sort(np.asarray(arrivals, dtype=np.float64))
    n = len(a)
    return Trace(name="t", arrival_s=a, prompt_tokens=np.arange(n, dtype=np.int64),
                 output_tokens=np.ones(n, dtype=np.int64), tenant=tuple(f"t{i}" for i in range(n)),
                 hash_ids=tuple((i,) for i in range(n)), block_tokens=512, start_epoch=1000.0,
                 meta={"source": "x"})


arrivals = st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(arrivals, st.floats(min_value=0.01, max_value=100), st.floats(min_value=0.01, max_value=100))
def test_scale_divides_arrivals_and_composes(arr: list[float], r1: float, r2: float) -> None:
    tr = _trace(arr)
    twice = scale(scale(tr, r1), r2)
    np.testing.assert_allclose(twice.arrival_s * r1 * r2, tr.arrival_s, rtol=1e-9, atol=1e-9)
    assert float(twice.meta["scale"]) == pytest.approx(r1 * r2, rel=1e-5)
    assert twice.meta["ops"].count("scale(") == 2 and twice.meta["source"] == "x"
    assert twice.prompt_tokens is tr.prompt_tokens and twice.start_epoch == tr.start_epoch
    assert "scale" not in tr.meta  # the input is untouched


@settings(max_examples=80, deadline=None)
@given(arrivals, st.floats(min_value=0, max_value=1e5), st.floats(min_value=0, max_value=1e5))
def test_time_slice_keeps_the_window_and_rebases_it(arr: list[float], a: float, b: float) -> None:
    tr = _trace(arr)
    start, end = min(a, b), max(a, b)
    cut = time_slice(tr, start, end)
    inside = [(x, i) for i, x in enumerate(tr.arrival_s.tolist()) if start <= x < end]
    assert len(cut) == len(inside) == int(cut.meta["rows"])
    np.testing.assert_allclose(cut.arrival_s, [x - start for x, _ in inside], atol=1e-9)
    assert cut.prompt_tokens.tolist() == [tr.prompt_tokens[i] for _, i in inside]
    assert cut.tenant == tuple(tr.tenant[i] for _, i in inside)  # type: ignore[index]
    assert cut.hash_ids == tuple(tr.hash_ids[i] for _, i in inside)  # type: ignore[index]
    assert cut.start_epoch == 1000.0 + start and bool(np.all(cut.arrival_s >= 0))


def test_slice_and_scale_of_the_azure_trace() -> None:
    tr = read_azure_csv(AZURE)
    hour = time_slice(scale(tr, 2.0), 600.0, 900.0)
    assert hour.meta["ops"] == "scale(2);slice(600,900)" and hour.meta["scale"] == "2"
    assert len(hour) == int(np.count_nonzero((tr.arrival_s / 2 >= 600) & (tr.arrival_s / 2 < 900)))
    assert hour.start_epoch == pytest.approx(tr.start_epoch + 600.0)  # type: ignore[operator]
    assert hour.arrival_s[0] >= 0 and hour.arrival_s[-1] < 300
    with pytest.raises(ValueError, match="rate"):
        scale(tr, 0.0)
    with pytest.raises(ValueError, match="start_s"):
        time_slice(tr, 10.0, 5.0)
    assert len(time_slice(tr, 0.0, math.inf)) == len(tr)
