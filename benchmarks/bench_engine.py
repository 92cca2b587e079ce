"""Throughput figures for payengine, printed (not asserted).

    python benchmarks/bench_engine.py [--payments 2000] [--synchronous FULL|NORMAL]

1. the pure core: ``decide`` calls per second for a whole combined payment's life;
2. the whole engine on threads and SQLite: combined payments per second, from submit to
   settled, with a channel that answers success at once (so the engine is what is measured).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payengine import CashPart, Engine, OrderPolicy, Overloaded, PaymentRequest, VoucherPart
from payengine.engine.codes import ResultKind
from payengine.engine.order import (
    AccountUnit,
    Activate,
    CashResult,
    ResultSource,
    VoucherOp,
    VoucherReply,
    build_order,
    decide,
)
from payengine.sim.bench import InstantChannel


def request(i: int) -> PaymentRequest:
    # amounts differ per order, so the user-dimension duplicate guard lets every one through
    return PaymentRequest("station-1", f"b{i}", f"u{i % 50}", "CNY", 10_000 + i, "Fuel",
                          CashPart(9_600 + i, "wechat"),
                          (VoucherPart(f"rp{i % 50}", 100), VoucherPart(f"pts{i % 50}", 20),
                           VoucherPart(f"tel{i % 50}", 100)))


def bench_core(n: int) -> float:
    policy = OrderPolicy()
    units = {f"rp{k}": AccountUnit("CNY", None) for k in range(50)}
    units |= {f"tel{k}": AccountUnit("CNY", None) for k in range(50)}
    units |= {f"pts{k}": AccountUnit("POINTS", 10) for k in range(50)}
    started = time.perf_counter()
    for i in range(n):
        order = build_order(request(i), order_id=f"o{i}", payment_serial=f"s{i}", now_ms=0,
                            accounts=units, policy=policy)
        order = decide(order, Activate(), now_ms=1, policy=policy).order
        for leg in order.legs[1:]:
            fence = order.fence_of(leg)
            order = decide(order, VoucherReply(leg.leg_no, fence, VoucherOp.TRY, True),
                           now_ms=2, policy=policy).order
        order = decide(order, CashResult(ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS"),
                       now_ms=3, policy=policy).order
        for leg in order.legs[1:]:
            fence = order.fence_of(leg)
            order = decide(order, VoucherReply(leg.leg_no, fence, VoucherOp.CONFIRM, True),
                           now_ms=4, policy=policy).order
        assert order.is_settled
    return n / (time.perf_counter() - started)


def submit_until_admitted(engine: Engine, payment: PaymentRequest, tries_max: int = 10_000) -> None:
    """A client above capacity is told ``Overloaded`` at once; like any client it backs off and
    retries (bounded), so the figure is the engine's capacity rather than a crash."""
    for _ in range(tries_max):
        try:
            engine.submit(payment)
            return
        except Overloaded:
            time.sleep(0.002)
    raise RuntimeError(f"{payment.merchant_order_no} refused {tries_max} times")


def bench_engine(n: int, synchronous: str, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.open(Path(tmp) / "bench.db", channels=[InstantChannel()],
                             synchronous=synchronous)
        try:
            for k in range(50):
                for name, unit, rate in (("rp", "CNY", None), ("tel", "CNY", None),
                                         ("pts", "POINTS", 10)):
                    engine.open_account(f"{name}{k}", unit, minor_per_unit=rate)
                    engine.fund(f"{name}{k}", 10**9, funding_id=f"{name}{k}")
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda i: submit_until_admitted(engine, request(i)), range(n)))
            accepted = time.perf_counter() - started
            while engine.unsettled_count():
                time.sleep(0.01)
            settled = time.perf_counter() - started
        finally:
            engine.shutdown()
    return n / accepted, n / settled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=2_000)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(f"core decide, whole combined payment (4 legs): "
          f"{bench_core(args.payments * 5):,.0f} payments/s")
    accepted, settled = bench_engine(args.payments, args.synchronous, args.workers)
    print(f"engine, threads + SQLite synchronous={args.synchronous}, {args.payments} combined "
          f"payments: {accepted:,.0f} submits/s accepted, {settled:,.0f} payments/s settled")


if __name__ == "__main__":
    main()
