"""The README's examples of these sections, run exactly as written, print what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


@pytest.mark.parametrize("marker,expected", [
    ('"gym.db"', "paying 1\nsucceeded 2 True\nfailed\n"),
    ('"wallet.db"', "succeeded [('cash', 'paid'), ('credit', 'credited')]\n"
                    "{'CNY': {'payer:wechat': -5000, 'transit': 0, "
                    "'vouchers:alice/balance': 5000}}\n"
                    "succeeded 2000\nrefused: insufficient_balance\n"),
    ("down = Wallet(", "wechat-2\nTrue\nwechat-1 unpaid BANK_DOWN\nwechat-2 paid SUCCESS\n"),
])
def test_the_readme_example_prints_exactly_its_comments(marker: str, expected: str) -> None:
    done = subprocess.run([sys.executable, "-c", block(marker)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=README.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == expected
