"""How voucher commands travel between order actors and the voucher systems.

In production the voucher accounts are actors of this engine and the link is a plain tell.
It is a seam all the same: a voucher system run by another company (points, phone credit)
answers over a network, late, twice or never, and the simulator puts a lossy link here.
The order side copes the same way in both cases: every command is idempotent by its fence
key and re-sent on the order's voucher retry schedule until answered. Commands and replies
name their fence by ``FenceKey`` (scope, owner, leg), never by a string to be parsed.
"""

from __future__ import annotations

from typing import Protocol

from payengine.actors.directory import Directory
from payengine.actors.messages import FromOrder
from payengine.engine.order import VoucherReply


class VoucherLink(Protocol):
    def request(self, account_id: str, command: FromOrder) -> None:
        """Send an order's command to a voucher account; never blocks."""

    def reply(self, order_id: str, reply: VoucherReply) -> None:
        """Send a voucher account's answer back to the order; never blocks."""


class DirectVoucherLink:
    """In-process voucher accounts: a tell each way."""

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def request(self, account_id: str, command: FromOrder) -> None:
        self._directory.tell(("account", account_id), command)

    def reply(self, order_id: str, reply: VoucherReply) -> None:
        self._directory.tell(("order", order_id), reply)
