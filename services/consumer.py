"""One consumer loop for the pipeline's workers (rollout: jobs -> rollouts, reward: rollouts -> graded).

Per batch: read (re-claiming what dead consumers left) -> ack duplicates (the done mark of the item's
job id is set) and stale work (from a learner incarnation that has since restarted) -> dead-letter
what the stage rejects -> process the rest -> publish each output and ack its input atomically
(`Queues.finish_many`: a redelivered item is processed again at worst, but published once).

Stopping: SIGTERM/SIGINT set the worker's StopFlag; the loop checks it between batches (reads time
out every ~0.5 s). A stop that arrives while a batch is in hand abandons the batch: while it is being
processed the signal interrupts the processing at once (`StopRequested`, main thread only), and nothing
of the batch is acked or published; its messages stay pending and another consumer re-claims them
after `claim_idle_s`. Why not finish it: the launcher signals the whole process group, so the
sandboxes or the engine child doing the work may be dying too, and half-done results would look real.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Protocol

from shared.schemas import WireModel

from .procs import Health, StopFlag
from .queues import Delivery, Heartbeat, QueueError, Queues, parse_policy_tag, parse_wire_id

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal interrupted a batch (BaseException: library `except Exception` must not eat it)."""


class Stage(Protocol):
    """What a worker adds to the loop. Items carry a `job_id` (the idempotency key of the hand-off)."""

    group: str  # consumer group on `source`, also the stage name of the done marks
    source: str  # input stream
    sink: str  # output stream
    item: type[WireModel]  # schema of the input messages
    stats: dict  # the loop adds to "duplicates", "stale" and, for rejected items, "failed"

    def reject(self, item) -> str | None:
        """Why `item` can never be processed (it is dead-lettered with this reason), or None."""

    def process(self, items: list) -> list[WireModel]:
        """One output per item, in item order."""

    def count(self, items: list, outputs: list, fresh: list[bool]) -> None:
        """Book a published batch in `stats` (fresh[i]: output i was new, not a duplicate)."""


@contextlib.contextmanager
def interruptible(stop: StopFlag) -> Iterator[None]:
    """Inside, a stop signal also raises StopRequested in the main thread (after the StopFlag's own
    handling, which sets the flag). Elsewhere, or without installed Python handlers, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    if not all(callable(h) for h in before.values()):  # no StopFlag installed: the default action stands
        yield
        return

    def handler(signum, frame):
        before[signum](signum, frame)
        raise StopRequested(signal.Signals(signum).name)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


class Consumer:
    """Runs a Stage over its source stream until the StopFlag is set."""

    def __init__(self, stage: Stage, queues: Queues, log: logging.Logger, consumer: str, batch: int,
                 stop: StopFlag, service: str):
        self.stage, self.q, self.log = stage, queues, log
        self.consumer, self.batch, self.stop, self.service = consumer, batch, stop, service
        self.abandoned = 0  # messages left unacked by a stop mid-batch

    def run(self) -> None:
        health = Health(self.service)
        with Heartbeat(self.q, self.stage.source, self.stage.group, self.consumer) as hb:
            while not self.stop:
                health.beat()
                self.step_once(hb)

    def step_once(self, hb: Heartbeat | None = None) -> int:
        """One batch; returns how many items were processed (0 when nothing came or it was abandoned)."""
        st = self.stage
        deliveries = self.q.read(st.source, st.group, self.consumer, st.item, count=self.batch)
        if not deliveries:
            return 0
        if hb is not None:
            hb.ids = [d.msg_id for d in deliveries]
        try:
            return self._handle(deliveries)
        except StopRequested:
            return self._abandon(deliveries)
        except QueueError:
            if not self.stop:  # a real queue failure (redis gone), not a stop during backpressure
                raise
            return self._abandon(deliveries)
        finally:
            if hb is not None:
                hb.ids = []

    def _handle(self, deliveries: list[Delivery]) -> int:
        st, q = self.stage, self.q
        if self.stop:
            raise StopRequested("before processing")
        current_inc = parse_policy_tag(q.policy_tag())[0]
        todo, skip = [], []
        for d, done in zip(deliveries, q.done_flags(st.group, [d.item.job_id for d in deliveries])):
            if done:
                st.stats["duplicates"] += 1
                skip.append(d)
            elif parse_wire_id(d.item.job_id)[1] < current_inc:  # from a learner that has since restarted
                st.stats["stale"] += 1
                skip.append(d)
            elif (reason := st.reject(d.item)) is not None:  # can never be processed: dead-letter it now
                st.stats["failed"] += 1
                q.dead_letter(d, st.group, reason, job_id=d.item.job_id)
            else:
                todo.append(d)
        q.ack_many(skip, st.group)
        if not todo:
            return 0
        items = [d.item for d in todo]
        with interruptible(self.stop):
            outputs = st.process(items)
        if self.stop:  # the stop came while processing (in a thread, or just as it ended): publish nothing
            raise StopRequested("after processing")
        q.wait_for_room(st.sink, len(todo))
        fresh = q.finish_many([(d, d.item.job_id, [(st.sink, out)]) for d, out in zip(todo, outputs)],
                              st.group, st.group)
        st.stats["duplicates"] += len(fresh) - sum(fresh)
        st.count(items, outputs, fresh)
        return len(todo)

    def _abandon(self, deliveries: list[Delivery]) -> int:
        self.abandoned += len(deliveries)
        self.log.info("stop requested mid-batch: %d message(s) left unacked for another consumer",
                      len(deliveries))
        return 0
