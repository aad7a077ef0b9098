"""redis-py clients for CONVEYOR_REDIS_URL, in the forms users already write.

- ``redis://[user:password@]host:port/db``, ``unix:///path?db=N``;
- ``rediss://...`` for TLS, with redis-py's query options honoured on every connection:
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``required``,
  ``optional``, ``none``), ``ssl_check_hostname``;
- ``redis+sentinel://[user:password@]host:26379,host2:26379/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the sentinels and the data nodes): the primary that the
  sentinels name for ``service``, found again after a failover. ``sentinel_username`` and
  ``sentinel_password`` in the query authenticate to the sentinels; the URL's own user and
  password are the data nodes'.
- ``redis+cluster://[user:password@]host:6379,host2:6379`` (or ``rediss+cluster://`` with
  the same ``ssl_*`` options): a Redis Cluster found from any of those nodes, its slots
  followed through resharding and failover. A cluster has only database 0.

Every connection has the connect timeout, TCP keepalive and a health check of an idle
connection before use; commands have ``redis_timeout`` (the hot path's batcher bounds
whole batches instead, see batcher.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from .errors import ConfigurationError
from .settings import Settings, redact

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# One client type for the code that takes either (the two share the commands used).
Redis = aioredis.Redis | RedisCluster
# Seconds a pooled connection may sit idle before it is checked with a PING on next use:
# a connection that went half-open meanwhile is replaced instead of failing a command.
HEALTH_CHECK_INTERVAL = 30


def redis_client(
    settings: Settings, *, max_connections: int | None = None, client_name: str | None = None
) -> Redis:
    """The client for everything but the hot path's batches."""
    return _client(settings, settings.redis_timeout, max_connections, client_name)


def hot_path_client(settings: Settings) -> Redis:
    """The batcher's client: no timer per reply, the batcher bounds each batch."""
    return _client(settings, None, None, None)


def _client(
    settings: Settings,
    socket_timeout: float | None,
    max_connections: int | None,
    client_name: str | None,
) -> Redis:
    url = settings.redis_url
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
    if client_name is not None:
        options["client_name"] = client_name
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in SENTINEL_SCHEMES:
            return _sentinel_primary(url, options, settings.redis_timeout)
        if scheme in CLUSTER_SCHEMES:
            return _cluster(url, options)
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "the scheme must be redis://, rediss://, unix://, redis+sentinel://, "
                "rediss+sentinel://, redis+cluster:// or rediss+cluster://"
            )
        return aioredis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigurationError(f"CONVEYOR_REDIS_URL={redact(url)!r}: {exc}") from exc


def _sentinel_primary(url: str, options: dict[str, Any], timeout: float) -> aioredis.Redis:
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = [_host_port(entry) for entry in hostlist.split(",") if entry]
    if not sentinels:
        raise ValueError("name at least one sentinel as host:port")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /service or /service/db (the monitored primary)")
    service = unquote(path[0])
    db = _int("db", path[1]) if len(path) == 2 else 0
    query = dict(parse_qsl(parts.query))
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_keepalive": True,
    }
    for name in ("sentinel_username", "sentinel_password"):
        if name in query:
            sentinel_options[name.removeprefix("sentinel_")] = query.pop(name)
    node_options = dict(options, db=db)
    if user:
        node_options["username"] = unquote(user)
    if password:
        node_options["password"] = unquote(password)
    tls, query = _tls(parts.scheme, query)
    node_options.update(tls)
    sentinel_options.update(tls)
    if query:
        raise ValueError(f"unknown option(s) {', '.join(sorted(query))} in the query")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs=sentinel_options, **node_options
    )
    primary: aioredis.Redis = sentinel.master_for(service, redis_class=aioredis.Redis)
    return primary


def _cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = [_host_port(entry, 6379) for entry in hostlist.split(",") if entry]
    if not nodes:
        raise ValueError("name at least one node of the cluster as host:port")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0: leave the path empty")
    query = dict(parse_qsl(parts.query))
    cluster_options = dict(options)
    if user:
        cluster_options["username"] = unquote(user)
    if password:
        cluster_options["password"] = unquote(password)
    tls, query = _tls(parts.scheme, query)
    cluster_options.update(tls)
    if query:
        raise ValueError(f"unknown option(s) {', '.join(sorted(query))} in the query")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes], **cluster_options
    )


def _tls(scheme: str, query: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The TLS options of a rediss+... URL's query, and the rest of the query."""
    if not scheme.lower().startswith("rediss"):
        return {}, query
    tls: dict[str, Any] = {"ssl": True}
    for name, value in query.items():
        if name == "ssl_check_hostname":
            tls[name] = value.lower() in ("1", "true", "yes")
        elif name.startswith("ssl_"):
            tls[name] = value
    return tls, {k: v for k, v in query.items() if not k.startswith("ssl_")}


def _host_port(entry: str, default_port: int = 26379) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    if not host:
        return entry, default_port
    return host.strip("[]"), _int("port", port)


def _int(what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
