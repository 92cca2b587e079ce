"""A scripted WeChat-Pay-v2-like wallet on loopback, for the HTTP adapter's tests.

JSON instead of XML, otherwise v2's shape: every request carries ``mch_id`` and ``sign``
(MD5 or HMAC-SHA256 of the sorted pairs and ``&key=KEY``, upper-case hex), which the wallet
checks against the merchant's key; every reply is signed the same way. A test drives the
payer (``user_pays``), makes a merchant number hang (``delay_s``), and takes the signed
notification the wallet would POST (``notification``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def pairs_sign(fields: dict[str, Any], key: str, method: str = "md5") -> str:
    """WeChat Pay v2's signature, written out independently of the adapter's."""
    text = "&".join(f"{k}={fields[k]}" for k in sorted(fields)
                    if k != "sign" and fields[k] not in ("", None))
    text += f"&key={key}"
    if method == "md5":
        return hashlib.md5(text.encode()).hexdigest().upper()
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest().upper()


@dataclass
class Trade:
    serial: str
    amount: int
    mch_id: str
    state: str = "NOTPAY"
    txn_id: str = ""
    refunds: dict[str, list[Any]] = field(default_factory=dict)


class ScriptedWallet:
    """The wallet's state and script; ``serve()`` runs it on a loopback port."""

    def __init__(self, keys: dict[str, str], method: str = "md5") -> None:
        self.keys = keys
        self.method = method
        self.trades: dict[str, Trade] = {}
        self.delay_s: dict[str, float] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.bad_signatures = 0
        self.sign_replies = True
        self.lock = threading.Lock()
        self._txn = 0

    # ---------------------------------------------------------------- the script

    def user_pays(self, serial: str) -> None:
        with self.lock:
            trade = self.trades[serial]
            trade.state = "SUCCESS"
            self._txn += 1
            trade.txn_id = f"4200{self._txn:010d}"

    def notification(self, serial: str, refund_id: str | None = None
                     ) -> tuple[bytes, dict[str, str]]:
        """The signed notification the wallet POSTs to the merchant."""
        with self.lock:
            trade = self.trades[serial]
            fields: dict[str, Any] = {"return_code": "SUCCESS", "mch_id": trade.mch_id,
                                      "out_trade_no": serial, "nonce_str": "n0tify"}
            if refund_id is None:
                fields.update(result_code=trade.state, transaction_id=trade.txn_id,
                              total_fee=trade.amount)
            else:
                state, amount = trade.refunds[refund_id]
                fields.update(out_refund_no=refund_id, refund_status=state, refund_fee=amount)
            fields["sign"] = pairs_sign(fields, self.keys[trade.mch_id], self.method)
        return json.dumps(fields).encode(), {"Content-Type": "application/json"}

    def refund_done(self, serial: str, refund_id: str) -> None:
        with self.lock:
            self.trades[serial].refunds[refund_id][0] = "SUCCESS"

    # ---------------------------------------------------------------- the API

    def handle(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        mch = str(request.get("mch_id"))
        key = self.keys.get(mch)
        with self.lock:
            self.requests.append((path, request))
        if key is None or request.get("sign") != pairs_sign(request, key, self.method):
            with self.lock:
                self.bad_signatures += 1
            return {"return_code": "FAIL", "return_msg": "SIGNERROR"}
        delay = self.delay_s.get(mch, 0)
        if delay:
            time.sleep(delay)
        with self.lock:
            reply = self._answer(path, mch, request)
        reply.setdefault("return_code", "SUCCESS")
        reply["nonce_str"] = "r3ply"
        if self.sign_replies:
            reply["sign"] = pairs_sign(reply, key, self.method)
        return reply

    def _answer(self, path: str, mch: str, r: dict[str, Any]) -> dict[str, Any]:
        serial = str(r.get("out_trade_no", ""))
        trade = self.trades.get(serial)
        if path == "/pay/unifiedorder":
            if trade is None:
                trade = self.trades[serial] = Trade(serial, int(r["total_fee"]), mch)
            return {"result_code": "SUCCESS", "prepay_id": f"wx{serial}",
                    "code_url": f"weixin://wxpay/bizpayurl?pr={serial}"}
        if path == "/pay/orderquery":
            if trade is None:
                return {"result_code": "FAIL", "err_code": "ORDERNOTEXIST"}
            out: dict[str, Any] = {"result_code": "SUCCESS", "trade_state": trade.state,
                                   "out_trade_no": serial}
            if trade.state == "SUCCESS":
                out.update(transaction_id=trade.txn_id, total_fee=trade.amount)
            return out
        if path == "/pay/closeorder":
            if trade is not None and trade.state == "NOTPAY":
                trade.state = "CLOSED"
            return {"result_code": "SUCCESS"}
        if path == "/secapi/pay/refund":
            if trade is None or trade.state != "SUCCESS":
                return {"result_code": "FAIL", "err_code": "TRADE_STATE_ERROR"}
            refund_id = str(r["out_refund_no"])
            trade.refunds.setdefault(refund_id, ["PROCESSING", int(r["refund_fee"])])
            return {"result_code": "SUCCESS", "out_refund_no": refund_id,
                    "refund_fee": trade.refunds[refund_id][1]}
        if path == "/pay/refundquery":
            refund_id = str(r.get("out_refund_no"))
            for trade in self.trades.values():
                if refund_id in trade.refunds:
                    state, amount = trade.refunds[refund_id]
                    return {"result_code": "SUCCESS", "refund_status": state,
                            "refund_fee": amount}
            return {"result_code": "FAIL", "err_code": "REFUNDNOTEXIST"}
        return {"return_code": "FAIL", "return_msg": f"no such API {path}"}


@contextmanager
def serve(wallet: ScriptedWallet) -> Iterator[str]:
    """Run ``wallet`` on 127.0.0.1 (a free port) until the block ends; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError:
                self.send_error(400)
                return
            try:
                body = json.dumps(wallet.handle(self.path, request)).encode()
            except (BrokenPipeError, ConnectionResetError):
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the adapter gave up waiting (its timeout)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
