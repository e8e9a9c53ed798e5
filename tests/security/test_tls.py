"""TLS and mutual TLS, from the files the settings name, with certificates made by the test (openssl CLI).

Without the openssl command the tests are skipped loudly (and fail with CI=true).
"""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.app import create_server
from spendgate.client import AsyncClient, RetryPolicy, Tls
from spendgate.domain import InvalidArgumentError, SpendgateError
from spendgate.settings import Settings

from .conftest import StartSecured
from .support import SPENDGATE, Pki, Secured, bearer, call, clean_env

ONCE = RetryPolicy(attempts_max=1)
BUDGET = spend_pb2.GetBudgetRequest(node_id="research-agent-01")


def tls_settings(pki: Pki, *, mutual: bool) -> dict[str, str]:
    settings = {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)}
    if mutual:
        settings["tls_client_ca_file"] = str(pki.ca)
    return settings


async def budget_over(s: Secured, tls: Tls | None, token: str | None = None) -> str:
    """GetBudget over a fresh channel with these client TLS files; 'OK' or the error's text."""
    client = AsyncClient(s.address, token=token or s.root, timeout_s=5.0, retry=ONCE, tls=tls)
    try:
        await client.get_budget("research-agent-01")
        return "OK"
    except SpendgateError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        await client.close()


async def plaintext_outcome(s: Secured) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(s.address) as channel:
        outcome = await call(channel, "GetBudget", BUDGET, bearer(s.root), timeout_s=5.0)
    return outcome.code


async def test_a_tls_server_answers_clients_that_trust_its_ca_and_nobody_else(
    start_secured: StartSecured, pki: Pki
) -> None:
    s = await start_secured(tls=Tls(ca_file=str(pki.ca)), **tls_settings(pki, mutual=False))
    # The fixture itself set the server up over TLS (plan, tokens); a client with the CA works.
    assert await budget_over(s, Tls(ca_file=str(pki.ca))) == "OK"
    assert await budget_over(s, Tls(ca_file=str(pki.ca)), token=s.tokens["agent_a"].secret) == "OK"
    # Auth still applies over TLS.
    outcome = await call(s.channel, "GetBudget", BUDGET)
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
    # A plaintext client gets nothing, and neither does one that trusts another CA.
    assert await plaintext_outcome(s) == grpc.StatusCode.UNAVAILABLE
    assert (await budget_over(s, Tls(ca_file=str(pki.rogue_ca)))).startswith("UnavailableError")
    # The server is still up for good clients after the failed handshakes.
    assert await budget_over(s, Tls(ca_file=str(pki.ca))) == "OK"


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(
    start_secured: StartSecured, pki: Pki
) -> None:
    good = Tls(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    s = await start_secured(tls=good, **tls_settings(pki, mutual=True))
    assert await budget_over(s, good) == "OK"
    refused = {
        "no client certificate": Tls(ca_file=str(pki.ca)),
        "a certificate of another CA": Tls(
            ca_file=str(pki.ca), cert_file=str(pki.rogue_client_cert), key_file=str(pki.rogue_client_key)
        ),
    }
    for label, tls in refused.items():
        answer = await budget_over(s, tls)
        assert answer.startswith("UnavailableError"), f"{label}: {answer}"
    assert await plaintext_outcome(s) == grpc.StatusCode.UNAVAILABLE
    assert await budget_over(s, good) == "OK"


async def spendgate(target: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        "--target",
        target,
        "--timeout",
        "5",
        *args,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_cli_speaks_mutual_tls_with_its_flags(start_secured: StartSecured, pki: Pki) -> None:
    good = Tls(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    s = await start_secured(tls=good, **tls_settings(pki, mutual=True))
    flags = [
        "--token",
        s.root,
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
    ]
    code, out, err = await spendgate(s.address, *flags, "budget", "research-agent-01")
    assert code == 0, err
    assert "research-agent-01" in out
    code, out, err = await spendgate(s.address, *flags, "token", "list")
    assert code == 0, err
    assert s.tokens["agent_a"].token_id in out
    code, out, err = await spendgate(s.address, *flags, "authorize", "research-agent-01", "0.10")
    assert code == 0, err
    # Without the client certificate, or without TLS at all, the CLI gets nowhere (and says so).
    code, out, err = await spendgate(s.address, "--token", s.root, "--tls-ca", str(pki.ca), "budget", "acme")
    assert code == 2, (out, err)
    code, out, err = await spendgate(s.address, "--token", s.root, "budget", "acme")
    assert code == 2, (out, err)


def test_tls_settings_must_come_in_working_sets(tmp_path: pathlib.Path, pki: Pki) -> None:
    with pytest.raises(InvalidArgumentError, match="both tls_cert_file and tls_key_file"):
        Settings(tls_cert_file=str(pki.server_cert))
    with pytest.raises(InvalidArgumentError, match="both tls_cert_file and tls_key_file"):
        Settings(tls_key_file=str(pki.server_key))
    with pytest.raises(InvalidArgumentError, match="needs tls_cert_file"):
        Settings(tls_client_ca_file=str(pki.ca))
    missing_file = Settings(port=0, tls_cert_file=str(tmp_path / "absent.pem"), tls_key_file=str(pki.server_key))
    with pytest.raises(InvalidArgumentError, match="cannot read tls_cert_file"):
        asyncio.run(create_server(missing_file))
