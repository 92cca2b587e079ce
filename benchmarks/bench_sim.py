"""Simulated payments per wall-clock second on the deterministic runtime (printed, not asserted).

    python benchmarks/bench_sim.py [--orders 2000] [--seeds 3]

Each run is a full simulation (engine on SQLite, actors on the seeded scheduler, faults and
crashes as drawn by the seed, quiet phase, oracle); the figure is orders / wall seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.simulation import SimConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2_000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for faults in ("none", "all"):
        total_orders, total_wall, total_virtual = 0, 0.0, 0.0
        for seed in range(args.seeds):
            config = SimConfig(seed=seed, orders=args.orders,
                               faults=frozenset() if faults == "none" else SimConfig.faults)
            result = run(config)
            assert result.ok, result.violations[:3]
            total_orders += result.orders
            total_wall += result.wall_seconds
            total_virtual += result.virtual_seconds
        print(f"faults={faults:<4} {total_orders} payments in {total_wall:.2f} s wall "
              f"({total_virtual:.0f} s virtual): {total_orders / total_wall:,.0f} simulated "
              f"payments per wall-clock second")


if __name__ == "__main__":
    main()
