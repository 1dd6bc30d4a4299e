import { strict as assert } from "node:assert";
import { createHmac, randomBytes } from "node:crypto";
import { describe, it } from "node:test";
import { AiqWebhookError, WebhookErrorCode, signWebhook, verifyWebhook } from "../src";

// The example of the Standard Webhooks specification and its reference libraries.
const SPEC = {
  secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
  id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
  timestamp: 1614265330,
  body: '{"test": 2432232314}',
  signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
};

const KEY = randomBytes(32);
const SECRET = `whsec_${KEY.toString("base64")}`;
const NOW = 1764626400;
const BODY = JSON.stringify({ type: "job.succeeded", timestamp: "2026-12-02T12:00:00Z", data: { job_id: "j-1", state: "succeeded" } });

/** The signature computed here from the scheme's definition, not by the client's code. */
function independentSignature(key: Buffer, id: string, ts: number, body: string): string {
  return "v1," + createHmac("sha256", key).update(`${id}.${ts}.${body}`, "utf8").digest("base64");
}

function headers(sig: string, id = "msg_1", ts = NOW): Record<string, string> {
  return { "webhook-id": id, "webhook-timestamp": String(ts), "webhook-signature": sig };
}

function rejectsWith(code: WebhookErrorCode, f: () => unknown, message?: RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof AiqWebhookError, String(e));
    assert.equal(e.code, code);
    if (message) assert.match(e.message, message);
    return true;
  });
}

describe("verifyWebhook", () => {
  it("accepts the specification's example", () => {
    const h = headers(SPEC.signature, SPEC.id, SPEC.timestamp);
    const v = verifyWebhook(SPEC.secret, h, SPEC.body, { nowSeconds: SPEC.timestamp });
    assert.deepEqual(v, { id: SPEC.id, timestamp: SPEC.timestamp, payload: { test: 2432232314 } });
    assert.equal(signWebhook(SPEC.secret, SPEC.id, SPEC.timestamp, SPEC.body), SPEC.signature);
    // The secret without its prefix is the same key, as in the reference libraries.
    verifyWebhook(SPEC.secret.slice("whsec_".length), h, SPEC.body, { nowSeconds: SPEC.timestamp });
    verifyWebhook(`${SPEC.secret}\n`, h, SPEC.body, { nowSeconds: SPEC.timestamp });
  });

  it("accepts a signature computed independently, from a string or the raw bytes", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, BODY);
    assert.equal(verifyWebhook(SECRET, headers(sig), BODY, { nowSeconds: NOW }).id, "msg_1");
    assert.equal(verifyWebhook(SECRET, headers(sig), Buffer.from(BODY), { nowSeconds: NOW }).timestamp, NOW);
  });

  it("accepts any matching entry among several (a rotation) and ignores other schemes", () => {
    const old = independentSignature(randomBytes(32), "msg_1", NOW, BODY);
    const current = independentSignature(KEY, "msg_1", NOW, BODY);
    const sig = `v1a,xyz ${old} v1,not-base64! ${current}`;
    assert.equal(verifyWebhook(SECRET, headers(sig), BODY, { nowSeconds: NOW }).id, "msg_1");
  });

  it("finds the headers in any case and in a fetch Headers object", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, BODY);
    const upper = { "Webhook-Id": "msg_1", "WEBHOOK-TIMESTAMP": String(NOW), "Webhook-Signature": [sig] };
    verifyWebhook(SECRET, upper, BODY, { nowSeconds: NOW });
    verifyWebhook(SECRET, new Headers(headers(sig)), BODY, { nowSeconds: NOW });
  });

  it("refuses a tampered body, another id, another timestamp or another key", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, BODY);
    rejectsWith("no_matching_signature", () => verifyWebhook(SECRET, headers(sig), BODY + " ", { nowSeconds: NOW }));
    rejectsWith("no_matching_signature", () => verifyWebhook(SECRET, headers(sig, "msg_2"), BODY, { nowSeconds: NOW }));
    rejectsWith("no_matching_signature", () => verifyWebhook(SECRET, headers(sig, "msg_1", NOW + 1), BODY, { nowSeconds: NOW }));
    const other = `whsec_${randomBytes(32).toString("base64")}`;
    rejectsWith("no_matching_signature", () => verifyWebhook(other, headers(sig), BODY, { nowSeconds: NOW }));
    rejectsWith("no_matching_signature", () => verifyWebhook(SECRET, headers("v1,"), BODY, { nowSeconds: NOW }));
  });

  it("names each missing header", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, BODY);
    for (const name of ["webhook-id", "webhook-timestamp", "webhook-signature"]) {
      const h = headers(sig);
      delete h[name];
      rejectsWith("missing_header", () => verifyWebhook(SECRET, h, BODY, { nowSeconds: NOW }), new RegExp(name));
    }
  });

  it("refuses a timestamp outside the tolerance, either way, and one that is not a number", () => {
    const at = (ts: number) => headers(independentSignature(KEY, "msg_1", ts, BODY), "msg_1", ts);
    verifyWebhook(SECRET, at(NOW - 300), BODY, { nowSeconds: NOW });
    rejectsWith("stale_timestamp", () => verifyWebhook(SECRET, at(NOW - 301), BODY, { nowSeconds: NOW }), /301 s/);
    rejectsWith("stale_timestamp", () => verifyWebhook(SECRET, at(NOW + 301), BODY, { nowSeconds: NOW }));
    verifyWebhook(SECRET, at(NOW - 3600), BODY, { nowSeconds: NOW, toleranceSeconds: 3600 });
    const h = { ...at(NOW), "webhook-timestamp": "17646e5" };
    rejectsWith("bad_header", () => verifyWebhook(SECRET, h, BODY, { nowSeconds: NOW }));
  });

  it("refuses a secret that is not whsec_ and base64", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, BODY);
    for (const bad of ["", "whsec_", "whsec_***", "whsec_abc", "x".repeat(2000)]) {
      rejectsWith("bad_secret", () => verifyWebhook(bad, headers(sig), BODY, { nowSeconds: NOW }));
    }
  });

  it("throws nothing but AiqWebhookError on any headers and body", () => {
    let seed = 11;
    const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const pick = <T>(xs: T[]): T => xs[Math.floor(rnd() * xs.length)];
    const pieces = ["", " ", ",", "v1", "v1,", "v2,", "=", "==", "msg_1", String(NOW), "-1", "1e9", "\u0000", "é", "AAAA", independentSignature(KEY, "msg_1", NOW, BODY)];
    const text = () => Array.from({ length: Math.floor(rnd() * 4) }, () => pick(pieces)).join(pick(["", " ", ","]));
    for (let i = 0; i < 3000; i++) {
      const h: Record<string, string | string[]> = {};
      for (const name of ["webhook-id", "webhook-timestamp", "webhook-signature"]) {
        if (rnd() < 0.9) h[name] = rnd() < 0.1 ? [text(), text()] : text();
      }
      const secret = rnd() < 0.7 ? SECRET : text();
      try {
        verifyWebhook(secret, h, rnd() < 0.5 ? BODY : text(), { nowSeconds: NOW });
      } catch (e) {
        assert.ok(e instanceof AiqWebhookError, `${JSON.stringify(h)}: ${e}`);
      }
    }
  });

  it("refuses a signed body that is not JSON, and oversized headers", () => {
    const sig = independentSignature(KEY, "msg_1", NOW, "not json");
    rejectsWith("bad_body", () => verifyWebhook(SECRET, headers(sig), "not json", { nowSeconds: NOW }));
    rejectsWith("bad_header", () => verifyWebhook(SECRET, headers(sig, "i".repeat(257)), BODY, { nowSeconds: NOW }));
    rejectsWith("bad_header", () => verifyWebhook(SECRET, headers("v1,x ".repeat(3000)), BODY, { nowSeconds: NOW }));
  });
});
