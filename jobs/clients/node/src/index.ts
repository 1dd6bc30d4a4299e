// @aiq/client: puts jobs into an aiq queue by running jobs/enqueue.lua (the contract in
// jobs/README.md). The script is read from its file at run time, never copied into this client.

import { readFileSync } from "node:fs";
import * as path from "node:path";
import type { Cluster, Redis } from "ioredis";
import { JobKind, PayloadByKind, Tier } from "./types";

export * from "./types";

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
  private readonly connection: AiqConnection;
  private readonly source: string;
  private sha: Promise<string> | undefined;

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
    try {
      this.source = readFileSync(this.scriptPath, "utf8");
    } catch (e) {
      throw new Error(
        `AiqQueue: cannot read enqueue.lua at ${this.scriptPath} (pass scriptPath): ${(e as Error).message}`,
      );
    }
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
    const sha = await this.loadScript();
    let reply: unknown;
    try {
      reply = await this.connection.evalsha(sha, 1, this.base, ...args);
    } catch (e) {
      if (!isNoScript(e)) throw toEnqueueError(e);
      // The script cache was flushed (or this is another cluster node): EVAL puts it back.
      try {
        reply = await this.connection.eval(this.source, 1, this.base, ...args);
      } catch (e2) {
        throw toEnqueueError(e2);
      }
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
    const sha = await this.loadScript();
    const results: Array<AddResult | Error> = new Array(prepared.length);
    let pending = prepared.map((_, i) => i);
    // First EVALSHA; jobs that met NOSCRIPT did not run, so they are sent again with EVAL.
    for (const useEval of [false, true]) {
      const pipe = this.connection.pipeline();
      for (const i of pending) {
        if (useEval) pipe.eval(this.source, 1, this.base, ...prepared[i].args);
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

  private loadScript(): Promise<string> {
    if (!this.sha) {
      const loading = this.connection.script("LOAD", this.source) as Promise<string>;
      this.sha = loading.catch((e) => {
        this.sha = undefined;
        throw e;
      });
    }
    return this.sha;
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
