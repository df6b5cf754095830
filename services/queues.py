"""Redis work queues between the services: at-least-once delivery, idempotent hand-off, dead letters,
backpressure, reconnect.

    jobs (PromptJob) --rollout--> rollouts (RolloutGroup) --reward--> graded (GradedGroup) --> learner

Each queue is a Redis stream read through one consumer group per stage (adding workers adds
throughput). A consumer reads with XREADGROUP, and first re-claims (XAUTOCLAIM) messages that some
other consumer left pending for longer than `claim_idle_s` (it died). Long work keeps its claim fresh
with a `Heartbeat`. `finish()` runs one Lua script that - atomically - marks the input id done
(SET NX with a TTL), publishes the outputs only if the mark was new, and acks + deletes the input:
a redelivered item is published at most once. A message delivered more than `max_deliveries` times,
or one that does not parse, goes to the `dlq` stream with the reason. Producers block while a stream
holds `max_queue` messages (acked messages are deleted, so XLEN = waiting + in flight).
All keys live under `rg:<run_id>:` so several runs can share one Redis.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.schemas import SchemaError, WireModel

log = logging.getLogger("queues")
T = TypeVar("T", bound=WireModel)

STREAMS = ("jobs", "rollouts", "graded", "dlq", "policy")
DONE_TTL_S = 7 * 24 * 3600
BULK_READ_SIZE = 4 << 20
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionResetError)

_FINISH_LUA = """
local fresh = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', tonumber(ARGV[3]))
if fresh then
  for i = 3, #KEYS do
    redis.call('XADD', KEYS[i], '*', 'd', ARGV[i + 1])
  end
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if fresh then return 1 else return 0 end
"""


class QueueError(RuntimeError):
    """Redis stayed unreachable past the reconnect deadline, or a queue was misused."""


def default_consumer(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def claim_idle_default() -> float:
    """Seconds a message may sit unacked with its consumer before another consumer takes it over."""
    return float(os.environ.get("RANKGUARD_CLAIM_IDLE_S", "15"))


@dataclass
class Delivery(Generic[T]):
    """One message handed to a consumer; `item` is the parsed message (None when it did not parse)."""

    stream: str
    msg_id: str
    data: bytes
    deliveries: int = 1
    item: T | None = None
    fields: dict = field(default_factory=dict)


class Queues:
    """All of one run's Redis traffic. Every call survives a Redis restart (exponential backoff up to
    `reconnect_s`)."""

    def __init__(self, url: str, run_id: str, *, max_queue: int = 64, max_deliveries: int = 3,
                 claim_idle_s: float | None = None, reconnect_s: float = 120.0, block_ms: int = 500,
                 stop: Callable[[], bool] | None = None):
        self.url, self.run_id = url, run_id
        self.max_queue, self.max_deliveries = max_queue, max_deliveries
        self.claim_idle_s = claim_idle_default() if claim_idle_s is None else claim_idle_s
        self.reconnect_s, self.block_ms = reconnect_s, block_ms
        self.stop = stop or (lambda: False)
        self.prefix = f"rg:{run_id}"
        self.r = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=block_ms / 1000 + 10.0, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
        # policy payloads are MBs: the pure-Python reply parser is ~10x faster with a large read size
        self.r_bulk = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=30.0, socket_read_size=BULK_READ_SIZE,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
        self._finish = self.r.register_script(_FINISH_LUA)
        self._groups: set[tuple[str, str]] = set()
        self.reconnects = 0

    # ---- keys -----------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def done_key(self, stage: str, item_id: str) -> str:
        return f"{self.prefix}:done:{stage}:{item_id}"

    # ---- reconnect wrapper ----------------------------------------------------------------------
    def call(self, fn: Callable, *args, **kwargs):
        """Run one Redis operation; on connection loss retry with exponential backoff (cap 2 s) until
        `reconnect_s` has passed. Consumer groups lost with a non-persisted restart are recreated."""
        deadline, delay, warned = time.monotonic() + self.reconnect_s, 0.05, False
        while True:
            try:
                out = fn(*args, **kwargs)
                if warned:
                    log.warning("redis reachable again")
                return out
            except RETRYABLE as e:
                if time.monotonic() > deadline:
                    raise QueueError(f"redis at {self.url} unreachable for {self.reconnect_s:.0f} s: {e}") from None
                if not warned:
                    log.warning("redis unreachable (%s); reconnecting with backoff", type(e).__name__)
                    warned = True
                    self.reconnects += 1
                time.sleep(delay)
                delay = min(2.0, delay * 2)
            except redis.ResponseError as e:
                # NOGROUP: a restart without the AOF; UNBLOCKED: the stream was deleted under a blocked
                # read (FLUSHALL). Either way the run's keys are gone: recreate the groups and go on (the
                # learner re-requests what was lost, see sources._check_lost).
                if not ("NOGROUP" in str(e) or "UNBLOCKED" in str(e)) or not self._groups:
                    raise
                log.warning("consumer group missing (%s); recreating", str(e).split(" ")[0])
                for stream, group in list(self._groups):
                    self._create_group(stream, group)

    # ---- groups ---------------------------------------------------------------------------------
    def _create_group(self, stream: str, group: str) -> None:
        try:
            self.r.xgroup_create(self.key(stream), group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def ensure_group(self, stream: str, group: str) -> None:
        if (stream, group) not in self._groups:
            self.call(self._create_group, stream, group)
            self._groups.add((stream, group))

    # ---- producing ------------------------------------------------------------------------------
    def backlog(self, stream: str) -> int:
        """Messages waiting or in flight (acked ones are deleted)."""
        return int(self.call(self.r.xlen, self.key(stream)))

    def wait_for_room(self, stream: str, n: int = 1, timeout_s: float | None = None) -> None:
        """Backpressure: block while the stream holds `max_queue` or more messages."""
        t0, delay = time.monotonic(), 0.01
        while self.backlog(stream) + min(n, self.max_queue) > self.max_queue:
            if self.stop():
                raise QueueError("stopped while waiting for queue room")
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise QueueError(f"stream {stream} full ({self.max_queue}) for {timeout_s} s")
            time.sleep(delay)
            delay = min(0.2, delay * 1.5)

    def put(self, stream: str, payload: bytes | WireModel, *, block: bool = True, **fields) -> str:
        data = payload.pack() if isinstance(payload, WireModel) else payload
        if block:
            self.wait_for_room(stream)
        return _s(self.call(self.r.xadd, self.key(stream), {"d": data, **fields}))

    def put_many(self, stream: str, payloads: Iterable[bytes | WireModel], *, block: bool = True) -> list[str]:
        datas = [p.pack() if isinstance(p, WireModel) else p for p in payloads]
        ids = []
        for i in range(0, len(datas), max(1, self.max_queue)):
            chunk = datas[i:i + max(1, self.max_queue)]
            if block:
                self.wait_for_room(stream, len(chunk))

            def _add(chunk=chunk):  # MULTI: a blocked reader sees the whole batch at once, not the first job
                pipe = self.r.pipeline(transaction=True)
                for d in chunk:
                    pipe.xadd(self.key(stream), {"d": d})
                return pipe.execute()

            ids += [_s(x) for x in self.call(_add)]
        return ids

    # ---- consuming ------------------------------------------------------------------------------
    def read(self, stream: str, group: str, consumer: str, cls: type[T], count: int = 1,
             block_ms: int | None = None) -> list[Delivery[T]]:
        """Up to `count` messages: first ones re-claimed from dead consumers, else new ones (blocks up
        to `block_ms`). Unparseable or over-delivered messages go to the DLQ and are not returned."""
        self.ensure_group(stream, group)
        raw = self._claim_stale(stream, group, consumer, count)
        if not raw:
            block = self.block_ms if block_ms is None else block_ms
            resp = self.call(self.r.xreadgroup, group, consumer, {self.key(stream): ">"}, count=count,
                             block=block if block > 0 else None)
            raw = [(mid, flds, 1) for _, msgs in (resp or []) for mid, flds in msgs]
        out: list[Delivery[T]] = []
        for mid, flds, n in raw:
            d = Delivery(stream=stream, msg_id=_s(mid), data=(flds or {}).get(b"d", b""), deliveries=n,
                         fields={_s(k): v for k, v in (flds or {}).items() if k != b"d"})
            try:
                d.item = cls.unpack(d.data)
            except SchemaError as e:
                self.dead_letter(d, group, f"unparseable {cls.__name__}: {e}")
                continue
            if n > self.max_deliveries:
                self.dead_letter(d, group, f"delivered {n} times (max_deliveries={self.max_deliveries})",
                                 job_id=getattr(d.item, "job_id", None) or _nested_job_id(d.item))
                continue
            out.append(d)
        return out

    def _claim_stale(self, stream: str, group: str, consumer: str, count: int) -> list[tuple]:
        idle_ms = int(self.claim_idle_s * 1000)
        resp = self.call(self.r.xautoclaim, self.key(stream), group, consumer, idle_ms, "0-0", count=count)
        msgs = [(mid, flds) for mid, flds in resp[1] if flds is not None]  # deleted entries come back empty
        if not msgs:
            return []

        def _counts():
            pipe = self.r.pipeline(transaction=False)
            for mid, _ in msgs:
                pipe.xpending_range(self.key(stream), group, min=mid, max=mid, count=1)
            return pipe.execute()

        counts = [(c[0]["times_delivered"] if c else 2) for c in self.call(_counts)]
        log.warning("re-claimed %d message(s) from %s left pending > %.1f s by a dead consumer",
                    len(msgs), stream, self.claim_idle_s)
        return [(mid, flds, n) for (mid, flds), n in zip(msgs, counts)]

    def ack(self, d: Delivery, group: str) -> None:
        def _ack():
            pipe = self.r.pipeline(transaction=True)
            pipe.xack(self.key(d.stream), group, d.msg_id)
            pipe.xdel(self.key(d.stream), d.msg_id)
            return pipe.execute()

        self.call(_ack)

    def is_done(self, stage: str, item_id: str) -> bool:
        return bool(self.call(self.r.exists, self.done_key(stage, item_id)))

    def finish(self, d: Delivery, group: str, stage: str, item_id: str,
               outputs: list[tuple[str, bytes | WireModel]] = (), ttl_s: int = DONE_TTL_S) -> bool:
        """Atomically: mark `item_id` done for `stage`; if it was not done yet publish `outputs`;
        ack + delete the input. Returns False when the item had already been finished (a duplicate)."""
        keys = [self.done_key(stage, item_id), self.key(d.stream)] + [self.key(s) for s, _ in outputs]
        args = [group, d.msg_id, ttl_s] + [p.pack() if isinstance(p, WireModel) else p for _, p in outputs]
        return bool(self.call(self._finish, keys=keys, args=args))

    def ack_many(self, ds: list[Delivery], group: str) -> None:
        if not ds:
            return

        def _ack():
            pipe = self.r.pipeline(transaction=True)
            for d in ds:
                pipe.xack(self.key(d.stream), group, d.msg_id)
                pipe.xdel(self.key(d.stream), d.msg_id)
            return pipe.execute()

        self.call(_ack)

    def done_flags(self, stage: str, item_ids: list[str]) -> list[bool]:
        """is_done for many ids in one round trip."""
        if not item_ids:
            return []

        def _exists():
            pipe = self.r.pipeline(transaction=False)
            for i in item_ids:
                pipe.exists(self.done_key(stage, i))
            return pipe.execute()

        return [bool(x) for x in self.call(_exists)]

    def finish_many(self, items: list[tuple[Delivery, str, list[tuple[str, bytes | WireModel]]]], group: str,
                    stage: str, ttl_s: int = DONE_TTL_S) -> list[bool]:
        """`finish` for a batch in one round trip: [(delivery, item_id, outputs)] -> fresh flags."""
        if not items:
            return []

        def _run():
            pipe = self.r.pipeline(transaction=False)
            for d, item_id, outputs in items:
                keys = [self.done_key(stage, item_id), self.key(d.stream)] + [self.key(s) for s, _ in outputs]
                args = [group, d.msg_id, ttl_s] + [p.pack() if isinstance(p, WireModel) else p for _, p in outputs]
                self._finish(keys=keys, args=args, client=pipe)
            return pipe.execute()

        return [bool(x) for x in self.call(_run)]

    def dead_letter(self, d: Delivery, group: str, reason: str, job_id: str | None = None) -> None:
        log.error("dead-letter %s %s: %s", d.stream, d.msg_id, reason)
        fields = {"d": d.data, "stream": d.stream, "msg_id": d.msg_id, "reason": reason,
                  "deliveries": d.deliveries}
        if job_id:
            fields["job_id"] = job_id

        def _dlq():
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(self.key("dlq"), fields)
            pipe.xack(self.key(d.stream), group, d.msg_id)
            pipe.xdel(self.key(d.stream), d.msg_id)
            return pipe.execute()

        self.call(_dlq)

    def dead_letters(self, after: str = "0-0", count: int = 100) -> list[tuple[str, dict]]:
        """DLQ entries newer than `after`: (id, {stream, msg_id, reason, deliveries, job_id?, d})."""
        resp = self.call(self.r.xrange, self.key("dlq"), min=f"({after}" if after != "0-0" else "-", count=count)
        return [(_s(mid), {_s(k): (v if k == b"d" else _s(v)) for k, v in flds.items()}) for mid, flds in resp]

    def heartbeat(self, stream: str, group: str, consumer: str, msg_ids: list[str]) -> None:
        """Reset the idle time of our in-flight messages (XCLAIM JUSTID does not count a delivery)."""
        if msg_ids:
            self.call(self.r.xclaim, self.key(stream), group, consumer, 0, msg_ids, justid=True)

    def pending_count(self, stream: str, group: str) -> int:
        try:
            return int(self.call(self.r.xpending, self.key(stream), group)["pending"])
        except redis.ResponseError:
            return 0

    def trim(self, streams: Iterable[str]) -> None:
        """Drop every message of these streams (groups stay); used when a new learner incarnation starts."""
        def _trim():
            pipe = self.r.pipeline(transaction=True)
            for s in streams:
                pipe.xtrim(self.key(s), maxlen=0, approximate=False)
            return pipe.execute()

        self.call(_trim)

    # ---- policy versions ------------------------------------------------------------------------
    def publish_policy(self, tag: str, data: bytes) -> None:
        """Store the latest DeltaSUpdate bytes under one key with its tag, and notify (pubsub + stream)."""
        def _pub():
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.key("policy:delta"), data)
            pipe.set(self.key("policy:tag"), tag)
            pipe.publish(self.key("policy:events"), tag)
            pipe.xadd(self.key("policy"), {"tag": tag, "bytes": len(data)}, maxlen=100, approximate=True)
            return pipe.execute()

        self.call(_pub)

    def policy_tag(self) -> str | None:
        tag = self.call(self.r.get, self.key("policy:tag"))
        return _s(tag) if tag is not None else None

    def fetch_policy(self) -> tuple[str | None, bytes | None]:
        def _get():
            pipe = self.r_bulk.pipeline(transaction=True)
            pipe.get(self.key("policy:tag"))
            pipe.get(self.key("policy:delta"))
            return pipe.execute()

        tag, data = self.call(_get)
        return (_s(tag) if tag is not None else None), data

    def wait_policy(self, timeout_s: float, stop: Callable[[], bool] | None = None) -> str | None:
        """Block until a policy tag exists (a fresh run's learner has not published yet)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            tag = self.policy_tag()
            if tag is not None or (stop and stop()):
                return tag
            time.sleep(0.05)
        return None

    def incr(self, name: str) -> int:
        return int(self.call(self.r.incr, self.key(name)))

    def get_int(self, name: str, default: int = 0) -> int:
        v = self.call(self.r.get, self.key(name))
        return int(v) if v is not None else default

    def close(self) -> None:
        try:
            self.r.close()
            self.r_bulk.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


class Heartbeat:
    """Background thread keeping this consumer's in-flight messages claimed while it works on them."""

    def __init__(self, q: Queues, stream: str, group: str, consumer: str):
        self.q, self.stream, self.group, self.consumer = q, stream, group, consumer
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{stream}")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        period = max(0.1, self.q.claim_idle_s / 3)
        while not self._stop.wait(period):
            try:
                self.q.heartbeat(self.stream, self.group, self.consumer, list(self.ids))
            except Exception as e:  # noqa: BLE001 - a missed beat only risks a duplicate, which is harmless
                log.debug("heartbeat failed: %s", e)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _nested_job_id(item) -> str | None:
    grp = getattr(item, "group", None)
    return getattr(grp, "job_id", None)


# ---- run-level helpers ------------------------------------------------------------------------------
REDIS_URL_ENV, RUN_ID_ENV = "RANKGUARD_REDIS_URL", "RANKGUARD_RUN_ID"


def run_id_for(run_dir: str) -> str:
    """Key namespace of a run: $RANKGUARD_RUN_ID, else the run dir as given (stable across --resume)."""
    env = os.environ.get(RUN_ID_ENV)
    if env:
        return env
    return os.path.normpath(run_dir).strip("/").replace(" ", "_") or "default"


def redis_url_for(cfg, override: str | None = None) -> str:
    url = override or os.environ.get(REDIS_URL_ENV) or cfg.pipeline.redis_url
    if not url:
        raise QueueError(f"no redis url: set pipeline.redis_url, ${REDIS_URL_ENV} or --redis-url "
                         "(`rankguard up` starts a private redis and passes it)")
    return url


def queues_for(cfg, redis_url: str | None = None, run_id: str | None = None, **kw) -> Queues:
    return Queues(redis_url_for(cfg, redis_url), run_id or run_id_for(cfg.run_dir),
                  max_queue=cfg.pipeline.max_queue, max_deliveries=cfg.pipeline.max_deliveries,
                  claim_idle_s=cfg.pipeline.claim_idle_s, **kw)


def wire_job_id(job_id: str, incarnation: int, attempt: int = 0) -> str:
    """The id a job travels under: `<job_id>@<learner incarnation>.<attempt>`. A re-requested job gets
    a new attempt (fresh idempotency keys); a restarted learner a new incarnation (old work is ignored)."""
    return f"{job_id}@{incarnation}.{attempt}"


def parse_wire_id(wire_id: str) -> tuple[str, int, int]:
    """Inverse of wire_job_id; ids without the suffix parse as incarnation 0, attempt 0."""
    base, sep, tail = wire_id.rpartition("@")
    if not sep:
        return wire_id, 0, 0
    inc, _, attempt = tail.partition(".")
    try:
        return base, int(inc), int(attempt or 0)
    except ValueError:
        return wire_id, 0, 0


def policy_tag(incarnation: int, version: int) -> str:
    return f"{incarnation}:{version}"


def parse_policy_tag(tag: str | None) -> tuple[int, int]:
    if not tag:
        return -1, -1
    inc, _, ver = tag.partition(":")
    return int(inc), int(ver)
