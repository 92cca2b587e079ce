"""A scripted WeChat-Pay-v2-like wallet on loopback (http.server), written from the README alone."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY = "192006250b4c09247ec02edce69f6a2d"


def sorted_pairs(fields: dict[str, Any], key: str = KEY, field: str = "sign") -> str:
    """"the fields sorted by name, empty ones and the signature left out, as `k1=v1&k2=v2`, then
    `&key=KEY` for ... `md5` (WeChat Pay v2)" -- `hex-upper` by default."""
    pairs = [f"{k}={_text(v)}" for k, v in sorted(fields.items())
             if k != field and v is not None and _text(v) != ""]
    text = "&".join(pairs) + f"&key={key}"
    return hashlib.md5(text.encode()).hexdigest().upper()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def signed(fields: dict[str, Any], key: str = KEY) -> dict[str, Any]:
    out = dict(fields)
    out["sign"] = sorted_pairs(out, key)
    return out


class Wallet:
    """Answers the README's WeChat-like operations; a test can script any path."""

    def __init__(self, key: str = KEY) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.paid: dict[str, int] = {}
        self.refunds: dict[str, int] = {}
        self.closed: set[str] = set()
        self.sign_replies = True
        self.bad_request_signatures: list[str] = []
        self.script: dict[str, Callable[[dict[str, Any]], Any]] = {}
        wallet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                wallet.handle(self, self.path, raw)

            def do_GET(self) -> None:
                wallet.handle(self, self.path, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    # -- the wallet's behaviour ------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, path: str, raw: bytes) -> None:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("latin-1")}
        with self.lock:
            self.requests.append({"path": path, "headers": dict(h.headers), "raw": raw, "body": body})
        if isinstance(body, dict) and "sign" in body and body["sign"] != sorted_pairs(body, self.key):
            with self.lock:
                self.bad_request_signatures.append(path)
        scripted = self.script.get(path.split("?")[0])
        if scripted is not None:
            answer = scripted(body)
            if callable(answer):
                answer(h)
                return
            if answer is not None:
                status, payload = answer
                self._send(h, status, payload)
                return
        reply = self.answer(path.split("?")[0], body)
        if self.sign_replies:
            reply = signed(reply, self.key)
        self._send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        ok = {"return_code": "SUCCESS", "nonce_str": "r3ply"}
        serial = body.get("out_trade_no", "")
        if path == "/pay/unifiedorder":
            return {**ok, "result_code": "SUCCESS", "prepay_id": "wx" + serial,
                    "code_url": "weixin://wxpay/bizpayurl?pr=" + serial}
        if path == "/pay/orderquery":
            with self.lock:
                amount = self.paid.get(serial)
                closed = serial in self.closed
            if amount is not None:
                return {**ok, "result_code": "SUCCESS", "trade_state": "SUCCESS",
                        "transaction_id": "4200" + serial, "total_fee": amount, "out_trade_no": serial}
            return {**ok, "result_code": "SUCCESS", "trade_state": "CLOSED" if closed else "NOTPAY",
                    "out_trade_no": serial}
        if path == "/pay/closeorder":
            with self.lock:
                self.closed.add(serial)
            return {**ok, "result_code": "SUCCESS"}
        if path == "/secapi/pay/refund":
            with self.lock:
                self.refunds[body.get("out_refund_no", "")] = body.get("refund_fee", 0)
            return {**ok, "result_code": "SUCCESS", "refund_fee": body.get("refund_fee")}
        if path == "/pay/refundquery":
            refund_no = body.get("out_refund_no", "")
            with self.lock:
                amount = self.refunds.get(refund_no)
            if amount is None:
                return {**ok, "result_code": "SUCCESS", "refund_status": "NOTSURE"}
            return {**ok, "result_code": "SUCCESS", "refund_status": "SUCCESS", "refund_fee": amount}
        return {"return_code": "FAIL", "return_msg": "no such path"}

    def notification(self, serial: str, amount: int, txn: str | None = None, key: str | None = None,
                     result: str = "SUCCESS") -> bytes:
        fields = {"return_code": "SUCCESS", "result_code": result, "out_trade_no": serial,
                  "transaction_id": txn or "4200" + serial, "total_fee": amount, "nonce_str": "n0t1fy"}
        return json.dumps(signed(fields, key or self.key)).encode()


def trickle(delay_s: float = 0.2, count: int = 50) -> Callable[[BaseHTTPRequestHandler], None]:
    def go(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(count))
        h.end_headers()
        for _ in range(count):
            try:
                h.wfile.write(b" ")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(delay_s)
    return go
