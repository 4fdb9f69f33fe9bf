"""``skyfleet engine sim``: a simulated OpenAI-compatible engine replica with realistic timing.

It answers like vLLM (OpenAI endpoints, vLLM metric names) with deterministic text and a
timing model (queueing on KV capacity, prefill, batch-dependent decode, prefix cache; see
:mod:`skyfleet.engines.sim.model`), so tests and benchmarks can run fleets of many replicas
on a couple of CPU cores; with ``fast=True`` it is a zero-delay upstream for measuring the
gateway's own overhead.

    from skyfleet.engines.sim import SimProfile, build_app, run
    run(host="127.0.0.1", port=9001, profile=SimProfile.paced(), model="sim-model", fast=False)
"""

from skyfleet.engines.sim.model import ContextLengthError, SimModel, SimRequest
from skyfleet.engines.sim.profile import ProfileError, SimProfile, load_profile
from skyfleet.engines.sim.server import ASGIApp, SimApp, build_app, run

__all__ = [
    "ASGIApp",
    "ContextLengthError",
    "ProfileError",
    "SimApp",
    "SimModel",
    "SimProfile",
    "SimRequest",
    "build_app",
    "load_profile",
    "run",
]
