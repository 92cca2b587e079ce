"""What ``Engine`` checks about external voucher providers, before anything is stored.

At ``Engine.open``: the providers given (well-formed, distinct names, bounded) and that every
provider unsettled orders still use is among them (``ProvidersMissing`` otherwise). At
submit: a provider account's unit comes from its provider, and such a part is a
Try/Confirm/Cancel hold (``PRE_DEDUCT``) and never a beneficiary. (A refund that would reach
a provider leg is refused by the order itself: ``engine.order``.) All on the caller's
thread; each refusal is typed and leaves everything as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from payengine.actors.provider import (
    PROVIDERS_MAX,
    ProviderRecorder,
    ProviderSlot,
    VoucherProvider,
    check_provider,
)
from payengine.engine.errors import InvalidRequest, ProvidersMissing
from payengine.engine.order import (
    AccountUnit,
    LegMode,
    OrderPolicy,
    PaymentRequest,
)
from payengine.engine.provider import provider_of
from payengine.persistence.store import Store


def provider_slots(providers: Iterable[Any], policy: OrderPolicy) -> dict[str, ProviderSlot]:
    """Each provider checked, by name, with a fresh recorder (``InvalidRequest`` for a bad
    one, two of one name, or one whose query schedule outlasts the order's voucher retry
    schedule: an order waits for a Try only that long, so later queries would be for
    nothing)."""
    slots: dict[str, ProviderSlot] = {}
    retry_total = sum(policy.voucher_retry_schedule_ms)
    for provider in providers:
        checked = check_provider(provider)
        if sum(checked.query_schedule_ms) > retry_total:
            raise InvalidRequest(
                f"provider {checked.name}: its query schedule ({sum(checked.query_schedule_ms)}"
                f" ms in all) must fit in the voucher retry schedule ({retry_total} ms), "
                "for which an order waits for a Try")
        if checked.name in slots:
            raise InvalidRequest(f"two voucher providers are named {checked.name!r}")
        slots[checked.name] = ProviderSlot(checked, ProviderRecorder(checked.name,
                                                                     checked.recording_keep))
        if len(slots) > PROVIDERS_MAX:
            raise InvalidRequest(f"at most {PROVIDERS_MAX} voucher providers")
    return slots


def check_providers_of_unsettled(store: Store, providers: Mapping[str, object]) -> None:
    """Refuse (``ProvidersMissing``, the store closed, nothing started) an open without a
    provider that unsettled orders still owe a Try, Confirm or Cancel to."""
    missing = {name: n for name, n in sorted(store.unsettled_orders_by_provider().items())
               if name not in providers}
    if missing:
        store.close()
        named = ", ".join(f"{name!r} ({n} unsettled orders)" for name, n in missing.items())
        raise ProvidersMissing(f"unsettled orders use voucher providers this engine was "
                               f"not given: {named}; open it with them", missing)


def provider_units(request: PaymentRequest, slots: Mapping[str, ProviderSlot]
                   ) -> dict[str, AccountUnit]:
    """The unit of each provider account ``request`` names, from its provider; refuses
    (``InvalidRequest``) a provider part that is not a plain hold, or a provider account
    as the beneficiary of a recharge or transfer."""
    units: dict[str, AccountUnit] = {}
    for part in request.vouchers:
        name = provider_of(part.account_id, slots)
        if name is None:
            continue
        if part.mode is not LegMode.PRE_DEDUCT:
            raise InvalidRequest(f"voucher part {part.account_id}: a provider account is "
                                 f"held and confirmed (pre_deduct), not {part.mode.value}")
        provider: VoucherProvider = slots[name].provider
        units[part.account_id] = AccountUnit(provider.unit, provider.minor_per_unit)
    if request.credit_account is not None and provider_of(request.credit_account, slots):
        raise InvalidRequest(f"credit_account {request.credit_account}: a provider account "
                             "cannot be credited")
    return units
