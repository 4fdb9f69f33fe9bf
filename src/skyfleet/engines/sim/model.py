"""The timing model of one simulated replica: queueing, prefill, batched decode, prefix cache.

Pure: no I/O, no asyncio, no wall time. The model reads an injected
:class:`~skyfleet.clock.Clock` and is an exact discrete-event simulation of what the
replica has done up to ``clock.now()``; the server asks it *when* something will next
happen to a request and sleeps until then. Tests drive it with a
:class:`~skyfleet.clock.ManualClock`.

The model
---------

**Admission (KV cache).** A request reserves ``prompt_tokens + max_tokens`` tokens of the
KV cache (``kv_capacity_tokens``) from admission until it finishes or is cancelled. Requests
are admitted strictly first-in first-out: when the request at the head of the queue does not
fit (or ``max_num_seqs`` requests are running) it and everything behind it waits, counted in
``num_waiting``. A request that could never fit (more than ``kv_capacity_tokens`` or
``max_model_len``) is refused at :meth:`SimModel.submit` with :class:`ContextLengthError`.

**Prefix cache.** On admission, the request's prompt is split into blocks of
``block_tokens`` tokens (see :mod:`.text`); the leading blocks already in the replica's
:class:`~.prefix_cache.PrefixCache` are hits, ``cached_tokens = hit_blocks * block_tokens``.
At least one prompt token is always computed (as in vLLM), so a prompt that is entirely
cached still recomputes its last block. The prompt's blocks are inserted when its prefill
finishes; the blocks of ``prompt + output`` when the request finishes (so the next turn of a
conversation hits them). The cache holds ``prefix_cache_blocks`` blocks, LRU-evicted; it is
bookkeeping separate from the KV reservation above.

**Time to first token.** Once admitted at ``t_admit``, the first token comes at::

    t_first = t_admit + ttft_base_s + (prompt_tokens - cached_tokens) / prefill_tokens_per_s

so the TTFT a client sees is ``t_first - t_arrival`` (queueing included). Prefills of
different requests do not slow each other down.

**Decode.** After its first token a request makes progress at ``1 / tpot`` tokens per
second, with the *current* batch size ``B`` (all admitted requests, prefilling or not)::

    tpot(B) = tpot_base_s * (1 + tpot_batch_slope * (B - 1))

``B`` changes only at events (an admission, a finish, a cancellation), so between events
every decoding request advances linearly, all at the same rate. The model therefore keeps
one *decode clock* ``V`` (tokens a request decoding all along would have made, integrated
piecewise from event to event): a request that got its first token when the decode clock
read ``V0`` has ``1 + V - V0`` tokens, and finishes with ``n`` tokens when ``V`` reaches
``V0 + n - 1``. Pending first tokens and finishes sit in two heaps, so an event costs
``O(log running)`` however large the batch. With ``tpot_base_s == 0`` decoding is
instantaneous.

A first token is reported to the observer (the metrics) when it comes; the rest of a
request's tokens when it finishes or is cancelled, all at its mean inter-token latency.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from skyfleet.clock import Clock
from skyfleet.engines.sim.prefix_cache import PrefixCache
from skyfleet.engines.sim.profile import SimProfile
from skyfleet.engines.sim.text import block_hashes, count_tokens

#: decode progress (in tokens) closer than this to a whole token counts as that token
_TOKEN_EPS = 1e-6
#: an event due within this many seconds of another happens with it
_TIME_EPS = 1e-7


class ContextLengthError(ValueError):
    """A request that can never run on this replica (prompt plus ``max_tokens`` too long)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens; the request "
            f"({prompt_tokens} prompt + {max_tokens} completion tokens) exceeds it."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(eq=False, slots=True)
class SimRequest:
    """One request as the model sees it. Read it; only the model changes it."""

    rid: int
    prompt: str
    prompt_tokens: int
    max_tokens: int
    #: tokens this request will generate (``<= max_tokens``)
    target_tokens: int
    finish_reason: str
    arrived_at: float
    block_hashes: Sequence[bytes]
    #: the generated text, cached with the prompt when the request finishes ("" caches nothing)
    output: str = ""
    #: vLLM's ``cache_salt``: only requests with the same salt (or none) share cached blocks
    cache_salt: str | None = None
    state: RequestState = RequestState.WAITING
    admitted_at: float | None = None
    #: when its first token is (or was) due; ``inf`` until admitted
    first_token_at: float = math.inf
    finished_at: float | None = None
    cached_tokens: int = 0
    #: whole tokens generated, as of the last :meth:`SimModel.poll` (exact once done)
    tokens_out: int = 0
    #: the model's decode clock at its first token; ``inf`` until then
    v_start: float = math.inf

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def done(self) -> bool:
        return self.state is RequestState.FINISHED or self.state is RequestState.CANCELLED

    @property
    def ttft(self) -> float | None:
        """Arrival to first token, queueing included (known once admitted)."""
        return None if self.first_token_at == math.inf else self.first_token_at - self.arrived_at


class ModelObserver(Protocol):
    """What the model reports as it simulates (the replica's metrics implement it)."""

    def admitted(self, prompt_tokens: int, cached_tokens: int) -> None: ...

    def first_token(self, ttft_s: float) -> None: ...

    def tokens(self, count: int, itl_s: float | None) -> None:
        """``count`` more tokens; ``itl_s`` is their inter-token latency (``None`` for a first token)."""
        ...

    def finished(self, e2e_s: float | None, finish_reason: str) -> None:
        """A request left the replica; ``e2e_s`` is ``None`` for a cancellation (``"abort"``)."""
        ...


class _NullObserver:
    def admitted(self, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def first_token(self, ttft_s: float) -> None:
        pass

    def tokens(self, count: int, itl_s: float | None) -> None:
        pass

    def finished(self, e2e_s: float | None, finish_reason: str) -> None:
        pass


class ModelStats(NamedTuple):
    running: int
    waiting: int
    kv_used_tokens: int
    kv_usage: float
    prefix_cache_blocks: int


class SimModel:
    """One replica's scheduler state, simulated up to ``clock.now()`` on every call."""

    def __init__(self, profile: SimProfile, clock: Clock, observer: ModelObserver | None = None) -> None:
        self._profile = profile
        self._clock = clock
        self._observer: ModelObserver = observer if observer is not None else _NullObserver()
        self._cache = PrefixCache(profile.prefix_cache_blocks)
        self._waiting: deque[SimRequest] = deque()
        self._running: dict[int, SimRequest] = {}
        #: (first_token_at, rid, request) of admitted requests still in prefill
        self._prefilling: list[tuple[float, int, SimRequest]] = []
        #: (decode clock at which it finishes, rid, request) of requests past their first token
        self._decoding: list[tuple[float, int, SimRequest]] = []
        self._kv_used = 0
        self._next_rid = 0
        self._now = clock.now()
        self._v = 0.0
        self._limit = min(profile.max_model_len, profile.kv_capacity_tokens)

    @property
    def profile(self) -> SimProfile:
        return self._profile

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._cache

    # -- the server's side -----------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        max_tokens: int,
        target_tokens: int | None = None,
        finish_reason: str = "length",
        output: str = "",
        cache_salt: str | None = None,
    ) -> SimRequest:
        """A new request arrives now; it is admitted at once if it fits, else queued.

        ``target_tokens`` (default ``max_tokens``) is how many tokens it will generate.
        Raises :class:`ContextLengthError` if it could never be admitted.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        target = max_tokens if target_tokens is None else target_tokens
        if not 1 <= target <= max_tokens:
            raise ValueError("target_tokens must be between 1 and max_tokens")
        prompt_tokens = count_tokens(prompt)
        if prompt_tokens + max_tokens > self._limit:
            raise ContextLengthError(prompt_tokens, max_tokens, self._limit)
        return self._enqueue(
            prompt, prompt_tokens, block_hashes(prompt, self._profile.block_tokens, cache_salt),
            max_tokens=max_tokens, target=target, finish_reason=finish_reason, output=output, cache_salt=cache_salt,
        )

    def submit_tokens(
        self,
        prompt_tokens: int,
        prefix_blocks: Sequence[bytes | int] = (),
        *,
        max_tokens: int,
        target_tokens: int | None = None,
        finish_reason: str = "length",
    ) -> SimRequest:
        """Like :meth:`submit`, for a prompt known only by its length (trace replay: no text to tokenise).

        ``prefix_blocks`` are the prompt's chained prefix-block hashes (Mooncake ``hash_ids``), each
        covering ``profile.block_tokens`` tokens; ``()`` gives the request no prefix-cache hits. Nothing
        is cached at the finish (there is no output text).
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if prompt_tokens < 0:
            raise ValueError("prompt_tokens must not be negative")
        target = max_tokens if target_tokens is None else target_tokens
        if not 1 <= target <= max_tokens:
            raise ValueError("target_tokens must be between 1 and max_tokens")
        if prompt_tokens + max_tokens > self._limit:
            raise ContextLengthError(prompt_tokens, max_tokens, self._limit)
        return self._enqueue("", prompt_tokens, prefix_blocks,  # type: ignore[arg-type]
                             max_tokens=max_tokens, target=target, finish_reason=finish_reason)

    def _enqueue(self, prompt: str, prompt_tokens: int, hashes: Sequence[bytes], *, max_tokens: int, target: int,
                 finish_reason: str, output: str = "", cache_salt: str | None = None) -> SimRequest:
        now = self._sync()
        req = SimRequest(
            rid=self._next_rid,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            target_tokens=target,
            finish_reason=finish_reason,
            arrived_at=now,
            block_hashes=hashes,
            output=output,
            cache_salt=cache_salt,
        )
        self._next_rid += 1
        self._waiting.append(req)
        self._admit(now)
        return req

    def poll(self, req: SimRequest) -> int:
        """Simulate up to now; the whole tokens ``req`` has generated (also left in ``req.tokens_out``)."""
        self._sync()
        if req.state is RequestState.RUNNING and req.v_start != math.inf:
            req.tokens_out = min(1 + int(self._v - req.v_start + _TOKEN_EPS), req.target_tokens)
        return req.tokens_out

    def next_update_at(self, req: SimRequest, *, each_token: bool = True) -> float | None:
        """When (on the clock) ``req`` will next have news, if nothing else arrives; ``None`` once done.

        The news is its next token (``each_token``), or its completion. A waiting request's
        news is the next event on the replica (only a finish can admit it), ``inf`` if none.
        Other arrivals or cancellations can move the answer, so sleep to it, then ask again.
        """
        self._sync()
        if req.done:
            return None
        tpot = self._tpot()
        if req.state is RequestState.WAITING:
            return self._next_event_at(tpot)
        if req.v_start == math.inf:
            return req.first_token_at if each_token else req.first_token_at + (req.target_tokens - 1) * tpot
        if each_token:
            p = self._v - req.v_start
            left = int(p + _TOKEN_EPS) + 1 - p
        else:
            left = req.v_start + req.target_tokens - 1 - self._v
        return self._now + max(left, 0.0) * tpot

    def next_event_at(self) -> float:
        """When the next first token or finish on this replica is due if nothing else arrives (``inf``: idle)."""
        self._sync()
        return self._next_event_at(self._tpot())

    @property
    def in_flight(self) -> int:
        """Requests admitted or queued (running + waiting), simulated up to now."""
        self._sync()
        return len(self._running) + len(self._waiting)

    def cancel(self, req: SimRequest) -> None:
        """The client went away: free its KV reservation now (no-op once it is done)."""
        now = self._sync()
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        elif req.state is RequestState.RUNNING:
            self.poll(req)
            del self._running[req.rid]  # its heap entries are dropped when they surface
            self._kv_used -= req.kv_tokens
            self._report_decode(req, now)
        else:
            return
        req.state = RequestState.CANCELLED
        req.finish_reason = "abort"
        req.finished_at = now
        self._observer.finished(None, "abort")
        self._admit(now)

    def stats(self) -> ModelStats:
        self._sync()
        cap = self._profile.kv_capacity_tokens
        return ModelStats(
            len(self._running), len(self._waiting), self._kv_used, self._kv_used / cap, len(self._cache)
        )

    def advance(self) -> None:
        """Simulate up to ``clock.now()`` (every other method does this first)."""
        self._sync()

    # -- the simulation ----------------------------------------------------------------------

    def _sync(self) -> float:
        now = self._clock.now()
        if now >= self._now:  # events due right now fire too
            self._advance_to(now)
        return self._now

    def _tpot(self) -> float:
        return self._profile.tpot_s(len(self._running))

    def _next_event_at(self, tpot: float) -> float:
        """The next first token or finish, at the current batch size (``inf`` if none)."""
        running = self._running
        pre, dec = self._prefilling, self._decoding
        while pre and pre[0][1] not in running:  # cancelled
            heapq.heappop(pre)
        while dec and dec[0][1] not in running:
            heapq.heappop(dec)
        t = pre[0][0] if pre else math.inf
        if dec:
            v_done = dec[0][0]
            t = min(t, self._now if self._finish_due(v_done, tpot) else self._now + (v_done - self._v) * tpot)
        return t

    def _finish_due(self, v_done: float, tpot: float) -> bool:
        """Whether a finish at decode clock ``v_done`` is due now (the one test of it, with tolerance)."""
        left = v_done - self._v
        return left <= _TOKEN_EPS or left * tpot <= _TIME_EPS

    def _advance_to(self, t: float) -> None:
        while True:
            tpot = self._tpot()
            t_evt = self._next_event_at(tpot)
            if t_evt > t:
                self._decode_until(t, tpot)
                # Decoding to t moves the decode clock by (t - now) / tpot, which can round onto
                # (within tolerance of) a finish predicted a hair after t: look again, or that
                # finish would stay pending until some later sync even though it is due by now.
                t_evt = self._next_event_at(tpot)
                if t_evt > t:
                    return
            self._decode_until(t_evt, tpot)
            self._fire(t_evt, tpot)
            self._admit(t_evt)

    def _decode_until(self, t: float, tpot: float) -> None:
        if t > self._now:
            if tpot > 0:
                self._v += (t - self._now) / tpot
            self._now = t

    def _fire(self, t: float, tpot: float) -> None:
        """First tokens and finishes due at ``t`` (the decode clock already at ``t``)."""
        pre, dec, running = self._prefilling, self._decoding, self._running
        while pre and pre[0][0] <= t:
            _, rid, r = heapq.heappop(pre)
            if rid not in running:
                continue
            r.v_start = self._v
            r.tokens_out = 1
            self._observer.first_token(t - r.arrived_at)
            self._observer.tokens(1, None)
            self._cache.insert(r.block_hashes)
            heapq.heappush(dec, (self._v + r.target_tokens - 1, rid, r))
        while dec:
            v_done, rid, r = dec[0]
            if rid in running and not self._finish_due(v_done, tpot):
                break
            heapq.heappop(dec)
            if rid in running:
                self._finish(r, t)

    def _finish(self, r: SimRequest, t: float) -> None:
        del self._running[r.rid]
        self._kv_used -= r.kv_tokens
        r.tokens_out = r.target_tokens
        r.state = RequestState.FINISHED
        r.finished_at = t
        self._report_decode(r, t)
        if r.output:
            self._cache.insert(block_hashes(r.prompt + r.output, self._profile.block_tokens, r.cache_salt))
        self._observer.finished(t - r.arrived_at, r.finish_reason)

    def _report_decode(self, r: SimRequest, t: float) -> None:
        """Tokens after the first, at their mean inter-token latency."""
        n = r.tokens_out - 1
        if n > 0:
            self._observer.tokens(n, (t - r.first_token_at) / n)

    def _admit(self, t: float) -> None:
        """Admit from the head of the queue, in order, while the head fits."""
        profile = self._profile
        while self._waiting:
            head = self._waiting[0]
            if len(self._running) >= profile.max_num_seqs:
                return
            if self._kv_used + head.kv_tokens > profile.kv_capacity_tokens:
                return
            self._waiting.popleft()
            # at least one prompt token is always computed
            limit = max(head.prompt_tokens - 1, 0) // profile.block_tokens
            head.cached_tokens = self._cache.match(head.block_hashes, limit) * profile.block_tokens
            head.admitted_at = t
            head.first_token_at = t + profile.prefill_s(head.prompt_tokens - head.cached_tokens)
            head.state = RequestState.RUNNING
            self._kv_used += head.kv_tokens
            self._running[head.rid] = head
            heapq.heappush(self._prefilling, (head.first_token_at, head.rid, head))
            self._observer.admitted(head.prompt_tokens, head.cached_tokens)
