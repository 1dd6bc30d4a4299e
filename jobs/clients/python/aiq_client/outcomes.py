"""What a job's status and its events look like to an app (jobs/README.md, "Outcomes").

The parsers build them from what Redis holds, defensively: Redis may hold anything (a hash
written by hand, a newer daemon's field), so a field that is missing or of the wrong type becomes
``None`` and is named in ``problems``; nothing here raises on what Redis returns.

``wait_machine`` and ``events_machine`` hold the logic of ``wait`` and ``events`` without any I/O:
they yield what they need done (a status snapshot, an XREAD, a pause, an event for the caller)
and are sent the answers, so the sync and the asyncio clients run the very same steps.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Dict, Generator, List, Literal, Mapping, NamedTuple, Optional, Tuple, TypedDict, Union

JobState = Literal["waiting", "delayed", "running", "succeeded", "failed", "dead", "cancelled"]
JOB_STATES: Tuple[str, ...] = ("waiting", "delayed", "running", "succeeded", "failed", "dead", "cancelled")
TERMINAL_STATES: Tuple[str, ...] = ("succeeded", "failed", "dead", "cancelled")

DelayReason = Literal[
    "scheduled", "retry", "budget", "org_rate", "provider_rate", "provider_paused", "breaker", "org_in_flight",
    "unavailable", "other",
]
DELAY_REASONS: Tuple[str, ...] = (
    "scheduled", "retry", "budget", "org_rate", "provider_rate", "provider_paused", "breaker", "org_in_flight",
    "unavailable", "other",
)

EVENT_TYPES: Tuple[str, ...] = (
    "created", "started", "deferred", "retried", "released", "interrupted", "succeeded", "failed", "dead", "cancelled",
)
TERMINAL_EVENT_TYPES: Tuple[str, ...] = ("succeeded", "failed", "dead", "cancelled")

CancelResult = Literal["cancelled", "running", "finished", "not_found"]
CANCEL_RESULTS: Tuple[str, ...] = ("cancelled", "running", "finished", "not_found")


class JobResult(TypedDict):
    """A succeeded job's result summary; ``cost_usd`` is a decimal string (never a float)."""

    provider: Optional[str]
    model: Optional[str]
    cost_usd: Optional[str]
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    units: Optional[int]
    duration_ms: Optional[int]


class _JobStatusRequired(TypedDict):
    id: str
    state: JobState
    organization_id: Optional[str]
    tier: Optional[str]
    kind: Optional[str]
    attempts: Optional[int]
    due_at: Optional[int]  # a delayed job's due time (ms, Redis time)
    delay_reason: Optional[DelayReason]
    last_error: Optional[str]
    finished_at: Optional[int]  # ms, Redis time
    result: Optional[JobResult]


class JobStatus(_JobStatusRequired, total=False):
    """A job's status: the same shape as ``aiq job show --json`` and the Node client's ``getJob``.

    ``problems`` is there only when Redis held a field that is missing or not what the contract says.
    """

    problems: List[str]


class _EventRequired(TypedDict):
    # The event's position, resume after it: its stream entry's id ("1764626400123-0") when the
    # entry holds this one event, else that id, "/" and its index in the entry ("...-0/3").
    id: str
    type: str  # one of EVENT_TYPES (an unknown type from a newer daemon is passed on, in problems)
    job_id: str
    organization_id: Optional[str]
    tier: Optional[str]
    kind: Optional[str]
    state: Optional[JobState]  # the state after the change
    at: Optional[int]
    attempts: Optional[int]
    reason: Optional[DelayReason]  # deferred
    until: Optional[int]  # deferred, retried, created of a delayed job
    message: Optional[str]  # deferred
    error: Optional[str]  # retried, failed, dead
    result: Optional[JobResult]  # succeeded


class AiqEvent(_EventRequired, total=False):
    """One entry of the ``{p}:events`` stream."""

    problems: List[str]


class AiqJobNotFound(LookupError):
    """The id exists nowhere in Redis (not queued, running, dead, nor finished within retention)."""

    def __init__(self, job_id: str, why: str = "it exists nowhere"):
        super().__init__(f"aiq: job {job_id!r} not found: {why}")
        self.job_id = job_id


class AiqTimeout(TimeoutError):
    """``wait``'s timeout passed first; ``status`` is the job's last status seen."""

    def __init__(self, job_id: str, timeout: float, status: JobStatus):
        super().__init__(f"aiq: job {job_id!r} did not finish within {timeout} s (it is {status['state']})")
        self.job_id = job_id
        self.status = status


MAX_RESULT_BYTES = 64 * 1024
MAX_JOB_ID_BYTES = 128
_COUNT_RE = re.compile(r"^[0-9]{1,16}$")
STREAM_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_POSITION_RE = re.compile(r"^(\$|[0-9]{1,20}(-[0-9]{1,20})?(/[0-9]{1,5})?)$")
MAX_EVENTS_PER_ENTRY = 10_000  # the contract's bound on the events of one stream entry
_MAX_SAFE = 2**53 - 1


def text(v: Any) -> Optional[str]:
    """A reply value as text (bytes decoded as UTF-8, bad bytes replaced); None for others."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def _clip(v: str) -> str:
    return json.dumps(v[:80] + "..." if len(v) > 80 else v)


def parse_count(v: str) -> Optional[int]:
    """A decimal count or ms time (digits only, within 2**53); else None."""
    if not _COUNT_RE.match(v):
        return None
    n = int(v)
    return n if n <= _MAX_SAFE else None


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id.encode("utf-8", errors="replace")) > MAX_JOB_ID_BYTES:
        raise ValueError(f"aiq: a job id is 1 to {MAX_JOB_ID_BYTES} bytes of text")
    return job_id


class _Fields:
    """Reads the fields of one hash or stream entry, collecting what is wrong with them."""

    def __init__(self, fields: Mapping[str, str], where: str):
        self.fields = fields
        self.where = where
        self.problems: List[str] = []

    def report(self, name: str, what: str) -> None:
        self.problems.append(f"{self.where}.{name}: {what}")
        return None

    def has(self, name: str) -> bool:
        return bool(self.fields.get(name))

    def str(self, name: str, required: bool = False) -> Optional[str]:
        v = self.fields.get(name)
        if v:
            return v
        return self.report(name, "missing") if required else None

    def int(self, name: str, required: bool = False) -> Optional[int]:
        v = self.str(name, required)
        if v is None:
            return None
        n = parse_count(v)
        return n if n is not None else self.report(name, f"not a non-negative integer: {_clip(v)}")

    def one_of(self, name: str, allowed: Tuple[str, ...], required: bool = False) -> Optional[Any]:
        v = self.str(name, required)
        if v is None:
            return None
        return v if v in allowed else self.report(name, f"unknown value {_clip(v)}")

    def result(self, name: str) -> Optional[JobResult]:
        v = self.str(name)
        if v is None:
            return None
        if len(v.encode("utf-8", errors="replace")) > MAX_RESULT_BYTES:
            return self.report(name, f"longer than {MAX_RESULT_BYTES} bytes")
        try:
            doc = json.loads(v)
        except (ValueError, RecursionError):
            return self.report(name, f"not JSON: {_clip(v)}")
        if not isinstance(doc, dict):
            return self.report(name, "not a JSON object")

        def string(k: str) -> Optional[str]:
            x = doc.get(k)
            if x is None or isinstance(x, str):
                return x
            return self.report(f"{name}.{k}", "not a string")

        def count(k: str) -> Optional[int]:
            x = doc.get(k)
            if x is None:
                return None
            if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_SAFE:
                return x
            return self.report(f"{name}.{k}", "not a non-negative integer")

        return {
            "provider": string("provider"),
            "model": string("model"),
            "cost_usd": string("cost_usd"),
            "input_tokens": count("input_tokens"),
            "output_tokens": count("output_tokens"),
            "units": count("units"),
            "duration_ms": count("duration_ms"),
        }


def _with_problems(value: Any, problems: List[str]) -> Any:
    if problems:
        value["problems"] = problems
    return value


def _hash(v: Any) -> Dict[str, str]:
    """An HGETALL reply as text fields ({} for anything else)."""
    if not isinstance(v, Mapping):
        return {}
    out = {}
    for k, x in v.items():
        k, x = text(k), text(x)
        if k is not None and x is not None:
            out[k] = x
    return out


def _score(v: Any) -> Optional[int]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 <= v <= _MAX_SAFE and v == int(v):
        return int(v)
    return None


class StatusSnapshot(NamedTuple):
    """What get_job reads in one MULTI: both hashes and the job's place in the queue's sets."""

    job: Dict[str, str]
    outcome: Dict[str, str]
    delayed: Any
    inflight: Any
    dead: Any


# The job hash's states (jobs/README.md, "A job's life in Redis") and the contract's.
_HASH_STATES = {
    "waiting": "waiting",
    "delayed": "delayed",
    "inflight": "running",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "dead": "dead",
    "cancelled": "cancelled",
}


def snapshot_commands(base: str, job_id: str, with_position: bool) -> List[Tuple[str, tuple]]:
    """The commands of a status snapshot, for a MULTI pipeline: (method name, arguments)."""
    cmds = [
        ("hgetall", (f"{base}:job:{job_id}",)),
        ("hgetall", (f"{base}:outcome:{job_id}",)),
        ("zscore", (f"{base}:delayed", job_id)),
        ("zscore", (f"{base}:inflight", job_id)),
        ("zscore", (f"{base}:dead", job_id)),
    ]
    if with_position:
        cmds.append(("xrevrange", (f"{base}:events", "+", "-", 1)))
    return cmds


def snapshot_from_replies(replies: List[Any], with_position: bool) -> Tuple[StatusSnapshot, str]:
    snap = StatusSnapshot(_hash(replies[0]), _hash(replies[1]), replies[2], replies[3], replies[4])
    return snap, (first_stream_id(replies[5]) or "0-0") if with_position else "0-0"


def status_from_snapshot(job_id: str, s: StatusSnapshot) -> Optional[JobStatus]:
    """From the job hash while the job is queued, else from the outcome hash; None when neither.

    A job hash that says the job ended defers to the outcome hash if there is one (it holds the
    finish time and the result).
    """
    if s.job:
        mapped = _HASH_STATES.get(s.job.get("state", ""))
        if not (mapped in TERMINAL_STATES and s.outcome):
            return _status_from_job_hash(job_id, s)
    if s.outcome:
        return _status_from_outcome(job_id, s.outcome)
    return None


def _status_from_job_hash(job_id: str, s: StatusSnapshot) -> JobStatus:
    f = _Fields(s.job, "job")
    raw = f.str("state", True)
    state = _HASH_STATES.get(raw) if raw is not None else None
    if state is None:
        # An unknown state: say where the job is by the set that holds it.
        if raw is not None:
            f.problems.append(f"job.state: unknown value {_clip(raw)}")
        if s.delayed is not None:
            state = "delayed"
        elif s.inflight is not None:
            state = "running"
        elif s.dead is not None:
            state = "dead"
        else:
            state = "waiting"
    if state == "dead":
        outcome = f.str("outcome")
        if outcome == "failed":
            state = "failed"
        elif outcome is not None and outcome != "dead":
            f.problems.append(f"job.outcome: unknown value {_clip(outcome)}")
    status = _status(job_id, state, f, last_error=f.str("last_error") or f.str("dead_reason"))
    if state == "delayed":
        if f.has("due_at"):
            status["due_at"] = f.int("due_at")
        else:
            status["due_at"] = _score(s.delayed)
            if status["due_at"] is None:
                f.problems.append("job.due_at: missing")
        status["delay_reason"] = f.one_of("delay_reason", DELAY_REASONS, True)
    if state in ("dead", "failed", "cancelled"):
        status["finished_at"] = f.int("dead_at") if f.has("dead_at") else _score(s.dead)
    return _with_problems(status, f.problems)


def _status_from_outcome(job_id: str, outcome: Dict[str, str]) -> JobStatus:
    f = _Fields(outcome, "outcome")
    state = f.one_of("state", TERMINAL_STATES, True)
    # An outcome hash is only written for a finished job; a bad state still means it ended.
    status = _status(job_id, state or "dead", f)
    status.update(last_error=f.str("error"), finished_at=f.int("finished_at", True), result=f.result("result"))
    return _with_problems(status, f.problems)


def _status(job_id: str, state: str, f: _Fields, **rest: Any) -> JobStatus:
    """A status with the fields both hashes hold (in this order, so problems read in it too)."""
    status: Any = {
        "id": job_id,
        "state": state,
        "organization_id": f.str("org", True),
        "tier": f.str("tier", True),
        "kind": f.str("kind", True),
        "attempts": f.int("attempts", True),
        "due_at": None,
        "delay_reason": None,
        "last_error": None,
        "finished_at": None,
        "result": None,
    }
    status.update(rest)
    return status


def parse_event(event_id: str, fields: Any) -> AiqEvent:
    """An event from a stream entry's fields (a mapping, or a flat [field, value, ...] list)."""
    problems: List[str] = []
    if isinstance(fields, (list, tuple)):
        fields = dict(zip(fields[0::2], fields[1::2]))
    if not isinstance(fields, Mapping):
        problems.append("event: the entry's fields are not a mapping")
        fields = {}
    f = _Fields({k: v for k, v in _hash(fields).items() if v != ""}, "event")
    raw_type = f.str("type", True)
    if raw_type is not None and raw_type not in EVENT_TYPES:
        f.problems.append(f"event.type: unknown value {_clip(raw_type)}")
    event: AiqEvent = {
        "id": event_id,
        "type": raw_type or "",
        "job_id": f.str("job_id", True) or "",
        "organization_id": f.str("org", True),
        "tier": f.str("tier"),
        "kind": f.str("kind"),
        "state": f.one_of("state", JOB_STATES),
        "at": f.int("at", True),
        "attempts": f.int("attempts"),
        "reason": f.one_of("reason", DELAY_REASONS),
        "until": f.int("until"),
        "message": f.str("message"),
        "error": f.str("error"),
        "result": f.result("result"),
    }
    return _with_problems(event, problems + f.problems)


def _fields_of(fields: Any) -> Optional[Dict[str, str]]:
    if isinstance(fields, (list, tuple)):
        fields = dict(zip(fields[0::2], fields[1::2]))
    return _hash(fields) if isinstance(fields, Mapping) else None


def parse_entry(entry_id: str, fields: Any) -> List[AiqEvent]:
    """The events of one stream entry: an entry of one event is that event's fields; one with the
    field ``n`` (2 or more) holds n events, each field's n values joined by line feeds. An entry
    of neither shape gives one event naming the problem."""
    flat = _fields_of(fields)
    if flat is None or "n" not in flat:
        return [parse_event(entry_id, fields)]
    n = parse_count(flat["n"])
    if n is None or not 2 <= n <= MAX_EVENTS_PER_ENTRY:
        return [_with_problems(parse_event(entry_id, flat), [f"event.n: not a count from 2 to {MAX_EVENTS_PER_ENTRY}: {_clip(flat['n'])}"])]
    columns = []
    for name, value in flat.items():
        if name == "n":
            continue
        values = value.split("\n")
        if len(values) != n:
            return [_with_problems(parse_event(entry_id, flat), [f"event.{name}: {len(values)} values, not {n}"])]
        columns.append((name, values))
    return [parse_event(f"{entry_id}/{i}", {name: values[i] for name, values in columns}) for i in range(n)]


def entry_of(position: str) -> str:
    """The stream entry id of an event's position ("1764626400123-0/3" -> "1764626400123-0")."""
    return position.split("/", 1)[0]


def parse_xread(reply: Any) -> List[AiqEvent]:
    """Events of an XREAD reply (RESP2 lists or RESP3 maps); anything unexpected is skipped."""
    if isinstance(reply, Mapping):
        streams = list(reply.values())
    elif isinstance(reply, (list, tuple)):
        streams = [s[1] for s in reply if isinstance(s, (list, tuple)) and len(s) == 2]
    else:
        return []
    out = []
    for entries in streams:
        if isinstance(entries, (list, tuple)) and len(entries) == 1 and isinstance(entries[0], (list, tuple)) and (
            entries[0] and isinstance(entries[0][0], (list, tuple))
        ):
            entries = entries[0]  # RESP3 wraps a stream's entries once more
        for entry in entries if isinstance(entries, (list, tuple)) else ():
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                continue
            eid = text(entry[0])
            if eid is None or not STREAM_ID_RE.match(eid):
                continue
            out.extend(parse_entry(eid, entry[1]))
    return out


def first_stream_id(reply: Any) -> Optional[str]:
    if not isinstance(reply, (list, tuple)) or not reply or not isinstance(reply[0], (list, tuple)) or not reply[0]:
        return None
    eid = text(reply[0][0])
    return eid if eid is not None and STREAM_ID_RE.match(eid) else None


def status_from_event(e: AiqEvent) -> JobStatus:
    """The status a terminal event implies, for a job whose outcome Redis no longer keeps."""
    return {
        "id": e["job_id"],
        "state": e["type"] if e["type"] in TERMINAL_STATES else (e["state"] or "dead"),  # type: ignore[typeddict-item]
        "organization_id": e["organization_id"],
        "tier": e["tier"],
        "kind": e["kind"],
        "attempts": e["attempts"],
        "due_at": None,
        "delay_reason": None,
        "last_error": e["error"],
        "finished_at": e["at"],
        "result": e["result"],
    }


def parse_cancel_reply(reply: Any) -> CancelResult:
    r = text(reply)
    if r not in CANCEL_RESULTS:
        raise ValueError(f"aiq: cancel.lua returned an unexpected reply: {reply!r}")
    return r  # type: ignore[return-value]


# --- The steps of wait and events, without I/O. ---


class Snapshot(NamedTuple):
    """Ask: the job's status (and the stream's last position); answer: (status or None, position)."""

    job_id: str
    with_position: bool


class XRead(NamedTuple):
    """Ask: one XREAD BLOCK after a position; answer: a list of events, or a ReadFailed."""

    after: str
    block_ms: int
    count: int


class EntryEvents(NamedTuple):
    """Ask: the events of one stream entry (XRANGE entry entry); answer: a list (empty when gone)."""

    entry: str


class LastPosition(NamedTuple):
    """Ask: the stream's last position; answer: it ("0-0" when the stream is empty)."""


class Pause(NamedTuple):
    """Ask: sleep this many seconds."""

    seconds: float


class Emit(NamedTuple):
    """Ask: hand this event to the caller."""

    event: AiqEvent


class ReadFailed(NamedTuple):
    """The answer to an XRead whose connection failed (the next read opens a new one)."""

    error: BaseException


Step = Union[Snapshot, XRead, EntryEvents, LastPosition, Pause, Emit]


def check_block_ms(block_ms: Any) -> int:
    if isinstance(block_ms, bool) or not isinstance(block_ms, int) or not 1 <= block_ms <= 600_000:
        raise ValueError("aiq: block_ms must be an integer, 1 to 600000")
    return block_ms


def _backoff(failures: int) -> float:
    return min(2.0, 0.05 * 2 ** min(failures, 6))


def wait_machine(job_id: str, timeout: Optional[float], block_ms: int) -> Generator[Step, Any, JobStatus]:
    """The steps of ``wait``: returns the final status, raises AiqJobNotFound or AiqTimeout."""
    check_job_id(job_id)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
        raise ValueError("aiq: timeout must be a number of seconds >= 0, or None")
    block_ms = check_block_ms(block_ms)
    deadline = None if timeout is None or timeout == float("inf") else time.monotonic() + timeout
    # The stream's position is read with the status, so an event written after it is seen.
    status, position = yield Snapshot(job_id, True)
    if status is None:
        raise AiqJobNotFound(job_id)
    if status["state"] in TERMINAL_STATES:
        return status
    failures = 0
    checked = time.monotonic()
    while True:
        left_ms = block_ms if deadline is None else int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise AiqTimeout(job_id, timeout, status)  # type: ignore[arg-type]
        read = yield XRead(position, max(1, min(block_ms, left_ms)), 100)
        if isinstance(read, ReadFailed):
            failures += 1
            yield Pause(min(_backoff(failures), max(0.0, left_ms / 1000)))
            continue
        failures = 0
        for event in read:
            position = entry_of(event["id"])
            if event["job_id"] == job_id and event["type"] in TERMINAL_EVENT_TYPES:
                final, _ = yield Snapshot(job_id, False)
                return final if final is not None and final["state"] in TERMINAL_STATES else status_from_event(event)
        if not read or time.monotonic() - checked >= block_ms / 1000:
            checked = time.monotonic()
            now, _ = yield Snapshot(job_id, False)
            if now is None:
                raise AiqJobNotFound(job_id, "it left Redis without an outcome")
            if now["state"] in TERMINAL_STATES:
                return now
            status = now


def events_machine(from_id: Optional[str], block_ms: int, count: int, reconnect_timeout: float) -> Generator[Step, Any, None]:
    """The steps of ``events``: emits every event after ``from_id``, reconnecting as needed."""
    position = "$" if from_id is None else from_id
    if not isinstance(position, str) or not _POSITION_RE.match(position):
        raise ValueError('aiq: from_id must be an event position ("1764626400123-0" or "1764626400123-0/3"), "0" or "$"')
    block_ms = check_block_ms(block_ms)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
        raise ValueError("aiq: count must be 1 to 10000")
    if position == "$":
        position = yield LastPosition()
    if "/" in position:
        # After one event of an entry of several: the rest of that entry first.
        entry, after = position.split("/", 1)
        for event in (yield EntryEvents(entry)):
            index = event["id"].partition("/")[2]
            if index and int(index) > int(after):
                yield Emit(event)
        position = entry
    failing_since: Optional[float] = None
    failures = 0
    while True:
        read = yield XRead(position, block_ms, count)
        if isinstance(read, ReadFailed):
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > reconnect_timeout:
                raise read.error
            failures += 1
            yield Pause(_backoff(failures))
            continue
        failing_since, failures = None, 0
        for event in read:
            position = entry_of(event["id"])
            yield Emit(event)
