"""Servers a test runs itself, on free loopback ports: a redis-server to kill, stop or pause,
a RabbitMQ node to crash, and a TCP proxy to put between a client and a server and cut at
a chosen moment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OwnRedis:
    """A redis-server of the test's own. With `data_dir` it keeps an AOF, by default
    fsynced on every command (appendfsync always), and a restart loads it back."""

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        data_dir: Path | None = None,
        appendfsync: str = "always",
    ) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("this test starts its own redis-server: install Redis (redis-server)")
        self.port = port or free_port()
        self.password = password
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        if self.data_dir is not None:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
            args += ["--dir", str(self.data_dir)]
        else:
            # A replica's full sync then streams, writing no dump.rdb into the working dir.
            args += ["--appendonly", "no", "--repl-diskless-sync", "yes"]
            args += ["--repl-diskless-sync-delay", "0"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, password=self.password).ping()
                return
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, connections refused until start()."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    stop = kill

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def _rabbitmq_scripts() -> Path:
    """The directory of RabbitMQ's own rabbitmq-server and rabbitmqctl scripts. Debian's
    /usr/sbin ones are a wrapper that, run as root, switches to the rabbitmq user (who
    could not write the test's files) and drops the node's environment into its log."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        pytest.fail("this test starts its own RabbitMQ node: install RabbitMQ (rabbitmq-server)")
    # Either resolves into that directory (the wrapper lives beside links to the scripts).
    return Path(found).resolve().parent


# OwnRabbitMQ's dead_letter_worker_publisher_confirm_timeout.
DLX_CONFIRM_TIMEOUT_MS = 5000


class OwnRabbitMQ:
    """A RabbitMQ node of the test's own, never the shared one: its own node name, loopback
    ports, configuration, cookie and data directory, which kill() and start() keep (a crash
    and a restart on the same disk) and close() removes. No plugins (the management
    plugin's port would clash with the shared node's). Nodes given the same `cookie` can
    form a cluster (join())."""

    def __init__(self, cookie: str | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="conveyor-rabbit-"))
        self.node = f"conveyor-crash-{self.base.name.rsplit('-', 1)[1]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.scripts = _rabbitmq_scripts()
        self.proc: subprocess.Popen[bytes] | None = None
        # The seconds the last start() took until the node accepted connections.
        self.started_in = 0.0
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # not the host's, which names its node
        (self.base / "enabled_plugins").write_text("[].\n")
        cookie_file = self.base / ".erlang.cookie"
        cookie_file.write_text(cookie or self.base.name.upper().replace("-", ""))
        cookie_file.chmod(0o400)
        self.env = {
            **os.environ,
            "HOME": str(self.base),  # where rabbitmqctl and the node find the cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
            # As compose.yaml sets it (there 10 s): a dead-letter hop that a queue below
            # could not confirm (its leader restarting or re-elected) is retried this soon,
            # not after RabbitMQ's default 180 s.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} "
            f"-rabbit dead_letter_worker_publisher_confirm_timeout {DLX_CONFIRM_TIMEOUT_MS}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60.0) -> None:
        began = time.monotonic()
        (self.base / "node.pid").unlink(missing_ok=True)  # a crashed node's, stale
        output = open(self.base / "server.out", "ab")  # noqa: SIM115 (the child's)
        try:
            # A session of its own: kill() takes the whole process group.
            self.proc = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self.env,
                cwd=self.base,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        finally:
            output.close()
        try:
            # await_startup fails at once while the node is not yet known to epmd; `wait`
            # first waits for the pid file the node writes as it boots.
            seconds = str(int(timeout))
            self.ctl("wait", str(self.base / "node.pid"), "--timeout", seconds, timeout=timeout)
            self.ctl("await_startup", "--timeout", seconds, timeout=timeout)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - began

    def join(self, other: OwnRabbitMQ) -> None:
        """Make this running node a member of `other`'s cluster (both share a cookie)."""
        self.ctl("stop_app")
        self.ctl("join_cluster", other.node, timeout=60.0)
        self.ctl("start_app", timeout=60.0)

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        try:
            proc = subprocess.run(
                [str(self.scripts / "rabbitmqctl"), "-n", self.node, *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} timed out; {self._log()}") from exc
        if proc.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed: {proc.stderr or proc.stdout}; {self._log()}"
            )
        return proc.stdout

    def _log(self) -> str:
        out = self.base / "server.out"
        tail = out.read_text(errors="replace")[-2000:] if out.exists() else ""
        return f"the node's output (in {self.base}) ends: {tail}"

    def kill(self) -> None:
        """SIGKILL of the node's process group (beam.smp and its helpers): a crash, no
        clean shutdown; the node's files stay for the next start()."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        while (left := self._node_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"processes of RabbitMQ node {self.node} outlived SIGKILL: {left}"

    def close(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _node_processes(self) -> list[int]:
        """Pids of processes whose command line names this node."""
        found = []
        marker = self.node.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found


class Proxy:
    """A TCP proxy on loopback: clients connect to `port`, it relays to `target_port`.

    `cut_reply_after(marker)` arms it: the next request containing `marker` still reaches
    the server, but the server's reply to it is thrown away and both sides of that
    connection are closed, as when a network drops a reply after the write was applied."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self.cuts = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut_reply_after(self, marker: bytes) -> None:
        self._marker = marker

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        doomed = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    doomed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():
                    self.cuts += 1
                    break  # the reply to the marked request goes nowhere
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        for pump in pumps:
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)


_NEW_KEY = ("openssl", "req", "-newkey", "rsa:2048", "-nodes")


class Certificates:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, made
    with openssl in `directory`."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.fail("this test makes TLS certificates: install openssl")
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        ca_key = directory / "ca.key"
        subprocess.run(
            [
                *_NEW_KEY,
                "-x509",
                "-days",
                "2",
                "-keyout",
                str(ca_key),
                "-out",
                str(self.ca),
                "-subj",
                "/CN=conveyor-test-ca",
            ],
            check=True,
            capture_output=True,
        )
        for name, cert, key, ext in (
            ("server", self.server_cert, self.server_key, "subjectAltName=IP:127.0.0.1"),
            ("client", self.client_cert, self.client_key, "extendedKeyUsage=clientAuth"),
        ):
            request = directory / f"{name}.csr"
            extfile = directory / f"{name}.ext"
            extfile.write_text(ext + "\n")
            subprocess.run(
                [
                    *_NEW_KEY,
                    "-keyout",
                    str(key),
                    "-out",
                    str(request),
                    "-subj",
                    f"/CN=conveyor-test-{name}",
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    "openssl",
                    "x509",
                    "-req",
                    "-in",
                    str(request),
                    "-CA",
                    str(self.ca),
                    "-CAkey",
                    str(ca_key),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    str(cert),
                    "-extfile",
                    str(extfile),
                ],
                check=True,
                capture_output=True,
            )


class TlsRedis:
    """A redis-server that only speaks TLS and requires client certificates."""

    def __init__(self, certs: Certificates) -> None:
        self.certs = certs
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-cert-file",
                str(certs.server_cert),
                "--tls-key-file",
                str(certs.server_key),
                "--tls-ca-cert-file",
                str(certs.ca),
                "--tls-auth-clients",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url()).ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("the TLS redis-server did not start")

    def url(self, *, client_cert: bool = True, ca: bool = True) -> str:
        query = []
        if ca:
            query.append(f"ssl_ca_certs={self.certs.ca}")
        if client_cert:
            query += [f"ssl_certfile={self.certs.client_cert}"]
            query += [f"ssl_keyfile={self.certs.client_key}"]
        query.append("ssl_cert_reqs=required")
        return f"rediss://127.0.0.1:{self.port}/0?{'&'.join(query)}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class SentinelGroup:
    """A primary, a replica and three sentinels watching them as `service`."""

    service = "conveyor-primary"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.primary = OwnRedis()
        self.primary.start()
        self.replica = OwnRedis()
        self.replica_args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.replica.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                *self.replica_args,
            ],
            stdout=subprocess.DEVNULL,
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        for port in self.sentinel_ports:
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL
                )
            )
        self._await(lambda: self._replicas_seen() >= 1 and self._sentinels_seen() >= 2)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def primary_port(self) -> int:
        addr = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(
            self.service
        )
        return int(addr[1])

    def _replicas_seen(self) -> int:
        try:
            info = redis.Redis(port=self.primary.port).info("replication")
            return int(info.get("connected_slaves", 0))
        except redis.exceptions.ConnectionError:
            return 0

    def _sentinels_seen(self) -> int:
        try:
            master = redis.Redis(port=self.sentinel_ports[0]).sentinel_master(self.service)
            return int(master.get("num-other-sentinels", 0))
        except redis.exceptions.ConnectionError:
            return 0

    @staticmethod
    def _await(check: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise AssertionError("the sentinel group did not come up")

    def close(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.primary.kill()
        self.replica.kill()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is free too."""
    for _ in range(100):
        port = random.randrange(20000, 30000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class RedisClusterGroup:
    """A Redis Cluster of three primaries with one replica each (`redis-cli --cluster
    create`), its nodes' files in `directory`. A node can be killed to make its replica
    take over."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-cli") is None:
            pytest.fail("this test creates a Redis Cluster: install Redis (redis-cli)")
        self.dir = directory
        self.ports = [_cluster_port() for _ in range(6)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self._start(port)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
        )
        if created.returncode != 0:
            self.close()
            raise AssertionError(f"redis-cli --cluster create failed: {created.stdout!r}")
        self.await_ok()

    def _start(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                redis.Redis(port=port).ping()
                return
            time.sleep(0.05)
        raise AssertionError("a cluster node did not start")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])

    def primaries(self) -> list[int]:
        """The ports of the primaries, as a live node sees them."""
        for port in self.procs:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                lines = redis.Redis(port=port).execute_command("CLUSTER", "NODES")
                text = lines.decode() if isinstance(lines, bytes) else str(lines)
                return sorted(
                    int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    for fields in (line.split() for line in text.splitlines())
                    if "master" in fields[2] and "fail" not in fields[2]
                )
        raise AssertionError("no cluster node answers")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def await_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok (all slots served)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for port in self.procs:
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    states.append(redis.Redis(port=port).cluster("INFO")["cluster_state"])
            if states and all(state == "ok" for state in states) and len(self.primaries()) == 3:
                return
            time.sleep(0.2)
        raise AssertionError("the Redis Cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs.clear()
