"""A simulated carrier: an external voucher provider (phone credit) with Try/Confirm/Cancel.

It is the outside world: it outlives engine crashes and keeps its own books, which the
oracle compares with the orders. Its faults: Trys decided late (answered "processing", the
result sent later by callback), callbacks lost, sent twice or out of order, Trys refused
although the balance suffices, calls that time out before or after doing their work (the
answer lost), and a Cancel that lands before its Try (recorded as an empty rollback; the late
Try is then refused). Every call may come from an I/O lane thread: one lock guards it all.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from payengine.actors.adapters.providers import ConfiguredProvider, load_providers
from payengine.actors.provider import ProviderCallback
from payengine.engine.errors import PaymentError
from payengine.engine.order import LegMode, OrderState, PaymentOrder, VoucherPart
from payengine.engine.provider import PROVIDER_SEPARATOR, ProviderOp, ProviderReply, txn_id_of
from payengine.engine.voucher import FenceKey
from payengine.persistence.store import Store
from payengine.sim.oracle import Violation

SIM_PROVIDERS_TOML = """
[providers.carrier-x]
unit = "CNY"
query_schedule_ms = [300, 600, 1200, 2400]
pending_max = 10000
recording_keep = 2000

[providers.carrier-x.codes]
communication_ok = ["OK"]

[providers.carrier-x.codes.try]
success = ["HELD", "CONFIRMED"]
failure = ["REFUSED", "CANCELLED", "EMPTY_ROLLBACK"]
processing = ["PENDING", "NOT_FOUND"]

[providers.carrier-x.codes.confirm]
success = ["CONFIRMED"]
failure = ["REFUSED", "CANCELLED", "EMPTY_ROLLBACK"]
processing = ["PENDING", "HELD", "NOT_FOUND"]

[providers.carrier-x.codes.cancel]
success = ["CANCELLED", "EMPTY_ROLLBACK", "REFUSED"]
failure = ["CONFIRMED"]
processing = ["PENDING", "HELD", "NOT_FOUND"]
"""
"""The simulated carrier's configuration, loaded as a deployment's would be."""

SIGNATURE_HEADER = "X-Carrier-Signature"
CALLBACK_BYTES_MAX = 4_096


@dataclass(frozen=True)
class ProviderFaults:
    slow: float = 0.0
    """Share of Trys answered PENDING and decided ``decide_ms`` later, by callback."""
    decide_ms: tuple[int, int] = (50, 2_000)
    refuse: float = 0.0
    """Share of Trys refused whatever the balance."""
    callback_lost: float = 0.0
    callback_twice: float = 0.0
    callback_delay_ms: tuple[int, int] = (0, 1_500)
    timeout_before: float = 0.0
    """Share of calls that raise before doing anything."""
    timeout_after: float = 0.0
    """Share of calls that do their work, then raise (the answer is lost)."""

    @staticmethod
    def draw(rng: random.Random) -> ProviderFaults:
        return ProviderFaults(
            slow=rng.uniform(0.2, 0.6), refuse=rng.uniform(0.02, 0.15),
            callback_lost=rng.uniform(0.0, 0.4), callback_twice=rng.uniform(0.0, 0.3),
            timeout_before=rng.uniform(0.0, 0.1), timeout_after=rng.uniform(0.0, 0.1))


@dataclass
class Txn:
    status: str
    """PENDING, HELD, CONFIRMED, CANCELLED, REFUSED, EMPTY_ROLLBACK."""
    account_ref: str
    amount: int
    held_at_ms: int | None = None
    """When the carrier held it (the world's clock), for the oracle."""


class SimulatedProvider:
    """A ``ProviderTransport``: the carrier's side of the network calls, and its books."""

    def __init__(self, name: str, world: Any, rng: random.Random, faults: ProviderFaults,
                 secret: str, engine: Callable[[], Any],
                 counts: dict[str, int] | None = None) -> None:
        self.name = name
        self.world = world
        self.rng = rng
        self.faults = faults
        self.secret = secret.encode()
        self.engine = engine
        self.counts: dict[str, int] = counts if counts is not None else {}
        self.quiet = False
        """No new faults (the simulator's quiet phase): everything answers at once."""
        self.accounts: dict[str, list[int]] = {}
        """ref -> [funded, available, held, spent]."""
        self.txns: dict[str, Txn] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ books

    def fund(self, ref: str, amount: int) -> None:
        with self._lock:
            account = self.accounts.setdefault(ref, [0, 0, 0, 0])
            account[0] += amount
            account[1] += amount

    def status(self, fence: FenceKey) -> str | None:
        with self._lock:
            txn = self.txns.get(txn_id_of(fence))
            return None if txn is None else txn.status

    def held_at(self, fence: FenceKey) -> int | None:
        """When the carrier held the transaction, if it ever did."""
        with self._lock:
            txn = self.txns.get(txn_id_of(fence))
            return None if txn is None else txn.held_at_ms

    def unbalanced(self) -> list[str]:
        """Accounts whose books do not add up (funded == available + held + spent, each
        non-negative, held the sum of HELD transactions)."""
        with self._lock:
            held: dict[str, int] = {}
            for txn in self.txns.values():
                if txn.status == "HELD":
                    held[txn.account_ref] = held.get(txn.account_ref, 0) + txn.amount
            return [f"{ref}: {acc}" for ref, acc in sorted(self.accounts.items())
                    if acc[0] != acc[1] + acc[2] + acc[3] or min(acc) < 0
                    or acc[2] != held.get(ref, 0)]

    # ------------------------------------------------------------------ calls

    def try_hold(self, txn_id: str, account_ref: str, amount: int, unit: str
                 ) -> ProviderReply:
        self._maybe_timeout("before")
        with self._lock:
            txn = self.txns.get(txn_id)
            if txn is None:
                if not self.quiet and self._chance(self.faults.slow, "provider_slow_try"):
                    txn = self.txns[txn_id] = Txn("PENDING", account_ref, amount)
                    delay = self.rng.randint(*self.faults.decide_ms)
                    self.world.call_at(self.world.now_ms() + delay,
                                       lambda: self._decide_later(txn_id))
                else:
                    txn = self.txns[txn_id] = Txn("PENDING", account_ref, amount)
                    self._decide(txn)
            code = txn.status
        self._maybe_timeout("after")
        return ProviderReply("OK", code)

    def confirm(self, txn_id: str) -> ProviderReply:
        self._maybe_timeout("before")
        with self._lock:
            txn = self.txns.get(txn_id)
            if txn is None:
                code = "REFUSED"
            elif txn.status == "HELD":
                account = self.accounts[txn.account_ref]
                account[2] -= txn.amount
                account[3] += txn.amount
                txn.status = code = "CONFIRMED"
            elif txn.status in ("PENDING", "CONFIRMED"):
                code = txn.status
            else:
                code = "REFUSED"
        self._maybe_timeout("after")
        return ProviderReply("OK", code)

    def cancel(self, txn_id: str) -> ProviderReply:
        self._maybe_timeout("before")
        with self._lock:
            txn = self.txns.get(txn_id)
            if txn is None:
                self.counts["provider_empty_rollback"] = (
                    self.counts.get("provider_empty_rollback", 0) + 1)
                self.txns[txn_id] = Txn("EMPTY_ROLLBACK", "", 0)
                code = "EMPTY_ROLLBACK"
            elif txn.status == "HELD":
                account = self.accounts[txn.account_ref]
                account[2] -= txn.amount
                account[1] += txn.amount
                txn.status = code = "CANCELLED"
            elif txn.status == "PENDING":
                txn.status = code = "CANCELLED"  # decided now: nothing was held
            else:
                code = txn.status
        self._maybe_timeout("after")
        return ProviderReply("OK", code)

    def query(self, txn_id: str) -> ProviderReply:
        self._maybe_timeout("before")
        with self._lock:
            txn = self.txns.get(txn_id)
            code = "NOT_FOUND" if txn is None else txn.status
        return ProviderReply("OK", code)

    def verify_callback(self, body: bytes, headers: Mapping[str, str]) -> ProviderCallback:
        if len(body) > CALLBACK_BYTES_MAX:
            raise ValueError("callback too large")
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER, "")):
            raise ValueError("bad signature")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return ProviderCallback(str(data["txn_id"]), ProviderOp(data["op"]),
                                ProviderReply("OK", str(data["code"])))

    # ------------------------------------------------------------------ inside

    def _decide(self, txn: Txn) -> None:
        """Under the lock: a PENDING Try held or refused."""
        account = self.accounts.get(txn.account_ref)
        refused = account is None or account[1] < txn.amount or (
            not self.quiet and self._chance(self.faults.refuse, "provider_refused"))
        if refused or account is None:
            txn.status = "REFUSED"
            return
        account[1] -= txn.amount
        account[2] += txn.amount
        txn.status = "HELD"
        txn.held_at_ms = self.world.now_ms()

    def _decide_later(self, txn_id: str) -> None:
        with self._lock:
            txn = self.txns[txn_id]
            if txn.status != "PENDING":
                return  # cancelled meanwhile
            self._decide(txn)
            code = txn.status
        self._send_callback(txn_id, code)

    def _send_callback(self, txn_id: str, code: str) -> None:
        with self._lock:
            self._send_callback_locked(txn_id, code)

    def signed_callback(self, txn_id: str, op: str, code: str
                        ) -> tuple[bytes, dict[str, str]]:
        """A callback as the carrier sends it: a JSON body and its HMAC-SHA256 header."""
        body = json.dumps({"txn_id": txn_id, "op": op, "code": code}).encode()
        return body, {SIGNATURE_HEADER: hmac.new(self.secret, body, hashlib.sha256).hexdigest()}

    def _send_callback_locked(self, txn_id: str, code: str) -> None:
        f = self.faults
        body, headers = self.signed_callback(txn_id, "try", code)
        if not self.quiet and self._chance(f.callback_lost, "provider_callback_lost"):
            return
        times = 2 if not self.quiet and self._chance(f.callback_twice,
                                                     "provider_callback_twice") else 1
        for _ in range(times):
            delay = self.rng.randint(*f.callback_delay_ms)
            self.world.call_at(self.world.now_ms() + delay,
                               lambda: self._deliver(body, headers))

    def _deliver(self, body: bytes, headers: dict[str, str]) -> None:
        engine = self.engine()
        if engine is None:
            self.counts["provider_callback_engine_down"] = (
                self.counts.get("provider_callback_engine_down", 0) + 1)
            return
        with contextlib.suppress(PaymentError):  # closed meanwhile: the queries still ask
            engine.handle_provider_callback(self.name, body, headers)
            self.counts["provider_callbacks"] = self.counts.get("provider_callbacks", 0) + 1

    def _maybe_timeout(self, when: str) -> None:
        if self.quiet:
            return
        chance = self.faults.timeout_before if when == "before" else self.faults.timeout_after
        with self._lock:
            hit = self._chance(chance, f"provider_timeout_{when}")
        if hit:
            raise TimeoutError(f"carrier timed out {when} the work")

    def _chance(self, probability: float, kind: str) -> bool:
        hit = probability > 0 and self.rng.random() < probability
        if hit:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit


def sim_providers(transport: SimulatedProvider) -> list[ConfiguredProvider]:
    """The simulated carrier bound to its configuration (``SIM_PROVIDERS_TOML``)."""
    return load_providers(SIM_PROVIDERS_TOML, {transport.name: transport})


PROVIDER_SHARE = 0.3
"""Share of orders that pay part with phone credit at the simulated carrier."""
CARRIER = "carrier-x"


OWN_BUG = "async-leg-ignored"


class ProviderWorkload:
    """The carrier in a simulator run: its accounts, the orders' phone-credit parts and the
    oracle's comparison of the orders with the carrier's own books. Draws from its own
    stream (``seed + 29``), so a seed's other draws are what they were.

    It is in every run without a planted bug, and in a run planting its own bug
    (``async-leg-ignored``, with every fault of the carrier at work); a run planting another
    bug leaves its orders without phone credit (the stream is drawn all the same), so that
    run is the one in which that bug was shown caught: the carrier's calls would move every
    other event of the seed (I/O latencies, interleavings) and hide a bug whose situation
    arises only in some seeds."""

    def __init__(self, rng: random.Random, world: Any, engine: Callable[[], Any],
                 counts: dict[str, int], *, planted: str | None) -> None:
        self.rng = rng
        self.active = planted in (None, OWN_BUG)
        faults = ProviderFaults.draw(rng)
        if planted == OWN_BUG:  # every fault at work, so the bug shows in a default run
            faults = ProviderFaults(slow=0.6, refuse=0.3, callback_lost=0.2,
                                    callback_twice=0.2, timeout_before=0.05,
                                    timeout_after=0.05)
        self.carrier = SimulatedProvider(CARRIER, world, random.Random(rng.getrandbits(64)),
                                         faults, f"carrier-secret-{rng.getrandbits(32)}",
                                         engine, counts)
        self.providers = sim_providers(self.carrier)

    def setup(self, customers: list[str]) -> None:
        for c in customers:
            self.carrier.fund(c, self.rng.choice([150, 400, 2_000]))

    def part(self, customer: str) -> VoucherPart | None:
        """Maybe a phone-credit part for the next order of ``customer``."""
        if self.rng.random() >= PROVIDER_SHARE:
            return None
        amount = self.rng.choice([50, 100, 200])
        if not self.active:
            return None
        return VoucherPart(f"{CARRIER}{PROVIDER_SEPARATOR}{customer}",
                           amount, LegMode.PRE_DEDUCT)

    def quiet(self) -> None:
        self.carrier.quiet = True

    def check(self, orders: list[PaymentOrder], store: Store) -> list[Violation]:
        """Every settled order against the carrier's books: the cash asked for only once the
        carrier held the phone credit, a succeeded order's phone credit confirmed there, no
        other order's still held, pending or confirmed; and the carrier's accounts add up."""
        violations = [Violation("provider-books-balance", f"carrier {CARRIER}", line)
                      for line in self.carrier.unbalanced()[:5]]
        prefix = f"{CARRIER}{PROVIDER_SEPARATOR}"
        for order in orders:
            for leg in order.legs:
                if leg.account_id is None or not leg.account_id.startswith(prefix):
                    continue
                if not order.is_settled:
                    continue  # reported as not converged
                status = self.carrier.status(order.fence_of(leg))
                subject = f"order {order.order_id}"
                if order.state is OrderState.SUCCEEDED and status != "CONFIRMED":
                    violations.append(Violation(
                        "async-leg-succeeded-at-provider", subject,
                        f"succeeded, leg {leg.leg_no} ({leg.status.value}) is {status} at "
                        f"{CARRIER}"))
                if order.state is not OrderState.SUCCEEDED and status in (
                        "HELD", "PENDING", "CONFIRMED"):
                    violations.append(Violation(
                        "provider-hold-released-for-unpaid-order", subject,
                        f"{order.state.value}, leg {leg.leg_no} ({leg.status.value}) is "
                        f"{status} at {CARRIER}"))
                violations += self._paid_after_held(store, order, leg.leg_no)
                self.carrier.counts[f"provider_leg:{order.state.value}"] = (
                    self.carrier.counts.get(f"provider_leg:{order.state.value}", 0) + 1)
        return violations

    def _paid_after_held(self, store: Store, order: PaymentOrder, leg_no: int
                         ) -> list[Violation]:
        """The order went to ``paying`` (the cash asked for) only after the carrier held
        the leg's amount: before that, one asynchronous leg had not succeeded."""
        paying = next((e.at_ms for e in store.journal("order", order.order_id)
                       if e.part == "order" and e.to_state == OrderState.PAYING.value), None)
        if paying is None:
            return []
        held = self.carrier.held_at(order.fence_of(order.leg(leg_no)))
        if held is not None and held <= paying:
            return []
        return [Violation("cash-asked-after-every-async-leg-held", f"order {order.order_id}",
                          f"paying at {paying}, leg {leg_no} held at the carrier at {held}")]
