"""Queue semantics against a real private redis-server: ack, claim, DLQ, idempotency, backpressure,
malformed messages, reconnect across a restart, policy publish/fetch."""
import threading
import time

import pytest

from services.queues import Heartbeat, QueueError, Queues
from services.redis_server import RedisServer
from shared.schemas import PromptJob, RolloutGroup, SamplingParams


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


_runs = iter(range(10_000))


@pytest.fixture
def q(server):
    qs = Queues(server.url, f"t{next(_runs)}", max_queue=4, max_deliveries=2, claim_idle_s=0.2, block_ms=50)
    yield qs
    qs.close()


def job(i: int, **kw) -> PromptJob:
    return PromptJob(job_id=f"j{i}", step=0, problem_id=f"p{i}", prompt_text="x", prompt_ids=[1, 2],
                     sampling=SamplingParams(n=2), **kw)


def group(job_id: str) -> RolloutGroup:
    return RolloutGroup(job_id=job_id, step=0, problem_id="p", policy_version=0, prompt_ids=[1], completions=[])


def test_put_read_ack_deletes(q):
    q.put("jobs", job(1))
    q.put("jobs", job(2))
    got = q.read("jobs", "rollout", "c1", PromptJob, count=10)
    assert [d.item.job_id for d in got] == ["j1", "j2"]
    assert q.backlog("jobs") == 2 and q.pending_count("jobs", "rollout") == 2
    q.ack(got[0], "rollout")
    assert q.backlog("jobs") == 1 and q.pending_count("jobs", "rollout") == 1
    assert q.read("jobs", "rollout", "c1", PromptJob, count=10) == []  # nothing new


def patient(q: Queues) -> Queues:
    """A second view of `q`'s run that re-claims only after 60 s: "not idle long enough yet" without
    racing q's 0.2 s threshold on a busy machine."""
    return Queues(q.url, q.run_id, max_queue=4, max_deliveries=2, claim_idle_s=60, block_ms=50)


def test_dead_consumer_work_is_reclaimed_then_dead_lettered(q):
    q.put("jobs", job(7))
    first = q.read("jobs", "rollout", "dead", PromptJob)
    assert first[0].deliveries == 1
    assert patient(q).read("jobs", "rollout", "alive", PromptJob) == []  # not idle long enough yet
    time.sleep(0.3)  # > q's claim_idle_s: a lower bound, always true after the sleep
    again = q.read("jobs", "rollout", "alive", PromptJob)
    assert [d.item.job_id for d in again] == ["j7"] and again[0].deliveries == 2
    time.sleep(0.3)  # "alive" died too: third delivery > max_deliveries=2 -> DLQ
    assert q.read("jobs", "rollout", "third", PromptJob) == []
    dlq = q.dead_letters()
    assert len(dlq) == 1
    assert dlq[0][1]["reason"] == "delivered 3 times (max_deliveries=2)"
    assert dlq[0][1]["job_id"] == "j7" and dlq[0][1]["stream"] == "jobs"
    assert q.backlog("jobs") == 0 and q.pending_count("jobs", "rollout") == 0


def test_heartbeat_keeps_claim(q):
    """The holder beats every 0.1 s; a thief that re-claims after 2 s idle finds nothing while the
    heartbeat runs (a 2 s stall of the beat thread would be needed to flake), and takes the message
    once the heartbeat has stopped and 2 s have passed."""
    q.put("jobs", job(3))
    d = q.read("jobs", "rollout", "slow", PromptJob)[0]
    thief = Queues(q.url, q.run_id, max_queue=4, max_deliveries=2, claim_idle_s=2.0, block_ms=50)
    beats = []
    beat = q.heartbeat
    q.heartbeat = lambda *a: (beats.append(a), beat(*a))[1]
    with Heartbeat(q, "jobs", "rollout", "slow") as hb:
        hb.ids.append(d.msg_id)
        time.sleep(2.5)  # > the thief's claim_idle_s
        assert thief.read("jobs", "rollout", "thief", PromptJob) == []
    assert beats and all(a[-1] == [d.msg_id] for a in beats)
    time.sleep(2.1)
    assert [x.item.job_id for x in thief.read("jobs", "rollout", "thief", PromptJob)] == ["j3"]
    thief.close()


def test_malformed_message_goes_to_dlq_with_reason(q):
    q.put("jobs", b"\xc1 not msgpack")
    q.put("jobs", group("g1").pack())  # valid msgpack, wrong schema
    q.put("jobs", job(4))
    got = q.read("jobs", "rollout", "c", PromptJob, count=10)
    assert [d.item.job_id for d in got] == ["j4"]
    reasons = [f["reason"] for _, f in q.dead_letters()]
    assert len(reasons) == 2
    assert reasons[0].startswith("unparseable PromptJob: not msgpack")
    assert reasons[1].startswith("unparseable PromptJob: PromptJob: field ")
    assert q.pending_count("jobs", "rollout") == 1  # only the good one is in flight


def test_finish_is_idempotent(q):
    q.put("jobs", job(5))
    d1 = q.read("jobs", "rollout", "a", PromptJob)[0]
    # a slow consumer's message gets redelivered to a second one; both finish it
    time.sleep(0.3)
    d2 = q.read("jobs", "rollout", "b", PromptJob)[0]
    assert d1.msg_id == d2.msg_id
    assert q.finish(d2, "rollout", "rollout", "j5", [("rollouts", group("j5"))]) is True
    assert q.finish(d1, "rollout", "rollout", "j5", [("rollouts", group("j5"))]) is False
    out = q.read("rollouts", "reward", "r", RolloutGroup, count=10)
    assert [d.item.job_id for d in out] == ["j5"]  # published once
    assert q.is_done("rollout", "j5") and not q.is_done("rollout", "j6")
    assert q.backlog("jobs") == 0


def test_backpressure_blocks_producer_until_consumed(q):
    for i in range(4):
        q.put("jobs", job(i))
    done = threading.Event()

    def produce():
        q.put("jobs", job(99))
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.3)
    assert not done.is_set() and q.backlog("jobs") == 4
    got = q.read("jobs", "rollout", "c", PromptJob, count=1)
    q.ack(got[0], "rollout")
    t.join(60)  # hang guard only
    assert done.is_set() and q.backlog("jobs") == 4
    with pytest.raises(QueueError, match="full"):
        q.wait_for_room("jobs", timeout_s=0.1)


def test_runs_are_namespaced(server):
    a = Queues(server.url, "runA", block_ms=10)
    b = Queues(server.url, "runB", block_ms=10)
    a.put("jobs", job(1))
    assert b.read("jobs", "rollout", "c", PromptJob) == []
    assert a.read("jobs", "rollout", "c", PromptJob)[0].item.job_id == "j1"


def test_policy_publish_fetch(q):
    assert q.policy_tag() is None
    q.publish_policy("1:0", b"\x00" * 12)
    q.publish_policy("1:1", b"\x01" * 12)
    assert q.fetch_policy() == ("1:1", b"\x01" * 12)


def test_survives_redis_restart(tmp_path):
    srv = RedisServer(tmp_path / "r")
    srv.start()
    q = Queues(srv.url, "restart", block_ms=50, claim_idle_s=60, reconnect_s=20)
    try:
        q.put("jobs", job(1))
        d = q.read("jobs", "rollout", "c", PromptJob)[0]  # in flight when redis goes down
        q.put("jobs", job(2))
        srv.stop()
        out = []
        reader = threading.Thread(target=lambda: out.extend(q.read("jobs", "rollout", "c", PromptJob, count=10,
                                                                   block_ms=50)))
        reader.start()  # blocks through the outage
        time.sleep(0.5)
        srv.start()  # back on the same port half a second later (from this thread: PDEATHSIG is per thread)
        reader.join(20)
        got = out
        assert q.reconnects >= 1
        assert [x.item.job_id for x in got] == ["j2"]  # AOF kept the queue and the group
        assert q.pending_count("jobs", "rollout") == 2  # and the pending list
        assert q.finish(d, "rollout", "rollout", "j1", [("rollouts", group("j1"))])  # script reloaded
    finally:
        q.close()
        srv.stop()


def test_group_recreated_when_redis_lost_it(q):
    q.put("jobs", job(1))
    assert [d.item.job_id for d in q.read("jobs", "rollout", "c", PromptJob)] == ["j1"]
    q.r.flushall()  # a restart without persistence: streams and groups are gone
    q.put("jobs", job(2))
    assert [d.item.job_id for d in q.read("jobs", "rollout", "c", PromptJob)] == ["j2"]


def test_wire_ids_round_trip():
    from services.queues import parse_policy_tag, parse_wire_id, policy_tag, wire_job_id

    assert parse_wire_id(wire_job_id("vanilla-s0-train3-1", 2, 1)) == ("vanilla-s0-train3-1", 2, 1)
    assert parse_wire_id("plain") == ("plain", 0, 0)
    assert parse_policy_tag(policy_tag(3, 17)) == (3, 17) and parse_policy_tag(None) == (-1, -1)


def test_batched_finish_done_flags_and_ack(q):
    for i in range(3):
        q.put("jobs", job(i))
    ds = q.read("jobs", "rollout", "a", PromptJob, count=10)
    assert q.done_flags("rollout", ["j0", "j1", "j2"]) == [False, False, False]
    assert q.finish(ds[1], "rollout", "rollout", "j1", [("rollouts", group("j1"))])  # j1 done alone
    fresh = q.finish_many([(d, d.item.job_id, [("rollouts", group(d.item.job_id))]) for d in ds], "rollout", "rollout")
    assert fresh == [True, False, True]
    assert q.done_flags("rollout", ["j0", "j1", "j2", "j3"]) == [True, True, True, False]
    out = q.read("rollouts", "reward", "r", RolloutGroup, count=10)
    assert sorted(d.item.job_id for d in out) == ["j0", "j1", "j2"]  # each published once
    q.ack_many(out, "reward")
    assert q.backlog("rollouts") == 0 and q.backlog("jobs") == 0
