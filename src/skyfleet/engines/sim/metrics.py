"""The replica's ``/metrics``: vLLM's metric names, rendered in the Prometheus text format.

A tiny hand-rolled registry (plain integers and bucket lists, no locks: everything runs on
one event loop) because the hot path of ``--fast`` mode updates it on every request. Every
series carries ``model_name="<model>"``; ``vllm:request_success_total`` also carries
``finished_reason`` (``stop``, ``length`` or ``abort``). Token counters count tokens;
``prefix_cache_queries``/``hits`` count prompt tokens looked up / found in the prefix cache.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISHED_REASONS: tuple[str, ...] = ("stop", "length", "abort")


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    """Bucket counts of observed values (``le`` semantics: a value lands in the first bucket >= it)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def render(self, name: str, labels: str, out: list[str]) -> None:
        cumulative = 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            cumulative += c
            out.append(f'{name}_bucket{{{labels},le="{_num(bound)}"}} {_num(cumulative)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {_num(self.count)}')
        out.append(f"{name}_count{{{labels}}} {_num(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {_num(self.sum)}")


class SimMetrics:
    """One replica's counters; a :class:`~skyfleet.engines.sim.model.ModelObserver`."""

    def __init__(self, model_name: str) -> None:
        self._labels = f'model_name="{_escape(model_name)}"'
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.success: dict[str, int] = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    # -- ModelObserver -----------------------------------------------------------------------

    def admitted(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.prefix_cache_queries += prompt_tokens
        self.prefix_cache_hits += cached_tokens

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def tokens(self, count: int, itl_s: float | None) -> None:
        self.generation_tokens += count
        if itl_s is not None:
            self.itl.observe(itl_s, count)

    def finished(self, e2e_s: float | None, finish_reason: str) -> None:
        self.success[finish_reason] = self.success.get(finish_reason, 0) + 1
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    # -- fast mode (no timing model) -----------------------------------------------------------

    def served(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        """A request answered without the timing model: counters only, no latency histograms."""
        self.prompt_tokens += prompt_tokens
        self.prefix_cache_queries += prompt_tokens
        self.generation_tokens += completion_tokens
        self.success[finish_reason] += 1

    # -- exposition --------------------------------------------------------------------------

    def render(self, running: int, waiting: int, kv_usage: float) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every series."""
        labels = self._labels
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, kind: str, doc: str, value: float) -> None:
            family(name, kind, doc)
            out.append(f"{name}{{{labels}}} {_num(value)}")

        sample(
            "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", running
        )
        sample("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
        sample("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        sample(
            "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", self.prompt_tokens
        )
        sample(
            "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
            self.generation_tokens,
        )  # fmt: skip
        sample(
            "vllm:prefix_cache_queries_total", "counter",
            "Prefix cache queries, in terms of number of queried tokens.", self.prefix_cache_queries,
        )  # fmt: skip
        sample(
            "vllm:prefix_cache_hits_total", "counter",
            "Prefix cache hits, in terms of number of cached tokens.", self.prefix_cache_hits,
        )  # fmt: skip
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, n in self.success.items():
            out.append(
                f'vllm:request_success_total{{{labels},finished_reason="{_escape(reason)}"}} {_num(n)}'
            )
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
        ):
            family(name, "histogram", doc)
            hist.render(name, labels, out)
        out.append("")
        return "\n".join(out).encode()
