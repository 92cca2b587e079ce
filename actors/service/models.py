"""The JSON bodies the HTTP service takes, as pydantic models, and their engine objects.

The models only check the JSON shape (strict: no ``"100"`` for 100, no ``1.0``, no
``true`` for a number, no unknown field): a body that is not this shape is answered 422
before the engine is called. Everything else (ids, bounds, parts adding up, currencies) is
the engine's own validation, which answers with its typed errors. Pure conversions: they
run on the event loop, before the engine call is handed to a worker thread.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.discounts import Benefits, Coupon, CouponKind, PointsBalance, QuoteUse
from payengine.engine.errors import InvalidRequest
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.order import CashPart, LegMode, PaymentRequest, VoucherPart

LIST_MAX = 64
"""Most items any list in a body may have (the engine bounds them further)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DetailsIn(Strict):
    scenario: Literal["native", "jsapi", "barcode", "app", "h5"] = "native"
    payer_id: str | None = None
    auth_code: str | None = None
    client_ip: str | None = None
    notify_url: str | None = None
    device_id: str | None = None

    def build(self) -> PayDetails:
        return PayDetails(PayScenario(self.scenario), self.payer_id, self.auth_code,
                          self.client_ip, self.notify_url, self.device_id)


class CashIn(Strict):
    amount_minor: int
    channel: str = Field(description="a channel's name, or a payment method of the routing")
    details: DetailsIn | None = None

    def build(self) -> CashPart:
        return CashPart(self.amount_minor, self.channel,
                        None if self.details is None else self.details.build())


class VoucherIn(Strict):
    account_id: str
    amount: int
    mode: Literal["pre_deduct", "pre_held", "post_deduct"] = "pre_deduct"
    hold_id: str | None = None

    def build(self) -> VoucherPart:
        return VoucherPart(self.account_id, self.amount, LegMode(self.mode), self.hold_id)


class FuelLineIn(Strict):
    grade: str
    unit_price_minor: int
    volume_ml: int | None = Field(None, description="give the volume (the pump measured it) "
                                                    "or the amount, or all three figures")
    amount_minor: int | None = None
    gross_minor: int | None = None


class SaleIn(Strict):
    station_id: str
    pump: int
    nozzle: int
    line: FuelLineIn
    terminal_id: str | None = None
    cashier_id: str | None = None
    shift_id: str | None = None

    def build(self) -> FuelSale:
        line = self.line
        built: FuelLine
        if line.gross_minor is not None and line.volume_ml is not None:
            built = FuelLine(line.grade, line.unit_price_minor, line.volume_ml,
                             line.gross_minor)
        elif line.volume_ml is not None and line.amount_minor is None:
            built = FuelLine.by_volume(line.grade, line.unit_price_minor, line.volume_ml)
        elif line.amount_minor is not None and line.volume_ml is None:
            built = FuelLine.by_amount(line.grade, line.unit_price_minor, line.amount_minor)
        else:
            raise InvalidRequest("a fuel line gives volume_ml or amount_minor (or volume_ml "
                                 "and gross_minor)")
        return FuelSale(self.station_id, self.pump, self.nozzle, built, self.terminal_id,
                        self.cashier_id, self.shift_id)


class QuoteUseIn(Strict):
    quote_id: str
    combination_id: str


class PaymentIn(Strict):
    """A ``PaymentRequest``: the same fields, the parts as objects."""

    merchant_id: str
    merchant_order_no: str
    user_id: str
    currency: str
    total_minor: int
    title: str
    cash: CashIn | None = None
    vouchers: list[VoucherIn] = Field(default_factory=list, max_length=LIST_MAX)
    pay_window_ms: int | None = None
    confirm_duplicate: bool = False
    attempt: int = 1
    sale: SaleIn | None = None
    quote: QuoteUseIn | None = None
    authorise: bool = False

    def build(self) -> PaymentRequest:
        return PaymentRequest(
            self.merchant_id, self.merchant_order_no, self.user_id, self.currency,
            self.total_minor, self.title,
            cash=None if self.cash is None else self.cash.build(),
            vouchers=tuple(v.build() for v in self.vouchers),
            pay_window_ms=self.pay_window_ms, confirm_duplicate=self.confirm_duplicate,
            attempt=self.attempt, sale=None if self.sale is None else self.sale.build(),
            quote=None if self.quote is None else QuoteUse(self.quote.quote_id,
                                                           self.quote.combination_id),
            authorise=self.authorise)


class CouponIn(Strict):
    coupon_id: str
    kind: Literal["fixed", "percent"]
    value: int
    threshold_minor: int = 0
    cap_minor: int | None = None
    grades: list[str] = Field(default_factory=list, max_length=LIST_MAX)
    exclusive: bool = False
    expires_at_ms: int | None = None

    def build(self) -> Coupon:
        return Coupon(self.coupon_id, CouponKind(self.kind), self.value, self.threshold_minor,
                      self.cap_minor, frozenset(self.grades), self.exclusive,
                      self.expires_at_ms)


class PointsIn(Strict):
    account_id: str
    balance: int
    minor_per_point: int


class BenefitsIn(Strict):
    level: str | None = None
    coupons: list[CouponIn] = Field(default_factory=list, max_length=LIST_MAX)
    points: PointsIn | None = None

    def build(self) -> Benefits:
        points = None if self.points is None else PointsBalance(
            self.points.account_id, self.points.balance, self.points.minor_per_point)
        return Benefits(self.level, tuple(c.build() for c in self.coupons), points)


class QuoteIn(Strict):
    merchant_id: str
    user_id: str
    sale: SaleIn
    benefits: BenefitsIn | None = None


class RefundIn(Strict):
    refund_no: str
    amount_minor: int
    reason: str = ""


class VerifyIn(Strict):
    code: str


class CaptureIn(Strict):
    amount_minor: int
    capture_id: str


class ResolveIn(Strict):
    item: str
    action: str
    operator: str
    reason: str


class AccountIn(Strict):
    account_id: str
    unit: str
    minor_per_unit: int | None = None


class FundIn(Strict):
    account_id: str
    amount: int
    funding_id: str


class StatusIn(Strict):
    account_id: str
    status: str


class HoldIn(Strict):
    account_id: str
    amount: int
    hold_id: str | None = None
    ttl_ms: int | None = None


class ReleaseIn(Strict):
    account_id: str
    hold_id: str
