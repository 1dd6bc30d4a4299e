// Enqueues jobs read from stdin and prints their ids.
//
//   AIQ_REDIS_URL=redis://127.0.0.1:6379/ [AIQ_QUEUE_PREFIX=aiq] node dist/examples/enqueue.js < jobs.json
//
// stdin:  a JSON array of {"kind": "...", "payload": {...}, "opts": {...}?}; opts takes the keys of
//         AddOptions (tier, delay, idempotencyKey, jobId, maxAttempts); the Python example's
//         spellings (delay_ms, idempotency_key, job_id, max_attempts) are accepted too.
// stdout: a JSON array of {"id": "...", "duplicate": false}, one per job, in order.
// Exits 0, or 1 with a message on stderr (jobs before the failing one stay queued).
// AIQ_IDEMPOTENCY_TTL_S (default 86400) sets how long idempotency keys are remembered.

import Redis from "ioredis";
import { AddOptions, AddResult, AiqQueue, BulkJob } from "../src";

const OPT_NAMES: Record<string, keyof AddOptions> = {
  tier: "tier",
  delay: "delay",
  delay_ms: "delay",
  idempotencyKey: "idempotencyKey",
  idempotency_key: "idempotencyKey",
  jobId: "jobId",
  job_id: "jobId",
  maxAttempts: "maxAttempts",
  max_attempts: "maxAttempts",
};

function readStdin(): Promise<string> {
  return new Promise((resolve, reject) => {
    let s = "";
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (c) => (s += c));
    process.stdin.on("end", () => resolve(s));
    process.stdin.on("error", reject);
  });
}

function parseJobs(text: string): BulkJob[] {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new Error(`stdin is not JSON: ${(e as Error).message}`);
  }
  if (!Array.isArray(doc)) throw new Error("stdin must be a JSON array of {kind, payload, opts?}");
  return doc.map((item, i) => {
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      throw new Error(`job ${i}: must be an object {kind, payload, opts?}`);
    }
    const { kind, payload, opts, ...rest } = item as Record<string, unknown>;
    if (Object.keys(rest).length > 0) throw new Error(`job ${i}: unknown field ${Object.keys(rest)[0]}`);
    if (typeof kind !== "string") throw new Error(`job ${i}: kind must be a string`);
    const addOpts: Record<string, unknown> = {};
    if (opts !== undefined && opts !== null) {
      if (typeof opts !== "object" || Array.isArray(opts)) throw new Error(`job ${i}: opts must be an object`);
      for (const [k, v] of Object.entries(opts)) {
        const name = OPT_NAMES[k];
        if (!name) throw new Error(`job ${i}: unknown option ${k}`);
        if (v !== null && v !== undefined) addOpts[name] = v;
      }
    }
    return { kind, payload, opts: addOpts } as BulkJob;
  });
}

async function main(): Promise<void> {
  const url = process.env.AIQ_REDIS_URL;
  if (!url) throw new Error("AIQ_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/)");
  const prefix = process.env.AIQ_QUEUE_PREFIX || "aiq";
  const ttl = process.env.AIQ_IDEMPOTENCY_TTL_S ? Number(process.env.AIQ_IDEMPOTENCY_TTL_S) : 86400;
  const jobs = parseJobs(await readStdin());
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
  let lastError: Error | undefined;
  redis.on("error", (e: Error) => (lastError = e));
  try {
    try {
      await redis.connect();
    } catch (e) {
      throw new Error(`cannot connect to AIQ_REDIS_URL: ${(lastError ?? (e as Error)).message}`);
    }
    const queue = new AiqQueue({ connection: redis, prefix, idempotencyTtlSeconds: ttl });
    const results: AddResult[] = [];
    for (const [i, job] of jobs.entries()) {
      try {
        results.push(await queue.add(job.kind, job.payload, job.opts));
      } catch (e) {
        throw new Error(`job ${i}: ${(e as Error).message}`);
      }
    }
    process.stdout.write(JSON.stringify(results.map((r) => ({ id: r.id, duplicate: r.duplicate }))) + "\n");
  } finally {
    // A connection that never opened has already ended; disconnect() would wait for it.
    if (redis.status !== "end") redis.disconnect();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`enqueue: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
