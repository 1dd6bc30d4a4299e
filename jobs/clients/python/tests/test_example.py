import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

from .fixtures import llm, vision
from .redis_server import ModuleServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "enqueue.py"
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"

server = ModuleServer()
setUpModule, tearDownModule = server.start, server.stop


def run_example(stdin, **env):
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)  # the example must find aiq_client by itself
    full_env.update(env)
    return subprocess.run(
        [sys.executable, str(EXAMPLE)], input=stdin, env=full_env, capture_output=True, text=True, timeout=60
    )


class ExampleTest(unittest.TestCase):
    def test_the_example_enqueues_stdin_and_prints_ids_and_duplicate_flags(self):
        """examples/enqueue.py enqueues the jobs on stdin and prints their ids and duplicate flags."""
        stdin = json.dumps(
            [
                {"kind": "llm.complete", "payload": llm()},
                {"kind": "vision.annotate", "payload": vision(), "opts": {"idempotency_key": "ex-1"}},
                {"kind": "vision.annotate", "payload": vision(), "opts": {"idempotencyKey": "ex-1", "delay": 0}},
            ]
        )
        p = run_example(stdin, AIQ_REDIS_URL=server.url, AIQ_QUEUE_PREFIX="py-example")
        self.assertEqual(p.returncode, 0, p.stderr)
        results = json.loads(p.stdout)
        self.assertEqual([sorted(r) for r in results], [["duplicate", "id"]] * 3)
        self.assertEqual([r["duplicate"] for r in results], [False, False, True])
        self.assertEqual(results[2]["id"], results[1]["id"])
        with server.client(decode_responses=True) as r:
            self.assertEqual(r.hget("{py-example}:job:" + results[0]["id"], "kind"), "llm.complete")

    def test_the_example_enqueues_the_contracts_example_payloads(self):
        """examples/enqueue.py enqueues the contract's example payloads from jobs/examples."""
        jobs = [
            {"kind": kind, "payload": json.loads((EXAMPLES_DIR / f"{kind}.json").read_text())}
            for kind in ("vision.annotate", "llm.complete")
        ]
        p = run_example(json.dumps(jobs), AIQ_REDIS_URL=server.url, AIQ_QUEUE_PREFIX="py-example-files")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual([r["duplicate"] for r in json.loads(p.stdout)], [False, False])

    def test_the_example_exits_non_zero_with_a_message_when_a_job_is_refused(self):
        """examples/enqueue.py exits non-zero with a message when a job is refused."""
        stdin = json.dumps([{"kind": "llm.complete", "payload": dict(llm(), tier="gold")}])
        p = run_example(stdin, AIQ_REDIS_URL=server.url, AIQ_QUEUE_PREFIX="py-example-bad")
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stdout, "")
        self.assertIn("job 0: ERR aiq: unknown tier gold", p.stderr)

    def test_the_example_exits_non_zero_when_redis_cannot_be_reached(self):
        """examples/enqueue.py exits non-zero with a message when Redis cannot be reached."""
        p = run_example("[]", AIQ_REDIS_URL="redis://127.0.0.1:1/")
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stdout, "")
        self.assertIn("cannot connect to AIQ_REDIS_URL", p.stderr)

    def test_the_example_exits_non_zero_without_aiq_redis_url(self):
        """examples/enqueue.py exits non-zero when AIQ_REDIS_URL is not set."""
        p = run_example("[]", AIQ_REDIS_URL="")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("AIQ_REDIS_URL", p.stderr)


if __name__ == "__main__":
    unittest.main()
