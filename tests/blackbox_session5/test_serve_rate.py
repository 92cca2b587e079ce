"""Rate buckets per client address (README *Configuration* and *Limits*)."""

from __future__ import annotations

from pathlib import Path

import httpx

from .support import serve


def client_from(url: str, address: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10,
                        transport=httpx.HTTPTransport(local_address=address))


def test_each_client_address_has_its_own_bucket(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[service]\nrate_per_s = 1\nrate_burst = 2\n")
    with serve(tmp_path, "--config", "p.toml") as server, \
            client_from(server.url, "127.0.0.1") as a, client_from(server.url, "127.0.0.2") as b:
        assert [a.get("/v1/channels/health").status_code for _ in range(3)] == [200, 200, 429]
        assert b.get("/v1/channels/health").status_code == 200


def test_past_rate_clients_max_the_least_recently_seen_address_is_forgotten(
        tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        "[service]\nrate_per_s = 1\nrate_burst = 2\nrate_clients_max = 1\n")
    with serve(tmp_path, "--config", "p.toml") as server, \
            client_from(server.url, "127.0.0.1") as a, client_from(server.url, "127.0.0.2") as b:
        assert [a.get("/v1/channels/health").status_code for _ in range(3)] == [200, 200, 429]
        assert b.get("/v1/channels/health").status_code == 200
        # a's bucket was forgotten for b's: a starts again with a full bucket
        assert a.get("/v1/channels/health").status_code == 200


def test_the_bound_order_is_token_then_rate_then_body_size(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        '[service]\nrate_per_s = 1\nrate_burst = 1\nmax_body_bytes = 1024\n'
        'api_token_env = "PE_TOKEN"\n')
    token = {"Authorization": "Bearer " + "k" * 20}
    with serve(tmp_path, "--config", "p.toml", extra_env={"PE_TOKEN": "k" * 20}) as server, \
            server.client() as c:
        big = b"{" + b" " * 5000 + b"}"
        # no token: 401 first, whatever the size, and it spends no rate
        r = c.post("/v1/orders", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 401
        r = c.post("/v1/orders", content=big,
                   headers={"content-type": "application/json", **token})
        assert r.status_code == 413
        r = c.post("/v1/orders", content=big,
                   headers={"content-type": "application/json", **token})
        assert r.status_code == 429


def test_an_api_token_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[service]\napi_token_env = "PE_TOKEN"\n')
    token = "0123456789abcdef"
    with serve(tmp_path, "--config", "p.toml", extra_env={"PE_TOKEN": token}) as server, \
            server.client() as c:
        assert c.get("/v1/channels/health").status_code == 401
        r = c.get("/v1/channels/health", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
