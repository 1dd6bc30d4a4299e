// What a job's status and its events look like to an app (jobs/README.md, "Outcomes"), and the
// parsers that build them from what Redis holds. Parsing is defensive: Redis may hold anything
// (a hand-written hash, a newer daemon's field), so a field that is missing or of the wrong type
// becomes null and is named in `problems`; nothing here throws on what Redis returns.

/** Every state a status may say. */
export type JobState = "waiting" | "delayed" | "running" | "succeeded" | "failed" | "dead" | "cancelled";
export const JOB_STATES: readonly JobState[] = [
  "waiting",
  "delayed",
  "running",
  "succeeded",
  "failed",
  "dead",
  "cancelled",
];
/** The states a job never leaves. */
export const TERMINAL_STATES: readonly JobState[] = ["succeeded", "failed", "dead", "cancelled"];

/** Why a delayed job waits. */
export type DelayReason =
  | "scheduled"
  | "retry"
  | "budget"
  | "org_rate"
  | "provider_rate"
  | "provider_paused"
  | "breaker"
  | "org_in_flight"
  | "unavailable"
  | "other";
export const DELAY_REASONS: readonly DelayReason[] = [
  "scheduled",
  "retry",
  "budget",
  "org_rate",
  "provider_rate",
  "provider_paused",
  "breaker",
  "org_in_flight",
  "unavailable",
  "other",
];

export type EventType =
  | "created"
  | "started"
  | "deferred"
  | "retried"
  | "released"
  | "interrupted"
  | "succeeded"
  | "failed"
  | "dead"
  | "cancelled";
export const EVENT_TYPES: readonly EventType[] = [
  "created",
  "started",
  "deferred",
  "retried",
  "released",
  "interrupted",
  "succeeded",
  "failed",
  "dead",
  "cancelled",
];
/** The events that end a job: exactly one of them is written per job. */
export const TERMINAL_EVENT_TYPES: readonly EventType[] = ["succeeded", "failed", "dead", "cancelled"];

/** The summary of a succeeded job's answer. */
export interface JobResult {
  provider: string | null;
  model: string | null;
  /** A decimal string, e.g. "0.000123" (never a float, so no cent is lost). */
  cost_usd: string | null;
  input_tokens: number | null;
  output_tokens: number | null;
  /** Billable units of a Vision job. */
  units: number | null;
  duration_ms: number | null;
}

/** A job's status: the same shape as `aiq job show --json` and the Python client's `get_job`. */
export interface JobStatus {
  id: string;
  state: JobState;
  organization_id: string | null;
  tier: string | null;
  kind: string | null;
  attempts: number | null;
  /** When a delayed job is due (ms, Redis time); null in any other state. */
  due_at: number | null;
  /** Why a delayed job waits; null in any other state. */
  delay_reason: DelayReason | null;
  last_error: string | null;
  /** When a finished job finished (ms, Redis time). */
  finished_at: number | null;
  /** A succeeded job's result summary. */
  result: JobResult | null;
  /** Present only when Redis held a field that is missing or not what the contract says. */
  problems?: string[];
}

/** One entry of the `{p}:events` stream. */
export interface AiqEvent {
  /**
   * The event's position: its stream entry's id ("1764626400123-0") when the entry holds this
   * one event, else that id, "/" and the event's index in the entry ("1764626400123-0/3").
   * Resume after it.
   */
  id: string;
  /** One of EVENT_TYPES; an unknown type from a newer daemon is passed on (and named in problems). */
  type: EventType;
  job_id: string;
  organization_id: string | null;
  tier: string | null;
  kind: string | null;
  /** The job's state after the change. */
  state: JobState | null;
  /** When it happened (ms, Redis time). */
  at: number | null;
  attempts: number | null;
  /** `deferred`: why. */
  reason: DelayReason | null;
  /** `deferred`, `retried`, `created` of a delayed job: when it is due (ms). */
  until: number | null;
  /** `deferred`: the deferral's message. */
  message: string | null;
  /** `retried`, `failed`, `dead`: the error. */
  error: string | null;
  /** `succeeded`: the result summary. */
  result: JobResult | null;
  problems?: string[];
}

/** The most a result's JSON may hold before it is refused (it is a few hundred bytes). */
const MAX_RESULT_BYTES = 64 * 1024;

type Fields = Record<string, string>;

/** Reads fields of one hash or stream entry, collecting what is wrong with them. */
class FieldReader {
  readonly problems: string[] = [];
  constructor(
    private readonly fields: Fields,
    private readonly where: string,
  ) {}

  private report(name: string, what: string): null {
    this.problems.push(`${this.where}.${name}: ${what}`);
    return null;
  }

  has(name: string): boolean {
    return typeof this.fields[name] === "string" && this.fields[name] !== "";
  }

  /** A string; "" or missing is null (reported when required). */
  str(name: string, required = false): string | null {
    const v = this.fields[name];
    if (typeof v === "string" && v !== "") return v;
    return required ? this.report(name, "missing") : null;
  }

  /** A non-negative integer written as decimal digits. */
  int(name: string, required = false): number | null {
    const v = this.str(name, required);
    if (v === null) return null;
    return parseCount(v) ?? this.report(name, `not a non-negative integer: ${clip(v)}`);
  }

  /** One of a closed list. */
  oneOf<T extends string>(name: string, allowed: readonly T[], required = false): T | null {
    const v = this.str(name, required);
    if (v === null) return null;
    return (allowed as readonly string[]).includes(v) ? (v as T) : this.report(name, `unknown value ${clip(v)}`);
  }

  /** The JSON result summary. */
  result(name: string): JobResult | null {
    const v = this.str(name);
    if (v === null) return null;
    if (Buffer.byteLength(v, "utf8") > MAX_RESULT_BYTES) return this.report(name, `longer than ${MAX_RESULT_BYTES} bytes`);
    let doc: unknown;
    try {
      doc = JSON.parse(v);
    } catch {
      return this.report(name, `not JSON: ${clip(v)}`);
    }
    if (doc === null || typeof doc !== "object" || Array.isArray(doc)) return this.report(name, "not a JSON object");
    const o = doc as Record<string, unknown>;
    const text = (k: string): string | null => {
      if (o[k] === undefined || o[k] === null) return null;
      return typeof o[k] === "string" ? (o[k] as string) : this.report(`${name}.${k}`, "not a string");
    };
    const count = (k: string): number | null => {
      const x = o[k];
      if (x === undefined || x === null) return null;
      return Number.isSafeInteger(x) && (x as number) >= 0 ? (x as number) : this.report(`${name}.${k}`, "not a non-negative integer");
    };
    return {
      provider: text("provider"),
      model: text("model"),
      cost_usd: text("cost_usd"),
      input_tokens: count("input_tokens"),
      output_tokens: count("output_tokens"),
      units: count("units"),
      duration_ms: count("duration_ms"),
    };
  }
}

/** A decimal count or ms time, within the integers a JS number holds exactly; else undefined. */
export function parseCount(v: string): number | undefined {
  if (!/^\d{1,16}$/.test(v)) return undefined;
  const n = Number(v);
  return Number.isSafeInteger(n) ? n : undefined;
}

function clip(v: string): string {
  return JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}...` : v);
}

/** A Redis zset score (a ms time) as an integer, or null. */
function score(v: unknown): number | null {
  if (typeof v !== "string") return null;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : null;
}

/** What getJob reads in one MULTI: both hashes and the job's place in the queue's sets. */
export interface StatusSnapshot {
  job: Fields;
  outcome: Fields;
  delayedScore: string | null;
  inflightScore: string | null;
  deadScore: string | null;
}

/** The job hash's states (jobs/README.md, "A job's life in Redis") and the contract's. */
const HASH_STATES: Record<string, JobState> = {
  waiting: "waiting",
  delayed: "delayed",
  inflight: "running",
  running: "running",
  succeeded: "succeeded",
  failed: "failed",
  dead: "dead",
  cancelled: "cancelled",
};

/**
 * Builds a status: from the job hash while the job is queued, else from the outcome hash; null
 * when neither exists. A job hash that says the job ended defers to the outcome hash if there is
 * one (it holds the finish time and the result).
 */
export function statusFromSnapshot(id: string, s: StatusSnapshot): JobStatus | null {
  const inJob = Object.keys(s.job).length > 0;
  const inOutcome = Object.keys(s.outcome).length > 0;
  if (inJob) {
    const raw = s.job.state;
    const mapped = typeof raw === "string" ? HASH_STATES[raw] : undefined;
    const ended = mapped === "dead" || mapped === "cancelled" || mapped === "succeeded" || mapped === "failed";
    if (!(ended && inOutcome)) return statusFromJobHash(id, s);
  }
  if (inOutcome) return statusFromOutcome(id, s.outcome);
  return null;
}

function statusFromJobHash(id: string, s: StatusSnapshot): JobStatus {
  const f = new FieldReader(s.job, "job");
  const raw = f.str("state", true);
  let state: JobState | undefined = raw === null ? undefined : HASH_STATES[raw];
  if (state === undefined) {
    // An unknown state: say where the job is by the set that holds it.
    if (raw !== null) f.problems.push(`job.state: unknown value ${clip(raw)}`);
    state =
      s.delayedScore !== null ? "delayed" : s.inflightScore !== null ? "running" : s.deadScore !== null ? "dead" : "waiting";
  }
  if (state === "dead") {
    const outcome = f.str("outcome");
    if (outcome === "failed") state = "failed";
    else if (outcome !== null && outcome !== "dead") f.problems.push(`job.outcome: unknown value ${clip(outcome)}`);
  }
  const status = baseStatus(id, state, f);
  status.last_error = f.str("last_error") ?? f.str("dead_reason");
  if (state === "delayed") {
    status.due_at = f.has("due_at") ? f.int("due_at") : score(s.delayedScore);
    if (status.due_at === null && !f.has("due_at")) f.problems.push("job.due_at: missing");
    status.delay_reason = f.oneOf("delay_reason", DELAY_REASONS, true);
  }
  if (state === "dead" || state === "failed" || state === "cancelled") {
    status.finished_at = f.has("dead_at") ? f.int("dead_at") : score(s.deadScore);
  }
  return withProblems(status, f.problems);
}

function statusFromOutcome(id: string, outcome: Fields): JobStatus {
  const f = new FieldReader(outcome, "outcome");
  const state = f.oneOf("state", TERMINAL_STATES, true);
  // An outcome hash is only written for a finished job; a bad state still means it ended.
  const status = baseStatus(id, state ?? "dead", f);
  status.last_error = f.str("error");
  status.finished_at = f.int("finished_at", true);
  status.result = f.result("result");
  return withProblems(status, f.problems);
}

/** A status with the fields both hashes hold (read in this order, so problems read in it too). */
function baseStatus(id: string, state: JobState, f: FieldReader): JobStatus {
  return {
    id,
    state,
    organization_id: f.str("org", true),
    tier: f.str("tier", true),
    kind: f.str("kind", true),
    attempts: f.int("attempts", true),
    due_at: null,
    delay_reason: null,
    last_error: null,
    finished_at: null,
    result: null,
  };
}

function withProblems<T extends { problems?: string[] }>(value: T, problems: string[]): T {
  if (problems.length > 0) value.problems = problems;
  return value;
}

/** The most events one stream entry may hold (the contract's bound). */
export const MAX_EVENTS_PER_ENTRY = 10_000;

/**
 * Builds the events of one stream entry from its flat [field, value, ...] list: an entry of one
 * event is that event's fields; an entry with the field `n` (2 or more) holds n events, each
 * field's n values joined by line feeds. An entry of neither shape gives one event naming the
 * problem.
 */
export function parseEntry(id: string, flat: unknown): AiqEvent[] {
  const fields: Fields = {};
  if (!Array.isArray(flat)) return [parseEvent(id, flat)];
  for (let i = 0; i + 1 < flat.length; i += 2) {
    const k = textOf(flat[i]);
    const v = textOf(flat[i + 1]);
    if (k !== null && v !== null) fields[k] = v;
  }
  if (!Object.prototype.hasOwnProperty.call(fields, "n")) return [parseEvent(id, flat)];
  const n = parseCount(fields.n);
  if (n === undefined || n < 2 || n > MAX_EVENTS_PER_ENTRY) {
    return [withProblems(parseEvent(id, flat), [`event.n: not a count from 2 to ${MAX_EVENTS_PER_ENTRY}: ${clip(fields.n)}`])];
  }
  const columns: [string, string[]][] = [];
  for (const [name, value] of Object.entries(fields)) {
    if (name === "n") continue;
    const values = value.split("\n");
    if (values.length !== n) {
      return [withProblems(parseEvent(id, flat), [`event.${name}: ${values.length} values, not ${n}`])];
    }
    columns.push([name, values]);
  }
  const out: AiqEvent[] = [];
  for (let i = 0; i < n; i++) {
    const one: string[] = [];
    for (const [name, values] of columns) if (values[i] !== "") one.push(name, values[i]);
    out.push(parseEvent(`${id}/${i}`, one));
  }
  return out;
}

/** The stream entry id of an event's position ("1764626400123-0/3" -> "1764626400123-0"). */
export function entryOf(position: string): string {
  const slash = position.indexOf("/");
  return slash < 0 ? position : position.slice(0, slash);
}

/** Builds one event from its flat [field, value, ...] list. */
export function parseEvent(id: string, flat: unknown): AiqEvent {
  const fields: Fields = {};
  const problems: string[] = [];
  if (Array.isArray(flat)) {
    for (let i = 0; i + 1 < flat.length; i += 2) {
      const k = textOf(flat[i]);
      const v = textOf(flat[i + 1]);
      if (k !== null && v !== null && v !== "") fields[k] = v;
    }
  } else {
    problems.push("event: the entry's fields are not a list");
  }
  const f = new FieldReader(fields, "event");
  const rawType = f.str("type", true);
  if (rawType !== null && !(EVENT_TYPES as readonly string[]).includes(rawType)) {
    f.problems.push(`event.type: unknown value ${clip(rawType)}`);
  }
  const event: AiqEvent = {
    id,
    type: (rawType ?? "") as EventType,
    job_id: f.str("job_id", true) ?? "",
    organization_id: f.str("org", true),
    tier: f.str("tier"),
    kind: f.str("kind"),
    state: f.oneOf("state", JOB_STATES),
    at: f.int("at", true),
    attempts: f.int("attempts"),
    reason: f.oneOf("reason", DELAY_REASONS),
    until: f.int("until"),
    message: f.str("message"),
    error: f.str("error"),
    result: f.result("result"),
  };
  return withProblems(event, [...problems, ...f.problems]);
}

/** The status a terminal event implies, for a job whose outcome Redis no longer keeps. */
export function statusFromEvent(e: AiqEvent): JobStatus {
  return {
    id: e.job_id,
    state: (TERMINAL_STATES as readonly string[]).includes(e.type) ? (e.type as JobState) : (e.state ?? "dead"),
    organization_id: e.organization_id,
    tier: e.tier,
    kind: e.kind,
    attempts: e.attempts,
    due_at: null,
    delay_reason: null,
    last_error: e.error,
    finished_at: e.at,
    result: e.result,
  };
}

/** Parses an XREAD reply into [position, event] pairs; anything unexpected is skipped. */
export function parseXRead(reply: unknown): AiqEvent[] {
  const out: AiqEvent[] = [];
  if (!Array.isArray(reply)) return out;
  for (const stream of reply) {
    if (!Array.isArray(stream) || !Array.isArray(stream[1])) continue;
    for (const entry of stream[1]) {
      if (!Array.isArray(entry)) continue;
      const id = textOf(entry[0]);
      if (id === null || !STREAM_ID_RE.test(id)) continue;
      out.push(...parseEntry(id, entry[1]));
    }
  }
  return out;
}

/** A stream id as Redis writes it. */
export const STREAM_ID_RE = /^\d{1,20}-\d{1,20}$/;
/** An event's position: a stream id, with its index in the entry when the entry holds several. */
export const POSITION_RE = /^\d{1,20}(-\d{1,20})?(\/\d{1,5})?$/;

export function textOf(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (Buffer.isBuffer(v)) return v.toString("utf8");
  if (typeof v === "number") return String(v);
  return null;
}
