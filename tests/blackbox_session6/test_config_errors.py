"""Configuration mistakes (README *HTTP service / Configuration*, *Command line*): every
mistake is refused before anything is opened, with exit status 2 and a message naming the
key as written. The file's checks run in-process through `run_server` (documented as
the same as `payengine serve`); three run as the command itself."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from .support import child_env, free_port, payengine_argv

CHANNEL = '''
[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "bb-wechat-key-000001" }
'''

# (name, the file's text, the key its message must name): one or two of each table, kept
# few because each is a Python process start on a shared machine
BAD_FILES: list[tuple[str, str, str]] = [
    ("port", "[service]\nport = 70000\n", "service.port"),
    ("host_type", "[service]\nhost = 5\n", "service.host"),
    ("max_body_small", "[service]\nmax_body_bytes = 10\n", "service.max_body_bytes"),
    ("rate_burst", "[service]\nrate_burst = 0\n", "service.rate_burst"),
    ("threads", "[service]\nthreads = 257\n", "service.threads"),
    ("drain", "[service]\ndrain_timeout_ms = -1\n", "service.drain_timeout_ms"),
    ("token_env_unset", "[service]\napi_token_env = \"BB_NO_SUCH_VARIABLE_SET\"\n",
     "service.api_token_env"),
    ("service_unknown", "[service]\ncolour = \"red\"\n", "service.colour"),
    ("top_unknown", "[colour]\nred = 1\n", "colour"),
    ("db_empty", "[engine]\ndb = \"\"\n", "engine.db"),
    ("synchronous", "[engine]\nsynchronous = \"FAST\"\n", "engine.synchronous"),
    ("pay_window", "[engine.policy]\npay_window_ms = 0\n", "engine.policy.pay_window_ms"),
    ("channel_kind", "[channels.wechat]\nkind = \"ftp\"\nwallet = \"wechat\"\nmerchant_no = \"m\"\n",
     "channels.wechat.kind"),
    ("route_channel", CHANNEL + "[[routing.route]]\nmethod = \"qr\"\nchannel = \"nobody\"\n",
     "routing.route[0].channel"),
    ("risk_step_up", "[risk.rules]\nstep_up_amount = { CNY = 100 }\n", "risk"),
    ("merchant_no_key", "[[merchants]]\nid = \"m1\"\n", "merchants[0]"),
    ("toml_syntax", "[service\nport = 1\n", ""),
]


def run_server_in_a_thread(config: Path, db: Path) -> int | None:
    """`run_server` (README: "exit status, as `payengine serve`") on a daemon thread: its
    status, or None if it is still running after the wait (the file was taken)."""
    from payengine.actors.service import run_server
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_server(
        config_path=str(config), db=str(db), port=free_port())), daemon=True)
    thread.start()
    thread.join(timeout=60)
    return result[0] if result else None


@pytest.mark.parametrize("name, text, key", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_a_bad_configuration_is_refused_with_status_2_naming_its_key_and_opens_nothing(
        server_extra: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str,
        key: str) -> None:
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    db = tmp_path / "station.db"
    status = run_server_in_a_thread(config, db)
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert stderr.startswith("payengine serve: "), stderr
    assert key in stderr, stderr
    assert not db.exists()


@pytest.fixture(scope="module")
def cli_refusals(
        server_extra: None, tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """`payengine serve` itself, in parallel: a bad port, a file that is not TOML, no file."""
    folder = tmp_path_factory.mktemp("bad-cli")
    (folder / "port.toml").write_text("[service]\nport = 70000\n")
    (folder / "syntax.toml").write_text("[service\nport = 1\n")
    started = {}
    for name in ("port", "syntax", "missing"):
        process = subprocess.Popen(
            [*payengine_argv(), "serve", "--config", str(folder / f"{name}.toml"),
             "--db", str(folder / f"{name}.db"), "--port", str(free_port())],
            cwd=folder, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = process
    done = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        assert not (folder / f"{name}.db").exists()
    return done


def test_payengine_serve_prints_the_readmes_port_message_and_exits_2(
        cli_refusals: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = cli_refusals["port"]
    assert result.returncode == 2
    assert "service.port: must be from 0 to 65535, not 70000" in result.stderr


def test_payengine_serve_with_a_file_that_is_not_toml_exits_2(
        cli_refusals: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert cli_refusals["syntax"].returncode == 2
    assert cli_refusals["syntax"].stderr.startswith("payengine serve: ")


def test_payengine_serve_with_a_configuration_file_that_does_not_exist_exits_2(
        cli_refusals: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = cli_refusals["missing"]
    assert result.returncode == 2, result.stderr
    assert "missing.toml" in result.stderr
