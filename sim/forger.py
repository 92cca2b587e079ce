"""The hostile outside: forged, replayed, tampered and misrouted notifications.

Fault ``forged-notification``. A payment engine's callback URL is public, so anyone can post
to it; an integrator's router can send a notification to the wrong channel's handler; a
wallet's own notifications are replayed. None of it may move money. The forger sends, at
random moments of an order's life:

- ``unsigned-success`` / ``unsigned-failure``: a parsed reply through ``handle_callback``
  (no signature: the engine may only ask the channel), with a made-up transaction id;
- ``unsigned-second-charge``: a success under another transaction id for a paid order;
- ``tampered``: a notification the wallet really signed, its amount or serial changed;
- ``wrong-channel``: a success correctly signed by *another* channel's key, for this
  order's serial (a misrouted or cross-channel notification);
- ``replayed``: a notification the wallet really sent, sent again (a harmless duplicate);
- ``unsigned-refund``: a refund's SUCCESS for one fen, or REFUNDCLOSE, for a refund the
  merchant asked for.

Every one of them is either refused (``NotificationRejected``, counted) or only makes the
engine ask the channel, whose answer is the truth; the oracle's cash and refund checks see
any order paid, or refund settled, on a forger's word.

The signed forgeries (``tampered``, ``wrong-channel``) arrive as at the HTTP service's
notification URL: through its answer (``actors.service.notify.answer_notification``), which
must never acknowledge one (``acknowledged`` lists those it did: a violation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Protocol

from payengine.actors.channel import ChannelNotification, ChannelReply, NotificationKind
from payengine.actors.service.notify import answer_notification, format_for_wallet
from payengine.engine.errors import PaymentError
from payengine.sim.channel import SimulatedChannel

ATTACKS = ("unsigned-success", "unsigned-failure", "unsigned-second-charge", "tampered",
           "wrong-channel", "replayed", "unsigned-refund")


class Target(Protocol):
    """What the forger posts to: an ``Engine`` has these methods."""

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str: ...

    def handle_callback(self, channel: str, payment_serial: str, reply: ChannelReply, *,
                        wait: bool = True) -> str: ...

    def handle_refund_callback(self, channel: str, payment_serial: str, refund_id: str,
                               reply: ChannelReply, *, wait: bool = True) -> str: ...


class Forger:
    """Sends one attack at a time at an order's serial; counts what it sent and what was
    refused. Deterministic given its ``rng``."""

    def __init__(self, rng: random.Random, channels: Mapping[str, SimulatedChannel],
                 counts: dict[str, int], planted_bugs: frozenset[str] = frozenset()) -> None:
        assert len(channels) >= 2, "a misrouted notification needs a second channel"
        self.rng = rng
        self.channels = dict(channels)
        self.counts = counts
        self.planted_bugs = planted_bugs
        self._forged = 0
        self.acknowledged: list[str] = []
        """Signed forgeries the service's answer acknowledged (``attack serial``): none."""

    def strike(self, target: Target, channel: str, serial: str, amount_minor: int,
               refund_ids: list[str]) -> None:
        """Send one attack at the order paying ``amount_minor`` through ``channel``."""
        attack = self.rng.choice(ATTACKS)
        self._forged += 1
        txn = f"FORGED{self._forged:06d}"
        self._count(f"forged:{attack}")
        try:
            self._send(target, attack, channel, serial, amount_minor, refund_ids, txn)
        except PaymentError as error:
            self._count(f"forged_refused:{error.code}")

    def _send(self, target: Target, attack: str, channel: str, serial: str,
              amount_minor: int, refund_ids: list[str], txn: str) -> None:
        wallet = self.channels[channel]
        success = ChannelReply("SUCCESS", "SUCCESS", txn, self.rng.choice([amount_minor, None]))
        match attack:
            case "unsigned-success" | "unsigned-second-charge":
                target.handle_callback(channel, serial, success, wait=False)
            case "unsigned-failure":
                target.handle_callback(channel, serial, ChannelReply("SUCCESS", "PAYERROR"),
                                       wait=False)
            case "tampered":
                body, headers = wallet.notifications.sign(ChannelNotification(
                    NotificationKind.PAYMENT, serial, success))
                data = json.loads(body)
                data["amount_minor"] = amount_minor + self.rng.randint(1, 100)
                self._post(target, attack, channel, serial, json.dumps(data).encode(),
                           headers)
            case "wrong-channel":
                other = self.rng.choice(sorted(set(self.channels) - {channel}))
                body, headers = self.channels[other].notifications.sign(ChannelNotification(
                    NotificationKind.PAYMENT, serial, success))
                self._post(target, attack, other, serial, body, headers)
            case "replayed":
                sent = wallet.sent_notifications
                if sent:
                    body, headers = sent[self.rng.randrange(len(sent))]
                    target.handle_notification(channel, body, dict(headers), wait=False)
            case "unsigned-refund":
                if refund_ids:
                    reply = self.rng.choice([ChannelReply("SUCCESS", "SUCCESS", None, 1),
                                             ChannelReply("SUCCESS", "REFUNDCLOSE")])
                    target.handle_refund_callback(channel, serial,
                                                  self.rng.choice(refund_ids), reply,
                                                  wait=False)

    def _post(self, target: Target, attack: str, channel: str, serial: str, body: bytes,
              headers: Mapping[str, str]) -> None:
        """A signed forgery posted to the service's notification URL of ``channel``."""
        answer = answer_notification(target, channel, body, headers,
                                     format_for_wallet(self.channels[channel].name), wait=False,
                                     planted_bugs=self.planted_bugs)
        if answer.acknowledged and answer.code:  # refused by the engine, yet acknowledged
            self.acknowledged.append(f"{attack} {serial}")
        if answer.code:
            self._count(f"forged_refused:{answer.code}")

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
