"""``spendgate token create/list/revoke`` against a server with auth on, and ``spendgate serve`` with auth on.

The CLI runs as a subprocess (so its flags, environment and exit codes are what a person gets); the server
runs in the test's event loop, so every subprocess is awaited, never run blocking.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import signal

import grpc

from helpers import eventually, free_port
from spendgate._gen.spendgate.v1 import admin_pb2, spend_pb2

from .conftest import StartSecured
from .support import FLEET, SPENDGATE, authorize, bearer, call, clean_env

SECRET = re.compile(r"^sg_[A-Za-z0-9_-]{40}$")
TOKEN_ID = re.compile(r"token ([0-9a-f]{16}) \(agent for research-agent-01\)")


def denied(stderr: str) -> bool:
    """Whether the CLI said the call was refused for its scope."""
    return "permission denied" in stderr.lower() or "permissiondenied" in stderr.lower()


async def spendgate(target: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run the CLI (with ``--token`` when given); return its exit code, stdout and stderr."""
    flags = ["--target", target, "--timeout", "10"]
    if token is not None:
        flags += ["--token", token]
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        *flags,
        *args,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_token_create_use_list_and_revoke_round_trip(start_secured: StartSecured) -> None:
    s = await start_secured()
    target = s.address

    code, out, err = await spendgate(
        target, "token", "create", "--role", "agent", "--scope", "research-agent-01", "--name", "cli-bot", token=s.root
    )
    assert code == 0, err
    secret = out.strip()
    assert SECRET.match(secret), f"stdout should be the secret alone: {out!r}"
    match = TOKEN_ID.search(err)
    assert match, err
    token_id = match.group(1)
    assert secret not in err, "the secret is printed once, on stdout"

    # The new token spends from its wallet, and only there.
    code, out, err = await spendgate(target, "authorize", "research-agent-01", "0.25", token=secret)
    assert code == 0, err
    assert "approved" in out.lower(), out
    code, out, err = await spendgate(target, "authorize", "research-agent-02", "0.25", token=secret)
    assert code == 2, (out, err)
    assert denied(err), err
    code, out, err = await spendgate(target, "token", "list", token=secret)
    assert code == 2, (out, err)
    assert denied(err), err

    # The listing shows the token by id, never a secret.
    code, out, err = await spendgate(target, "token", "list", token=s.root)
    assert code == 0, err
    assert token_id in out
    assert "cli-bot" in out
    assert secret not in out
    for issued in s.tokens.values():
        assert issued.token_id in out
        assert issued.secret not in out
    code, out, err = await spendgate(target, "token", "list", "--account", "globex", token=s.tokens["admin_a"].secret)
    assert code == 2, (out, err)
    assert denied(err), err

    # Without a token, nothing.
    code, out, err = await spendgate(
        target, "token", "create", "--role", "admin", "--scope", "acme", "--name", "sneaky"
    )
    assert code == 2, (out, err)
    assert "no token" in err.lower(), err

    code, out, err = await spendgate(target, "token", "revoke", token_id, token=s.tokens["admin_a"].secret)
    assert code == 0, err
    assert f"revoked {token_id}" in out

    # The next call with the revoked secret fails, over the CLI and over gRPC.
    code, out, err = await spendgate(target, "authorize", "research-agent-01", "0.25", token=secret)
    assert code == 2, (out, err)
    assert "unknown or revoked token" in err, err
    outcome = await call(
        s.channel, "GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-01"), bearer(secret)
    )
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
    code, out, err = await spendgate(target, "token", "list", token=s.root)
    assert code == 0, err
    assert token_id not in out
    # Revoking again says there is no such token.
    code, out, err = await spendgate(target, "token", "revoke", token_id, token=s.root)
    assert code == 2, (out, err)
    assert "no token" in err, err


async def read_tokens(stream: asyncio.StreamReader, wallets: int) -> tuple[str, dict[str, tuple[str, str]]]:
    """Read serve's stdout until the root token and every demo token are printed."""
    root = ""
    demo: dict[str, tuple[str, str]] = {}
    while not (root and len(demo) == wallets + 1):
        line = (await stream.readline()).decode()
        if not line:
            break
        if "root token" in line:
            root = line.split()[-1]
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("admin", "agent"):
            demo[parts[1]] = (parts[0], parts[2])
    return root, demo


async def test_spendgate_serve_embedded_prints_working_operator_and_agent_tokens(tmp_path: pathlib.Path) -> None:
    wallets = FLEET.read_text().count("{id: ")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        "serve",
        "--port",
        str(port),
        "--plan",
        str(FLEET),
        "--log-format",
        "text",
        cwd=tmp_path,
        env=clean_env() | {"SPENDGATE_DATA_DIR": str(tmp_path / "data")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    target = f"127.0.0.1:{port}"
    try:
        assert process.stdout is not None
        root, demo = await asyncio.wait_for(read_tokens(process.stdout, wallets), timeout=60)
        assert SECRET.match(root), root
        assert demo.get("acme", ("", ""))[0] == "admin", demo
        agents = {scope: secret for scope, (role, secret) in demo.items() if role == "agent"}
        assert len(agents) == wallets, demo
        assert all(SECRET.match(secret) for secret in agents.values())
        assert len({root, *(secret for _, secret in demo.values())}) == wallets + 2, "every token is different"

        async with grpc.aio.insecure_channel(target) as channel:

            async def answering() -> bool:
                outcome = await call(channel, "GetTree", admin_pb2.GetTreeRequest(), bearer(root))
                return outcome.code == grpc.StatusCode.OK

            await eventually(answering, timeout_s=30, what="spendgate serve to answer")
            # Auth is on: no token, nothing.
            outcome = await call(channel, "GetBudget", spend_pb2.GetBudgetRequest(node_id="acme"))
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
            # The operator token administers acme.
            admin = bearer(demo["acme"][1])
            outcome = await call(
                channel, "FreezeNode", admin_pb2.FreezeNodeRequest(node_id="content-agents", reason="t"), admin
            )
            assert outcome.code == grpc.StatusCode.OK, outcome
            outcome = await call(
                channel, "UnfreezeNode", admin_pb2.UnfreezeNodeRequest(node_id="content-agents"), admin
            )
            assert outcome.code == grpc.StatusCode.OK, outcome
            # Each agent token spends from its own wallet and no other.
            scopes = sorted(agents)
            for index, scope in enumerate(scopes):
                mine = bearer(agents[scope])
                outcome = await call(channel, "Authorize", authorize(scope, f"demo-{index}"), mine)
                assert outcome.code == grpc.StatusCode.OK, outcome
                assert outcome.responses[0].decision == spend_pb2.DECISION_APPROVED
                other = scopes[(index + 1) % len(scopes)]
                outcome = await call(channel, "Authorize", authorize(other, f"demo-x-{index}"), mine)
                assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, outcome
        # And the CLI takes the tokens from SPENDGATE_TOKEN as the printed line says.
        cli = await asyncio.create_subprocess_exec(
            str(SPENDGATE),
            "--target",
            target,
            "budget",
            scopes[0],
            env=clean_env() | {"SPENDGATE_TOKEN": agents[scopes[0]]},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, cli_err = await asyncio.wait_for(cli.communicate(), timeout=60)
        assert cli.returncode == 0, cli_err.decode()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
    assert process.returncode == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    # Printed once to the person who started it, never logged.
    assert root not in log
    assert all(secret not in log for _, secret in demo.values())
