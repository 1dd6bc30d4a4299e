import json
import unittest

import redis
import redis.asyncio

from aiq_client import AddResult, AiqBulkEnqueueError, AiqEnqueueError, AsyncAiqQueue

from .fixtures import ORG, command_calls, fresh_prefix, llm, vision
from .redis_server import ModuleServer

server = ModuleServer()
setUpModule, tearDownModule = server.start, server.stop


class AsyncQueueTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.r = server.client(decode_responses=True)
        self.conn = redis.asyncio.Redis.from_url(server.url)
        self.q = AsyncAiqQueue(self.conn, prefix=fresh_prefix("a"))

    async def asyncTearDown(self):
        close = getattr(self.conn, "aclose", None) or self.conn.close  # aclose: redis-py >= 5.0.1
        await close()
        self.r.close()

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


if __name__ == "__main__":
    unittest.main()
