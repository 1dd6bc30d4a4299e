import json
import unittest

from aiq_client import AddResult, AiqBulkEnqueueError, AiqEnqueueError, AiqQueue, default_script_path

from .fixtures import ORG, OTHER_ORG, QueueCase, command_calls, fresh_prefix, llm, redis_now_ms, vision
from .redis_server import ModuleServer

server = ModuleServer()
setUpModule, tearDownModule = server.start, server.stop


class AddTest(QueueCase):
    server = server

    def queue_keys(self):
        return sorted(self.r.keys(self.q.base + "*"))

    def test_add_returns_an_id_and_stores_kind_tier_org_and_payload_in_the_job_hash(self):
        """add returns a new id and stores kind, tier, organization and payload in the job hash."""
        payload = llm()
        job_id, duplicate = self.q.add("llm.complete", payload)
        self.assertFalse(duplicate)
        self.assertRegex(job_id, r"^j-\d{16}-\d+$")
        job = self.r.hgetall("{%s}:job:%s" % (self.q.prefix, job_id))
        self.assertEqual(job["kind"], "llm.complete")
        self.assertEqual(job["tier"], "growth_team")
        self.assertEqual(job["org"], ORG)
        self.assertEqual(json.loads(job["payload"]), payload)
        self.assertEqual(job["state"], "waiting")
        self.assertEqual(job["max_attempts"], "0")
        self.assertEqual(self.r.lrange(self.q.key(f"wait:growth_team:{ORG}"), 0, -1), [job_id])
        self.assertEqual(self.r.hget(self.q.key("depth"), "growth_team"), "1")

    def test_add_returns_an_add_result_with_named_fields(self):
        """add returns an AddResult whose fields are id and duplicate."""
        result = self.q.add("vision.annotate", vision())
        self.assertIsInstance(result, AddResult)
        self.assertIsInstance(result.id, str)
        self.assertIs(result.duplicate, False)

    def test_the_default_prefix_is_aiq(self):
        """The default prefix is aiq, so jobs go under {aiq}."""
        q = AiqQueue(self.conn)
        self.assertEqual(q.base, "{aiq}")
        job_id, _ = q.add("vision.annotate", vision())
        self.assertEqual(self.r.hget("{aiq}:job:" + job_id, "kind"), "vision.annotate")
        self.r.delete(*self.r.keys("{aiq}*"))

    def test_a_reused_idempotency_key_returns_the_first_id_as_a_duplicate(self):
        """A reused idempotency key returns the first id as a duplicate and queues nothing new."""
        first = self.q.add("llm.complete", llm(), idempotency_key="caption-photo-42")
        second = self.q.add("llm.complete", llm(), idempotency_key="caption-photo-42")
        self.assertEqual(first.duplicate, False)
        self.assertEqual(second, (first.id, True))
        self.assertEqual(self.r.get(self.q.key(f"idem:{ORG}:caption-photo-42")), first.id)
        self.assertTrue(86000 < self.r.ttl(self.q.key(f"idem:{ORG}:caption-photo-42")) <= 86400)
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 1)

    def test_idempotency_keys_are_remembered_for_idempotency_ttl_s(self):
        """Idempotency keys are remembered for idempotency_ttl_s seconds."""
        q = AiqQueue(self.conn, prefix=fresh_prefix(), idempotency_ttl_s=120)
        q.add("llm.complete", llm(), idempotency_key="k")
        self.assertTrue(100 < self.r.ttl(q.key(f"idem:{ORG}:k")) <= 120)

    def test_a_reused_job_id_is_a_duplicate(self):
        """A reused job id is a duplicate and queues nothing new."""
        self.assertEqual(self.q.add("llm.complete", llm(), job_id="photo-42-caption"), ("photo-42-caption", False))
        self.assertEqual(self.q.add("llm.complete", llm(), job_id="photo-42-caption"), ("photo-42-caption", True))
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 1)

    def test_a_delayed_job_goes_to_the_delayed_set(self):
        """A delayed job goes to the delayed set, due after the delay, and not to a wait list."""
        t0 = redis_now_ms(self.r)
        job_id, _ = self.q.add("vision.annotate", vision(), delay_ms=60_000)
        t1 = redis_now_ms(self.r)
        due = self.r.zscore(self.q.key("delayed"), job_id)
        self.assertIsNotNone(due)
        self.assertTrue(t0 + 60_000 <= due <= t1 + 60_000, (t0, due, t1))
        self.assertEqual(self.r.hget(self.q.key("job:" + job_id), "state"), "delayed")
        self.assertEqual(self.r.exists(self.q.key(f"wait:enterprise:{ORG}")), 0)

    def test_max_attempts_is_stored_with_the_job(self):
        """max_attempts is stored with the job."""
        job_id, _ = self.q.add("llm.complete", llm(), max_attempts=3)
        self.assertEqual(self.r.hget(self.q.key("job:" + job_id), "max_attempts"), "3")

    def test_a_tier_equal_to_the_payloads_is_accepted(self):
        """A tier argument equal to the payload's tier is accepted."""
        job_id, _ = self.q.add("llm.complete", llm("trial"), tier="trial")
        self.assertEqual(self.r.hget(self.q.key("job:" + job_id), "tier"), "trial")

    def test_an_unknown_tier_is_refused_with_the_servers_message_and_writes_nothing(self):
        """An unknown tier is refused with the server's message and writes nothing."""
        with self.assertRaises(AiqEnqueueError) as cm:
            self.q.add("llm.complete", dict(llm(), tier="platinum"))
        self.assertEqual(cm.exception.source, "server")
        self.assertEqual(str(cm.exception), "ERR aiq: unknown tier platinum")
        self.assertEqual(self.queue_keys(), [])

    def test_a_tier_that_differs_from_the_payloads_is_refused_before_calling_redis(self):
        """A tier that differs from the payload's is refused before calling Redis."""
        before = command_calls(self.r, "evalsha", "eval", "script|load", "script|exists")
        with self.assertRaises(AiqEnqueueError) as cm:
            self.q.add("llm.complete", llm("growth_team"), tier="enterprise")
        self.assertEqual(cm.exception.source, "client")
        self.assertIn("'enterprise' differs from payload['tier'] 'growth_team'", str(cm.exception))
        self.assertEqual(command_calls(self.r, "evalsha", "eval", "script|load", "script|exists"), before)
        self.assertEqual(self.queue_keys(), [])

    def test_a_payload_without_organization_id_is_refused_before_calling_redis(self):
        """A payload without organization_id is refused before calling Redis."""
        payload = llm()
        del payload["organization_id"]
        with self.assertRaisesRegex(AiqEnqueueError, "organization_id"):
            self.q.add("llm.complete", payload)
        self.assertEqual(self.queue_keys(), [])

    def test_the_scripts_other_refusals_raise_aiq_enqueue_error(self):
        """The script's other refusals raise AiqEnqueueError with the server's message."""
        cases = [
            (lambda: self.q.add("llm.complete", llm("trial", "not-a-uuid")), "ERR aiq: organization_id must be a UUID"),
            (lambda: self.q.add("bogus.kind", llm()), "ERR aiq: unknown kind bogus.kind"),
            (lambda: self.q.add("llm.complete", llm(), delay_ms=-1), "ERR aiq: delay_ms must be >= 0"),
            (lambda: self.q.add("llm.complete", llm(), max_attempts=101), "ERR aiq: max_attempts must be 0..100"),
            (
                lambda: self.q.add("llm.complete", llm(), job_id="has space"),
                "ERR aiq: job_id must be 1-128 characters without spaces or braces",
            ),
        ]
        for call, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(AiqEnqueueError) as cm:
                    call()
                self.assertEqual(str(cm.exception), message)
        self.assertEqual(self.queue_keys(), [])

    def test_add_recovers_from_noscript_after_script_flush(self):
        """add recovers from NOSCRIPT after SCRIPT FLUSH."""
        a, _ = self.q.add("llm.complete", llm())
        self.r.script_flush()
        loads = command_calls(self.r, "script|load")
        b, duplicate = self.q.add("llm.complete", llm())
        self.assertFalse(duplicate)
        self.assertNotEqual(a, b)
        self.assertEqual(command_calls(self.r, "script|load"), loads + 1, "NOSCRIPT should reload the script once")
        self.q.add("llm.complete", llm())
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 3)

    def test_a_client_with_decoded_responses_works_too(self):
        """A client created with decode_responses=True works too."""
        q = AiqQueue(self.r, prefix=fresh_prefix())
        job_id, duplicate = q.add("llm.complete", llm())
        self.assertIsInstance(job_id, str)
        self.assertFalse(duplicate)


class AddBulkTest(QueueCase):
    server = server
    tag = "b"

    def test_add_bulk_queues_every_job_in_order(self):
        """add_bulk queues every job in order in one pipeline."""
        results = self.q.add_bulk(
            [
                {"kind": "llm.complete", "payload": llm()},
                {"kind": "vision.annotate", "payload": vision(), "opts": {"job_id": "v-1"}},
                {"kind": "llm.complete", "payload": llm("trial", OTHER_ORG), "opts": {"idempotency_key": "same"}},
                {"kind": "llm.complete", "payload": llm("trial", OTHER_ORG), "opts": {"idempotency_key": "same"}},
                {"kind": "vision.annotate", "payload": vision(), "opts": {"delay_ms": 5000}},
            ]
        )
        self.assertEqual([r.duplicate for r in results], [False, False, False, True, False])
        self.assertEqual(results[1].id, "v-1")
        self.assertEqual(results[3].id, results[2].id)
        self.assertEqual(self.r.hget(self.q.key("job:" + results[0].id), "kind"), "llm.complete")
        self.assertEqual(self.r.lrange(self.q.key(f"wait:trial:{OTHER_ORG}"), 0, -1), [results[2].id])
        self.assertIsNotNone(self.r.zscore(self.q.key("delayed"), results[4].id))

    def test_add_bulk_of_no_jobs_returns_an_empty_list(self):
        """add_bulk of no jobs returns an empty list."""
        self.assertEqual(self.q.add_bulk([]), [])

    def test_add_bulk_recovers_from_noscript_after_script_flush(self):
        """add_bulk recovers from NOSCRIPT after SCRIPT FLUSH."""
        self.q.add("llm.complete", llm())
        self.r.script_flush()
        results = self.q.add_bulk([{"kind": "llm.complete", "payload": llm()}, {"kind": "vision.annotate", "payload": vision()}])
        self.assertEqual([r.duplicate for r in results], [False, False])
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 2)

    def test_add_bulk_sends_nothing_when_one_job_has_a_tier_mismatch(self):
        """add_bulk sends nothing when one job has a tier mismatch."""
        with self.assertRaises(AiqEnqueueError) as cm:
            self.q.add_bulk(
                [
                    {"kind": "llm.complete", "payload": llm()},
                    {"kind": "llm.complete", "payload": llm("trial"), "opts": {"tier": "enterprise"}},
                ]
            )
        self.assertEqual(cm.exception.source, "client")
        self.assertEqual(sorted(self.r.keys(self.q.base + "*")), [])

    def test_add_bulk_reports_which_jobs_the_server_refused_and_keeps_the_others(self):
        """add_bulk reports which jobs the server refused and keeps the others."""
        with self.assertRaises(AiqBulkEnqueueError) as cm:
            self.q.add_bulk(
                [{"kind": "llm.complete", "payload": llm()}, {"kind": "llm.complete", "payload": dict(llm(), tier="gold")}]
            )
        ok, refused = cm.exception.results
        self.assertIsInstance(ok, AddResult)
        self.assertEqual(self.r.hget(self.q.key("job:" + ok.id), "kind"), "llm.complete")
        self.assertIsInstance(refused, AiqEnqueueError)
        self.assertEqual(str(refused), "ERR aiq: unknown tier gold")


class OptionsTest(unittest.TestCase):
    def test_a_prefix_the_daemon_would_refuse_is_refused(self):
        """A prefix the daemon would refuse is refused."""
        conn = server.client()
        for bad in ("has space", "", "x" * 65):
            with self.subTest(prefix=bad), self.assertRaisesRegex(ValueError, "prefix"):
                AiqQueue(conn, prefix=bad)
        conn.close()

    def test_the_script_is_loaded_from_script_path_and_a_missing_file_is_reported(self):
        """enqueue.lua is loaded from script_path, and a missing file is reported."""
        here = default_script_path()
        self.assertEqual(here.name, "enqueue.lua")
        self.assertTrue(here.is_file())
        conn = server.client(decode_responses=True)
        q = AiqQueue(conn, prefix=fresh_prefix(), script_path=str(here))
        job_id, _ = q.add("llm.complete", llm())
        self.assertEqual(conn.hget(q.key("job:" + job_id), "kind"), "llm.complete")
        with self.assertRaisesRegex(FileNotFoundError, "cannot read enqueue.lua at /nonexistent/enqueue.lua"):
            AiqQueue(conn, script_path="/nonexistent/enqueue.lua")
        conn.close()


if __name__ == "__main__":
    unittest.main()
