#!/usr/bin/env python3
"""Enqueues jobs read from stdin and prints their ids.

    AIQ_REDIS_URL=redis://127.0.0.1:6379/ [AIQ_QUEUE_PREFIX=aiq] python3 examples/enqueue.py < jobs.json

stdin:  a JSON array of {"kind": "...", "payload": {...}, "opts": {...}?}; opts takes add()'s
        keyword names (tier, delay_ms, idempotency_key, job_id, max_attempts); the Node
        example's spellings (delay, idempotencyKey, jobId, maxAttempts) are accepted too.
stdout: a JSON array of {"id": "...", "duplicate": false}, one per job, in order.
Exits 0, or 1 with a message on stderr (jobs before the failing one stay queued).
AIQ_IDEMPOTENCY_TTL_S (default 86400) sets how long idempotency keys are remembered.
"""

import json
import os
import sys
from pathlib import Path

try:
    import aiq_client
except ImportError:  # run from the repository without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import aiq_client

import redis

OPT_NAMES = {
    "tier": "tier",
    "delay_ms": "delay_ms",
    "delay": "delay_ms",
    "idempotency_key": "idempotency_key",
    "idempotencyKey": "idempotency_key",
    "job_id": "job_id",
    "jobId": "job_id",
    "max_attempts": "max_attempts",
    "maxAttempts": "max_attempts",
}


class UsageError(Exception):
    pass


def parse_jobs(text):
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"stdin is not JSON: {e}") from e
    if not isinstance(doc, list):
        raise UsageError("stdin must be a JSON array of {kind, payload, opts?}")
    jobs = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise UsageError(f"job {i}: must be an object {{kind, payload, opts?}}")
        extra = [k for k in item if k not in ("kind", "payload", "opts")]
        if extra:
            raise UsageError(f"job {i}: unknown field {extra[0]}")
        if not isinstance(item.get("kind"), str):
            raise UsageError(f"job {i}: kind must be a string")
        opts = item.get("opts") or {}
        if not isinstance(opts, dict):
            raise UsageError(f"job {i}: opts must be an object")
        kwargs = {}
        for k, v in opts.items():
            if k not in OPT_NAMES:
                raise UsageError(f"job {i}: unknown option {k}")
            if v is not None:
                kwargs[OPT_NAMES[k]] = v
        jobs.append((item["kind"], item.get("payload"), kwargs))
    return jobs


def main():
    url = os.environ.get("AIQ_REDIS_URL")
    if not url:
        raise UsageError("AIQ_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/)")
    prefix = os.environ.get("AIQ_QUEUE_PREFIX") or "aiq"
    try:
        ttl = int(os.environ.get("AIQ_IDEMPOTENCY_TTL_S") or 86400)
    except ValueError as e:
        raise UsageError(f"AIQ_IDEMPOTENCY_TTL_S: {e}") from e
    jobs = parse_jobs(sys.stdin.read())
    client = redis.Redis.from_url(url)
    try:
        try:
            client.ping()
        except redis.exceptions.RedisError as e:
            raise UsageError(f"cannot connect to AIQ_REDIS_URL: {e}") from e
        queue = aiq_client.AiqQueue(client, prefix=prefix, idempotency_ttl_s=ttl)
        results = []
        for i, (kind, payload, kwargs) in enumerate(jobs):
            try:
                results.append(queue.add(kind, payload, **kwargs))
            except (aiq_client.AiqEnqueueError, redis.exceptions.RedisError, TypeError) as e:
                raise UsageError(f"job {i}: {e}") from e
    finally:
        client.close()
    print(json.dumps([{"id": r.id, "duplicate": r.duplicate} for r in results], separators=(",", ":")))


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, OSError) as e:
        print(f"enqueue: {e}", file=sys.stderr)
        sys.exit(1)
