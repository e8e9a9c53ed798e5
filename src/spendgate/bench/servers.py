"""The processes a benchmark starts and watches: its own redis-server, a spendgate server, an empty server.

Nothing here touches a Redis it did not start: the benchmark's Redis is a ``redis-server`` process on a free
port with persistence off, stopped at the end. CPU time and memory of the processes come from ``/proc``
(Linux); elsewhere those figures are reported as unknown.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

REDIS_SERVER_DEFAULT = "/usr/bin/redis-server"
START_TIMEOUT_S = 30.0
# The longest path a Unix socket may have on Linux (sun_path holds 108 bytes, the terminating NUL included).
UNIX_SOCKET_PATH_MAX = 107
STOP_TIMEOUT_S = 15.0
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user and system, all threads) a process has used, or ``None`` where /proc is missing."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def machine_busy_cpu_s() -> float | None:
    """CPU seconds every CPU of the machine has spent busy since boot (all processes), from /proc/stat."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
    ticks = [int(value) for value in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS_PER_S


def process_rss_bytes(pid: int) -> int | None:
    """A process's resident memory, or ``None`` where /proc is missing."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def find_redis_server(path: str = "") -> str:
    """The redis-server binary to start ('' when there is none)."""
    if path:
        return path if os.access(path, os.X_OK) else ""
    return shutil.which("redis-server") or (REDIS_SERVER_DEFAULT if os.access(REDIS_SERVER_DEFAULT, os.X_OK) else "")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def redis_server_options(port: int, *, socket_path: str = "") -> list[str]:
    """redis-server's command-line options for a server of our own (the tests' servers use them too).

    Loopback only, nothing kept on disk, and with ``socket_path`` a Unix socket only its user may use.
    """
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if socket_path:
        options += ["--unixsocket", socket_path, "--unixsocketperm", "700"]
    return options


class RedisServer:
    """A redis-server process of the benchmark's own, without persistence.

    It listens on a TCP port on loopback, and with ``unix_socket`` on a Unix socket too, which :attr:`url` (what
    the server and the generators connect to) then names. The benchmark's own checks use the port either way.
    """

    def __init__(self, binary: str, *, unix_socket: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        socket_path = ""
        # A directory of its own for the socket, which nobody else writes to; removed on any failure below.
        self._socket_dir = tempfile.mkdtemp(prefix="spendgate-redis-") if unix_socket else ""
        try:
            if self._socket_dir:
                socket_path = os.path.join(self._socket_dir, "redis.sock")
                if len(socket_path.encode()) > UNIX_SOCKET_PATH_MAX:
                    raise RuntimeError(
                        f"the Redis socket's path {socket_path} is over {UNIX_SOCKET_PATH_MAX} bytes: set TMPDIR to "
                        "a shorter directory"
                    )
                self.url = f"unix://{socket_path}?db=0"
            self._process = subprocess.Popen(  # noqa: S603 - the binary is the operator's redis-server
                [binary, *redis_server_options(self.port, socket_path=socket_path), "--daemonize", "no"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            self._remove_socket_dir()
            raise
        self._client = redis.Redis(port=self.port, socket_timeout=5.0)
        try:
            self._wait_ready()
        except BaseException:  # Not ready, or interrupted: nothing is left running.
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._client.ping()
                return
            except redis.exceptions.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def _remove_socket_dir(self) -> None:
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    def cpu_s(self) -> float | None:
        """CPU seconds used so far."""
        return process_cpu_s(self.pid)

    def used_memory_bytes(self) -> int:
        """What Redis reports as its data's memory (INFO memory used_memory)."""
        info = self._client.info("memory")
        return int(info["used_memory"])

    def reset_stats(self) -> None:
        """Zero Redis's command statistics (this Redis is the benchmark's own)."""
        self._client.config_resetstat()

    def round_trips(self) -> int:
        """Reply writes to clients since the last reset (INFO stats ``total_writes_processed``).

        Redis answers each read it serves with one write, so under pipelining this counts round trips as Redis
        served them: commands that reach it together, in one write or in several read at once, are one.
        """
        return int(self._client.info("stats")["total_writes_processed"])

    def script_stats(self) -> tuple[int, int]:
        """Scripts run (EVALSHA and EVAL) since the last reset, and the microseconds Redis spent in them."""
        stats = self._client.info("commandstats")
        calls = usec = 0
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            if name in stats:
                calls += int(stats[name]["calls"])
                usec += int(stats[name]["usec"])
        return calls, usec

    def stop(self) -> None:
        """Stop the process (and remove its socket's directory)."""
        self._client.close()
        _stop(self._process)
        self._remove_socket_dir()


def _wait_serving(target: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until a gRPC server answers a health check with SERVING (or its process dies)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} before serving")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {target} was not serving within {timeout_s:.0f} s")
            time.sleep(0.05)


class ServerProcess:
    """A server in a process of its own (``spendgate serve`` or the empty server), stopped with SIGTERM."""

    def __init__(
        self, command: Sequence[str], port: int, *, environment: dict[str, str], log_path: pathlib.Path
    ) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        started = time.monotonic()
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter running our own module
            list(command), stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **environment}
        )
        self.start_s = 0.0
        self._started = started

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the server serves; ``start_s`` is then the time from launch to serving."""
        try:
            _wait_serving(self.target, self._process, timeout_s)
        except RuntimeError as error:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{error}; its output ends with:\n{tail}") from None
        self.start_s = time.monotonic() - self._started

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    def cpu_s(self) -> float | None:
        """CPU seconds used so far."""
        return process_cpu_s(self.pid)

    def rss_bytes(self) -> int | None:
        """Resident memory now."""
        return process_rss_bytes(self.pid)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL if it lingers)."""
        _stop(self._process)
        with contextlib.suppress(OSError):
            self._log.close()


def spendgate_server(
    port: int, redis_url: str, plan: str, log_path: pathlib.Path, *, extra_environment: dict[str, str] | None = None
) -> ServerProcess:
    """Start ``spendgate serve`` with auth off on the given Redis, loading ``plan``."""
    command = [sys.executable, "-c", "from spendgate.cli import main; main()", "serve", "--port", str(port)]
    command += ["--redis-url", redis_url, "--plan", plan, "--log-format", "text"]
    environment = {"SPENDGATE_AUTH": "off", "SPENDGATE_LOG_LEVEL": "WARNING", **(extra_environment or {})}
    return ServerProcess(command, port, environment=environment, log_path=log_path)


def empty_server(port: int, log_path: pathlib.Path, *, metrics_interceptor: bool = False) -> ServerProcess:
    """Start the empty-handler server (:mod:`spendgate.bench.empty_server`)."""
    command = [sys.executable, "-m", "spendgate.bench.empty_server", "--port", str(port)]
    if metrics_interceptor:
        command.append("--metrics-interceptor")
    return ServerProcess(command, port, environment={}, log_path=log_path)
