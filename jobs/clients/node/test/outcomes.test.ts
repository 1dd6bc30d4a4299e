import { strict as assert } from "node:assert";
import { after, before, describe, it } from "node:test";
import Redis from "ioredis";
import {
  AiqEvent,
  AiqJobNotFound,
  AiqQueue,
  AiqTimeoutError,
  JobStatus,
  LlmCompletePayload,
  parseEntry,
  parseEvent,
  parseXRead,
  statusFromSnapshot,
} from "../src";
import { TestRedis, evalCalls, redisNowMs as redisNowMsOf, startTestRedis, stopTestRedis } from "./redis-server";

const ORG = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";

function llm(): LlmCompletePayload {
  return {
    version: 1,
    organization_id: ORG,
    tier: "growth_team",
    provider: "openai",
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "Caption a photo of a cat on a red sofa." }],
    max_tokens: 64,
  };
}

const RESULT = {
  provider: "openai",
  model: "gpt-4o-mini",
  cost_usd: "0.000123",
  input_tokens: 12,
  output_tokens: 30,
  units: null,
  duration_ms: 850,
};

let server: TestRedis;
let redis: Redis;
let n = 0;

function newQueue(): AiqQueue {
  n += 1;
  return new AiqQueue({ connection: redis, prefix: `o${n}-${process.pid}` });
}

/** Polls a condition until it holds (never a fixed sleep to order events). */
async function waitUntil(what: string, cond: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The ids of the clients blocked in XREAD right now. */
async function blockedReaders(): Promise<string[]> {
  const list = (await redis.client("LIST")) as string;
  return list
    .split("\n")
    .filter((l) => /\bcmd=xread\b/.test(l) && /\bflags=\S*b/.test(l))
    .map((l) => /\bid=(\d+)/.exec(l)![1]);
}

/** Appends an event as the daemon's scripts do (the contract's fields, all strings). */
async function xaddEvent(q: AiqQueue, fields: Record<string, string>): Promise<string> {
  const flat = Object.entries({ org: ORG, tier: "growth_team", kind: "llm.complete", at: "1764626400123", attempts: "1", ...fields }).flat();
  return (await redis.xadd(q.key("events"), "*", ...flat)) as string;
}

/** Writes a finished job's outcome hash as the daemon does. */
async function writeOutcome(q: AiqQueue, id: string, state: string, extra: Record<string, string> = {}): Promise<void> {
  await redis.hset(q.key(`outcome:${id}`), {
    state,
    org: ORG,
    tier: "growth_team",
    kind: "llm.complete",
    attempts: "1",
    finished_at: "1764626400999",
    error: "",
    result: state === "succeeded" ? JSON.stringify(RESULT) : "",
    ...extra,
  });
}

const redisNowMs = () => redisNowMsOf(redis);

before(async () => ({ server, redis } = await startTestRedis()));
after(() => stopTestRedis({ server, redis }));

describe("AiqQueue.getJob", () => {
  it("reports a waiting job with its organisation, tier, kind and attempts", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    const status = await q.getJob(id);
    assert.deepEqual(status, {
      id,
      state: "waiting",
      organization_id: ORG,
      tier: "growth_team",
      kind: "llm.complete",
      attempts: 0,
      due_at: null,
      delay_reason: null,
      last_error: null,
      finished_at: null,
      result: null,
    } satisfies JobStatus);
  });

  it("reports a delayed job with the time it is due and the reason scheduled", async () => {
    const q = newQueue();
    const t0 = await redisNowMs();
    const { id } = await q.add("llm.complete", llm(), { delay: 60_000 });
    const t1 = await redisNowMs();
    const status = (await q.getJob(id))!;
    assert.equal(status.state, "delayed");
    assert.equal(status.delay_reason, "scheduled");
    assert.ok(status.due_at! >= t0 + 60_000 && status.due_at! <= t1 + 60_000, `due_at ${status.due_at}`);
    assert.equal(status.problems, undefined, String(status.problems));
  });

  it("says null for an id that exists nowhere", async () => {
    assert.equal(await newQueue().getJob("photo-42-caption"), null);
  });

  it("reports a finished job from its outcome hash, with the result summary", async () => {
    const q = newQueue();
    await writeOutcome(q, "done-1", "succeeded");
    assert.deepEqual(await q.getJob("done-1"), {
      id: "done-1",
      state: "succeeded",
      organization_id: ORG,
      tier: "growth_team",
      kind: "llm.complete",
      attempts: 1,
      due_at: null,
      delay_reason: null,
      last_error: null,
      finished_at: 1764626400999,
      result: RESULT,
    });
  });

  it("tells a failed job from a dead one in the dead set by its outcome field", async () => {
    const q = newQueue();
    const base = { kind: "llm.complete", tier: "growth_team", org: ORG, attempts: "1", dead_at: "1764626400500" };
    await redis.hset(q.key("job:f1"), { ...base, state: "dead", outcome: "failed", last_error: "invalid payload: model" });
    await redis.hset(q.key("job:d1"), { ...base, state: "dead", dead_reason: "attempts exhausted" });
    const failed = (await q.getJob("f1"))!;
    assert.equal(failed.state, "failed");
    assert.equal(failed.last_error, "invalid payload: model");
    assert.equal(failed.finished_at, 1764626400500);
    const dead = (await q.getJob("d1"))!;
    assert.equal(dead.state, "dead");
    assert.equal(dead.last_error, "attempts exhausted");
    await redis.hset(q.key("job:r1"), { ...base, state: "inflight" });
    assert.equal((await q.getJob("r1"))!.state, "running");
  });

  it("names the fields Redis holds wrong and still answers", async () => {
    const q = newQueue();
    await redis.hset(q.key("job:odd"), { state: "sideways", attempts: "-1", org: ORG });
    await redis.zadd(q.key("inflight"), 1764626400000, "odd");
    const status = (await q.getJob("odd"))!;
    assert.equal(status.state, "running");
    assert.equal(status.attempts, null);
    assert.deepEqual(status.problems, [
      'job.state: unknown value "sideways"',
      "job.tier: missing",
      "job.kind: missing",
      'job.attempts: not a non-negative integer: "-1"',
    ]);
    await writeOutcome(q, "bad-result", "succeeded", { result: "{not json", finished_at: "soon" });
    const bad = (await q.getJob("bad-result"))!;
    assert.equal(bad.state, "succeeded");
    assert.equal(bad.result, null);
    assert.equal(bad.finished_at, null);
    assert.deepEqual(bad.problems, ['outcome.finished_at: not a non-negative integer: "soon"', 'outcome.result: not JSON: "{not json"']);
  });

  it("rejects with a clear error when the job key is not a hash", async () => {
    const q = newQueue();
    await redis.set(q.key("job:str"), "x");
    await assert.rejects(q.getJob("str"), /reading the status of "str" \(command 0\): WRONGTYPE/);
  });

  it("refuses an id that is not 1 to 128 bytes before calling Redis", async () => {
    const q = newQueue();
    await assert.rejects(q.getJob(""), TypeError);
    await assert.rejects(q.getJob("x".repeat(129)), TypeError);
    await assert.rejects(q.getJob(42 as unknown as string), TypeError);
  });

  it("never throws on any field values, only names them", () => {
    // A seeded walk over hostile values for every field the parsers read.
    let seed = 7;
    const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const values = ["", "0", "-1", "1e3", "9".repeat(30), "null", "{}", "[]", '{"cost_usd":1}', "\u0000", "waiting", "dead", "succeeded", "budget"];
    const names = ["state", "org", "tier", "kind", "attempts", "due_at", "delay_reason", "outcome", "last_error", "dead_at", "finished_at", "result", "error", "type", "job_id", "at", "until", "reason"];
    for (let i = 0; i < 2000; i++) {
      const fields: Record<string, string> = {};
      for (const name of names) if (rnd() < 0.6) fields[name] = values[Math.floor(rnd() * values.length)];
      const snap = { job: rnd() < 0.5 ? fields : {}, outcome: fields, delayedScore: rnd() < 0.3 ? "12" : null, inflightScore: null, deadScore: rnd() < 0.3 ? "nan" : null };
      const status = statusFromSnapshot("j", snap);
      assert.ok(status !== null);
      assert.ok(["waiting", "delayed", "running", "succeeded", "failed", "dead", "cancelled"].includes(status.state));
      const event = parseEvent("1-0", Object.entries(fields).flat());
      assert.equal(event.id, "1-0");
    }
    assert.deepEqual(parseEvent("1-0", "garbage").problems?.[0], "event: the entry's fields are not a list");
    const reply = [["k", [["not-an-id", []], "x", ["1-0", ["type", "created", "job_id", "j"]], null]], "junk"];
    assert.deepEqual(parseXRead(reply).map((e) => [e.id, e.type, e.job_id]), [["1-0", "created", "j"]]);
    assert.deepEqual(parseXRead(null), []);
  });
});

describe("AiqQueue.cancel", () => {
  it("removes a waiting job from its organisation's list and says cancelled", async () => {
    const q = newQueue();
    const keep = await q.add("llm.complete", llm());
    const { id } = await q.add("llm.complete", llm());
    assert.equal(await q.cancel(id), "cancelled");
    assert.deepEqual(await redis.lrange(q.key(`wait:growth_team:${ORG}`), 0, -1), [keep.id]);
    assert.equal(await redis.hget(q.key("depth"), "growth_team"), "1");
    assert.equal((await q.getJob(id))!.state, "cancelled");
    assert.notEqual(await redis.zscore(q.key("cancelled"), id), null);
    assert.equal(await q.cancel(id), "finished");
  });

  it("removes the last waiting job of an organisation from its tier's ring", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    assert.equal(await q.cancel(id), "cancelled");
    assert.equal(await redis.llen(q.key(`wait:growth_team:${ORG}`)), 0);
    assert.deepEqual(await redis.lrange(q.key("orgs:growth_team"), 0, -1), []);
    assert.equal(await redis.zscore(q.key("heads:growth_team"), ORG), null);
    assert.equal(Number((await redis.hget(q.key("depth"), "growth_team")) ?? "0"), 0);
  });

  it("removes a delayed job from the delayed set and says cancelled", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm(), { delay: 60_000 });
    assert.equal(await q.cancel(id), "cancelled");
    assert.equal(await redis.zscore(q.key("delayed"), id), null);
    assert.equal(await redis.zcard(q.key("delayed")), 0);
    assert.equal((await q.getJob(id))!.state, "cancelled");
  });

  it("says not_found for an unknown id", async () => {
    assert.equal(await newQueue().cancel("nobody"), "not_found");
  });

  it("recovers from NOSCRIPT after SCRIPT FLUSH", async () => {
    const q = newQueue();
    await q.add("llm.complete", llm());
    assert.equal(await q.cancel("a"), "not_found");
    await redis.script("FLUSH");
    const evals = await evalCalls(redis);
    const { id } = await q.add("llm.complete", llm());
    assert.equal(await q.cancel(id), "cancelled");
    assert.equal(await evalCalls(redis), evals + 2, "enqueue and cancel should each fall back to EVAL once");
    assert.equal(await q.cancel("b"), "not_found");
    assert.equal(await evalCalls(redis), evals + 2);
  });

  it("reports a missing cancel.lua when cancel is called", async () => {
    const q = new AiqQueue({ connection: redis, prefix: "nocancel", cancelScriptPath: "/nonexistent/cancel.lua" });
    await assert.rejects(q.cancel("x"), /cannot read cancel.lua at \/nonexistent\/cancel.lua/);
  });
});

describe("AiqQueue.events", () => {
  it("yields the created event of an added job with its position", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    const seen: AiqEvent[] = [];
    for await (const e of q.events({ from: "0", blockMs: 100, signal: AbortSignal.timeout(5000) })) {
      seen.push(e);
      break;
    }
    assert.equal(seen.length, 1, "no event within 5 s");
    const [e] = seen;
    assert.equal(e.type, "created");
    assert.equal(e.job_id, id);
    assert.equal(e.state, "waiting");
    assert.equal(e.organization_id, ORG);
    assert.match(e.id, /^\d+-\d+$/);
    assert.equal(e.problems, undefined);
  });

  it("parses every field of the contract's events", async () => {
    const q = newQueue();
    await xaddEvent(q, { type: "deferred", job_id: "j1", state: "delayed", reason: "budget", until: "1764626460000", message: "day budget full" });
    await xaddEvent(q, { type: "succeeded", job_id: "j1", state: "succeeded", result: JSON.stringify(RESULT) });
    const seen: AiqEvent[] = [];
    for await (const e of q.events({ from: "0" })) {
      seen.push(e);
      if (seen.length === 2) break;
    }
    assert.equal(seen[0].reason, "budget");
    assert.equal(seen[0].until, 1764626460000);
    assert.equal(seen[0].message, "day budget full");
    assert.equal(seen[0].at, 1764626400123);
    assert.equal(seen[0].attempts, 1);
    assert.deepEqual(seen[1].result, RESULT);
  });

  it("after a dropped connection goes on from its last position, each event once", async () => {
    const q = newQueue();
    const written: string[] = [];
    for (let i = 0; i < 3; i++) written.push(await xaddEvent(q, { type: "created", job_id: `a${i}`, state: "waiting" }));
    const controller = new AbortController();
    const seen: string[] = [];
    const consumer = (async () => {
      for await (const e of q.events({ from: "0", blockMs: 1000, signal: controller.signal })) seen.push(e.id);
    })();
    try {
      await waitUntil("the first events are read", async () => seen.length === 3);
      await waitUntil("the reader blocks", async () => (await blockedReaders()).length === 1);
      const [killed] = await blockedReaders();
      assert.equal(await redis.client("KILL", "ID", killed), 1);
      for (let i = 0; i < 3; i++) written.push(await xaddEvent(q, { type: "created", job_id: `b${i}`, state: "waiting" }));
      await waitUntil("the later events are read", async () => seen.length >= 6);
      await waitUntil("a new connection reads", async () => {
        const now = await blockedReaders();
        return now.length === 1 && now[0] !== killed;
      });
    } finally {
      controller.abort(); // the test ends the reader even when it fails
      await consumer;
    }
    assert.deepEqual(seen, written);
    assert.deepEqual(await blockedReaders(), []);
  });

  it("reads an entry of several events as each event, in order, and resumes inside it", async () => {
    const q = newQueue();
    // One script call's events, as guard.lua writes them: `n` and each field's values by line.
    const entry = (await redis.xadd(q.key("events"), "*", "n", "3",
      "type", "started\nsucceeded\nfailed", "job_id", "a\nb\nc", "org", `${ORG}\n${ORG}\n${ORG}`,
      "tier", "trial\ntrial\ntrial", "kind", "llm.complete\nllm.complete\nllm.complete",
      "state", "running\nsucceeded\nfailed", "at", "5\n5\n5", "attempts", "0\n0\n1",
      "result", `\n${JSON.stringify(RESULT)}\n`, "error", "\n\nquota exhausted")) as string;
    const later = await xaddEvent(q, { type: "created", job_id: "d", state: "waiting" });
    const all: AiqEvent[] = [];
    for await (const e of q.events({ from: "0" })) {
      all.push(e);
      if (all.length === 4) break;
    }
    assert.deepEqual(all.map((e) => [e.id, e.type, e.job_id]), [
      [`${entry}/0`, "started", "a"], [`${entry}/1`, "succeeded", "b"], [`${entry}/2`, "failed", "c"], [later, "created", "d"],
    ]);
    assert.deepEqual(all[1].result, RESULT);
    assert.equal(all[1].error, null);
    assert.equal(all[2].error, "quota exhausted");
    assert.equal(all[2].attempts, 1);
    assert.ok(all.every((e) => e.problems === undefined), JSON.stringify(all));
    // From the middle of the entry: the rest of it, then what follows.
    const rest: string[] = [];
    for await (const e of q.events({ from: `${entry}/0` })) {
      rest.push(e.id);
      if (rest.length === 3) break;
    }
    assert.deepEqual(rest, [`${entry}/1`, `${entry}/2`, later]);
    // Entries of the wrong shape give one event that names the problem; nothing throws.
    for (const flat of [["n", "2", "job_id", "a\nb\nc"], ["n", "1", "job_id", "a"], ["n", "x"]]) {
      const got = parseEntry("9-0", flat);
      assert.equal(got.length, 1);
      assert.match(got[0].problems?.join(" ") ?? "", /event\.(n|job_id)/);
    }
  });

  it("starts after the stream's last event by default", async () => {
    const q = newQueue();
    await xaddEvent(q, { type: "created", job_id: "old", state: "waiting" });
    const controller = new AbortController();
    const it = q.events({ blockMs: 100, signal: controller.signal });
    const next = it.next();
    try {
      await waitUntil("the reader blocks", async () => (await blockedReaders()).length === 1);
      await xaddEvent(q, { type: "created", job_id: "new", state: "waiting" });
      const first = await next;
      assert.equal((first.value as AiqEvent).job_id, "new");
    } finally {
      controller.abort();
      await next;
      await it.return();
    }
  });

  it("throws when Redis stays unreachable past reconnectTimeoutMs", async () => {
    const down = new Redis({ port: 1, lazyConnect: true, maxRetriesPerRequest: 0 });
    down.on("error", () => undefined);
    const q = new AiqQueue({ connection: down, prefix: "down" });
    await assert.rejects(
      (async () => {
        for await (const _ of q.events({ from: "0", blockMs: 100, reconnectTimeoutMs: 300 })) break;
      })(),
      /ECONNREFUSED|Connection is closed|Reached the max retries/,
    );
    down.disconnect();
  });

  it("refuses a position that is not one", async () => {
    const q = newQueue();
    await assert.rejects(q.events({ from: "yesterday" }).next(), TypeError);
  });
});

describe("AiqQueue.waitUntilFinished", () => {
  it("returns at once for a job that finished before the call", async () => {
    const q = newQueue();
    await writeOutcome(q, "early", "succeeded");
    const status = await q.waitUntilFinished("early", { timeoutMs: 10_000 });
    assert.equal(status.state, "succeeded");
    assert.deepEqual(status.result, RESULT);
  });

  it("returns the cancelled status of a job cancelled before the call", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    assert.equal(await q.cancel(id), "cancelled");
    assert.equal((await q.waitUntilFinished(id, { timeoutMs: 10_000 })).state, "cancelled");
  });

  it("returns when the job's terminal event arrives", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    const waiting = q.waitUntilFinished(id, { timeoutMs: 30_000 });
    await waitUntil("the waiter blocks", async () => (await blockedReaders()).length === 1);
    // What settle does in one script: the job leaves, its outcome is kept, the event is written.
    await redis.del(q.key(`job:${id}`));
    await writeOutcome(q, id, "succeeded");
    await xaddEvent(q, { type: "succeeded", job_id: id, state: "succeeded", result: JSON.stringify(RESULT) });
    const status = await waiting;
    assert.equal(status.state, "succeeded");
    assert.deepEqual(status.result, RESULT);
    await waitUntil("the waiter's connection is closed", async () => (await blockedReaders()).length === 0);
  });

  it("ends by reading the status when a job finishes without an event (events off)", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    const waiting = q.waitUntilFinished(id, { timeoutMs: 30_000, blockMs: 100 });
    await waitUntil("the waiter blocks", async () => (await blockedReaders()).length === 1);
    await redis.del(q.key(`job:${id}`));
    await writeOutcome(q, id, "failed", { error: "invalid payload: model" });
    const status = await waiting;
    assert.equal(status.state, "failed");
    assert.equal(status.last_error, "invalid payload: model");
  });

  it("times out cleanly for a job still waiting", async () => {
    const q = newQueue();
    const { id } = await q.add("llm.complete", llm());
    await assert.rejects(q.waitUntilFinished(id, { timeoutMs: 300, blockMs: 100 }), (e: unknown) => {
      assert.ok(e instanceof AiqTimeoutError);
      assert.equal(e.jobId, id);
      assert.equal(e.status.state, "waiting");
      return true;
    });
    await waitUntil("the waiter's connection is closed", async () => (await blockedReaders()).length === 0);
  });

  it("refuses a timeout or a block that is not one", async () => {
    const q = newQueue();
    for (const bad of [{ timeoutMs: -1 }, { timeoutMs: NaN }, { blockMs: 0 }, { blockMs: 1.5 }, { blockMs: 600_001 }]) {
      await assert.rejects(q.waitUntilFinished("x", bad), TypeError, JSON.stringify(bad));
    }
    await assert.rejects(q.events({ count: 0 }).next(), TypeError);
  });

  it("says not found at once for an unknown id", async () => {
    const q = newQueue();
    await assert.rejects(q.waitUntilFinished("nobody", { timeoutMs: 60_000 }), (e: unknown) => {
      assert.ok(e instanceof AiqJobNotFound);
      assert.equal(e.jobId, "nobody");
      return true;
    });
  });
});
