"""An engine abandoned mid-flight (no shutdown: a crash) and reopened on the same file.

Every acknowledged submit must survive, every order must converge, and the money must
balance against the simulated channel's own records. Repeated under several seeds, with
crashes at different moments, because one lucky interleaving proves little.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from payengine import CashPart, Engine, EngineConfig, LegMode, PaymentError, PaymentRequest, VoucherPart
from payengine.actors.runtime import ThreadRuntime
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.demo import DEMO_POLICY
from payengine.sim.oracle import check
from tests.helpers import wait_for

CONFIG = EngineConfig(account_idle_ms=500, pre_hold_ttl_ms=1_000, duplicate_guard_window_ms=0)


def _open(path: Path, channel: SimulatedChannel) -> Engine:
    engine = Engine.open(path, channels=[channel], policy=DEMO_POLICY, config=CONFIG)
    channel.attach(engine)
    return engine


def _request(rng: random.Random, i: int) -> PaymentRequest:
    who = f"c{rng.randrange(6)}"
    mode = rng.choice([LegMode.PRE_DEDUCT, LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT])
    return PaymentRequest(
        merchant_id="station-1", merchant_order_no=f"o{i}", user_id=who, currency="CNY",
        total_minor=5_000, title="Fuel", cash=CashPart(4_700, "wechat"),
        vouchers=(VoucherPart(f"{who}/rp", 100, mode), VoucherPart(f"{who}/pts", 20, mode)))


@pytest.mark.parametrize("seed", range(6))
def test_an_engine_abandoned_mid_flight_and_reopened_converges_with_money_conserved(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    world = ThreadRuntime()
    channel = SimulatedChannel("wechat", world, seed=seed, faults=ChannelFaults())
    path = tmp_path / "crash.db"
    engine = _open(path, channel)
    for c in range(6):
        engine.open_account(f"c{c}/rp", "CNY")
        engine.fund(f"c{c}/rp", 1_000, funding_id=f"c{c}/rp")
        engine.open_account(f"c{c}/pts", "POINTS", minor_per_unit=10)
        engine.fund(f"c{c}/pts", 100, funding_id=f"c{c}/pts")
    requests = [_request(rng, i) for i in range(40)]
    acknowledged: dict[str, str] = {}
    try:
        for crash in range(2):
            batch = requests[crash * 20:(crash + 1) * 20]

            def submit(req: PaymentRequest, eng: Engine = engine) -> tuple[str, str] | None:
                try:
                    return req.merchant_order_no, eng.submit(req).order_id
                except PaymentError:
                    return None  # refused because the engine crashed: never acknowledged

            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = [pool.submit(submit, req) for req in batch]
                time.sleep(rng.uniform(0.0, 0.3))
                engine.abandon()  # the crash: no shutdown, in-flight messages lost
                for future in futures:
                    result = future.result()
                    if result is not None:
                        acknowledged[result[0]] = result[1]
            time.sleep(rng.uniform(0.0, 0.5))  # downtime: the wallet keeps going
            engine = _open(path, channel)
        wait_for(lambda: engine.unsettled_count() == 0, timeout_s=30, what="convergence")
        wait_for(lambda: not any(a.held for a in engine.store.all_accounts()), timeout_s=10,
                 what="holds released")
        for merchant_order_no, order_id in acknowledged.items():
            assert engine.find_order("station-1", merchant_order_no).order_id == order_id
        report = check(engine.store, {"wechat": channel}, now_ms=world.now_ms())
        assert report.violations == []
        assert report.orders_checked >= len(acknowledged)
    finally:
        engine.shutdown()
        world.shutdown()
