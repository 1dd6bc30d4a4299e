import { strict as assert } from "node:assert";
import { spawn } from "node:child_process";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import Redis from "ioredis";
import {
  AiqBulkEnqueueError,
  AiqEnqueueError,
  AiqQueue,
  LlmCompletePayload,
  Tier,
  VisionAnnotatePayload,
  defaultScriptPath,
} from "../src";
import { TestRedis, evalCalls as evalCallsOf, startTestRedis, stopTestRedis, redisNowMs as redisNowMsOf } from "./redis-server";

const ORG = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";
const OTHER_ORG = "7c2d0a4e-1b3f-4c5d-8e6f-a7b8c9d0e1f2";

function llm(tier: Tier = "growth_team", org = ORG): LlmCompletePayload {
  return {
    version: 1,
    organization_id: org,
    tier,
    provider: "openai",
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "Caption a photo of a cat on a red sofa." }],
    max_tokens: 64,
  };
}

function vision(tier: Tier = "enterprise"): VisionAnnotatePayload {
  return {
    version: 1,
    organization_id: ORG,
    tier,
    images: [{ uri: "gs://example-bucket/photos/5f0c8a2e.jpg" }],
    features: [{ type: "LABEL_DETECTION", maxResults: 10 }],
  };
}

let server: TestRedis;
let redis: Redis;
let n = 0;

/** A queue on a prefix no other test uses, so each test starts from an empty queue. */
function newQueue(extra: { idempotencyTtlSeconds?: number } = {}): AiqQueue {
  n += 1;
  return new AiqQueue({ connection: redis, prefix: `t${n}-${process.pid}`, ...extra });
}

async function queueKeys(q: AiqQueue): Promise<string[]> {
  return (await redis.keys(`${q.base}*`)).sort();
}

async function scriptCalls(): Promise<number> {
  const info = await redis.info("commandstats");
  let total = 0;
  for (const m of info.matchAll(/^cmdstat_(evalsha|eval|script\|load|script):calls=(\d+)/gm)) {
    total += Number(m[2]);
  }
  return total;
}

const evalCalls = () => evalCallsOf(redis);
const redisNowMs = () => redisNowMsOf(redis);

before(async () => ({ server, redis } = await startTestRedis()));
after(() => stopTestRedis({ server, redis }));

describe("AiqQueue.add", () => {
  it("returns a new id and stores kind, tier, organization and payload in the job hash", async () => {
    const q = newQueue();
    const payload = llm();
    const { id, duplicate } = await q.add("llm.complete", payload);
    assert.equal(duplicate, false);
    assert.match(id, /^j-\d{16}-\d+$/);
    const job = await redis.hgetall(`{${q.prefix}}:job:${id}`);
    assert.equal(job.kind, "llm.complete");
    assert.equal(job.tier, "growth_team");
    assert.equal(job.org, ORG);
    assert.deepEqual(JSON.parse(job.payload), payload);
    assert.equal(job.state, "waiting");
    assert.equal(job.max_attempts, "0");
    assert.deepEqual(await redis.lrange(q.key(`wait:growth_team:${ORG}`), 0, -1), [id]);
    assert.equal(await redis.hget(q.key("depth"), "growth_team"), "1");
  });

  it("uses the default prefix aiq when none is given", async () => {
    const q = new AiqQueue({ connection: redis });
    assert.equal(q.base, "{aiq}");
    const { id } = await q.add("vision.annotate", vision());
    assert.equal(await redis.hget(`{aiq}:job:${id}`, "kind"), "vision.annotate");
    await redis.del(...(await redis.keys("{aiq}*")));
  });

  it("gives consecutive jobs different ids", async () => {
    const q = newQueue();
    const a = await q.add("llm.complete", llm());
    const b = await q.add("vision.annotate", vision());
    assert.notEqual(a.id, b.id);
    assert.equal(b.duplicate, false);
  });

  it("returns the first id as a duplicate when the idempotency key is reused", async () => {
    const q = newQueue();
    const first = await q.add("llm.complete", llm(), { idempotencyKey: "caption-photo-42" });
    const second = await q.add("llm.complete", llm(), { idempotencyKey: "caption-photo-42" });
    assert.deepEqual(first, { id: first.id, duplicate: false });
    assert.deepEqual(second, { id: first.id, duplicate: true });
    assert.equal(await redis.get(q.key(`idem:${ORG}:caption-photo-42`)), first.id);
    const ttl = await redis.ttl(q.key(`idem:${ORG}:caption-photo-42`));
    assert.ok(ttl > 86000 && ttl <= 86400, `ttl ${ttl}`);
    assert.equal(await redis.llen(q.key(`wait:growth_team:${ORG}`)), 1);
  });

  it("remembers idempotency keys for idempotencyTtlSeconds", async () => {
    const q = newQueue({ idempotencyTtlSeconds: 120 });
    await q.add("llm.complete", llm(), { idempotencyKey: "k" });
    const ttl = await redis.ttl(q.key(`idem:${ORG}:k`));
    assert.ok(ttl > 100 && ttl <= 120, `ttl ${ttl}`);
  });

  it("treats a reused job id as a duplicate and queues nothing new", async () => {
    const q = newQueue();
    const first = await q.add("llm.complete", llm(), { jobId: "photo-42-caption" });
    assert.deepEqual(first, { id: "photo-42-caption", duplicate: false });
    const second = await q.add("llm.complete", llm(), { jobId: "photo-42-caption" });
    assert.deepEqual(second, { id: "photo-42-caption", duplicate: true });
    assert.equal(await redis.llen(q.key(`wait:growth_team:${ORG}`)), 1);
  });

  it("puts a delayed job in the delayed set, due after the delay", async () => {
    const q = newQueue();
    const t0 = await redisNowMs();
    const { id } = await q.add("vision.annotate", vision(), { delay: 60_000 });
    const t1 = await redisNowMs();
    const due = Number(await redis.zscore(q.key("delayed"), id));
    assert.ok(due >= t0 + 60_000 && due <= t1 + 60_000, `due ${due} not in [${t0}, ${t1}] + 60s`);
    assert.equal(await redis.hget(q.key(`job:${id}`), "state"), "delayed");
    assert.equal(await redis.exists(q.key(`wait:enterprise:${ORG}`)), 0);
  });

  it("passes maxAttempts to the job", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm(), { maxAttempts: 3 });
    assert.equal(await redis.hget(q.key(`job:${id}`), "max_attempts"), "3");
  });

  it("accepts a tier option equal to the payload's tier", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm("trial"), { tier: "trial" });
    assert.equal(await redis.hget(q.key(`job:${id}`), "tier"), "trial");
  });

  it("refuses an unknown tier with the server's message and writes nothing", async () => {
    const q = newQueue();
    const bad = { ...llm(), tier: "platinum" as Tier };
    await assert.rejects(q.add("llm.complete", bad), (e: unknown) => {
      assert.ok(e instanceof AiqEnqueueError);
      assert.equal(e.source, "server");
      assert.equal(e.message, "ERR aiq: unknown tier platinum");
      return true;
    });
    assert.deepEqual(await queueKeys(q), []);
  });

  it("refuses a tier that differs from the payload's before calling Redis", async () => {
    const q = newQueue();
    const calls = await scriptCalls();
    await assert.rejects(q.add("llm.complete", llm("growth_team"), { tier: "enterprise" }), (e: unknown) => {
      assert.ok(e instanceof AiqEnqueueError);
      assert.equal(e.source, "client");
      assert.match(e.message, /tier "enterprise" differs from payload.tier "growth_team"/);
      return true;
    });
    assert.equal(await scriptCalls(), calls);
    assert.deepEqual(await queueKeys(q), []);
  });

  it("refuses a payload without an organization_id before calling Redis", async () => {
    const q = newQueue();
    const { organization_id: _, ...noOrg } = llm();
    await assert.rejects(q.add("llm.complete", noOrg as LlmCompletePayload), /organization_id is required/);
    assert.deepEqual(await queueKeys(q), []);
  });

  it("surfaces the script's other refusals as AiqEnqueueError", async () => {
    const q = newQueue();
    const cases: Array<[() => Promise<unknown>, string]> = [
      [() => q.add("llm.complete", llm("trial", "not-a-uuid")), "ERR aiq: organization_id must be a UUID"],
      [() => q.add("bogus.kind" as "llm.complete", llm()), "ERR aiq: unknown kind bogus.kind"],
      [() => q.add("llm.complete", llm(), { delay: -1 }), "ERR aiq: delay_ms must be >= 0"],
      [() => q.add("llm.complete", llm(), { maxAttempts: 101 }), "ERR aiq: max_attempts must be 0..100"],
      [
        () => q.add("llm.complete", llm(), { jobId: "has space" }),
        "ERR aiq: job_id must be 1-128 characters without spaces or braces",
      ],
    ];
    for (const [call, message] of cases) {
      await assert.rejects(call(), (e: unknown) => e instanceof AiqEnqueueError && e.message === message);
    }
    assert.deepEqual(await queueKeys(q), []);
  });

  it("recovers from NOSCRIPT after SCRIPT FLUSH", async () => {
    const q = newQueue();
    const a = await q.add("llm.complete", llm());
    await redis.script("FLUSH");
    const evals = await evalCalls();
    const b = await q.add("llm.complete", llm());
    assert.equal(await evalCalls(), evals + 1, "the NOSCRIPT reply should fall back to EVAL once");
    assert.equal(b.duplicate, false);
    assert.notEqual(a.id, b.id);
    const c = await q.add("llm.complete", llm());
    assert.equal(await redis.llen(q.key(`wait:growth_team:${ORG}`)), 3);
    assert.notEqual(c.id, b.id);
  });
});

describe("AiqQueue.addBulk", () => {
  it("queues every job in order in one pipeline", async () => {
    const q = newQueue();
    const results = await q.addBulk([
      { kind: "llm.complete", payload: llm() },
      { kind: "vision.annotate", payload: vision(), opts: { jobId: "v-1" } },
      { kind: "llm.complete", payload: llm("trial", OTHER_ORG), opts: { idempotencyKey: "same" } },
      { kind: "llm.complete", payload: llm("trial", OTHER_ORG), opts: { idempotencyKey: "same" } },
      { kind: "vision.annotate", payload: vision(), opts: { delay: 5_000 } },
    ]);
    assert.equal(results.length, 5);
    assert.equal(results[1].id, "v-1");
    assert.deepEqual(
      results.map((r) => r.duplicate),
      [false, false, false, true, false],
    );
    assert.equal(results[3].id, results[2].id);
    assert.equal(await redis.hget(q.key(`job:${results[0].id}`), "kind"), "llm.complete");
    assert.equal(await redis.hget(q.key("job:v-1"), "kind"), "vision.annotate");
    assert.deepEqual(await redis.lrange(q.key(`wait:trial:${OTHER_ORG}`), 0, -1), [results[2].id]);
    assert.notEqual(await redis.zscore(q.key("delayed"), results[4].id), null);
  });

  it("returns an empty array for no jobs", async () => {
    assert.deepEqual(await newQueue().addBulk([]), []);
  });

  it("recovers from NOSCRIPT after SCRIPT FLUSH", async () => {
    const q = newQueue();
    await q.add("llm.complete", llm());
    await redis.script("FLUSH");
    const evals = await evalCalls();
    const results = await q.addBulk([
      { kind: "llm.complete", payload: llm() },
      { kind: "vision.annotate", payload: vision() },
    ]);
    assert.deepEqual(
      results.map((r) => r.duplicate),
      [false, false],
    );
    assert.equal(await evalCalls(), evals + 2, "both jobs should be sent again with EVAL");
    assert.equal(await redis.llen(q.key(`wait:growth_team:${ORG}`)), 2);
  });

  it("sends nothing when one job has a tier mismatch", async () => {
    const q = newQueue();
    await assert.rejects(
      q.addBulk([
        { kind: "llm.complete", payload: llm() },
        { kind: "llm.complete", payload: llm("trial"), opts: { tier: "enterprise" } },
      ]),
      (e: unknown) => e instanceof AiqEnqueueError && e.source === "client",
    );
    assert.deepEqual(await queueKeys(q), []);
  });

  it("reports which jobs the server refused and keeps the others", async () => {
    const q = newQueue();
    const err = await q
      .addBulk([
        { kind: "llm.complete", payload: llm() },
        { kind: "llm.complete", payload: { ...llm(), tier: "gold" as Tier } },
      ])
      .then(
        () => assert.fail("addBulk should have thrown"),
        (e: unknown) => e,
      );
    assert.ok(err instanceof AiqBulkEnqueueError);
    assert.ok(err instanceof AiqEnqueueError);
    const [ok, refused] = err.results;
    assert.ok(!(ok instanceof Error));
    assert.equal(await redis.hget(q.key(`job:${ok.id}`), "kind"), "llm.complete");
    assert.ok(refused instanceof AiqEnqueueError);
    assert.equal(refused.message, "ERR aiq: unknown tier gold");
  });
});

describe("AiqQueue options", () => {
  it("refuses a connection with a keyPrefix", () => {
    const prefixed = new Redis({ lazyConnect: true, keyPrefix: "app:" });
    assert.throws(() => new AiqQueue({ connection: prefixed }), /keyPrefix/);
    prefixed.disconnect();
  });

  it("refuses a prefix the daemon would refuse", () => {
    assert.throws(() => new AiqQueue({ connection: redis, prefix: "has space" }), /prefix/);
    assert.throws(() => new AiqQueue({ connection: redis, prefix: "" }), /prefix/);
  });

  it("loads enqueue.lua from scriptPath and reports a missing file", async () => {
    assert.equal(defaultScriptPath(), path.resolve(__dirname, "..", "..", "..", "..", "enqueue.lua"));
    const q = new AiqQueue({ connection: redis, prefix: "explicit-path", scriptPath: defaultScriptPath() });
    const { id } = await q.add("llm.complete", llm());
    assert.equal(await redis.hget(q.key(`job:${id}`), "kind"), "llm.complete");
    assert.throws(
      () => new AiqQueue({ connection: redis, scriptPath: "/nonexistent/enqueue.lua" }),
      /cannot read enqueue.lua at \/nonexistent\/enqueue.lua/,
    );
  });
});

function runExample(input: string, env: Record<string, string>): Promise<{ code: number; out: string; err: string }> {
  const script = path.resolve(__dirname, "..", "examples", "enqueue.js");
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script], { env: { ...process.env, ...env } });
    let out = "";
    let err = "";
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code: code ?? -1, out, err }));
    child.stdin.end(input);
  });
}

describe("examples/enqueue", () => {
  it("enqueues the jobs on stdin and prints their ids and duplicate flags", async () => {
    const input = JSON.stringify([
      { kind: "llm.complete", payload: llm() },
      { kind: "vision.annotate", payload: vision(), opts: { idempotencyKey: "ex-1" } },
      { kind: "vision.annotate", payload: vision(), opts: { idempotency_key: "ex-1", delay: 0 } },
    ]);
    const r = await runExample(input, { AIQ_REDIS_URL: server.url, AIQ_QUEUE_PREFIX: "example" });
    assert.equal(r.code, 0, r.err);
    const results = JSON.parse(r.out) as Array<{ id: string; duplicate: boolean }>;
    assert.equal(results.length, 3);
    assert.deepEqual(Object.keys(results[0]).sort(), ["duplicate", "id"]);
    assert.deepEqual(
      results.map((x) => x.duplicate),
      [false, false, true],
    );
    assert.equal(results[2].id, results[1].id);
    assert.equal(await redis.hget(`{example}:job:${results[0].id}`, "kind"), "llm.complete");
  });

  it("exits non-zero with a message when a job is refused", async () => {
    const input = JSON.stringify([{ kind: "llm.complete", payload: { ...llm(), tier: "gold" } }]);
    const r = await runExample(input, { AIQ_REDIS_URL: server.url, AIQ_QUEUE_PREFIX: "example-bad" });
    assert.notEqual(r.code, 0);
    assert.equal(r.out, "");
    assert.match(r.err, /job 0: ERR aiq: unknown tier gold/);
  });

  it("exits non-zero with a message when Redis cannot be reached", async () => {
    const r = await runExample("[]", { AIQ_REDIS_URL: "redis://127.0.0.1:1/" });
    assert.notEqual(r.code, 0);
    assert.equal(r.out, "");
    assert.match(r.err, /cannot connect to AIQ_REDIS_URL/);
  });

  it("exits non-zero when AIQ_REDIS_URL is not set", async () => {
    const r = await runExample("[]", { AIQ_REDIS_URL: "" });
    assert.notEqual(r.code, 0);
    assert.match(r.err, /AIQ_REDIS_URL/);
  });
});
