"""The README's channel configuration, as the tests use it: read from README.md itself, so
the documented file is the one that is tested."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

KEY_1 = "192006250b4c09247ec02edce69f6a2d"
KEY_2 = "8934e7d15453e97507ef794cf7b0519d"
MERCHANT_1 = "1900000109"
MERCHANT_2 = "1900000110"


def readme_toml() -> str:
    """The TOML block of README.md's "Channels from a configuration file"."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Channels from a configuration file"):]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match is not None, "the README's section has no TOML block"
    return match.group(1)


def readme_toml_at(url_1: str, url_2: str | None = None, **replace: str) -> str:
    """The README's configuration, its two merchant numbers at ``url_1`` and ``url_2``."""
    text = readme_toml().replace("http://127.0.0.1:8801", url_1).replace(
        "http://127.0.0.1:8802", url_2 or url_1)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def readme_python_blocks() -> list[str]:
    """The Python blocks of README.md's "Channels from a configuration file"."""
    text = README.read_text(encoding="utf-8")
    start = text.index("### Channels from a configuration file")
    section = text[start:text.index("\n### ", start + 10)]
    return re.findall(r"```python\n(.*?)```", section, re.S)
