import json
import random
import threading
import time
import unittest

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from aiq_client import AiqJobNotFound, AiqQueue, AiqTimeout, JOB_STATES
from aiq_client.outcomes import StatusSnapshot, _hash, parse_entry, parse_event, parse_xread, status_from_snapshot

from .fixtures import ORG, RESULT, blocked_readers, command_calls, fresh_prefix, llm, redis_now_ms, wait_until
from .fixtures import QueueCase, in_background, write_outcome, xadd_event
from .redis_server import ModuleServer

server = ModuleServer()
setUpModule, tearDownModule = server.start, server.stop


class OutcomesCase(QueueCase):
    server = server
    tag = "o"


class GetJobTest(OutcomesCase):
    def test_a_waiting_job_has_its_organisation_tier_kind_and_attempts(self):
        """get_job of a waiting job says waiting, with its organisation, tier, kind and attempts."""
        job_id, _ = self.q.add("llm.complete", llm())
        self.assertEqual(
            self.q.get_job(job_id),
            {
                "id": job_id,
                "state": "waiting",
                "organization_id": ORG,
                "tier": "growth_team",
                "kind": "llm.complete",
                "attempts": 0,
                "due_at": None,
                "delay_reason": None,
                "last_error": None,
                "finished_at": None,
                "result": None,
            },
        )

    def test_a_delayed_job_has_its_due_time_and_the_reason_scheduled(self):
        """get_job of a delayed job gives the time it is due and the reason scheduled."""
        t0 = redis_now_ms(self.r)
        job_id, _ = self.q.add("llm.complete", llm(), delay_ms=60_000)
        t1 = redis_now_ms(self.r)
        status = self.q.get_job(job_id)
        self.assertEqual(status["state"], "delayed")
        self.assertEqual(status["delay_reason"], "scheduled")
        self.assertTrue(t0 + 60_000 <= status["due_at"] <= t1 + 60_000, status)
        self.assertNotIn("problems", status)

    def test_an_id_that_exists_nowhere_is_none(self):
        """get_job of an id that exists nowhere is None, never waiting."""
        self.assertIsNone(self.q.get_job("photo-42-caption"))

    def test_a_finished_job_is_read_from_its_outcome_with_the_result(self):
        """get_job of a finished job reads its outcome hash, with the result summary."""
        write_outcome(self.r, self.q, "done-1", "succeeded")
        status = self.q.get_job("done-1")
        self.assertEqual(status["state"], "succeeded")
        self.assertEqual(status["result"], RESULT)
        self.assertEqual(status["finished_at"], 1764626400999)
        self.assertEqual(status["attempts"], 1)
        self.assertIsNone(status["last_error"])

    def test_a_failed_job_is_told_from_a_dead_one_by_its_outcome_field(self):
        """A job in the dead set is failed or dead by its outcome field."""
        base = {"kind": "llm.complete", "tier": "growth_team", "org": ORG, "attempts": "1", "dead_at": "1764626400500"}
        self.r.hset(self.q.key("job:f1"), mapping=dict(base, state="dead", outcome="failed", last_error="invalid payload: model"))
        self.r.hset(self.q.key("job:d1"), mapping=dict(base, state="dead", dead_reason="attempts exhausted"))
        failed = self.q.get_job("f1")
        self.assertEqual((failed["state"], failed["last_error"], failed["finished_at"]), ("failed", "invalid payload: model", 1764626400500))
        dead = self.q.get_job("d1")
        self.assertEqual((dead["state"], dead["last_error"]), ("dead", "attempts exhausted"))
        self.r.hset(self.q.key("job:r1"), mapping=dict(base, state="inflight"))
        self.assertEqual(self.q.get_job("r1")["state"], "running")

    def test_fields_redis_holds_wrong_are_named_and_the_status_still_given(self):
        """Fields Redis holds wrong are named in problems, and the status is still given."""
        self.r.hset(self.q.key("job:odd"), mapping={"state": "sideways", "attempts": "-1", "org": ORG})
        self.r.zadd(self.q.key("inflight"), {"odd": 1764626400000})
        status = self.q.get_job("odd")
        self.assertEqual(status["state"], "running")
        self.assertIsNone(status["attempts"])
        self.assertEqual(
            status["problems"],
            ['job.state: unknown value "sideways"', "job.tier: missing", "job.kind: missing",
             'job.attempts: not a non-negative integer: "-1"'],
        )
        write_outcome(self.r, self.q, "bad-result", "succeeded", result="{not json", finished_at="soon")
        bad = self.q.get_job("bad-result")
        self.assertEqual((bad["state"], bad["result"], bad["finished_at"]), ("succeeded", None, None))
        self.assertEqual(bad["problems"], ['outcome.finished_at: not a non-negative integer: "soon"', 'outcome.result: not JSON: "{not json"'])

    def test_a_job_key_that_is_not_a_hash_raises_a_clear_error(self):
        """A job key that is not a hash raises a clear error naming the job."""
        self.r.set(self.q.key("job:str"), "x")
        with self.assertRaisesRegex(redis.ResponseError, "reading the status of 'str'.*WRONGTYPE"):
            self.q.get_job("str")

    def test_an_id_that_is_not_1_to_128_bytes_is_refused_before_calling_redis(self):
        """An id that is not 1 to 128 bytes is refused before calling Redis."""
        before = command_calls(self.r, "multi", "hgetall")
        for bad in ("", "x" * 129, 42, None):
            with self.subTest(job_id=bad), self.assertRaises(ValueError):
                self.q.get_job(bad)
        self.assertEqual(command_calls(self.r, "multi", "hgetall"), before)

    def test_the_parsers_never_raise_on_any_field_values(self):
        """The status and event parsers never raise on any field values, they name them."""
        rnd = random.Random(7)
        values = ["", "0", "-1", "1e3", "9" * 30, "null", "{}", "[]", '{"cost_usd": 1}', "\x00", "\udcff", "waiting", "dead",
                  "succeeded", "budget", b"\xff\xfe"]
        names = ["state", "org", "tier", "kind", "attempts", "due_at", "delay_reason", "outcome", "last_error", "dead_at",
                 "finished_at", "result", "error", "type", "job_id", "at", "until", "reason"]
        for _ in range(2000):
            fields = {n: rnd.choice(values) for n in names if rnd.random() < 0.6}
            fields = {k: (v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")) for k, v in fields.items()}
            job = _hash(fields) if rnd.random() < 0.5 else {}
            delayed = 12.0 if rnd.random() < 0.3 else None
            dead = float("nan") if rnd.random() < 0.3 else None
            status = status_from_snapshot("j", StatusSnapshot(job, _hash(fields), delayed, None, dead))
            self.assertIsNotNone(status)
            self.assertIn(status["state"], JOB_STATES)
            self.assertEqual(parse_event("1-0", fields)["id"], "1-0")
        self.assertEqual(parse_event("1-0", "garbage")["problems"][0], "event: the entry's fields are not a mapping")
        reply = [["k", [["not-an-id", []], "x", ["1-0", {"type": "created", "job_id": "j"}], None]], "junk"]
        self.assertEqual([(e["id"], e["type"], e["job_id"]) for e in parse_xread(reply)], [("1-0", "created", "j")])
        self.assertEqual(parse_xread(None), [])


class CancelTest(OutcomesCase):
    def test_a_waiting_job_leaves_its_organisations_list(self):
        """cancel of a waiting job says cancelled, and its organisation's list and depth are right after."""
        keep, _ = self.q.add("llm.complete", llm())
        job_id, _ = self.q.add("llm.complete", llm())
        self.assertEqual(self.q.cancel(job_id), "cancelled")
        self.assertEqual(self.r.lrange(self.q.key(f"wait:growth_team:{ORG}"), 0, -1), [keep])
        self.assertEqual(self.r.hget(self.q.key("depth"), "growth_team"), "1")
        self.assertEqual(self.q.get_job(job_id)["state"], "cancelled")
        self.assertIsNotNone(self.r.zscore(self.q.key("cancelled"), job_id))
        self.assertEqual(self.q.cancel(job_id), "finished")

    def test_the_last_waiting_job_of_an_organisation_leaves_the_tiers_ring(self):
        """cancel of an organisation's last waiting job takes the organisation out of its tier's ring."""
        job_id, _ = self.q.add("llm.complete", llm())
        self.assertEqual(self.q.cancel(job_id), "cancelled")
        self.assertEqual(self.r.llen(self.q.key(f"wait:growth_team:{ORG}")), 0)
        self.assertEqual(self.r.lrange(self.q.key("orgs:growth_team"), 0, -1), [])
        self.assertIsNone(self.r.zscore(self.q.key("heads:growth_team"), ORG))
        self.assertEqual(int(self.r.hget(self.q.key("depth"), "growth_team") or 0), 0)

    def test_a_delayed_job_leaves_the_delayed_set(self):
        """cancel of a delayed job says cancelled and takes it out of the delayed set."""
        job_id, _ = self.q.add("llm.complete", llm(), delay_ms=60_000)
        self.assertEqual(self.q.cancel(job_id), "cancelled")
        self.assertEqual(self.r.zcard(self.q.key("delayed")), 0)
        self.assertEqual(self.q.get_job(job_id)["state"], "cancelled")

    def test_an_unknown_id_is_not_found(self):
        """cancel of an unknown id says not_found."""
        self.assertEqual(self.q.cancel("nobody"), "not_found")

    def test_cancel_recovers_from_noscript_after_script_flush(self):
        """cancel recovers from NOSCRIPT after SCRIPT FLUSH."""
        self.assertEqual(self.q.cancel("a"), "not_found")
        self.r.script_flush()
        loads = command_calls(self.r, "script|load")
        self.assertEqual(self.q.cancel("b"), "not_found")
        self.assertEqual(command_calls(self.r, "script|load"), loads + 1)

    def test_a_missing_cancel_lua_is_reported(self):
        """A missing cancel.lua is reported when cancel is called."""
        q = AiqQueue(self.conn, prefix=fresh_prefix(), cancel_script_path="/nonexistent/cancel.lua")
        with self.assertRaisesRegex(FileNotFoundError, "cannot read cancel.lua at /nonexistent/cancel.lua"):
            q.cancel("x")


class EventsTest(OutcomesCase):
    def test_an_added_job_gives_a_created_event_with_its_position(self):
        """events yields the created event of an added job, with its position."""
        job_id, _ = self.q.add("llm.complete", llm())
        event = in_background(lambda: next(iter(self.q.events(from_id="0", block_ms=100)))).result(timeout=10)
        self.assertEqual((event["type"], event["job_id"], event["state"], event["organization_id"]), ("created", job_id, "waiting", ORG))
        self.assertRegex(event["id"], r"^\d+-\d+$")
        self.assertNotIn("problems", event)

    def test_every_field_of_the_contracts_events_is_parsed(self):
        """events parses every field of the contract's events."""
        xadd_event(self.r, self.q, type="deferred", job_id="j1", state="delayed", reason="budget", until="1764626460000",
                   message="day budget full")
        xadd_event(self.r, self.q, type="succeeded", job_id="j1", state="succeeded", result='{"provider": "openai",'
                   ' "model": "gpt-4o-mini", "cost_usd": "0.000123", "input_tokens": 12, "output_tokens": 30, "units": null,'
                   ' "duration_ms": 850}')
        it = self.q.events(from_id="0")
        deferred, succeeded = next(it), next(it)
        it.close()
        self.assertEqual((deferred["reason"], deferred["until"], deferred["message"]), ("budget", 1764626460000, "day budget full"))
        self.assertEqual((deferred["at"], deferred["attempts"]), (1764626400123, 1))
        self.assertEqual(succeeded["result"], RESULT)

    def test_after_a_dropped_connection_it_goes_on_from_its_last_position_each_event_once(self):
        """After its connection is killed, events goes on after the last event it yielded: each event once."""
        written = [xadd_event(self.r, self.q, type="created", job_id=f"a{i}", state="waiting") for i in range(3)]
        seen = []

        def consume():
            for event in self.q.events(from_id="0", block_ms=1000):
                seen.append(event["id"])
                if len(seen) == 6:
                    return

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        wait_until("the first events are read", lambda: len(seen) == 3)
        wait_until("the reader blocks", lambda: len(blocked_readers(self.r)) == 1)
        [killed] = blocked_readers(self.r)
        self.assertEqual(self.r.client_kill_filter(_id=killed), 1)
        written += [xadd_event(self.r, self.q, type="created", job_id=f"b{i}", state="waiting") for i in range(3)]
        consumer.join(timeout=20)
        self.assertFalse(consumer.is_alive(), f"the consumer saw {seen}")
        self.assertEqual(seen, written)

    def test_by_default_it_starts_after_the_streams_last_event(self):
        """events starts after the stream's last event by default."""
        xadd_event(self.r, self.q, type="created", job_id="old", state="waiting")
        first = in_background(lambda: next(iter(self.q.events(block_ms=100))))
        wait_until("the reader blocks", lambda: len(blocked_readers(self.r)) == 1)
        xadd_event(self.r, self.q, type="created", job_id="new", state="waiting")
        self.assertEqual(first.result(timeout=10)["job_id"], "new")

    def test_it_raises_when_redis_stays_unreachable_past_reconnect_timeout(self):
        """events raises when Redis stays unreachable past reconnect_timeout."""
        down = redis.Redis(port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))  # fail fast
        q = AiqQueue(down, prefix=fresh_prefix())
        with self.assertRaises(redis.ConnectionError):
            next(q.events(from_id="0", block_ms=100, reconnect_timeout=0.3))
        down.close()

    def test_a_resp3_client_reads_status_and_events_alike(self):
        """A client speaking RESP3 (protocol=3) reads the same status and events."""
        conn = redis.Redis.from_url(server.url, protocol=3)
        q = AiqQueue(conn, prefix=self.q.prefix)
        job_id, _ = q.add("llm.complete", llm(), delay_ms=60_000)
        self.assertEqual(q.get_job(job_id), self.q.get_job(job_id))
        it = q.events(from_id="0")
        event = next(it)
        it.close()
        self.assertEqual(event, next(iter(self.q.events(from_id="0"))))
        self.assertEqual((event["type"], event["job_id"], event["state"]), ("created", job_id, "delayed"))
        conn.close()

    def test_an_entry_of_several_events_is_read_as_each_event_and_resumed_inside(self):
        """One script call's entry (n and each field's values by line) gives each event, in order."""
        entry = self.r.xadd(self.q.key("events"), {
            "n": "3", "type": "started\nsucceeded\nfailed", "job_id": "a\nb\nc", "org": "\n".join([ORG] * 3),
            "tier": "trial\ntrial\ntrial", "kind": "llm.complete\nllm.complete\nllm.complete",
            "state": "running\nsucceeded\nfailed", "at": "5\n5\n5", "attempts": "0\n0\n1",
            "result": "\n" + json.dumps(RESULT) + "\n", "error": "\n\nquota exhausted"})
        later = xadd_event(self.r, self.q, type="created", job_id="d", state="waiting")
        it = self.q.events(from_id="0")
        got = [next(it) for _ in range(4)]
        it.close()
        self.assertEqual([(e["id"], e["type"], e["job_id"]) for e in got], [
            (f"{entry}/0", "started", "a"), (f"{entry}/1", "succeeded", "b"), (f"{entry}/2", "failed", "c"),
            (later, "created", "d")])
        self.assertEqual(got[1]["result"], RESULT)
        self.assertEqual((got[1]["error"], got[2]["error"], got[2]["attempts"]), (None, "quota exhausted", 1))
        self.assertTrue(all("problems" not in e for e in got), got)
        it = self.q.events(from_id=f"{entry}/0")
        rest = [next(it)["id"] for _ in range(3)]
        it.close()
        self.assertEqual(rest, [f"{entry}/1", f"{entry}/2", later])
        for flat in (["n", "2", "job_id", "a\nb\nc"], ["n", "1", "job_id", "a"], ["n", "x"]):
            [bad] = parse_entry("9-0", flat)
            self.assertRegex(" ".join(bad.get("problems", [])), r"event\.(n|job_id)")

    def test_a_position_that_is_not_one_is_refused(self):
        """events refuses a position that is not one."""
        with self.assertRaises(ValueError):
            next(self.q.events(from_id="yesterday"))


class WaitTest(OutcomesCase):
    def test_a_job_finished_before_the_call_returns_at_once(self):
        """wait returns at once for a job that finished before the call."""
        write_outcome(self.r, self.q, "early", "succeeded")
        status = self.q.wait("early", timeout=10)
        self.assertEqual((status["state"], status["result"]), ("succeeded", RESULT))

    def test_a_job_cancelled_before_the_call_returns_cancelled(self):
        """wait returns the cancelled status of a job cancelled before the call."""
        job_id, _ = self.q.add("llm.complete", llm())
        self.assertEqual(self.q.cancel(job_id), "cancelled")
        self.assertEqual(self.q.wait(job_id, timeout=10)["state"], "cancelled")

    def test_it_returns_when_the_jobs_terminal_event_arrives(self):
        """wait returns when the job's terminal event arrives."""
        job_id, _ = self.q.add("llm.complete", llm())
        waiting = in_background(self.q.wait, job_id, 30)
        wait_until("the waiter blocks", lambda: len(blocked_readers(self.r)) == 1)
        # What settle does in one script: the job leaves, its outcome is kept, the event is written.
        self.r.delete(self.q.key("job:" + job_id))
        write_outcome(self.r, self.q, job_id, "succeeded")
        xadd_event(self.r, self.q, type="succeeded", job_id=job_id, state="succeeded")
        status = waiting.result(timeout=30)
        self.assertEqual((status["state"], status["result"]), ("succeeded", RESULT))

    def test_it_ends_by_reading_the_status_when_a_job_finishes_without_an_event(self):
        """wait ends by reading the status when a job finishes without an event (events off)."""
        job_id, _ = self.q.add("llm.complete", llm())
        waiting = in_background(self.q.wait, job_id, float("inf"), 100)  # no limit
        wait_until("the waiter blocks", lambda: len(blocked_readers(self.r)) == 1)
        self.r.delete(self.q.key("job:" + job_id))
        write_outcome(self.r, self.q, job_id, "failed", error="invalid payload: model")
        status = waiting.result(timeout=30)
        self.assertEqual((status["state"], status["last_error"]), ("failed", "invalid payload: model"))

    def test_a_job_still_waiting_times_out_cleanly(self):
        """wait raises AiqTimeout for a job still waiting, with its last status."""
        job_id, _ = self.q.add("llm.complete", llm())
        t0 = time.monotonic()
        with self.assertRaises(AiqTimeout) as cm:
            self.q.wait(job_id, timeout=0.3, block_ms=100)
        self.assertLess(time.monotonic() - t0, 10)
        self.assertIsInstance(cm.exception, TimeoutError)
        self.assertEqual((cm.exception.job_id, cm.exception.status["state"]), (job_id, "waiting"))

    def test_a_timeout_or_block_that_is_not_one_is_refused(self):
        """wait refuses a negative or NaN timeout and a bad block_ms."""
        for bad in ({"timeout": -1}, {"timeout": float("nan")}, {"timeout": "5"}, {"block_ms": 0}, {"block_ms": 1.5}):
            with self.subTest(**{k: repr(v) for k, v in bad.items()}), self.assertRaises(ValueError):
                self.q.wait("x", **bad)

    def test_an_unknown_id_is_not_found_at_once(self):
        """wait raises AiqJobNotFound at once for an unknown id."""
        with self.assertRaises(AiqJobNotFound) as cm:
            self.q.wait("nobody", timeout=60)
        self.assertEqual(cm.exception.job_id, "nobody")
        self.assertEqual(blocked_readers(self.r), [])


if __name__ == "__main__":
    unittest.main()
