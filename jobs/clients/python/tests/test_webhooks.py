import base64
import hashlib
import hmac
import json
import os
import unittest

from aiq_client import AiqWebhookError, sign_webhook, verify_webhook

# The example of the Standard Webhooks specification and its reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1764626400
BODY = json.dumps({"type": "job.succeeded", "timestamp": "2026-12-02T12:00:00Z", "data": {"job_id": "j-1", "state": "succeeded"}})


def independent_signature(key, msg_id, ts, body):
    """The signature computed here from the scheme's definition, not by the client's code."""
    mac = hmac.new(key, f"{msg_id}.{ts}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(sig, msg_id="msg_1", ts=NOW):
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


class VerifyWebhookTest(unittest.TestCase):
    def refused(self, code, f, message=None):
        with self.assertRaises(AiqWebhookError) as cm:
            f()
        self.assertEqual(cm.exception.code, code)
        if message:
            self.assertRegex(str(cm.exception), message)

    def test_the_specifications_example_verifies(self):
        """The Standard Webhooks specification's example verifies, with or without the whsec_ prefix."""
        h = headers(SPEC_SIGNATURE, SPEC_ID, SPEC_TS)
        self.assertEqual(verify_webhook(SPEC_SECRET, h, SPEC_BODY, now=SPEC_TS), (SPEC_ID, SPEC_TS, {"test": 2432232314}))
        self.assertEqual(sign_webhook(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIGNATURE)
        verify_webhook(SPEC_SECRET[len("whsec_"):], h, SPEC_BODY.encode(), now=SPEC_TS)
        verify_webhook(SPEC_SECRET + "\n", h, SPEC_BODY, now=SPEC_TS)

    def test_a_signature_computed_independently_verifies_from_text_or_bytes(self):
        """A signature computed independently verifies, for the body as text or as bytes."""
        sig = independent_signature(KEY, "msg_1", NOW, BODY)
        self.assertEqual(verify_webhook(SECRET, headers(sig), BODY, now=NOW).id, "msg_1")
        self.assertEqual(verify_webhook(SECRET, headers(sig), BODY.encode(), now=NOW).payload["data"]["job_id"], "j-1")

    def test_any_matching_entry_among_several_verifies_and_other_schemes_are_ignored(self):
        """Any matching v1 entry among several (a rotation) verifies; other schemes are ignored."""
        old = independent_signature(os.urandom(32), "msg_1", NOW, BODY)
        current = independent_signature(KEY, "msg_1", NOW, BODY)
        verify_webhook(SECRET, headers(f"v1a,xyz {old} v1,not-base64! {current}"), BODY, now=NOW)

    def test_header_names_are_found_in_any_case(self):
        """Header names are found in any case."""
        sig = independent_signature(KEY, "msg_1", NOW, BODY)
        verify_webhook(SECRET, {"Webhook-Id": "msg_1", "WEBHOOK-TIMESTAMP": str(NOW), "Webhook-Signature": sig}, BODY, now=NOW)

    def test_a_tampered_body_another_id_timestamp_or_key_is_refused(self):
        """A tampered body, another id, another timestamp or another key is refused."""
        sig = independent_signature(KEY, "msg_1", NOW, BODY)
        other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        for f in (
            lambda: verify_webhook(SECRET, headers(sig), BODY + " ", now=NOW),
            lambda: verify_webhook(SECRET, headers(sig, "msg_2"), BODY, now=NOW),
            lambda: verify_webhook(SECRET, headers(sig, "msg_1", NOW + 1), BODY, now=NOW),
            lambda: verify_webhook(other, headers(sig), BODY, now=NOW),
            lambda: verify_webhook(SECRET, headers("v1,"), BODY, now=NOW),
        ):
            self.refused("no_matching_signature", f)

    def test_each_missing_header_is_named(self):
        """Each missing header is named."""
        sig = independent_signature(KEY, "msg_1", NOW, BODY)
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            h = headers(sig)
            del h[name]
            self.refused("missing_header", lambda: verify_webhook(SECRET, h, BODY, now=NOW), name)

    def test_a_timestamp_outside_the_tolerance_either_way_is_refused(self):
        """A timestamp outside the tolerance, either way, or not a number, is refused."""

        def at(ts):
            return headers(independent_signature(KEY, "msg_1", ts, BODY), "msg_1", ts)

        verify_webhook(SECRET, at(NOW - 300), BODY, now=NOW)
        self.refused("stale_timestamp", lambda: verify_webhook(SECRET, at(NOW - 301), BODY, now=NOW), "301 s")
        self.refused("stale_timestamp", lambda: verify_webhook(SECRET, at(NOW + 301), BODY, now=NOW))
        verify_webhook(SECRET, at(NOW - 3600), BODY, tolerance_s=3600, now=NOW)
        self.refused("bad_header", lambda: verify_webhook(SECRET, dict(at(NOW), **{"webhook-timestamp": "17646e5"}), BODY, now=NOW))

    def test_a_secret_that_is_not_whsec_and_base64_is_refused(self):
        """A secret that is not whsec_ and base64 is refused."""
        sig = independent_signature(KEY, "msg_1", NOW, BODY)
        for bad in ("", "whsec_", "whsec_***", "whsec_abc", "x" * 2000, None):
            with self.subTest(secret=bad):
                self.refused("bad_secret", lambda: verify_webhook(bad, headers(sig), BODY, now=NOW))

    def test_any_headers_and_body_raise_nothing_but_aiq_webhook_error(self):
        """Any headers, secret and body raise nothing but AiqWebhookError."""
        import random

        rnd = random.Random(11)
        pieces = ["", " ", ",", "v1", "v1,", "v2,", "=", "==", "msg_1", str(NOW), "-1", "1e9", "\x00", "\udcff", "é", "AAAA",
                  independent_signature(KEY, "msg_1", NOW, BODY)]

        def text():
            return rnd.choice(["", " ", ","]).join(rnd.choice(pieces) for _ in range(rnd.randrange(4)))

        for _ in range(3000):
            h = {}
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
                if rnd.random() < 0.9:
                    h[name] = [text(), text()] if rnd.random() < 0.1 else (text().encode("utf-8", "surrogatepass") if rnd.random() < 0.1 else text())
            secret = SECRET if rnd.random() < 0.7 else text()
            body = BODY if rnd.random() < 0.5 else text().encode("utf-8", "surrogatepass")
            try:
                verify_webhook(secret, h, body, now=NOW)
            except AiqWebhookError:
                pass

    def test_a_body_that_is_not_json_and_oversized_headers_are_refused(self):
        """A signed body that is not JSON, and oversized headers, are refused."""
        sig = independent_signature(KEY, "msg_1", NOW, "not json")
        self.refused("bad_body", lambda: verify_webhook(SECRET, headers(sig), "not json", now=NOW))
        self.refused("bad_header", lambda: verify_webhook(SECRET, headers(sig, "i" * 257), BODY, now=NOW))
        self.refused("bad_header", lambda: verify_webhook(SECRET, headers("v1,x " * 3000), BODY, now=NOW))


if __name__ == "__main__":
    unittest.main()
