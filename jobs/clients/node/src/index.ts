// @aiq/client: puts jobs into an aiq queue by running jobs/enqueue.lua (the contract in
// jobs/README.md), and tells their outcomes: status, waiting, the events stream, cancel
// (jobs/cancel.lua). The scripts are read from their files at run time, never copied here.

import { readFileSync } from "node:fs";
import * as path from "node:path";
import type { Cluster, Redis } from "ioredis";
import {
  AiqEvent,
  JobStatus,
  STREAM_ID_RE,
  StatusSnapshot,
  TERMINAL_EVENT_TYPES,
  TERMINAL_STATES,
  parseXRead,
  entryOf,
  POSITION_RE,
  statusFromEvent,
  statusFromSnapshot,
  textOf,
} from "./outcomes";
import { JobKind, PayloadByKind, Tier } from "./types";

export * from "./outcomes";
export * from "./types";
export * from "./webhooks";

/** An ioredis client or cluster client; the queue does not own it and never closes it. */
export type AiqConnection = Redis | Cluster;

export interface AiqQueueOptions {
  /** The ioredis connection to use. It must not have a `keyPrefix`. */
  connection: AiqConnection;
  /** The queue prefix (the daemon's AIQ_QUEUE_PREFIX); keys live under `{prefix}`. Default "aiq". */
  prefix?: string;
  /** How long idempotency keys are remembered, in seconds. Default 86400 (what aiq uses). */
  idempotencyTtlSeconds?: number;
  /** Path of enqueue.lua. Default: jobs/enqueue.lua, i.e. ../../enqueue.lua from this package. */
  scriptPath?: string;
  /** Path of cancel.lua, read at the first cancel(). Default: cancel.lua beside enqueue.lua. */
  cancelScriptPath?: string;
}

export interface AddOptions {
  /** The tier to queue under. Defaults to payload.tier; when given it must equal payload.tier. */
  tier?: Tier;
  /** Run no earlier than this many milliseconds from now. Default 0 (now). */
  delay?: number;
  /** A second add with the same key (within the TTL) returns the first job's id as a duplicate. */
  idempotencyKey?: string;
  /** Your own job id (1-128 characters, no spaces or braces); an id already queued is a duplicate. */
  jobId?: string;
  /** Executions before the job goes to the dead set, 1 to 100. Default 0: the daemon's default. */
  maxAttempts?: number;
}

export interface AddResult {
  /** The job id: the new job's, or the first job's when `duplicate` is true. */
  id: string;
  /** True when the job id or idempotency key was already known: nothing new was queued. */
  duplicate: boolean;
}

/** One job for `addBulk`. */
export type BulkJob = {
  [K in JobKind]: { kind: K; payload: PayloadByKind[K]; opts?: AddOptions };
}[JobKind];

/**
 * A job was refused. `message` is the server's reply (it starts with "ERR aiq:") when
 * `source` is "server", or the client's reason when the job was refused before reaching Redis.
 */
export class AiqEnqueueError extends Error {
  readonly source: "server" | "client";
  constructor(message: string, source: "server" | "client") {
    super(message);
    this.name = "AiqEnqueueError";
    this.source = source;
  }
}

/**
 * `addBulk` could not queue every job. `results` has one entry per job, in order: its result,
 * or the error that stopped it (an AiqEnqueueError when the script refused it). Jobs are
 * independent: those with a result were queued.
 */
export class AiqBulkEnqueueError extends AiqEnqueueError {
  readonly results: Array<AddResult | Error>;
  constructor(results: Array<AddResult | Error>) {
    const first = results.findIndex((r) => r instanceof Error);
    const failed = results.filter((r) => r instanceof Error).length;
    super(
      `aiq: ${failed} of ${results.length} jobs failed; job ${first}: ${(results[first] as Error).message}`,
      "server",
    );
    this.name = "AiqBulkEnqueueError";
    this.results = results;
  }
}

/** Where enqueue.lua is when this package sits in the aiq repository (jobs/clients/node). */
export function defaultScriptPath(): string {
  // This file is dist/src/index.js once built: the package folder is two levels up.
  const packageDir = path.resolve(__dirname, "..", "..");
  return path.resolve(packageDir, "..", "..", "enqueue.lua");
}

const PREFIX_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

type Prepared = { args: string[] };

/** Puts jobs into one aiq queue. */
export class AiqQueue {
  readonly prefix: string;
  /** The hash tag every key of the queue starts with: "{" + prefix + "}". */
  readonly base: string;
  readonly idempotencyTtlSeconds: number;
  readonly scriptPath: string;
  readonly cancelScriptPath: string;
  private readonly connection: AiqConnection;
  private readonly enqueueScript: LuaScript;
  private cancelScript: LuaScript | undefined;

  constructor(opts: AiqQueueOptions) {
    if (!opts || !opts.connection) throw new TypeError("AiqQueue: options.connection is required");
    const prefix = opts.prefix ?? "aiq";
    if (!PREFIX_RE.test(prefix)) {
      throw new TypeError(
        `AiqQueue: prefix ${JSON.stringify(prefix)} must be 1-64 characters of letters, digits, _ - . :`,
      );
    }
    const ttl = opts.idempotencyTtlSeconds ?? 86400;
    if (!Number.isInteger(ttl) || ttl <= 0) {
      throw new TypeError("AiqQueue: idempotencyTtlSeconds must be a positive integer");
    }
    if (connectionKeyPrefix(opts.connection)) {
      throw new TypeError(
        "AiqQueue: the connection has a keyPrefix; aiq keys must be exact, use the prefix option instead",
      );
    }
    this.connection = opts.connection;
    this.prefix = prefix;
    this.base = `{${prefix}}`;
    this.idempotencyTtlSeconds = ttl;
    this.scriptPath = path.resolve(opts.scriptPath ?? defaultScriptPath());
    this.cancelScriptPath = path.resolve(opts.cancelScriptPath ?? path.join(path.dirname(this.scriptPath), "cancel.lua"));
    this.enqueueScript = new LuaScript(this.scriptPath, "enqueue.lua", "scriptPath");
  }

  /** The full key of a queue key suffix, e.g. key("job:j1") is "{aiq}:job:j1". */
  key(suffix: string): string {
    return `${this.base}:${suffix}`;
  }

  /**
   * Queues one job. Throws an AiqEnqueueError when the job is refused (nothing is written then).
   */
  async add<K extends JobKind>(kind: K, payload: PayloadByKind[K], opts: AddOptions = {}): Promise<AddResult> {
    const { args } = this.prepare(kind, payload, opts);
    let reply: unknown;
    try {
      reply = await this.enqueueScript.run(this.connection, this.base, args);
    } catch (e) {
      throw toEnqueueError(e);
    }
    return parseReply(reply);
  }

  /**
   * Queues several jobs in one round trip (a pipeline of EVALSHA calls), in order. Every job is
   * checked locally first: if one fails, none is sent. Each job is then queued atomically on its
   * own; if the server refuses some, an AiqBulkEnqueueError tells which (the others were queued).
   */
  async addBulk(jobs: readonly BulkJob[]): Promise<AddResult[]> {
    const prepared = jobs.map((j) => this.prepare(j.kind, j.payload, j.opts ?? {}));
    if (prepared.length === 0) return [];
    const script = this.enqueueScript;
    const sha = await script.load(this.connection);
    const results: Array<AddResult | Error> = new Array(prepared.length);
    let pending = prepared.map((_, i) => i);
    // First EVALSHA; jobs that met NOSCRIPT did not run, so they are sent again with EVAL.
    for (const useEval of [false, true]) {
      const pipe = this.connection.pipeline();
      for (const i of pending) {
        if (useEval) pipe.eval(script.source, 1, this.base, ...prepared[i].args);
        else pipe.evalsha(sha, 1, this.base, ...prepared[i].args);
      }
      const replies = (await pipe.exec()) ?? [];
      const retry: number[] = [];
      pending.forEach((i, n) => {
        const [err, reply] = replies[n] ?? [new Error("aiq: no reply from the pipeline"), null];
        if (err && !useEval && isNoScript(err)) retry.push(i);
        else if (err) results[i] = toEnqueueError(err) as Error;
        else results[i] = parseReply(reply);
      });
      pending = retry;
      if (pending.length === 0) break;
    }
    if (results.some((r) => r instanceof Error)) throw new AiqBulkEnqueueError(results);
    return results as AddResult[];
  }

  /** Checks a job locally and builds its script arguments (ARGV[1..9]). */
  private prepare(kind: string, payload: unknown, opts: AddOptions): Prepared {
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
      throw new AiqEnqueueError("aiq: the payload must be a JSON object", "client");
    }
    const doc = payload as Record<string, unknown>;
    const org = doc.organization_id;
    if (typeof org !== "string" || org.length === 0) {
      throw new AiqEnqueueError("aiq: payload.organization_id is required", "client");
    }
    const payloadTier = doc.tier;
    if (typeof payloadTier !== "string" || payloadTier.length === 0) {
      throw new AiqEnqueueError("aiq: payload.tier is required", "client");
    }
    const tier = opts.tier ?? payloadTier;
    if (tier !== payloadTier) {
      throw new AiqEnqueueError(
        `aiq: tier ${JSON.stringify(tier)} differs from payload.tier ${JSON.stringify(payloadTier)}`,
        "client",
      );
    }
    const ttl = this.idempotencyTtlSeconds;
    return {
      args: [
        kind,
        tier,
        org,
        JSON.stringify(payload),
        opts.jobId ?? "",
        numberArg("delay", opts.delay ?? 0),
        opts.idempotencyKey ?? "",
        String(ttl),
        numberArg("maxAttempts", opts.maxAttempts ?? 0),
      ],
    };
  }

  /**
   * A job's status, or null when the id exists nowhere in Redis (never "waiting"). Reads
   * `{p}:job:<id>` and then `{p}:outcome:<id>` in one MULTI, so the answer is one moment's.
   */
  async getJob(id: string): Promise<JobStatus | null> {
    checkJobId(id);
    const { snapshot } = await this.snapshot(id, false);
    return statusFromSnapshot(id, snapshot);
  }

  /**
   * Waits for a job to finish and returns its final status (at once for a job that finished
   * before the call). Rejects with AiqJobNotFound at once for an id that exists nowhere, and
   * with AiqTimeoutError when `timeoutMs` passes first (no timeout: waits as long as it takes).
   * It reads the events stream on a connection of its own (the given one's `duplicate()`), in
   * slices of `blockMs`, reading the status again between them, so it also ends when events
   * are off.
   */
  async waitUntilFinished(id: string, opts: WaitOptions = {}): Promise<JobStatus> {
    checkJobId(id);
    const timeoutMs = opts.timeoutMs ?? Infinity;
    if (typeof timeoutMs !== "number" || Number.isNaN(timeoutMs) || timeoutMs < 0) {
      throw new TypeError("waitUntilFinished: timeoutMs must be a number >= 0");
    }
    const blockMs = checkBlockMs(opts.blockMs);
    const deadline = Date.now() + timeoutMs;
    // The stream's position is read with the status, so an event written after it is seen.
    const first = await this.snapshot(id, true);
    let status = statusFromSnapshot(id, first.snapshot);
    if (status === null) throw new AiqJobNotFound(id);
    if (isFinished(status)) return status;
    let position = first.position;
    const reader = new StreamReader(this.connection, this.key("events"));
    try {
      let failures = 0;
      let checked = Date.now();
      for (;;) {
        const left = deadline - Date.now();
        if (left <= 0) throw new AiqTimeoutError(id, timeoutMs, status);
        const read = await reader.read(position, Math.max(1, Math.min(blockMs, left)), 100);
        if ("error" in read) {
          failures += 1;
          await pause(Math.min(backoffMs(failures), Math.max(0, deadline - Date.now())));
          continue;
        }
        failures = 0;
        for (const event of read.events) {
          position = entryOf(event.id);
          if (event.job_id === id && (TERMINAL_EVENT_TYPES as readonly string[]).includes(event.type)) {
            const final = await this.getJob(id);
            return final !== null && isFinished(final) ? final : statusFromEvent(event);
          }
        }
        if (read.events.length === 0 || Date.now() - checked >= blockMs) {
          checked = Date.now();
          const now = await this.getJob(id);
          if (now === null) throw new AiqJobNotFound(id, "it left Redis without an outcome");
          if (isFinished(now)) return now;
          status = now;
        }
      }
    } finally {
      reader.close();
    }
  }

  /**
   * The events stream as an async iterator: every event after `from` (a position an earlier
   * event gave, "0" for all the stream keeps, "$" or nothing for those written from now on),
   * parsed, with its position in `id`. It reads on a connection of its own; when that
   * connection drops it reconnects and goes on after the last event it yielded, so a consumer
   * sees each event once. It ends when `signal` aborts or the loop breaks, and throws when
   * Redis stays unreachable for `reconnectTimeoutMs`.
   */
  async *events(opts: EventsOptions = {}): AsyncGenerator<AiqEvent, void, undefined> {
    let position = opts.from ?? "$";
    if (typeof position !== "string" || !(position === "$" || POSITION_RE.test(position))) {
      throw new TypeError(
        'events: from must be an event position ("1764626400123-0" or "1764626400123-0/3"), "0" or "$"',
      );
    }
    const blockMs = checkBlockMs(opts.blockMs);
    const count = opts.count ?? 100;
    if (!Number.isInteger(count) || count < 1 || count > 10_000) throw new TypeError("events: count must be 1 to 10000");
    const reconnectTimeoutMs = opts.reconnectTimeoutMs ?? 60_000;
    const signal = opts.signal;
    const reader = new StreamReader(this.connection, this.key("events"));
    const stop = () => reader.close();
    signal?.addEventListener("abort", stop);
    try {
      if (position === "$") position = await this.lastEventId();
      if (position !== entryOf(position)) {
        // After one event of an entry of several: the rest of that entry first.
        const entry = entryOf(position);
        const after = Number(position.slice(entry.length + 1));
        const reply = (await this.connection.xrange(this.key("events"), entry, entry)) as unknown;
        for (const event of parseXRead([["events", reply]])) {
          if (Number(event.id.slice(entry.length + 1)) > after) yield event;
        }
        position = entry;
      }
      let failingSince: number | undefined;
      let failures = 0;
      while (!signal?.aborted) {
        const read = await reader.read(position, blockMs, count);
        if ("error" in read) {
          if (signal?.aborted) break;
          failingSince ??= Date.now();
          if (Date.now() - failingSince > reconnectTimeoutMs) throw read.error;
          failures += 1;
          await pause(backoffMs(failures));
          continue;
        }
        failingSince = undefined;
        failures = 0;
        for (const event of read.events) {
          position = entryOf(event.id);
          yield event;
        }
      }
    } finally {
      signal?.removeEventListener("abort", stop);
      reader.close();
    }
  }

  /**
   * Cancels a waiting or delayed job (jobs/cancel.lua): "cancelled" when it was removed,
   * "running" when it is running (it finishes), "finished" when it had already ended,
   * "not_found" when the id exists nowhere.
   */
  async cancel(id: string): Promise<CancelResult> {
    checkJobId(id);
    this.cancelScript ??= new LuaScript(this.cancelScriptPath, "cancel.lua", "cancelScriptPath");
    const reply = textOf(await this.cancelScript.run(this.connection, this.base, [id]));
    if (reply === null || !(CANCEL_RESULTS as readonly string[]).includes(reply)) {
      throw new Error(`aiq: cancel.lua returned an unexpected reply: ${JSON.stringify(reply)}`);
    }
    return reply as CancelResult;
  }

  /** The position of the stream's last event ("0-0" when it has none). */
  private async lastEventId(): Promise<string> {
    const last = (await this.connection.xrevrange(this.key("events"), "+", "-", "COUNT", 1)) as unknown;
    return firstStreamId(last) ?? "0-0";
  }

  private async snapshot(id: string, withPosition: boolean): Promise<{ snapshot: StatusSnapshot; position: string }> {
    const m = this.connection.multi();
    m.hgetall(this.key(`job:${id}`));
    m.hgetall(this.key(`outcome:${id}`));
    m.zscore(this.key("delayed"), id);
    m.zscore(this.key("inflight"), id);
    m.zscore(this.key("dead"), id);
    if (withPosition) m.xrevrange(this.key("events"), "+", "-", "COUNT", 1);
    const replies = await m.exec();
    if (!replies) throw new Error("aiq: the status transaction was aborted");
    const values = replies.map(([err, value], i) => {
      if (err) throw new Error(`aiq: reading the status of ${JSON.stringify(id)} (command ${i}): ${err.message}`);
      return value;
    });
    const hash = (v: unknown): Record<string, string> =>
      v !== null && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, string>) : {};
    const zscore = (v: unknown): string | null => textOf(v);
    return {
      snapshot: {
        job: hash(values[0]),
        outcome: hash(values[1]),
        delayedScore: zscore(values[2]),
        inflightScore: zscore(values[3]),
        deadScore: zscore(values[4]),
      },
      position: withPosition ? (firstStreamId(values[5]) ?? "0-0") : "0-0",
    };
  }
}

export interface WaitOptions {
  /** Reject with AiqTimeoutError after this many ms. Default: no limit. */
  timeoutMs?: number;
  /** How long one XREAD BLOCK lasts before the status is read again, ms. Default 5000. */
  blockMs?: number;
}

export interface EventsOptions {
  /** Yield events after this position; "0" for all the stream keeps; "$" (default) for new ones. */
  from?: string;
  /** How long one XREAD BLOCK lasts, ms. Default 5000. */
  blockMs?: number;
  /** The most events read at once. Default 100. */
  count?: number;
  /** Stops the iterator (it returns). */
  signal?: AbortSignal;
  /** Throw when Redis stays unreachable this long, ms. Default 60000. */
  reconnectTimeoutMs?: number;
}

export type CancelResult = "cancelled" | "running" | "finished" | "not_found";
export const CANCEL_RESULTS: readonly CancelResult[] = ["cancelled", "running", "finished", "not_found"];

/** The id exists nowhere in Redis (not queued, running, dead, nor finished within retention). */
export class AiqJobNotFound extends Error {
  readonly jobId: string;
  constructor(jobId: string, why = "it exists nowhere") {
    super(`aiq: job ${JSON.stringify(jobId)} not found: ${why}`);
    this.name = "AiqJobNotFound";
    this.jobId = jobId;
  }
}

/** waitUntilFinished's timeout passed first; `status` is the job's last status seen. */
export class AiqTimeoutError extends Error {
  readonly jobId: string;
  readonly status: JobStatus;
  constructor(jobId: string, timeoutMs: number, status: JobStatus) {
    super(`aiq: job ${JSON.stringify(jobId)} did not finish within ${timeoutMs} ms (it is ${status.state})`);
    this.name = "AiqTimeoutError";
    this.jobId = jobId;
    this.status = status;
  }
}

const MAX_JOB_ID_BYTES = 128;

function checkJobId(id: string): void {
  if (typeof id !== "string" || id.length === 0 || Buffer.byteLength(id, "utf8") > MAX_JOB_ID_BYTES) {
    throw new TypeError(`aiq: a job id is 1 to ${MAX_JOB_ID_BYTES} bytes of text`);
  }
}

function checkBlockMs(v: number | undefined): number {
  const ms = v ?? 5000;
  if (!Number.isInteger(ms) || ms < 1 || ms > 600_000) throw new TypeError("aiq: blockMs must be an integer, 1 to 600000");
  return ms;
}

function isFinished(s: JobStatus): boolean {
  return TERMINAL_STATES.includes(s.state);
}

function firstStreamId(reply: unknown): string | null {
  if (!Array.isArray(reply) || !Array.isArray(reply[0])) return null;
  const id = textOf(reply[0][0]);
  return id !== null && STREAM_ID_RE.test(id) ? id : null;
}

function backoffMs(failures: number): number {
  return Math.min(2000, 50 * 2 ** Math.min(failures, 6));
}

function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** How long past its BLOCK an XREAD may go unanswered before its connection is called dead. */
const READ_GRACE_MS = 5000;

/**
 * Reads the events stream with XREAD BLOCK on a connection of its own (a blocking read would
 * hold up every other command of a shared one). A read that fails, or hangs past its block,
 * drops the connection; the next read opens a new one.
 */
class StreamReader {
  private conn: AiqConnection | undefined;
  private closed = false;
  constructor(
    private readonly source: AiqConnection,
    private readonly key: string,
  ) {}

  async read(after: string, blockMs: number, count: number): Promise<{ events: AiqEvent[] } | { error: Error }> {
    if (this.closed) return { error: new Error("aiq: the events reader is closed") };
    this.conn ??= duplicateOf(this.source);
    const call = this.conn.call("XREAD", "COUNT", count, "BLOCK", blockMs, "STREAMS", this.key, after) as Promise<unknown>;
    call.catch(() => undefined); // its failure is handled below, or it lost the race to the guard
    let timer: NodeJS.Timeout | undefined;
    const guard = new Promise<typeof HUNG>((resolve) => {
      timer = setTimeout(() => resolve(HUNG), blockMs + READ_GRACE_MS);
    });
    try {
      const reply = await Promise.race([call, guard]);
      if (reply === HUNG) {
        this.drop();
        return { error: new Error(`aiq: XREAD got no answer within ${blockMs + READ_GRACE_MS} ms`) };
      }
      return { events: parseXRead(reply) };
    } catch (e) {
      // A reply error (WRONGTYPE...) is not mended by reconnecting.
      if (e instanceof Error && e.name === "ReplyError") throw e;
      this.drop();
      return { error: e instanceof Error ? e : new Error(String(e)) };
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    this.closed = true;
    this.drop();
  }

  private drop(): void {
    this.conn?.disconnect();
    this.conn = undefined;
  }
}

const HUNG = Symbol("hung");

function duplicateOf(conn: AiqConnection): AiqConnection {
  const dup = (conn as Redis).duplicate();
  // Errors surface as rejected reads; without a listener ioredis would log each one.
  dup.on("error", () => undefined);
  return dup;
}

/** A Lua script of the contract, read from its file once, run by SHA with a NOSCRIPT fallback. */
class LuaScript {
  readonly source: string;
  private sha: Promise<string> | undefined;

  constructor(
    readonly file: string,
    name: string,
    option: string,
  ) {
    try {
      this.source = readFileSync(file, "utf8");
    } catch (e) {
      throw new Error(`AiqQueue: cannot read ${name} at ${file} (pass ${option}): ${(e as Error).message}`);
    }
  }

  load(conn: AiqConnection): Promise<string> {
    if (!this.sha) {
      const loading = conn.script("LOAD", this.source) as Promise<string>;
      this.sha = loading.catch((e) => {
        this.sha = undefined;
        throw e;
      });
    }
    return this.sha;
  }

  /** EVALSHA with one key; on NOSCRIPT (a flushed cache, a failover) EVAL, which caches it again. */
  async run(conn: AiqConnection, key: string, args: string[]): Promise<unknown> {
    const sha = await this.load(conn);
    try {
      return await conn.evalsha(sha, 1, key, ...args);
    } catch (e) {
      if (!isNoScript(e)) throw e;
      return await conn.eval(this.source, 1, key, ...args);
    }
  }
}

function numberArg(name: string, v: number): string {
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new AiqEnqueueError(`aiq: ${name} must be a finite number`, "client");
  }
  return String(v);
}

function connectionKeyPrefix(conn: AiqConnection): string | undefined {
  const o = (conn as unknown as { options?: { keyPrefix?: string; redisOptions?: { keyPrefix?: string } } })
    .options;
  return o?.keyPrefix || o?.redisOptions?.keyPrefix || undefined;
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function isNoScript(e: unknown): boolean {
  return errorMessage(e).startsWith("NOSCRIPT");
}

/** Script refusals ("ERR aiq: ...") become AiqEnqueueError; any other error is returned as is. */
function toEnqueueError(e: unknown): unknown {
  const msg = errorMessage(e);
  if (msg.startsWith("ERR aiq:")) return new AiqEnqueueError(msg, "server");
  return e instanceof Error ? e : new Error(msg);
}

function parseReply(reply: unknown): AddResult {
  if (Array.isArray(reply) && reply.length === 2) {
    const [id, status] = reply.map((v) => (Buffer.isBuffer(v) ? v.toString("utf8") : v));
    if (typeof id === "string" && (status === "created" || status === "duplicate")) {
      return { id, duplicate: status === "duplicate" };
    }
  }
  throw new Error(`aiq: enqueue.lua returned an unexpected reply: ${JSON.stringify(reply)}`);
}
