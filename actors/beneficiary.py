"""Recharges and transfers: payment orders whose success credits a stored-value account.

A recharge is a payment by cash alone whose beneficiary is the account to top up; a
transfer is a payment by one voucher held on the source account whose beneficiary is the
target. The order machinery (``engine.order``: persist before acting, retries, restart,
journal, ledger) does the work; this module only builds their requests and runs the
checks the caller deserves a typed answer to before anything is created. It runs in the
caller's thread (never an actor's) and only reads the database.

The checks here are advisory where the accounts' actors decide (a balance may change after
the check): a transfer whose source no longer has the balance when its hold is tried fails
with the hold refused and nothing moved; a recharge refund whose account no longer holds
the value when its clawback comes is ``failed`` with nothing moved.
"""

from __future__ import annotations

from payengine.engine.checks import check_id
from payengine.engine.errors import (
    CurrencyMismatch,
    InsufficientBalance,
    InvalidRequest,
    UnknownAccount,
)
from payengine.engine.money import check_amount
from payengine.engine.order import LegMode, PaymentOrder, PaymentRequest, VoucherPart
from payengine.engine.voucher import VoucherAccount
from payengine.persistence.store import Store

TRANSFER_MERCHANT = "payengine:transfer"
"""The merchant id transfers are kept under (their ``merchant_order_no`` is the transfer
id). Reserved: a merchant's own submit under it is ``InvalidRequest``."""
TRANSFER_TITLE = "transfer"


def transfer_request(transfer_id: str, from_account: str, to_account: str, amount: int,
                     source: VoucherAccount) -> PaymentRequest:
    """The payment order of a transfer: ``amount`` held on ``from_account`` (Try), credited
    to ``to_account``, then confirmed on the source. Idempotent by ``transfer_id``."""
    return PaymentRequest(
        TRANSFER_MERCHANT, transfer_id, from_account, source.unit, amount, TRANSFER_TITLE,
        vouchers=(VoucherPart(from_account, amount, LegMode.PRE_DEDUCT),),
        credit_account=to_account, confirm_duplicate=True)


def transfer_source(store: Store, transfer_id: object, from_account: object,
                    to_account: object, amount: object) -> VoucherAccount:
    """The source account of a well-formed transfer: ``InvalidRequest`` (ids, the same
    account twice), ``InvalidAmount`` or ``UnknownAccount`` otherwise."""
    check_id(transfer_id, "transfer_id")
    source_id = check_id(from_account, "from_account")
    target_id = check_id(to_account, "to_account")
    check_amount(amount)
    if source_id == target_id:
        raise InvalidRequest(f"a transfer from {source_id} to itself moves nothing")
    return _account(store, source_id)


def check_transfer(store: Store, source: VoucherAccount, target_id: str, value: int) -> None:
    """Whether a new transfer may be made, before anything is created: ``UnknownAccount``,
    ``AccountFrozen`` / ``AccountClosed`` (either account), ``CurrencyMismatch`` (not two
    money accounts of one currency), ``InsufficientBalance`` (the source's available
    balance now)."""
    source_id = source.account_id
    target = _account(store, target_id)
    source.check_usable()
    target.check_usable()
    for account in (source, target):
        if account.minor_per_unit is not None:
            raise CurrencyMismatch(f"account {account.account_id} is in {account.unit} "
                                   "points: only money accounts transfer")
    if source.unit != target.unit:
        raise CurrencyMismatch(f"account {source_id} is in {source.unit}, {target_id} in "
                               f"{target.unit}")
    if source.available < value:
        raise InsufficientBalance(f"account {source_id} has {source.available} "
                                  f"{source.unit} available, {value} asked")


def check_recharge_target(store: Store, account_id: object) -> None:
    """A recharge's account, if it exists (the submit says ``UnknownAccount``), must take
    credits now (``AccountFrozen``, ``AccountClosed``). Advisory: frozen after this, the
    credit is refused when the cash is paid, and the cash is refunded."""
    if isinstance(account_id, str) and (account := store.load_account(account_id)):
        account.check_usable()


def check_recharge_refund(store: Store, order: PaymentOrder, refund_no: str,
                          amount: int) -> None:
    """A new refund of a recharge takes its value back from the account first: refused
    (``InsufficientBalance``, nothing moves) when the account has less available now."""
    credit = next((leg for leg in order.legs if leg.mode is LegMode.CREDIT), None)
    if credit is None or order.cash_leg is None or order.refund(refund_no=refund_no):
        return  # not a recharge (a transfer's refund is refused by its order), or a retry
    assert credit.account_id is not None
    account = _account(store, credit.account_id)
    account.check_usable()
    if account.available < amount:
        raise InsufficientBalance(
            f"recharge {order.order_id} credited {credit.account_id}, which has "
            f"{account.available} {account.unit} available now: {amount} cannot be taken "
            "back to refund")


def _account(store: Store, account_id: str) -> VoucherAccount:
    account = store.load_account(account_id)
    if account is None:
        raise UnknownAccount(f"no voucher account {account_id}")
    return account
