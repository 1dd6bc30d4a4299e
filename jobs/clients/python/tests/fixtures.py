"""Payloads and helpers shared by the tests."""

import concurrent.futures
import itertools
import json
import threading
import time
import os
import unittest

import redis

from aiq_client import AiqQueue

ORG = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d"
OTHER_ORG = "7c2d0a4e-1b3f-4c5d-8e6f-a7b8c9d0e1f2"

_counter = itertools.count(1)


def fresh_prefix(tag="t"):
    """A prefix no other test uses, so each test starts from an empty queue."""
    return f"py-{tag}{next(_counter)}-{os.getpid()}"


def llm(tier="growth_team", org=ORG):
    return {
        "version": 1,
        "organization_id": org,
        "tier": tier,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Caption a photo of a cat on a red sofa."}],
        "max_tokens": 64,
    }


def vision(tier="enterprise"):
    return {
        "version": 1,
        "organization_id": ORG,
        "tier": tier,
        "images": [{"uri": "gs://example-bucket/photos/5f0c8a2e.jpg"}],
        "features": [{"type": "LABEL_DETECTION", "maxResults": 10}],
    }


def command_calls(r, *names):
    """How many times the server ran the named commands (INFO commandstats)."""
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{n}", {}).get("calls", 0) for n in names)


def redis_now_ms(r):
    s, us = r.time()
    return s * 1000 + us // 1000


RESULT = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "cost_usd": "0.000123",
    "input_tokens": 12,
    "output_tokens": 30,
    "units": None,
    "duration_ms": 850,
}


def wait_until(what, cond, timeout=10.0):
    """Polls a condition until it holds (never a fixed sleep to order events)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def blocked_readers(r):
    """The ids of the clients blocked in XREAD right now (r decodes responses)."""
    return [str(c["id"]) for c in r.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", "")]


def xadd_event(r, q, **fields):
    """Appends an event as the daemon's scripts do (the contract's fields, all strings)."""
    entry = {"org": ORG, "tier": "growth_team", "kind": "llm.complete", "at": "1764626400123", "attempts": "1"}
    entry.update(fields)
    return r.xadd(q.key("events"), entry)


def write_outcome(r, q, job_id, state, **extra):
    """Writes a finished job's outcome hash as the daemon does."""
    fields = {
        "state": state,
        "org": ORG,
        "tier": "growth_team",
        "kind": "llm.complete",
        "attempts": "1",
        "finished_at": "1764626400999",
        "error": "",
        "result": json.dumps(RESULT) if state == "succeeded" else "",
    }
    fields.update(extra)
    r.hset(q.key("outcome:" + job_id), mapping=fields)


class QueueCase(unittest.TestCase):
    """A test with a fresh queue: ``self.r`` (decoded replies), ``self.conn`` (bytes replies) and
    ``self.q``. A module sets ``server`` (its ModuleServer) and ``tag`` in a subclass."""

    server = None
    tag = "t"

    def setUp(self):
        self.r = self.server.client(decode_responses=True)
        self.conn = redis.Redis.from_url(self.server.url)  # bytes replies, as from_url gives by default
        self.q = AiqQueue(self.conn, prefix=fresh_prefix(self.tag))

    def tearDown(self):
        self.r.close()
        self.conn.close()


def in_background(fn, *args):
    """Runs fn(*args) on a daemon thread, so a call that hangs never keeps the tests from ending;
    returns a Future of its result."""
    future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: B902 - handed to the test through the future
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future
