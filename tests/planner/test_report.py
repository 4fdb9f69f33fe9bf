"""The report: files written, the HTML referencing every PNG, summary.json readable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from skyfleet.planner.policies import StaticPolicy
from skyfleet.planner.report import summary_rows, write_report
from skyfleet.planner.simulator import simulate
from skyfleet.planner.types import Trace

from .test_simulator import CATALOG, fleet, profile


def test_report_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 200
    tr = Trace("small", np.sort(rng.uniform(0, 120, n)), rng.integers(10, 500, n), rng.integers(1, 50, n))
    f = fleet(("od", "on-demand", 4), ("sp", "spot", 4), floor=1)
    profs = {"od": profile(), "sp": profile()}
    results = {"skyfleet": simulate(tr, f, profs, catalog=CATALOG),
               "fixed": simulate(tr, f, profs, policy=StaticPolicy({"od": 2}), catalog=CATALOG, name="fixed")}
    index = write_report(results, tmp_path / "out", title="test <report>")
    page = index.read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(["replicas-skyfleet.png", "replicas-fixed.png", "cost.png", "cdf-ttft.png",
                           "cdf-e2e.png", "slo-windows.png"])
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in pngs)
    assert "test &lt;report&gt;" in page and "<td>fixed</td>" in page
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["policy"] for r in summary["summary"]] == ["skyfleet", "fixed"]
    assert summary["summary"] == json.loads(json.dumps(summary_rows(results)))
    assert summary["results"]["fixed"]["cost_usd"] == results["fixed"].cost_usd
