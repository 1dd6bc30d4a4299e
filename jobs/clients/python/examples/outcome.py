#!/usr/bin/env python3
"""Asks an aiq queue about jobs' outcomes: what an app does after enqueueing.

    AIQ_REDIS_URL=redis://127.0.0.1:6379/ [AIQ_QUEUE_PREFIX=aiq] python3 examples/outcome.py COMMAND ...

    get ID                  prints the job's status as JSON
    wait ID [TIMEOUT_S]     waits for the job to finish, prints its final status
    cancel ID               prints cancelled | running | finished | not_found
    events FROM COUNT       prints COUNT events after position FROM ("0": from the start), one
                            JSON line each, then exits

Exits 0; 3 with "not found" on stderr for an id that exists nowhere; 4 when wait times out; 1 with
a message for anything else. Its connections are named aiq-example (CLIENT LIST).
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

USAGE = "usage: outcome.py get ID | wait ID [TIMEOUT_S] | cancel ID | events FROM COUNT"


def emit(value):
    print(json.dumps(value), flush=True)


def run(queue, args):
    if len(args) < 2:
        raise ValueError(USAGE)
    command, job_id, extra = args[0], args[1], args[2] if len(args) > 2 else None
    if command == "get":
        status = queue.get_job(job_id)
        if status is None:
            raise aiq_client.AiqJobNotFound(job_id)
        emit(status)
    elif command == "wait":
        emit(queue.wait(job_id, timeout=float(extra) if extra else None))
    elif command == "cancel":
        emit(queue.cancel(job_id))
    elif command == "events":
        count = int(extra or "0")
        if count < 1:
            raise ValueError(USAGE)
        for n, event in enumerate(queue.events(from_id=job_id, block_ms=1000), start=1):
            emit(event)
            if n == count:
                return
    else:
        raise ValueError(USAGE)


def main():
    url = os.environ.get("AIQ_REDIS_URL")
    if not url:
        print("outcome: AIQ_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/)", file=sys.stderr)
        return 1
    conn = redis.Redis.from_url(url, client_name="aiq-example")
    try:
        run(aiq_client.AiqQueue(conn, prefix=os.environ.get("AIQ_QUEUE_PREFIX") or "aiq"), sys.argv[1:])
    except aiq_client.AiqJobNotFound as e:
        print(f"outcome: {e}", file=sys.stderr)
        return 3
    except aiq_client.AiqTimeout as e:
        print(f"outcome: {e}", file=sys.stderr)
        return 4
    except (ValueError, redis.RedisError, OSError) as e:
        print(f"outcome: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
