"""Prometheus metrics of one node, in a registry of its own (served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Fan-out latency buckets: sub-millisecond to seconds, dense where broadcast latency lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "roomcast_connections", "Open WebSocket connections", ["dialect"], registry=r
        )
        self.rooms = Gauge("roomcast_rooms", "Rooms with at least one local member", registry=r)
        self.messages_in = Counter(
            "roomcast_messages_in", "Client frames received", ["type"], registry=r
        )
        self.messages_out = Counter(
            "roomcast_messages_out", "Frames queued to clients by fan-out", registry=r
        )
        self.publications = Counter(
            "roomcast_publications", "Messages accepted and published by this node", registry=r
        )
        self.errors = Counter(
            "roomcast_errors", "Error envelopes and error closes sent", ["code"], registry=r
        )
        self.closes = Counter(
            "roomcast_closes", "Connections closed, by close code", ["code"], registry=r
        )
        self.fanout_latency = Histogram(
            "roomcast_fanout_latency_seconds",
            "Publish time to the moment this node queued the frame to its members",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.gaps = Counter(
            "roomcast_gaps",
            "Stored publications missing on this node (offset skipped or subscription lost): "
            "refilled from history, or lost and the members told (gap event)",
            ["outcome"], registry=r,
        )
        self.resubscribes = Counter(
            "roomcast_pubsub_resubscribes",
            "Times the Redis pub/sub connection was made again and every room resubscribed",
            registry=r,
        )
        self.broker_up = Gauge(
            "roomcast_broker_up", "1 while the fan-out backend is reachable", registry=r
        )
        self.ready = Gauge("roomcast_ready", "1 while accepting connections", registry=r)
        self.presence_left_suppressed = Counter(
            "roomcast_presence_left_suppressed",
            "user_left events about a user connected on this node, not shown to its members "
            "(a peer reaped this node while it was paused)", registry=r,
        )
        self.typing_dropped = Counter(
            "roomcast_typing_dropped",
            "Typing events not relayed: within --typing-interval of the last one relayed for the "
            "same connection and room, or over the typing frame budget", registry=r,
        )
        self.handshakes_refused = Counter(
            "roomcast_handshakes_refused",
            "WebSocket handshakes answered with an HTTP error instead of an upgrade, by reason: "
            "unauthorized, origin, node_full, address_full, handshake_rate, draining, bad_request",
            ["reason"], registry=r,
        )
        self.auth_failures = Counter(
            "roomcast_auth_failures",
            "Tokens refused (handshake, connect frame, refresh, room token), by reason: invalid, "
            "expired, unavailable", ["reason"], registry=r,
        )
        self.api_requests = Counter(
            "roomcast_api_requests",
            "Server API requests answered, by method (other: unknown) and HTTP status",
            ["method", "status"], registry=r,
        )
        self.http_refused = Counter(
            "roomcast_http_refused",
            "Plain HTTP requests on the client port answered with a 4xx before anything was "
            "served (405 method, 413 body, 400 malformed, 431 headers too large), by status",
            ["status"], registry=r,
        )
        self.presence_reannounced = Counter(
            "roomcast_presence_reannounced",
            "Users announced again with user_joined after the cluster had counted them gone",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_redis_errors(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Expose ``source()`` (failures by kind, redis_common.RedisHealth.errors) as the
        counter roomcast_redis_errors_total{kind}, read at each scrape."""
        self.registry.register(_RedisErrors(source))


class _RedisErrors(Collector):
    """roomcast_redis_errors_total{kind}: Redis failures this node saw, by kind."""

    NAME = "roomcast_redis_errors"
    HELP = ("Redis failures seen by this node (commands, the write probe, the pub/sub reader), "
            "by kind: connection, timeout, pool, oom, readonly, misconf, other")

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["kind"])
        for kind, count in self._source().items():
            family.add_metric([kind], count)
        return [family]
