// Verifies aiq's webhooks, which follow the Standard Webhooks scheme (standardwebhooks.com):
// `webhook-signature` holds space-separated `v1,<base64 HMAC-SHA256>` entries over
// `<webhook-id>.<webhook-timestamp>.<body>`, keyed by the endpoint's secret `whsec_<base64>`.
// Only node:crypto is used.

import { createHmac, timingSafeEqual } from "node:crypto";

export type WebhookErrorCode =
  | "missing_header"
  | "bad_header"
  | "bad_secret"
  | "stale_timestamp"
  | "no_matching_signature"
  | "bad_body";

/** A webhook that does not verify; `code` says why. Answer it with a 4xx and do not act on it. */
export class AiqWebhookError extends Error {
  readonly code: WebhookErrorCode;
  constructor(code: WebhookErrorCode, message: string) {
    super(message);
    this.name = "AiqWebhookError";
    this.code = code;
  }
}

export interface VerifyWebhookOptions {
  /** How far the timestamp may be from now, either way, in seconds. Default 300 (5 minutes). */
  toleranceSeconds?: number;
  /** The current time in seconds since the epoch; default the clock's. */
  nowSeconds?: number;
}

/** Headers as Node's http module, fetch's Headers or a plain object give them. */
export type WebhookHeaders =
  | { get(name: string): string | null }
  | Record<string, string | string[] | undefined>;

/** A delivery's own fields, once verified. */
export interface VerifiedWebhook<T = unknown> {
  /** `webhook-id`: the same on every retry of one delivery; deduplicate on it. */
  id: string;
  /** `webhook-timestamp` in seconds. */
  timestamp: number;
  /** The body, parsed from JSON. */
  payload: T;
}

const MAX_ID = 256;
const MAX_SIGNATURE_HEADER = 8192;
const MAX_SECRET = 1024;
const SECRET_PREFIX = "whsec_";
const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * Verifies a delivery against its endpoint's secret and returns its id, timestamp and parsed
 * body; throws AiqWebhookError otherwise. Pass the body exactly as received (the raw bytes or
 * their text), not a re-serialised object.
 */
export function verifyWebhook<T = unknown>(
  secret: string,
  headers: WebhookHeaders,
  body: string | Uint8Array,
  opts: VerifyWebhookOptions = {},
): VerifiedWebhook<T> {
  const key = decodeSecret(secret);
  const id = header(headers, "webhook-id");
  const ts = header(headers, "webhook-timestamp");
  const sigs = header(headers, "webhook-signature");
  if (id.length > MAX_ID) throw new AiqWebhookError("bad_header", `webhook-id is longer than ${MAX_ID} characters`);
  if (sigs.length > MAX_SIGNATURE_HEADER) {
    throw new AiqWebhookError("bad_header", `webhook-signature is longer than ${MAX_SIGNATURE_HEADER} characters`);
  }
  if (!/^\d{1,12}$/.test(ts)) throw new AiqWebhookError("bad_header", "webhook-timestamp is not a number of seconds");
  const timestamp = Number(ts);
  const tolerance = opts.toleranceSeconds ?? 300;
  if (!Number.isFinite(tolerance) || tolerance < 0) throw new TypeError("verifyWebhook: toleranceSeconds must be >= 0");
  const now = opts.nowSeconds ?? Math.floor(Date.now() / 1000);
  if (Math.abs(now - timestamp) > tolerance) {
    throw new AiqWebhookError(
      "stale_timestamp",
      `webhook-timestamp ${timestamp} is ${Math.abs(now - timestamp)} s from now, more than the tolerance of ${tolerance} s`,
    );
  }
  const raw = typeof body === "string" ? Buffer.from(body, "utf8") : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  const expected = createHmac("sha256", key).update(`${id}.${ts}.`).update(raw).digest();
  let matched = false;
  for (const entry of sigs.split(" ")) {
    const comma = entry.indexOf(",");
    if (comma < 0 || entry.slice(0, comma) !== "v1") continue; // another scheme's signature
    const given = entry.slice(comma + 1);
    if (!BASE64_RE.test(given)) continue;
    const bytes = Buffer.from(given, "base64");
    // Compare every candidate (no early exit) in constant time.
    if (bytes.length === expected.length && timingSafeEqual(bytes, expected)) matched = true;
  }
  if (!matched) throw new AiqWebhookError("no_matching_signature", "no v1 signature in webhook-signature matches the body");
  let payload: T;
  try {
    payload = JSON.parse(raw.toString("utf8")) as T;
  } catch {
    throw new AiqWebhookError("bad_body", "the signed body is not JSON");
  }
  return { id, timestamp, payload };
}

/** Signs a body as aiq does; for tests and for checking a receiver. Returns the header value. */
export function signWebhook(secret: string, id: string, timestampSeconds: number, body: string | Uint8Array): string {
  const key = decodeSecret(secret);
  const mac = createHmac("sha256", key).update(`${id}.${timestampSeconds}.`).update(body).digest("base64");
  return `v1,${mac}`;
}

function decodeSecret(secret: string): Buffer {
  if (typeof secret !== "string" || secret.length === 0) {
    throw new AiqWebhookError("bad_secret", "the webhook secret is empty");
  }
  if (secret.length > MAX_SECRET) throw new AiqWebhookError("bad_secret", "the webhook secret is too long");
  const text = secret.trim(); // as copied from an environment file, with its newline
  const b64 = text.startsWith(SECRET_PREFIX) ? text.slice(SECRET_PREFIX.length) : text;
  if (b64.length === 0 || !BASE64_RE.test(b64)) {
    throw new AiqWebhookError("bad_secret", "the webhook secret is not whsec_ followed by base64");
  }
  return Buffer.from(b64, "base64");
}

function header(headers: WebhookHeaders, name: string): string {
  let v: string | string[] | null | undefined;
  if (headers && typeof (headers as { get?: unknown }).get === "function") {
    v = (headers as { get(name: string): string | null }).get(name);
  } else if (headers && typeof headers === "object") {
    const h = headers as Record<string, string | string[] | undefined>;
    v = h[name];
    if (v === undefined) {
      const k = Object.keys(h).find((k) => k.toLowerCase() === name);
      v = k === undefined ? undefined : h[k];
    }
  }
  if (Array.isArray(v)) v = v.length === 1 ? v[0] : undefined;
  if (typeof v !== "string" || v.length === 0) throw new AiqWebhookError("missing_header", `the ${name} header is missing`);
  return v;
}
