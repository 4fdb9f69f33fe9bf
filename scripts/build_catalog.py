"""Build skyfleet's instance catalog (src/skyfleet/cost/data/catalog.csv) from the SkyPilot catalog CSVs.

Source: skypilot-org/skypilot-catalog, catalogs/v7/{aws,gcp}/vms.csv, as transcribed (partially)
into ../shared/data/gpu_prices_{aws,gcp}_skypilot_catalog.csv (see that folder's README).

One row per (cloud, instance type, region): the on-demand price (the lowest across the region's
zones; they agree almost everywhere) and the median spot price across the zones that list one.
GCP GPU VMs are priced as host VM + accelerator bundle in the same zone; types whose accelerator
rows were not transcribed (a2-ultragpu → A100-80GB) are left out.

    python scripts/build_catalog.py [--data ../shared/data] [--out src/skyfleet/cost/data/catalog.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_MEMORY_GIB = {"T4": 16, "A10G": 24, "L4": 24, "L40S": 48, "V100": 16, "V100-32GB": 32, "A100": 40,
                  "A100-80GB": 80, "H100": 80, "H100-MEGA": 80, "H200": 141}
GCP_HOST_ACCELERATOR = {"a2-highgpu": "A100", "a2-megagpu": "A100", "a2-ultragpu": "A100-80GB",
                        "a3-highgpu": "H100", "a3-edgegpu": "H100-MEGA"}
COLUMNS = ["cloud", "instance_type", "region", "accelerator", "accelerator_count", "gpu_memory_gib", "vcpus",
           "memory_gib", "ondemand_usd_per_hr", "spot_usd_per_hr", "zones"]


def _num(value: str) -> float | None:
    return float(value) if value.strip() else None


def _row(cloud: str, itype: str, region: str, acc: str, count: int, vcpus: float, mem: float,
         zones: list[tuple[float, float | None]]) -> dict[str, str]:
    spots = [s for _, s in zones if s is not None]
    return {
        "cloud": cloud, "instance_type": itype, "region": region, "accelerator": acc,
        "accelerator_count": str(count), "gpu_memory_gib": str(GPU_MEMORY_GIB[acc]),
        "vcpus": f"{vcpus:g}", "memory_gib": f"{mem:g}",
        "ondemand_usd_per_hr": f"{min(o for o, _ in zones):.4f}",
        "spot_usd_per_hr": f"{statistics.median(spots):.4f}" if spots else "",
        "zones": str(len(zones)),
    }


def aws(path: Path) -> list[dict[str, str]]:
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with path.open() as f:
        for r in csv.DictReader(f):
            groups[(r["instance_type"], r["region"])].append(r)
    out = []
    for (itype, region), rows in sorted(groups.items()):
        zones: dict[str, tuple[float, float | None]] = {}
        for r in rows:  # duplicate AZ rows (p4de): keep the one with a spot price
            od, spot = _num(r["ondemand_usd_per_hr"]), _num(r["spot_usd_per_hr"])
            if od is None:
                continue
            if r["availability_zone"] not in zones or zones[r["availability_zone"]][1] is None:
                zones[r["availability_zone"]] = (od, spot)
        if zones:
            r0 = rows[0]
            out.append(_row("aws", itype, region, r0["accelerator"], int(r0["accelerator_count"]),
                            float(r0["vcpus"]), float(r0["memory_gib"]), list(zones.values())))
    return out


def gcp(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    accel = {(r["zone"], r["accelerator"], int(r["accelerator_count"])): r
             for r in rows if r["row_kind"] == "accelerator"}
    groups: dict[tuple[str, str], list[tuple[float, float | None]]] = defaultdict(list)
    shape: dict[tuple[str, str], tuple[str, int, float, float]] = {}
    for r in rows:
        if r["row_kind"] != "host_vm":
            continue
        family, _, size = r["instance_type"].rpartition("-")
        acc, count = GCP_HOST_ACCELERATOR[family], int(size.rstrip("g"))
        a = accel.get((r["zone"], acc, count))
        host_od, acc_od = _num(r["ondemand_usd_per_hr"]), _num(a["ondemand_usd_per_hr"]) if a else None
        if a is None or host_od is None or acc_od is None:
            continue
        host_spot, acc_spot = _num(r["spot_usd_per_hr"]), _num(a["spot_usd_per_hr"])
        spot = host_spot + acc_spot if host_spot is not None and acc_spot is not None else None
        key = (r["instance_type"], r["region"])
        groups[key].append((host_od + acc_od, spot))
        shape[key] = (acc, count, float(r["vcpus"]), float(r["memory_gib"]))
    return [_row("gcp", itype, region, *shape[(itype, region)], zones)
            for (itype, region), zones in sorted(groups.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "skyfleet" / "cost" / "data" / "catalog.csv")
    args = parser.parse_args()
    rows = aws(args.data / "gpu_prices_aws_skypilot_catalog.csv") + gcp(args.data / "gpu_prices_gcp_skypilot_catalog.csv")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} instance types x regions to {args.out}")


if __name__ == "__main__":
    main()
