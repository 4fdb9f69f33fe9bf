"""Capacity planning and trace replay: what a fleet will cost, and which fleet is cheapest at an SLO.

* ``types.py``: the shared values (:class:`~skyfleet.planner.types.Trace`,
  :class:`~skyfleet.planner.types.EngineProfile`).
* ``traces.py``: trace readers (Azure LLM inference CSV, Mooncake JSONL/CSV with prefix-block hashes,
  skyfleet's own usage records); scaling and slicing.
* ``profiles.py`` + ``data/profiles.yaml``: engine performance profiles per (GPU, model, engine), each
  with its published source; ``measure.py``: ``skyfleet profile --endpoint`` measures a live engine.
* ``spot.py``: spot availability traces.
* ``simulator.py``: the discrete-event simulator (gateway routing + replicas + the fleet policy, called
  exactly as the live controller calls it), ``results.py`` its result; ``policies.py``: the baselines
  compared with it (static-peak, reactive, oracle) and ``compare``.
* ``capacity.py``: one replica's sustainable rate at an SLO, from its profile; ``milp.py``: the planner
  (integer program over the catalog and profiles, scipy/HiGHS) writing a fleet spec.
* ``report.py``: HTML + PNG report and JSON summary.
"""
