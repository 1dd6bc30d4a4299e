import json
import unittest

import redis
import redis.asyncio

import asyncio

from aiq_client import AddResult, AiqBulkEnqueueError, AiqEnqueueError, AiqJobNotFound, AiqTimeout, AsyncAiqQueue

from .fixtures import ORG, RESULT, blocked_readers, command_calls, fresh_prefix, llm, vision, write_outcome, xadd_event
from .redis_server import ModuleServer

server = ModuleServer()
setUpModule, tearDownModule = server.start, server.stop


class AsyncQueueCase(unittest.IsolatedAsyncioTestCase):
    """A test with a fresh queue on a redis.asyncio client (self.q) and a sync client (self.r)."""

    tag = "a"

    async def asyncSetUp(self):
        self.r = server.client(decode_responses=True)
        self.conn = redis.asyncio.Redis.from_url(server.url)
        self.q = AsyncAiqQueue(self.conn, prefix=fresh_prefix(self.tag))

    async def asyncTearDown(self):
        close = getattr(self.conn, "aclose", None) or self.conn.close  # aclose: redis-py >= 5.0.1
        await close()
        self.r.close()


class AsyncQueueTest(AsyncQueueCase):

    async def test_add_stores_the_job_and_returns_its_id(self):
        """The async add stores kind, tier, organization and payload and returns the id."""
        job_id, duplicate = await self.q.add("vision.annotate", vision())
        self.assertFalse(duplicate)
        job = self.r.hgetall(self.q.key("job:" + job_id))
        self.assertEqual((job["kind"], job["tier"], job["org"]), ("vision.annotate", "enterprise", ORG))
        self.assertEqual(json.loads(job["payload"]), vision())

    async def test_idempotency_key_and_job_id_reuse_are_duplicates(self):
        """The async add reports a reused idempotency key or job id as a duplicate."""
        a = await self.q.add("llm.complete", llm(), idempotency_key="k1")
        self.assertEqual(await self.q.add("llm.complete", llm(), idempotency_key="k1"), (a.id, True))
        self.assertEqual(await self.q.add("llm.complete", llm(), job_id="mine"), ("mine", False))
        self.assertEqual(await self.q.add("llm.complete", llm(), job_id="mine"), ("mine", True))

    async def test_delay_puts_the_job_in_the_delayed_set(self):
        """The async add puts a delayed job in the delayed set."""
        job_id, _ = await self.q.add("llm.complete", llm(), delay_ms=30_000)
        self.assertIsNotNone(self.r.zscore(self.q.key("delayed"), job_id))

    async def test_a_bad_tier_or_a_tier_mismatch_raises_and_writes_nothing(self):
        """The async add raises on a bad tier or a tier mismatch and writes nothing."""
        with self.assertRaises(AiqEnqueueError) as cm:
            await self.q.add("llm.complete", dict(llm(), tier="platinum"))
        self.assertEqual(str(cm.exception), "ERR aiq: unknown tier platinum")
        before = command_calls(self.r, "evalsha", "eval")
        with self.assertRaises(AiqEnqueueError) as cm:
            await self.q.add("llm.complete", llm(), tier="trial")
        self.assertEqual(cm.exception.source, "client")
        self.assertEqual(command_calls(self.r, "evalsha", "eval"), before)
        self.assertEqual(self.r.keys(self.q.base + "*"), [])

    async def test_add_and_add_bulk_recover_from_noscript_after_script_flush(self):
        """The async add and add_bulk recover from NOSCRIPT after SCRIPT FLUSH."""
        await self.q.add("llm.complete", llm())
        self.r.script_flush()
        await self.q.add("llm.complete", llm())
        self.r.script_flush()
        results = await self.q.add_bulk([{"kind": "llm.complete", "payload": llm()}] * 2)
        self.assertEqual([r.duplicate for r in results], [False, False])
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 4)

    async def test_add_bulk_queues_in_order_and_reports_refusals(self):
        """The async add_bulk queues jobs in order and reports the ones the server refused."""
        results = await self.q.add_bulk(
            [
                {"kind": "llm.complete", "payload": llm(), "opts": {"idempotency_key": "b"}},
                {"kind": "llm.complete", "payload": llm(), "opts": {"idempotency_key": "b"}},
            ]
        )
        self.assertEqual(results[1], (results[0].id, True))
        with self.assertRaises(AiqBulkEnqueueError) as cm:
            await self.q.add_bulk([{"kind": "vision.annotate", "payload": vision()}, {"kind": "nope", "payload": llm()}])
        ok, refused = cm.exception.results
        self.assertIsInstance(ok, AddResult)
        self.assertEqual(str(refused), "ERR aiq: unknown kind nope")


async def until(what, cond, timeout=10.0):
    """Polls a condition until it holds, letting the event loop run between polls."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


class AsyncOutcomesTest(AsyncQueueCase):
    tag = "ao"

    async def test_get_job_of_waiting_delayed_and_unknown_jobs(self):
        """The async get_job says waiting, delayed with its reason and due time, or None."""
        waiting, _ = await self.q.add("llm.complete", llm())
        delayed, _ = await self.q.add("llm.complete", llm(), delay_ms=60_000)
        self.assertEqual((await self.q.get_job(waiting))["state"], "waiting")
        status = await self.q.get_job(delayed)
        self.assertEqual((status["state"], status["delay_reason"]), ("delayed", "scheduled"))
        self.assertEqual(status["due_at"], int(self.r.zscore(self.q.key("delayed"), delayed)))
        self.assertIsNone(await self.q.get_job("nobody"))

    async def test_cancel_of_waiting_and_delayed_jobs(self):
        """The async cancel takes a waiting and a delayed job out of their queues."""
        waiting, _ = await self.q.add("llm.complete", llm())
        delayed, _ = await self.q.add("llm.complete", llm(), delay_ms=60_000)
        self.assertEqual(await self.q.cancel(waiting), "cancelled")
        self.assertEqual(await self.q.cancel(delayed), "cancelled")
        self.assertEqual(await self.q.cancel("nobody"), "not_found")
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 0)
        self.assertEqual(self.r.zcard(self.q.key("delayed")), 0)
        self.assertEqual((await self.q.get_job(delayed))["state"], "cancelled")

    async def test_wait_for_a_finished_job_a_waiting_one_and_an_unknown_id(self):
        """The async wait returns a finished job's status, times out for a waiting one, and says not found."""
        write_outcome(self.r, self.q, "early", "succeeded")
        self.assertEqual((await self.q.wait("early", timeout=10))["result"], RESULT)
        job_id, _ = await self.q.add("llm.complete", llm())
        with self.assertRaises(AiqTimeout) as cm:
            await self.q.wait(job_id, timeout=0.3, block_ms=100)
        self.assertEqual(cm.exception.status["state"], "waiting")
        with self.assertRaises(AiqJobNotFound):
            await self.q.wait("nobody", timeout=60)

    async def test_wait_returns_when_the_terminal_event_arrives(self):
        """The async wait returns when the job's terminal event arrives."""
        job_id, _ = await self.q.add("llm.complete", llm())
        waiting = asyncio.ensure_future(self.q.wait(job_id, timeout=30))
        await until("the waiter blocks", lambda: len(blocked_readers(self.r)) == 1)
        self.r.delete(self.q.key("job:" + job_id))
        write_outcome(self.r, self.q, job_id, "succeeded")
        xadd_event(self.r, self.q, type="succeeded", job_id=job_id, state="succeeded")
        self.assertEqual((await asyncio.wait_for(waiting, 30))["state"], "succeeded")

    async def test_events_after_a_dropped_connection_each_event_once(self):
        """The async events goes on after a killed connection from its last position: each event once."""
        job_id, _ = await self.q.add("llm.complete", llm())
        written = [e[0] for e in self.r.xrange(self.q.key("events"))]
        seen = []

        async def consume():
            async for event in self.q.events(from_id="0", block_ms=1000):
                seen.append(event["id"])
                if len(seen) == 4:
                    return

        consumer = asyncio.ensure_future(consume())
        await until("the first event is read", lambda: len(seen) == 1)
        self.assertEqual(seen, written)
        await until("the reader blocks", lambda: len(blocked_readers(self.r)) == 1)
        [killed] = blocked_readers(self.r)
        self.assertEqual(self.r.client_kill_filter(_id=killed), 1)
        written += [xadd_event(self.r, self.q, type="created", job_id=f"b{i}", state="waiting") for i in range(3)]
        await asyncio.wait_for(consumer, 20)
        self.assertEqual(seen, written)


if __name__ == "__main__":
    unittest.main()
