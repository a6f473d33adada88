"""The local server's ``accounts``: keys of one main account share one QPS limit."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ocrserver import cli
from ocrserver.server import ServerConfig, start_server
from ocrserver.truth import make_test_image
from workers.api.client import AsyncClient, Image
from workers.config import Credentials
from workers.errors import ConfigError, RetryableApiError

PNG = make_test_image(["浙A12345"])
KEYS = "ram1:s1,ram2:s2,other:s3"


async def _both(url: str, n: int) -> dict[str, list[str]]:
    """``n`` calls from each of ram1, ram2 and other, all at once."""
    async with httpx.AsyncClient(timeout=10) as http:

        async def one(client: AsyncClient) -> str:
            try:
                await client.recognize(Image(body=PNG))
                return "ok"
            except RetryableApiError as exc:
                return exc.code

        clients = {
            k: AsyncClient(url, Credentials(k, s), http)
            for k, s in (("ram1", "s1"), ("ram2", "s2"), ("other", "s3"))
        }
        results = await asyncio.gather(
            *(asyncio.gather(*(one(c) for _ in range(n))) for c in clients.values())
        )
        return dict(zip(clients, (list(r) for r in results), strict=True))


def test_keys_of_one_account_share_its_qps() -> None:
    config = ServerConfig(qps=5, keys=KEYS, accounts="ram1=acct, ram2=acct")
    assert config.account_of() == {"ram1": "acct", "ram2": "acct"}
    with start_server(config) as srv:
        got = asyncio.run(_both(srv.url, 30))
        stats = httpx.get(f"{srv.url}/__carnumber/stats").json()
    per_key = stats["per_key"]
    # Per whole second, ram1 + ram2 together get at most 5; "other" has its own 5.
    shared = sum(per_key.get(k, {"accepted": 0})["accepted"] for k in ("ram1", "ram2"))
    assert got["ram1"].count("ok") + got["ram2"].count("ok") == shared
    assert per_key["other"]["max_accepted_per_second"] == 5
    seconds = len(stats["accepted_per_second"])
    assert 5 <= shared <= 5 * seconds
    assert all(n <= 10 for n in stats["accepted_per_second"].values())  # 2 accounts x 5


def test_accounts_are_validated() -> None:
    with pytest.raises(ConfigError, match="ID=ACCOUNT"):
        ServerConfig(keys=KEYS, accounts="ram1")
    with pytest.raises(ConfigError, match="not one of --keys"):
        ServerConfig(keys=KEYS, accounts="nobody=acct")
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--keys", KEYS])
    config = cli.build_config(args, {"CARNUMBER_SERVER_ACCOUNTS": "ram1=a,ram2=a"})
    assert config.account_of() == {"ram1": "a", "ram2": "a"}
