"""A voucher link through a faulty network: the voucher systems of other companies.

Requests and replies travel as world events (a crash of the engine does not recall a
request already on the wire), after a seeded delay; either may be lost; a voucher system
may fail without deciding (a retryable error). The order actors must still never lose a
voucher nor spend one twice: they re-send on their retry schedule, and every command is
idempotent by its fence key.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from payengine.actors.directory import Directory, Key
from payengine.actors.messages import FromOrder
from payengine.engine.errors import EngineClosed
from payengine.engine.order import (
    CancelHold,
    ClawBack,
    ConfirmHold,
    CreditVoucher,
    DebitVoucher,
    ReturnVoucher,
    TryHold,
    VoucherOp,
    VoucherReply,
)
from payengine.sim.channel import World

_OPS = {TryHold: VoucherOp.TRY, ConfirmHold: VoucherOp.CONFIRM, CancelHold: VoucherOp.CANCEL,
        DebitVoucher: VoucherOp.DEBIT, ReturnVoucher: VoucherOp.RETURN,
        CreditVoucher: VoucherOp.CREDIT, ClawBack: VoucherOp.CLAWBACK}


@dataclass(frozen=True)
class VoucherFaults:
    request_lost: float = 0.0
    reply_lost: float = 0.0
    unavailable: float = 0.0
    """The voucher system answers "try again" without doing anything."""
    delay_ms: tuple[int, int] = (0, 5)
    outage: tuple[str, int, int] | None = None
    """One voucher system unreachable: requests to accounts whose id ends with the first
    item are lost from the second item's virtual time (ms) until the third's."""


class LossyVoucherLink:
    """Fits ``actors.voucher_link.VoucherLink``."""

    def __init__(self, directory: Directory, world: World, rng: random.Random,
                 faults: Callable[[], VoucherFaults], counts: dict[str, int]) -> None:
        self._directory = directory
        self._world = world
        self._rng = rng
        self._faults = faults
        self._counts = counts

    def request(self, account_id: str, command: FromOrder) -> None:
        f = self._faults()
        if f.outage is not None and account_id.endswith(f.outage[0]) and (
            f.outage[1] <= self._world.now_ms() < f.outage[2]
        ):
            self._counts["voucher_outage_lost"] = self._counts.get("voucher_outage_lost", 0) + 1
            return
        if self._chance(f.request_lost, "voucher_request_lost"):
            return
        if self._chance(f.unavailable, "voucher_unavailable"):
            effect = command.effect
            failed = VoucherReply(effect.leg_no, effect.fence, _OPS[type(effect)], False,
                                  "voucher system unavailable", retryable=True)
            self._send(("order", command.order_id), failed, f)
            return
        self._send(("account", account_id), command, f)

    def reply(self, order_id: str, reply: VoucherReply) -> None:
        f = self._faults()
        if self._chance(f.reply_lost, "voucher_reply_lost"):
            return
        self._send(("order", order_id), reply, f)

    def _send(self, key: Key, message: Any, f: VoucherFaults) -> None:
        directory = self._directory

        def deliver() -> None:
            with contextlib.suppress(EngineClosed):  # the engine crashed meanwhile
                directory.tell(key, message)

        delay = self._rng.randint(*f.delay_ms)
        self._world.call_at(self._world.now_ms() + delay, deliver)

    def _chance(self, probability: float, kind: str) -> bool:
        hit = probability > 0 and self._rng.random() < probability
        if hit:
            self._counts[kind] = self._counts.get(kind, 0) + 1
        return hit
