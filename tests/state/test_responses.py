"""ResponseRepository on real SQLite and PostgreSQL: lifecycle, chains, concurrent turns."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from skyfleet.clock import ManualClock
from skyfleet.crypto import LocalKeyProvider
from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError
from skyfleet.state import Store
from skyfleet.state.conversations import ResponseRecord

from .test_conversations import count, message


def say(text_: str) -> dict[str, Any]:
    return message(text_, "assistant")


def texts(items: list[dict[str, Any]]) -> list[str]:
    return [i["content"][0]["text"] for i in items]


async def turn(
    store: Store,
    tenant_id: str,
    question: str,
    *,
    conversation_id: str | None = None,
    previous: str | None = None,
    answers: int = 1,
    store_it: bool = True,
) -> ResponseRecord:
    resp = await store.responses.begin(
        tenant_id,
        model="tiny-model",
        conversation_id=conversation_id,
        previous_response_id=previous,
        input_items=[message(question)],
        body={"object": "response", "status": "in_progress", "instructions": "be brief"},
        store=store_it,
    )
    return await store.responses.complete(
        tenant_id,
        resp.id,
        body={"id": resp.id, "object": "response", "status": "completed"},
        output_items=[say(f"{question}->{i}") for i in range(answers)],
        input_tokens=10,
        output_tokens=5,
        cached_tokens=2,
    )


async def test_begin_then_complete(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.responses
    begun = await repo.begin(
        acme,
        model="tiny-model",
        conversation_id=None,
        previous_response_id=None,
        input_items=[message("q1"), message("q2")],
        body={"status": "in_progress", "instructions": "hi"},
        store=True,
    )
    assert begun.id.startswith("resp_") and begun.status == "in_progress" and begun.session_id == begun.id
    assert begun.completed_at is None and (begun.input_tokens, begun.output_tokens) == (0, 0)
    assert await repo.get(acme, begun.id) == begun
    done = await repo.complete(
        acme,
        begun.id,
        body={"status": "completed", "output": [say("a")]},
        output_items=[{**say("a"), "id": "msg_out1"}],
        input_tokens=7,
        output_tokens=3,
        cached_tokens=1,
    )
    assert done.status == "completed" and done.completed_at is not None
    assert (done.input_tokens, done.output_tokens, done.cached_tokens) == (7, 3, 1)
    assert await repo.get(acme, begun.id) == done
    page, more = await repo.input_items(acme, begun.id)
    assert texts([p.item for p in page]) == ["q2", "q1"] and not more  # newest first by default
    page, more = await repo.input_items(acme, begun.id, order="asc", limit=1)
    assert texts([p.item for p in page]) == ["q1"] and more and page[0].response_id == begun.id
    page, more = await repo.input_items(acme, begun.id, order="asc", after=page[0].id)
    assert texts([p.item for p in page]) == ["q2"] and not more
    assert await repo.history(acme, begun.id) == [
        p.item for p in (await repo.input_items(acme, begun.id, order="asc"))[0]
    ] + [{**say("a"), "id": "msg_out1"}]
    with pytest.raises(ConflictError):  # never completes twice
        await repo.complete(
            acme, begun.id, body={}, output_items=[], input_tokens=0, output_tokens=0, cached_tokens=0
        )
    with pytest.raises(ConflictError):
        await repo.fail(acme, begun.id, status="failed", error=None)


async def test_incomplete_status_is_kept(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    resp = await secure_store.responses.begin(
        acme, model="m", conversation_id=None, previous_response_id=None, input_items=[], body={}, store=True
    )
    done = await secure_store.responses.complete(
        acme,
        resp.id,
        body={"status": "incomplete"},
        output_items=[],
        input_tokens=1,
        output_tokens=1,
        cached_tokens=0,
    )
    assert done.status == "incomplete"


async def test_validation(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.responses
    common: dict[str, Any] = {"conversation_id": None, "previous_response_id": None, "store": True}
    with pytest.raises(InvalidRequestError):
        await repo.begin(acme, model="", input_items=[], body={}, **common)
    with pytest.raises(InvalidRequestError):
        await repo.begin(acme, model="m", input_items="hi", body={}, **common)  # type: ignore[arg-type]
    resp = await repo.begin(acme, model="m", input_items=[], body={}, **common)
    with pytest.raises(InvalidRequestError):
        await repo.complete(
            acme, resp.id, body={}, output_items=[], input_tokens=-1, output_tokens=0, cached_tokens=0
        )
    with pytest.raises(InvalidRequestError):
        await repo.fail(acme, resp.id, status="completed", error=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        await repo.input_items(acme, resp.id, limit=500)


async def test_turns_append_to_the_conversation(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme, items=[message("seed")])
    begun = await secure_store.responses.begin(
        acme,
        model="m",
        conversation_id=conv.id,
        previous_response_id=None,
        input_items=[message("q")],
        body={},
        store=True,
    )
    assert begun.session_id == conv.id and begun.conversation_id == conv.id
    # Not appended until complete.
    assert [
        i.item["content"][0]["text"] for i in await secure_store.conversations.all_items(acme, conv.id)
    ] == ["seed"]
    await secure_store.responses.complete(
        acme,
        begun.id,
        body={},
        output_items=[say("a1"), say("a2")],
        input_tokens=1,
        output_tokens=2,
        cached_tokens=0,
    )
    items = await secure_store.conversations.all_items(acme, conv.id)
    assert [(i.seq, i.item["content"][0]["text"]) for i in items] == [
        (0, "seed"),
        (1, "q"),
        (2, "a1"),
        (3, "a2"),
    ]
    assert [i.response_id for i in items] == [None, begun.id, begun.id, begun.id]
    # The conversation's items and the response's items carry the same ids.
    [input_item], _ = await secure_store.responses.input_items(acme, begun.id)
    assert items[1].id == input_item.id
    # A second turn in the conversation continues the seq numbers.
    await turn(secure_store, acme, "q2", conversation_id=conv.id)
    assert [i.seq for i in await secure_store.conversations.all_items(acme, conv.id)] == list(range(6))


async def test_failed_or_cancelled_responses_append_nothing(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme)
    for status in ("failed", "cancelled"):
        resp = await secure_store.responses.begin(
            acme,
            model="m",
            conversation_id=conv.id,
            previous_response_id=None,
            input_items=[message("lost")],
            body={"status": "in_progress"},
            store=True,
        )
        await secure_store.responses.fail(
            acme, resp.id, status=status, error={"code": "engine_down", "message": "x"}
        )  # type: ignore[arg-type]
        got = await secure_store.responses.get(acme, resp.id)
        assert got.status == status and got.completed_at is None
        assert got.body["status"] == status and got.body["error"] == {"code": "engine_down", "message": "x"}
        with pytest.raises(ConflictError):
            await secure_store.responses.complete(
                acme,
                resp.id,
                body={},
                output_items=[say("late")],
                input_tokens=0,
                output_tokens=0,
                cached_tokens=0,
            )
    assert await secure_store.conversations.all_items(acme, conv.id) == []
    assert (await secure_store.conversations.get(acme, conv.id)).id == conv.id


async def test_store_false_leaves_no_response_behind(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme)
    done = await turn(secure_store, acme, "ephemeral", conversation_id=conv.id, store_it=False)
    assert done.status == "completed"
    with pytest.raises(NotFoundError):
        await secure_store.responses.get(acme, done.id)
    assert await count(secure_store, "SELECT count(*) FROM responses") == 0
    assert await count(secure_store, "SELECT count(*) FROM response_items") == 0
    # Conversations are always stored.
    assert len(await secure_store.conversations.all_items(acme, conv.id)) == 2
    failed = await secure_store.responses.begin(
        acme,
        model="m",
        conversation_id=None,
        previous_response_id=None,
        input_items=[message("x")],
        body={},
        store=False,
    )
    with pytest.raises(NotFoundError):
        await secure_store.responses.get(acme, failed.id)
    await secure_store.responses.fail(acme, failed.id, status="failed", error=None)
    assert await count(secure_store, "SELECT count(*) FROM responses") == 0


async def test_delete(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme)
    resp = await turn(secure_store, acme, "q", conversation_id=conv.id)
    await secure_store.responses.delete(acme, resp.id)
    assert await count(secure_store, "SELECT count(*) FROM responses WHERE id = :r", r=resp.id) == 0
    assert (
        await count(secure_store, "SELECT count(*) FROM response_items WHERE response_id = :r", r=resp.id)
        == 0
    )
    for call in (
        secure_store.responses.get(acme, resp.id),
        secure_store.responses.delete(acme, resp.id),
        secure_store.responses.input_items(acme, resp.id),
        secure_store.responses.history(acme, resp.id),
    ):
        with pytest.raises(NotFoundError):
            await call
    assert (
        len(await secure_store.conversations.all_items(acme, conv.id)) == 2
    )  # the conversation keeps its turn


async def test_foreign_ids_look_exactly_like_unknown_ones(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, globex = tenant_ids
    repo = secure_store.responses
    conv = await secure_store.conversations.create(acme)
    mine = await turn(secure_store, acme, "private", conversation_id=conv.id)
    unknown_id = "resp_doesnotexist00"
    for method in ("get", "delete", "input_items", "history"):
        errors = []
        for rid in (mine.id, unknown_id):
            with pytest.raises(NotFoundError) as caught:
                await getattr(repo, method)(globex, rid)
            errors.append(caught.value)
        foreign, unknown = errors
        assert foreign.message == f"response '{mine.id}' not found"
        assert unknown.message == foreign.message.replace(mine.id, unknown_id)
        assert (foreign.param, foreign.code, foreign.status) == (unknown.param, unknown.code, unknown.status)
    for method in ("complete", "fail"):
        kwargs: dict[str, Any] = (
            {"body": {}, "output_items": [], "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}
            if method == "complete"
            else {"status": "failed", "error": None}
        )
        messages = []
        for rid in (mine.id, unknown_id):
            with pytest.raises(NotFoundError) as caught:
                await getattr(repo, method)(globex, rid, **kwargs)
            messages.append(caught.value.message.replace(rid, "<id>"))
        assert messages[0] == messages[1]
    # begin() referring to another tenant's conversation / response: the same as unknown ones.
    for field, theirs, unknown, what in (
        ("conversation_id", conv.id, "conv_doesnotexist00", "conversation"),
        ("previous_response_id", mine.id, unknown_id, "response"),
    ):
        seen = []
        for ref in (theirs, unknown):
            args: dict[str, Any] = {"conversation_id": None, "previous_response_id": None, field: ref}
            with pytest.raises(NotFoundError) as caught:
                await repo.begin(
                    globex, model="m", input_items=[message("sneak")], body={}, store=True, **args
                )
            seen.append((caught.value.message.replace(ref, "<id>"), caught.value.param))
        assert seen[0] == seen[1] == (f"{what} '<id>' not found", seen[0][1])
    assert await repo.get(acme, mine.id) == mine
    assert len(await secure_store.conversations.all_items(acme, conv.id)) == 2


async def test_history_along_a_five_turn_chain(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, globex = tenant_ids
    chain: list[ResponseRecord] = []
    for n in range(5):
        chain.append(
            await turn(secure_store, acme, f"q{n}", previous=chain[-1].id if chain else None, answers=2)
        )
    assert {r.session_id for r in chain} == {chain[0].id}
    assert [r.previous_response_id for r in chain] == [None] + [r.id for r in chain[:-1]]
    expected = [t for n in range(5) for t in (f"q{n}", f"q{n}->0", f"q{n}->1")]
    assert texts(await secure_store.responses.history(acme, chain[-1].id)) == expected
    assert texts(await secure_store.responses.history(acme, chain[2].id)) == expected[:9]
    # A branch from turn 2 whose first response failed: failed turns are not history.
    failed = await secure_store.responses.begin(
        acme,
        model="m",
        conversation_id=None,
        previous_response_id=chain[1].id,
        input_items=[message("bad")],
        body={},
        store=True,
    )
    await secure_store.responses.fail(acme, failed.id, status="failed", error=None)
    after_failure = await turn(secure_store, acme, "retry", previous=failed.id)
    assert texts(await secure_store.responses.history(acme, after_failure.id)) == [
        *expected[:6],
        "retry",
        "retry->0",
    ]
    # An in-progress response contributes nothing yet.
    pending = await secure_store.responses.begin(
        acme,
        model="m",
        conversation_id=None,
        previous_response_id=chain[-1].id,
        input_items=[message("wip")],
        body={},
        store=True,
    )
    assert texts(await secure_store.responses.history(acme, pending.id)) == expected
    # Deleting a middle response cuts the chain there.
    await secure_store.responses.delete(acme, chain[2].id)
    assert texts(await secure_store.responses.history(acme, chain[-1].id)) == expected[9:]
    with pytest.raises(NotFoundError):
        await secure_store.responses.history(globex, chain[-1].id)


async def test_concurrent_turns_on_one_conversation(
    db_url: str, secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    # 20 turns completing at once, through 4 stores (as 4 gateway processes would).
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme)
    stores = [secure_store] + [
        await Store.open(db_url, key_provider=key_provider, clock=ManualClock()) for _ in range(3)
    ]
    try:
        begun = []
        for n in range(20):
            store = stores[n % len(stores)]
            inputs = [message(f"t{n}-in{i}") for i in range(1 + n % 2)]
            resp = await store.responses.begin(
                acme,
                model="m",
                conversation_id=conv.id,
                previous_response_id=None,
                input_items=inputs,
                body={},
                store=True,
            )
            begun.append((store, resp, len(inputs), 1 + n % 3))

        async def finish(store: Store, resp: ResponseRecord, n: int, outputs: int) -> None:
            await store.responses.complete(
                acme,
                resp.id,
                body={"status": "completed"},
                output_items=[say(f"{resp.id}-out{i}") for i in range(outputs)],
                input_tokens=1,
                output_tokens=1,
                cached_tokens=0,
            )

        await asyncio.gather(*(finish(s, r, n, o) for s, r, n, o in begun))
    finally:
        for store in stores[1:]:
            await store.close()
    items = await secure_store.conversations.all_items(acme, conv.id)
    total = sum(n + o for _, _, n, o in begun)
    assert [i.seq for i in items] == list(range(total))  # no gaps, no duplicates
    # Every turn is there, contiguous, inputs before outputs.
    runs: list[tuple[str | None, int]] = []
    for item in items:
        if runs and runs[-1][0] == item.response_id:
            runs[-1] = (item.response_id, runs[-1][1] + 1)
        else:
            runs.append((item.response_id, 1))
    assert sorted(runs) == sorted((r.id, n + o) for _, r, n, o in begun)
    for _, resp, n, o in begun:
        mine = [i.item["content"][0]["text"] for i in items if i.response_id == resp.id]
        assert all(t.endswith(f"-in{k}") for k, t in enumerate(mine[:n]))
        assert mine[n:] == [f"{resp.id}-out{k}" for k in range(o)]
    assert await count(secure_store, "SELECT count(*) FROM responses WHERE status = 'completed'") == 20
