"""The simulated risk service and the users who answer step-ups (fault ``risk``).

A run with ``risk`` opens the engine with a ``RiskConfig`` drawn from the run's own risk
stream: rules (an amount maximum, a step-up threshold, a blocked pump, velocity per user and
per device) and a hook, ``SimRiskService``, whose verdict for a payment is a function of the
seed and the merchant order number (it runs on the gate's pool thread, so it draws nothing
from a shared stream: the run stays reproducible). It steps up some payments with a code
it "sent", blocks some, and for others times out, fails, or answers something that is not
a verdict, so the configured default (``on_timeout``) is taken.

Every step-up's user (``StepUpUser``) then answers or abandons it: the right code (after a
delay that may outlast the window), wrong codes first, only wrong codes (the order must
fail), or nothing at all (it must expire). Calls the engine did not answer (down, crashed)
are tried again, a few times. What the oracle checks (``oracle.check_step_ups``): no order
whose verification did not pass ever reached the channel's ``pay``, every hold of one is
given back, and an order passed only if its user sent the right code.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter
from collections.abc import Callable

from payengine.actors.engine import Engine
from payengine.actors.risk_gate import RiskConfig, RiskContext
from payengine.engine.errors import (
    ActorBroken,
    EngineClosed,
    IllegalTransition,
    Overloaded,
    PaymentError,
    VerificationFailed,
)
from payengine.engine.order import PaymentRequest
from payengine.engine.risk import RiskOutcome, RiskRules, RiskVerdict

BLOCKED_DEVICE = "pump-12"
"""The pump the rules block (the simulator's devices are pump-1 .. pump-12)."""


def code_for(seed: int, merchant_order_no: str) -> str:
    """The code the risk service (or the code issuer) sends the user of this payment."""
    digest = hashlib.sha256(f"{seed}:{merchant_order_no}".encode()).digest()
    return f"{int.from_bytes(digest[:4], 'big') % 1_000_000:06d}"


def _draw(seed: int, merchant_order_no: str) -> float:
    digest = hashlib.sha256(f"risk:{seed}:{merchant_order_no}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SimRiskService:
    """A risk service whose answer is a pure function of the seed and the order number."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        x = _draw(self.seed, request.merchant_order_no)
        if x < 0.06:
            return RiskVerdict.step_up("sim_new_device", code_for(self.seed,
                                                                  request.merchant_order_no))
        if x < 0.08:
            return RiskVerdict.blocked("sim_fraud_score")
        if x < 0.10:
            raise TimeoutError("the risk service's client timed out")
        if x < 0.11:
            raise ConnectionError("the risk service is down")
        if x < 0.12:
            return "ok"  # type: ignore[return-value]  # not a verdict: the default applies
        return RiskVerdict.passed()


def risk_config(rng: random.Random, seed: int) -> RiskConfig:
    """The engine's risk gate for a run with ``risk``, drawn from the risk stream."""

    def issue(request: PaymentRequest, context: RiskContext) -> str:
        return code_for(seed, request.merchant_order_no)

    rules = RiskRules(
        amount_max={"CNY": rng.choice([29_000, 30_000])},
        step_up_amount={"CNY": rng.choice([20_000, 25_000])},
        blocked_devices=frozenset({BLOCKED_DEVICE}),
        velocity_window_ms=rng.choice([1_000, 2_000]),
        user_orders_max=rng.choice([3, 5]),
        device_orders_max=rng.choice([4, 8]),
        velocity_action=rng.choice([RiskOutcome.BLOCK, RiskOutcome.STEP_UP]),
    )
    # The longest wait: the service answers at once, and a real-time timeout on a loaded
    # machine would make a run depend on the machine, not only on its seed.
    return RiskConfig(rules=rules, hook=SimRiskService(seed), hook_timeout_ms=10_000,
                      on_timeout=rng.choice(list(RiskOutcome)), issue_code=issue,
                      verification_window_ms=rng.choice([1_000, 2_000]),
                      verify_attempts_max=3)


class StepUpUser:
    """The users of a run who are asked for a step-up code, and what they do."""

    FATES = ("right", "wrong_then_right", "only_wrong", "abandoned")

    def __init__(self, rng: random.Random, seed: int, config: RiskConfig, *,
                 at: Callable[[int, Callable[[], None]], None], now_ms: Callable[[], int],
                 engine: Callable[[], Engine | None], counts: Counter[str]) -> None:
        self.rng, self.seed, self.config = rng, seed, config
        self._at, self._now_ms, self._engine, self.counts = at, now_ms, engine, counts
        self.right_code_sent: set[str] = set()
        """Orders whose user sent the right code (whether or not it was answered)."""

    def stepped_up(self, order_id: str, merchant_order_no: str) -> None:
        """A submit answered ``needs_verification``: the user answers or abandons it."""
        rng = self.rng
        fate = rng.choice(self.FATES)
        self.counts[f"step_up_{fate}"] += 1
        if fate == "abandoned":
            return
        right = code_for(self.seed, merchant_order_no)
        wrong = f"{(int(right) + 1) % 1_000_000:06d}"
        attempts = self.config.verify_attempts_max
        codes = {"right": [right], "wrong_then_right": [wrong] * rng.randint(1, attempts - 1)
                 + [right], "only_wrong": [wrong] * attempts}[fate]
        window = self.config.verification_window_ms  # mostly in time, some too late
        when = self._now_ms() + rng.choice([rng.randint(0, window // 2),
                                            rng.randint(0, window + 500)])
        for code in codes:
            self._at(when, functools.partial(self._verify, order_id, code, code == right, 4))
            when += rng.randint(1, 300)

    def _verify(self, order_id: str, code: str, right: bool, tries_left: int) -> None:
        engine = self._engine()
        if engine is None:
            self._again(order_id, code, right, tries_left)
            return
        if right:
            self.right_code_sent.add(order_id)
        try:
            engine.verify(order_id, code)
        except VerificationFailed as error:
            self.counts["verify_wrong" if error.attempts_left else "verify_failed_order"] += 1
        except IllegalTransition:
            self.counts["verify_refused_not_waiting"] += 1
        except (EngineClosed, Overloaded):
            self._again(order_id, code, right, tries_left)
        except (PaymentError, ActorBroken) as error:
            self.counts[f"verify_error:{getattr(error, 'code', 'actor_broken')}"] += 1
        else:
            self.counts["verify_passed"] += 1

    def _again(self, order_id: str, code: str, right: bool, tries_left: int) -> None:
        if tries_left > 1:
            self._at(self._now_ms() + self.rng.randint(500, 1_500), functools.partial(
                self._verify, order_id, code, right, tries_left - 1))
