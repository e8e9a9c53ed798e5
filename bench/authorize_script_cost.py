"""Where the authorize script spends its time inside Redis, and how many Redis commands it runs per decision.

    .venv/bin/python bench/authorize_script_cost.py [--rounds 5] [--scripts 800]

Starts a redis-server of its own, applies examples/fleet.yaml with the server's own code, records the
server's EVALSHA commands (spendgate.bench.loadgen.script_templates) and runs them, one-shot, pipelined:

1. the nested commands per decision (INFO commandstats), e.g. hget=15 hincrby=12 hmget=7 ...;
2. the time Redis spends per script (commandstats usec_per_call) for the whole script and for copies that
   return early at each numbered step of authorize.lua, so the difference between two rows is that step's
   cost. Rounds are interleaved and the minimum is shown, which keeps other load on the machine out of it.

It measures the script only (no gRPC, no Python server); a change to the Lua shows here first.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import pathlib
import statistics
import time

import redis
import redis.asyncio as aioredis

from spendgate.bench.fleet import find_example_fleet, load_fleet
from spendgate.bench.loadgen import LoadJob, ScriptTemplate, script_templates
from spendgate.bench.runner import _apply_directly
from spendgate.bench.servers import RedisServer, find_redis_server
from spendgate.store.redis_store import load_script_source

EARLY_RETURN = "do return {'OK', '1', '', '0'} end\n"
# The numbered steps of authorize.lua; each must appear once in authorize.lua (not in _lib.lua).
STEPS = (
    "-- 0. The caller may act",
    "-- 3. Expired holds",
    "-- 4. Read every node once",
    "-- 5. Decide, in order of precedence.",
    "-- 6. Apply an approval",
    "-- 7. The tightest window",
)
PIPELINE_SIZE = 100


def variants() -> dict[str, str]:
    """The whole script, and copies returning just before each step."""
    library = (importlib.resources.files("spendgate.store") / "lua" / "_lib.lua").read_text()
    full = load_script_source("authorize")
    out = {}
    for step in STEPS:
        position = full.find(step, len(library))
        if position < 0:
            raise SystemExit(f"authorize.lua no longer has the step {step!r}; update STEPS")
        out[f"return before {step.removeprefix('-- ')}"] = full[:position] + EARLY_RETURN + full[position:]
    out["the whole script"] = full
    return out


async def run_batch(client: aioredis.Redis, templates: list[ScriptTemplate], count: int, tag: str) -> list[object]:
    replies: list[object] = []
    for start in range(0, count, PIPELINE_SIZE):
        pipe = client.pipeline(transaction=False)
        for number in range(start, min(count, start + PIPELINE_SIZE)):
            command = templates[number % len(templates)].fresh(f"{tag}-{number:x}", f"{tag}{number:x}".rjust(32, "0"))
            pipe.execute_command(*command)
        replies.extend(await pipe.execute(raise_on_error=False))
    return replies


async def main(rounds: int, scripts: int) -> None:
    binary = find_redis_server()
    example = find_example_fleet()
    if not binary or example is None:
        raise SystemExit("needs redis-server and examples/fleet.yaml (run from the repository)")
    server = RedisServer(binary)
    try:
        fleet = load_fleet([pathlib.Path(example)])
        await _apply_directly(server.url, fleet, slice(None))
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        stats = redis.Redis(port=server.port)
        job = LoadJob(
            kind="redis", process_index=0, key_prefix="", wallets=fleet.wallet_ids, amount_micros=1, one_shot=True
        )
        now_ms = int(time.time() * 1000)
        templates = {}
        for index, (name, source) in enumerate(variants().items()):
            sha = str(await client.script_load(source))
            templates[name] = (index, await script_templates(client, job, sha, now_ms))

        # 1. Nested commands per decision, from the whole script.
        _, whole = templates["the whole script"]
        await run_batch(client, whole, 200, "warm")
        stats.config_resetstat()
        await run_batch(client, whole, scripts, "count")
        counts = {
            name.removeprefix("cmdstat_"): int(value["calls"]) / scripts
            for name, value in stats.info("commandstats").items()
            if name not in ("cmdstat_evalsha", "cmdstat_config|resetstat")
        }
        print(
            f"nested Redis commands per one-shot decision (3-node chain): {sum(counts.values()):g} = "
            + " ".join(f"{name}={count:g}" for name, count in sorted(counts.items(), key=lambda item: -item[1]))
        )

        # 2. Time per script, cumulative by step.
        timings: dict[str, list[float]] = {name: [] for name in templates}
        for round_number in range(rounds):
            for name, (index, variant_templates) in templates.items():
                stats.config_resetstat()
                replies = await run_batch(client, variant_templates, scripts, f"r{round_number}v{index}")
                failures = [reply for reply in replies if isinstance(reply, Exception)]
                if failures:
                    raise SystemExit(f"{name}: {failures[0]}")
                timings[name].append(float(stats.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
        print(f"\nmicroseconds Redis spends per script (min and median of {rounds} interleaved rounds):")
        for name, values in timings.items():
            print(f"  {min(values):7.1f} {statistics.median(values):7.1f}  {name}")
        await client.aclose()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scripts", type=int, default=800, help="scripts per variant per round")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.scripts))
