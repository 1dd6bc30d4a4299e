"""Verifies aiq's webhooks, which follow the Standard Webhooks scheme (standardwebhooks.com).

``webhook-signature`` holds space-separated ``v1,<base64 HMAC-SHA256>`` entries over
``<webhook-id>.<webhook-timestamp>.<body>``, keyed by the endpoint's secret ``whsec_<base64>``.
Only the standard library is used (hmac, hashlib, base64).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from typing import Any, Mapping, NamedTuple, Optional, Union

__all__ = ["AiqWebhookError", "VerifiedWebhook", "verify_webhook", "sign_webhook"]

_MAX_ID = 256
_MAX_SIGNATURE_HEADER = 8192
_MAX_SECRET = 1024
_PREFIX = "whsec_"
_BASE64_RE = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}$")


class AiqWebhookError(ValueError):
    """A webhook that does not verify; answer it with a 4xx and do not act on it.

    ``code`` says why: ``missing_header``, ``bad_header``, ``bad_secret``, ``stale_timestamp``,
    ``no_matching_signature`` or ``bad_body``.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class VerifiedWebhook(NamedTuple):
    id: str  # webhook-id: the same on every retry of one delivery; deduplicate on it
    timestamp: int  # webhook-timestamp, seconds
    payload: Any  # the body, parsed from JSON


def _key(secret: Any) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise AiqWebhookError("bad_secret", "the webhook secret is empty")
    if len(secret) > _MAX_SECRET:
        raise AiqWebhookError("bad_secret", "the webhook secret is too long")
    text = secret.strip()  # as copied from an environment file, with its newline
    b64 = text[len(_PREFIX):] if text.startswith(_PREFIX) else text
    if not b64 or not _BASE64_RE.match(b64):
        raise AiqWebhookError("bad_secret", "the webhook secret is not whsec_ followed by base64")
    return base64.b64decode(b64)


def _header(headers: Any, name: str) -> str:
    v = None
    getter = getattr(headers, "get", None)
    if callable(getter):
        v = getter(name)
        if v is None and isinstance(headers, Mapping):
            for k, x in headers.items():
                if isinstance(k, str) and k.lower() == name:
                    v = x
                    break
    if isinstance(v, (list, tuple)):
        v = v[0] if len(v) == 1 else None
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    if not isinstance(v, str) or not v:
        raise AiqWebhookError("missing_header", f"the {name} header is missing")
    return v


def _mac(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, msg_id.encode("utf-8") + b"." + timestamp.encode("ascii") + b"." + body, hashlib.sha256).digest()


def _body_bytes(body: Union[str, bytes, bytearray, memoryview]) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError("verify_webhook: body must be the raw bytes or their text")


def verify_webhook(
    secret: str,
    headers: Mapping[str, Any],
    body: Union[str, bytes, bytearray, memoryview],
    tolerance_s: float = 300,
    now: Optional[float] = None,
) -> VerifiedWebhook:
    """Verifies a delivery and returns its id, timestamp and parsed body; raises AiqWebhookError.

    Pass the body exactly as received (``request.get_data()``, ``await request.body()``), not a
    re-serialised object. ``headers`` may be a dict (any case of the names) or a framework's
    headers object. ``tolerance_s`` bounds how far the timestamp may be from ``now`` (default the
    clock), either way.
    """
    key = _key(secret)
    msg_id = _header(headers, "webhook-id")
    ts = _header(headers, "webhook-timestamp")
    sigs = _header(headers, "webhook-signature")
    if len(msg_id) > _MAX_ID:
        raise AiqWebhookError("bad_header", f"webhook-id is longer than {_MAX_ID} characters")
    if len(sigs) > _MAX_SIGNATURE_HEADER:
        raise AiqWebhookError("bad_header", f"webhook-signature is longer than {_MAX_SIGNATURE_HEADER} characters")
    if not _TIMESTAMP_RE.match(ts):
        raise AiqWebhookError("bad_header", "webhook-timestamp is not a number of seconds")
    if isinstance(tolerance_s, bool) or not isinstance(tolerance_s, (int, float)) or not tolerance_s >= 0:
        raise ValueError("verify_webhook: tolerance_s must be >= 0")
    timestamp = int(ts)
    drift = abs((time.time() if now is None else now) - timestamp)
    if drift > tolerance_s:
        raise AiqWebhookError(
            "stale_timestamp",
            f"webhook-timestamp {timestamp} is {int(drift)} s from now, more than the tolerance of {tolerance_s} s",
        )
    raw = _body_bytes(body)
    expected = _mac(key, msg_id, ts, raw)
    matched = False
    for entry in sigs.split(" "):
        version, _, given = entry.partition(",")
        if version != "v1" or not _BASE64_RE.match(given):
            continue  # another scheme's signature, or not one
        try:
            candidate = base64.b64decode(given)
        except (binascii.Error, ValueError):
            continue
        # Every candidate is compared (no early exit), in constant time.
        if hmac.compare_digest(candidate, expected):
            matched = True
    if not matched:
        raise AiqWebhookError("no_matching_signature", "no v1 signature in webhook-signature matches the body")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AiqWebhookError("bad_body", "the signed body is not JSON") from None
    return VerifiedWebhook(msg_id, timestamp, payload)


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: Union[str, bytes]) -> str:
    """Signs a body as aiq does (the ``webhook-signature`` value); for tests and for checking a receiver."""
    mac = _mac(_key(secret), msg_id, str(timestamp), _body_bytes(body))
    return "v1," + base64.b64encode(mac).decode("ascii")
