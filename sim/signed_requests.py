"""Signed merchant requests in the simulated world: the merchant's own server, and a forger.

Fault ``forged-request``. The merchant ``station-1`` sends a share of the workload's
payments as signed requests (``Engine.submit_signed``; a duplicate or a retry is signed
anew, as a client must); later it queries them and refunds some (``query_signed``,
``refund_signed``). Meanwhile the outside attacks, in episodes spread over the workload,
every kind in turn (so that a run with a few episodes sees each):

- ``forged-key``: a pay for a new order signed with a key that is not the merchant's;
- ``tampered-body``: a pay the merchant signed, its amount changed on the way;
- ``flipped-signature``: a pay the merchant signed, one hex digit of the signature changed;
- ``replayed``: a request the engine took, sent again byte for byte (maybe after a crash,
  maybe after its timestamp left the window);
- ``stale``: a pay the merchant really signed, long ago (outside the window);
- ``frozen-user`` / ``frozen-merchant``: a real signature, for a user or from a merchant
  that is frozen or closed;
- ``unknown-merchant``: a merchant with no key;
- ``cached-url``: the merchant's pay for an order whose pay window is over, signed anew
  (a cashier URL cached and opened again);
- ``forged-refund``: a refund of a real order signed with a key that is not the merchant's.

Each must be refused (``RequestRejected``, for its reason) and leave nothing: checked at
once, and at the end no order exists for a forged pay and no refund for a forged refund,
while every genuine pay that was answered has its order (``check``; a genuine pay refused
for anything but a pay window that is over, which a retry after a crash may meet, is a
violation at once: ``Simulation._submit``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from payengine.actors.merchant_auth import MerchantSigner
from payengine.actors.messages import Receipt
from payengine.engine.errors import EngineClosed, Overloaded, PaymentError, RequestRejected
from payengine.engine.merchant_request import SIGNATURE_HEADER, encode_pay
from payengine.engine.order import CashPart, PaymentRequest
from payengine.sim.oracle import Violation

if TYPE_CHECKING:
    from payengine.actors.engine import Engine

MERCHANT = "station-1"
FROZEN_MERCHANT = "station-9"
REQUEST_SECRET = "station-1-request-signing-key-0123456789"
"""Not the notification secret: the merchant signs its requests with a key of its own."""
FORGED_REFUND_PREFIX = "forged-"

ATTACKS: dict[str, frozenset[str]] = {
    "forged-key": frozenset({"bad_signature"}),
    "tampered-body": frozenset({"bad_signature"}),
    "flipped-signature": frozenset({"bad_signature"}),
    "replayed": frozenset({"replayed_nonce", "stale_timestamp"}),
    "stale": frozenset({"stale_timestamp"}),
    "frozen-user": frozenset({"user_frozen", "user_closed"}),
    "frozen-merchant": frozenset({"merchant_frozen"}),
    "unknown-merchant": frozenset({"unknown_merchant"}),
    "cached-url": frozenset({"pay_window_over"}),
    "forged-refund": frozenset({"bad_signature"}),
}
"""Each attack and the reasons it may be refused for."""


@dataclass
class _Genuine:
    """A payment of the workload that the engine took as a signed request."""

    request: PaymentRequest
    receipt: Receipt | None = None
    order_id: str | None = None


_CALLS = {"pay": "submit_signed", "close": "close_signed", "refund": "refund_signed",
          "query": "query_signed"}


class SignedRequests:
    """The merchant's signed traffic and the forger's; deterministic given ``rng``."""

    def __init__(self, rng: random.Random, rate: float, *, window_ms: int,
                 engine: Callable[[], Engine | None], now_ms: Callable[[], int],
                 at: Callable[[int, Callable[[], None]], None], quiet: Callable[[], bool],
                 counts: dict[str, int], violations: list[Violation], seed: int) -> None:
        self.rng = rng
        self.rate = rate
        self.window_ms = window_ms
        self._engine = engine
        self._now_ms = now_ms
        self._at = at
        self._quiet = quiet
        self.counts = counts
        self.violations = violations
        self.seed = seed
        self.signer = MerchantSigner(MERCHANT, secret=REQUEST_SECRET, clock_ms=now_ms)
        self.frozen_signer = MerchantSigner(FROZEN_MERCHANT, secret=REQUEST_SECRET[::-1],
                                            clock_ms=now_ms)
        self.forger = MerchantSigner(MERCHANT, secret="not-the-merchants-key-0123456789abc",
                                     clock_ms=now_ms)
        self.stranger = MerchantSigner("station-x", secret=REQUEST_SECRET, clock_ms=now_ms)
        self.customers: list[str] = []
        self.genuine: dict[str, _Genuine] = {}
        self._signs: dict[str, bool] = {}
        """Whether each merchant order number of the workload goes signed (drawn once)."""
        self.accepted: list[tuple[str, bytes, dict[str, str]]] = []
        """Requests the engine took (op, body, headers), byte for byte, for the replays."""
        self.forged_orders: set[tuple[str, str]] = set()
        self._attacks = list(ATTACKS)
        rng.shuffle(self._attacks)
        self._turn = 0
        self._n = 0

    def _nonce(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    # ------------------------------------------------------------------ setup and schedule

    def setup(self, engine: Engine, customers: list[str]) -> None:
        engine.register_merchant_key(MERCHANT, secret=REQUEST_SECRET)
        engine.register_merchant_key(FROZEN_MERCHANT, secret=REQUEST_SECRET[::-1])
        engine.set_merchant_status(FROZEN_MERCHANT, "frozen")
        engine.set_user_status("u-frozen", "frozen")
        engine.set_user_status("u-closed", "closed")
        self.customers = customers

    def schedule(self, start_ms: int, span_ms: int, orders: int) -> None:
        """Attack episodes spread over the workload, two attacks each, at least five."""
        for _ in range(max(5, round(self.rate * orders))):
            at_ms = start_ms + self.rng.randint(0, span_ms)
            for _ in range(2):
                attack = self._attacks[self._turn % len(self._attacks)]  # every kind in turn
                self._turn += 1
                self._at(at_ms + self.rng.randint(0, 3_000),
                         functools.partial(self._attack, attack))

    # ------------------------------------------------------------------ the merchant

    def takes(self, request: PaymentRequest) -> bool:
        """Whether this payment of the workload goes as a signed request (decided once per
        order number, so its duplicates and retries go the same way)."""
        no = request.merchant_order_no
        if no not in self._signs:
            self._signs[no] = request.merchant_id == MERCHANT and self.rng.random() < self.rate
        return self._signs[no]

    def submit(self, engine: Engine, request: PaymentRequest) -> Receipt:
        """Sign ``request`` afresh and submit it; raises what ``submit_signed`` raises."""
        body, headers = self.signer.pay(request, nonce=self._nonce())
        receipt = engine.submit_signed(body, headers)
        self._count("signed_pay")
        self.accepted.append(("pay", body, headers))
        no = request.merchant_order_no
        genuine = self.genuine.get(no)
        if genuine is None:
            self.genuine[no] = genuine = _Genuine(request)
            later = self._now_ms() + self.rng.randint(500, 8_000)
            self._at(later, functools.partial(self._query, no))
            if self.rng.random() < 0.3:
                amount = self.rng.randint(1, request.total_minor)
                self._at(later + self.rng.randint(0, 2_000),
                         functools.partial(self._refund, no, amount))
        genuine.receipt, genuine.order_id = receipt, receipt.order_id
        return receipt

    def _query(self, no: str) -> None:
        engine, genuine = self._engine(), self.genuine[no]
        if engine is None:
            return
        body, headers = self.signer.query(no, nonce=self._nonce())
        try:
            view = engine.query_signed(body, headers)
        except (Overloaded, EngineClosed):
            return
        except PaymentError as error:
            self.violations.append(Violation("signed-query-answers", f"merchant order {no}",
                                             f"refused {error.code}: {error.message}"))
            return
        self._count("signed_query")
        if view.order_id != genuine.order_id:
            self.violations.append(Violation("signed-query-answers", f"merchant order {no}",
                                             f"{view.order_id} != {genuine.order_id}"))
        self.accepted.append(("query", body, headers))

    def _refund(self, no: str, amount: int) -> None:
        engine = self._engine()
        if engine is None or self._quiet() or self.genuine[no].order_id is None:
            return
        body, headers = self.signer.refund(no, "sr-1", amount, nonce=self._nonce())
        try:
            engine.refund_signed(body, headers)
            self._count("signed_refund")
        except RequestRejected as error:
            self.violations.append(Violation("genuine-request-taken", f"merchant order {no}",
                                             f"refund refused {error.reason}: {error.message}"))
            return
        except PaymentError as error:  # not paid (yet), more than left: the refund's answer
            self._count(f"signed_refund_refused:{error.code}")
            return
        self.accepted.append(("refund", body, headers))

    # ------------------------------------------------------------------ the forger

    def _forged_pay(self, merchant: str = MERCHANT, user: str | None = None) -> PaymentRequest:
        self._n += 1
        no = f"fr{self.seed}-{self._n:05d}"
        self.forged_orders.add((merchant, no))
        total = self.rng.randint(1, 500) * 100
        return PaymentRequest(merchant, no, user or self.rng.choice(self.customers), "CNY",
                              total, "Fuel", CashPart(total, "wechat"), confirm_duplicate=True)

    def _attack(self, attack: str, no: str | None = None) -> None:
        engine = self._engine()
        if engine is None:  # also in the quiet phase: a refused request changes nothing
            return
        if no is None and self.genuine:  # the attacks on a real order pick one
            no = self.rng.choice(sorted(self.genuine))
        sent = self._forge(attack, no)
        if sent is None:
            return
        call, body, headers = sent
        self._count(f"forged_request:{attack}")
        try:
            call(engine)(body, headers)
        except RequestRejected as error:
            self._count(f"forged_request_refused:{error.reason}")
            if error.reason not in ATTACKS[attack]:
                self.violations.append(Violation(
                    "forged-request-refused", f"attack {attack}",
                    f"refused for {error.reason}, expected one of {sorted(ATTACKS[attack])}"))
            return
        except (Overloaded, EngineClosed):
            return
        except PaymentError as error:
            self.violations.append(Violation("forged-request-refused", f"attack {attack}",
                                             f"refused {error.code}, not as a request: "
                                             f"{error.message}"))
            return
        self.violations.append(Violation("forged-request-refused", f"attack {attack}",
                                         f"taken: {body[:200]!r}"))

    def _forge(self, attack: str, no: str | None
               ) -> tuple[Callable[[Engine], Callable[..., object]], bytes,
                          dict[str, str]] | None:
        pay = lambda engine: engine.submit_signed  # noqa: E731
        now = self._now_ms()
        genuine = None if no is None else self.genuine[no]
        match attack:
            case "forged-key":
                body, headers = self.forger.pay(self._forged_pay(), nonce=self._nonce())
            case "tampered-body":
                request = self._forged_pay()
                _, headers = self.signer.pay(request, nonce=self._nonce())
                total = request.total_minor + self.rng.randint(1, 100)
                body = encode_pay(replace(request, total_minor=total,
                                          cash=CashPart(total, "wechat")))
            case "flipped-signature":
                body, headers = self.signer.pay(self._forged_pay(), nonce=self._nonce())
                signature = headers[SIGNATURE_HEADER]
                at = self.rng.randrange(len(signature))
                digit = self.rng.choice([d for d in "0123456789abcdef" if d != signature[at]])
                headers = {**headers, SIGNATURE_HEADER: signature[:at] + digit
                           + signature[at + 1:]}
            case "replayed":
                if not self.accepted:
                    return None
                op, body, headers = self.accepted[self.rng.randrange(len(self.accepted))]
                return (lambda engine: getattr(engine, _CALLS[op])), body, dict(headers)
            case "stale":
                stamp = now - self.window_ms - self.rng.randint(1, 3_000)
                body, headers = self.signer.pay(self._forged_pay(), timestamp_ms=stamp,
                                                nonce=self._nonce())
            case "frozen-user":
                user = self.rng.choice(["u-frozen", "u-closed"])
                body, headers = self.signer.pay(self._forged_pay(user=user), nonce=self._nonce())
            case "frozen-merchant":
                body, headers = self.frozen_signer.pay(self._forged_pay(FROZEN_MERCHANT),
                                                       nonce=self._nonce())
            case "unknown-merchant":
                body, headers = self.stranger.pay(self._forged_pay("station-x"),
                                                  nonce=self._nonce())
            case "cached-url":
                receipt = None if genuine is None else genuine.receipt
                if genuine is None or receipt is None:
                    return None
                if now <= receipt.close_at_ms:  # not over yet: come back when it is
                    self._at(receipt.close_at_ms + self.rng.randint(1, 3_000),
                             functools.partial(self._attack, attack, no))
                    return None
                body, headers = self.signer.pay(genuine.request, nonce=self._nonce())
            case "forged-refund":
                if genuine is None or no is None:
                    return None
                self._n += 1
                body, headers = self.forger.refund(no, f"{FORGED_REFUND_PREFIX}{self._n}",
                                                   self.rng.randint(1, 100),
                                                   nonce=self._nonce())
                return (lambda engine: engine.refund_signed), body, headers
            case _:
                raise AssertionError(attack)
        return pay, body, headers

    # ------------------------------------------------------------------ the oracle

    def check(self, engine: Engine) -> list[Violation]:
        """Every genuine pay taken, under its receipt; nothing of any forged request."""
        violations: list[Violation] = []
        for no, genuine in sorted(self.genuine.items()):
            try:
                found = engine.find_order(MERCHANT, no)
            except PaymentError:
                violations.append(Violation("genuine-request-taken", f"merchant order {no}",
                                            "no order for a genuine signed pay"))
                continue
            if genuine.order_id is not None and found.order_id != genuine.order_id:
                violations.append(Violation("genuine-request-taken", f"merchant order {no}",
                                            f"receipt {genuine.order_id}, database "
                                            f"{found.order_id}"))
            for refund in found.refunds:
                if refund.refund_no.startswith(FORGED_REFUND_PREFIX):
                    violations.append(Violation(
                        "forged-request-refused", f"order {found.order_id}",
                        f"refund {refund.refund_no} of {refund.amount_minor} from a forged "
                        "request"))
        for merchant, no in sorted(self.forged_orders):
            try:
                found = engine.find_order(merchant, no)
            except PaymentError:
                continue
            violations.append(Violation("forged-request-refused", f"order {found.order_id}",
                                        f"{merchant}/{no} was created by a forged, replayed "
                                        "or refused request"))
        return violations
