"""Simulated payments per wall-clock second on the deterministic runtime (printed, not asserted).

    python benchmarks/bench_sim.py [--orders 2000] [--seeds 4] [--jobs 0]

Each run is a full simulation (engine on SQLite, actors on the seeded scheduler, faults and
crashes as drawn by the seed, quiet phase, oracle); the figure is orders / wall seconds.
Two figures per fault setting: one process running the seeds one after the other (the cost
of one payment), and ``--jobs`` processes running them side by side (what a sweep of seeds
gets out of the machine; 0 = one per core).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payengine.sim.simulation import JOBS_MAX, SimConfig, run_many


def _measure(configs: list[SimConfig], jobs: int) -> tuple[int, float, float]:
    """(orders, wall seconds, virtual seconds) of running ``configs`` with ``jobs``."""
    started = time.perf_counter()
    orders, virtual = 0, 0.0
    for result in run_many(configs, jobs=jobs):
        assert result.ok, (result.seed, result.violations[:3])
        orders += result.orders
        virtual += result.virtual_seconds
    return orders, time.perf_counter() - started, virtual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2_000, help="payments per seed")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per core)")
    args = parser.parse_args()
    jobs = min(args.jobs or os.cpu_count() or 1, JOBS_MAX)
    for faults in ("none", "all"):
        configs = [SimConfig(seed=seed, orders=args.orders,
                             faults=frozenset() if faults == "none" else SimConfig.faults)
                   for seed in range(args.seeds)]
        for label, n in (("1 process", 1), (f"{jobs} processes", jobs)):
            orders, wall, virtual = _measure(configs, n)
            print(f"faults={faults:<4} {label:<12} {orders} payments in {wall:6.2f} s wall "
                  f"({virtual:.0f} s virtual): {orders / wall:,.0f} simulated payments per "
                  f"wall-clock second", flush=True)


if __name__ == "__main__":
    main()
