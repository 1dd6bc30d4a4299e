"""aiq_client: puts jobs into an aiq queue by running jobs/enqueue.lua (see jobs/README.md), and
tells their outcomes: status, waiting, the events stream, cancel (jobs/cancel.lua).

The scripts are read from their files at run time, never copied into this client::

    import redis
    from aiq_client import AiqQueue

    q = AiqQueue(redis.Redis.from_url(url), prefix="aiq")
    job_id, duplicate = q.add("llm.complete", payload, idempotency_key="caption-photo-42")
    status = q.wait(job_id, timeout=60)

``AsyncAiqQueue`` is the same API for ``redis.asyncio`` clients, with ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    TypedDict,
    Union,
)

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .outcomes import (
    CANCEL_RESULTS,
    DELAY_REASONS,
    EVENT_TYPES,
    JOB_STATES,
    TERMINAL_STATES,
    AiqEvent,
    AiqJobNotFound,
    AiqTimeout,
    CancelResult,
    DelayReason,
    Emit,
    JobResult,
    JobState,
    JobStatus,
    EntryEvents,
    LastPosition,
    Pause,
    ReadFailed,
    Snapshot,
    Step,
    XRead,
    check_job_id,
    events_machine,
    first_stream_id,
    parse_cancel_reply,
    parse_xread,
    snapshot_commands,
    snapshot_from_replies,
    status_from_snapshot,
    wait_machine,
)
from .webhooks import AiqWebhookError, VerifiedWebhook, sign_webhook, verify_webhook

__all__ = [
    "TIERS",
    "JOB_KINDS",
    "Tier",
    "JobKind",
    "CommonPayload",
    "VisionImage",
    "VisionFeature",
    "VisionAnnotatePayload",
    "LlmMessage",
    "LlmCompletePayload",
    "AddResult",
    "AiqEnqueueError",
    "AiqBulkEnqueueError",
    "AiqQueue",
    "AsyncAiqQueue",
    "default_script_path",
    "JobState",
    "JOB_STATES",
    "TERMINAL_STATES",
    "DelayReason",
    "DELAY_REASONS",
    "EVENT_TYPES",
    "CancelResult",
    "CANCEL_RESULTS",
    "JobResult",
    "JobStatus",
    "AiqEvent",
    "AiqJobNotFound",
    "AiqTimeout",
    "AiqWebhookError",
    "VerifiedWebhook",
    "verify_webhook",
    "sign_webhook",
]

# --- Types that mirror jobs/schema/*.json (version 1); the schemas are the source of truth. ---

Tier = Literal["enterprise_plus", "enterprise", "professional_agency", "growth_team", "solo_professional", "trial"]
TIERS: Tuple[str, ...] = (
    "enterprise_plus",
    "enterprise",
    "professional_agency",
    "growth_team",
    "solo_professional",
    "trial",
)

JobKind = Literal["vision.annotate", "llm.complete"]
JOB_KINDS: Tuple[str, ...] = ("vision.annotate", "llm.complete")


class _CommonRequired(TypedDict):
    organization_id: str  # UUID of the organisation billed
    tier: Tier  # also the tier the job is queued under


class CommonPayload(_CommonRequired, total=False):
    """Fields every job carries (schema/common.json)."""

    version: Literal[1]
    idempotency_key: str  # informational; pass idempotency_key= to add() for it to count
    correlation_id: str
    subject_id: str
    subject_type: str


class VisionImage(TypedDict, total=False):
    """One of ``content`` (base64) or ``uri`` (gs:// or https://)."""

    content: str
    uri: str


class _VisionFeatureRequired(TypedDict):
    type: str  # LABEL_DETECTION, TEXT_DETECTION, ... (schema/vision.annotate.json)


class VisionFeature(_VisionFeatureRequired, total=False):
    maxResults: int


class _VisionRequired(TypedDict):
    images: List[VisionImage]  # 1 to 16
    features: List[VisionFeature]  # at least one


class VisionAnnotatePayload(CommonPayload, _VisionRequired):
    """vision.annotate: annotate up to 16 images with Google Cloud Vision."""


class LlmMessage(TypedDict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class _LlmRequired(TypedDict):
    provider: Literal["openai", "anthropic", "gemini"]
    model: str  # must be in aiq's price catalog
    messages: List[LlmMessage]  # at least one
    max_tokens: int  # 1 to 200000


class LlmCompletePayload(CommonPayload, _LlmRequired):
    """llm.complete: one chat completion from an LLM provider."""


# --- Results and errors. ---


class AddResult(NamedTuple):
    """The job id (the first job's when duplicate) and whether it was already known."""

    id: str
    duplicate: bool


class AiqEnqueueError(Exception):
    """A job was refused; nothing was written for it.

    ``message`` is the server's reply (starting with ``ERR aiq:``) when ``source`` is
    ``"server"``, or the client's reason when the job was refused before reaching Redis.
    """

    def __init__(self, message: str, source: str = "server"):
        super().__init__(message)
        self.message = message
        self.source = source


class AiqBulkEnqueueError(AiqEnqueueError):
    """``add_bulk`` could not queue every job.

    ``results`` has one entry per job, in order: its AddResult, or the exception that stopped it
    (an AiqEnqueueError when the script refused it). Jobs with a result were queued.
    """

    def __init__(self, results: List[Union[AddResult, Exception]]):
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
        first, err = failed[0]
        super().__init__(f"aiq: {len(failed)} of {len(results)} jobs failed; job {first}: {err}", "server")
        self.results = results


# --- The queue. ---

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_OPTION_NAMES = ("tier", "delay_ms", "idempotency_key", "job_id", "max_attempts")


def default_script_path() -> Path:
    """jobs/enqueue.lua when this package sits in the aiq repository (jobs/clients/python)."""
    package_dir = Path(__file__).resolve().parent.parent
    return (package_dir / ".." / ".." / "enqueue.lua").resolve()


def _text(v: Any) -> Any:
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _number_arg(name: str, v: Any) -> Union[int, float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AiqEnqueueError(f"aiq: {name} must be a finite number", "client")
    return v


def _to_enqueue_error(e: BaseException) -> BaseException:
    """Script refusals become AiqEnqueueError with the server's reply; others are left as is."""
    msg = str(e)
    # redis-py drops the "ERR " of the reply; put it back so the message is the server's.
    if isinstance(e, ResponseError) and (msg.startswith("aiq:") or msg.startswith("ERR aiq:")):
        return AiqEnqueueError(msg if msg.startswith("ERR ") else "ERR " + msg, "server")
    return e


def _parse_reply(reply: Any) -> AddResult:
    if isinstance(reply, (list, tuple)) and len(reply) == 2:
        job_id, status = _text(reply[0]), _text(reply[1])
        if isinstance(job_id, str) and status in ("created", "duplicate"):
            return AddResult(job_id, status == "duplicate")
    raise ResponseError(f"aiq: enqueue.lua returned an unexpected reply: {reply!r}")


_READ_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@contextlib.contextmanager
def _reading_status(job_id: str) -> Iterator[None]:
    """Names the job in a reply error of its status's MULTI (e.g. WRONGTYPE on a hand-written key)."""
    try:
        yield
    except ResponseError as e:
        raise ResponseError(f"aiq: reading the status of {job_id!r}: {e}") from e


class _QueueBase:
    def __init__(
        self,
        connection: Any,
        prefix: str,
        idempotency_ttl_s: int,
        script_path: Union[str, os.PathLike, None],
        cancel_script_path: Union[str, os.PathLike, None] = None,
    ):
        if connection is None:
            raise TypeError("AiqQueue: connection is required")
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise ValueError(f"AiqQueue: prefix {prefix!r} must be 1-64 characters of letters, digits, _ - . :")
        if isinstance(idempotency_ttl_s, bool) or not isinstance(idempotency_ttl_s, int) or idempotency_ttl_s <= 0:
            raise ValueError("AiqQueue: idempotency_ttl_s must be a positive integer")
        self.connection = connection
        self.prefix = prefix
        self.base = "{" + prefix + "}"
        self.idempotency_ttl_s = idempotency_ttl_s
        self.script_path = Path(script_path).resolve() if script_path is not None else default_script_path()
        try:
            self.script_source = self.script_path.read_text(encoding="utf-8")
        except OSError as e:
            raise FileNotFoundError(f"AiqQueue: cannot read enqueue.lua at {self.script_path} (pass script_path): {e}") from e
        # EVALSHA by the script's SHA; on NOSCRIPT redis-py loads it (SCRIPT LOAD) and retries.
        self._script = connection.register_script(self.script_source)
        self.cancel_script_path = (
            Path(cancel_script_path).resolve() if cancel_script_path is not None else self.script_path.parent / "cancel.lua"
        )
        self._cancel_script: Any = None

    def _cancel(self) -> Any:
        """cancel.lua, read and registered at the first cancel."""
        if self._cancel_script is None:
            try:
                source = self.cancel_script_path.read_text(encoding="utf-8")
            except OSError as e:
                raise FileNotFoundError(
                    f"AiqQueue: cannot read cancel.lua at {self.cancel_script_path} (pass cancel_script_path): {e}"
                ) from e
            self._cancel_script = self.connection.register_script(source)
        return self._cancel_script

    def _snapshot_pipeline(self, pipe: Any, step: Snapshot) -> Any:
        for name, args in snapshot_commands(self.base, step.job_id, step.with_position):
            getattr(pipe, name)(*args)
        return pipe

    def _snapshot_result(self, step: Snapshot, replies: Any) -> Tuple[Optional[JobStatus], str]:
        snap, position = snapshot_from_replies(replies, step.with_position)
        return status_from_snapshot(step.job_id, snap), position

    def _block_ms(self, block_ms: int) -> int:
        """A block that ends before the client's socket_timeout, if it has one."""
        kwargs = getattr(getattr(self.connection, "connection_pool", None), "connection_kwargs", None) or {}
        timeout = kwargs.get("socket_timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            block_ms = min(block_ms, max(1, int(timeout * 1000) - 250))
        return block_ms

    def key(self, suffix: str) -> str:
        """The full key of a queue key suffix, e.g. key("job:j1") is "{aiq}:job:j1"."""
        return f"{self.base}:{suffix}"

    def _prepare(
        self,
        kind: str,
        payload: Mapping[str, Any],
        tier: Optional[str] = None,
        delay_ms: Union[int, float] = 0,
        idempotency_key: Optional[str] = None,
        job_id: Optional[str] = None,
        max_attempts: int = 0,
    ) -> List[Any]:
        """Checks a job locally and returns the script's ARGV (before any Redis call)."""
        if not isinstance(payload, Mapping):
            raise AiqEnqueueError("aiq: the payload must be a JSON object (a dict)", "client")
        org = payload.get("organization_id")
        if not isinstance(org, str) or not org:
            raise AiqEnqueueError("aiq: payload['organization_id'] is required", "client")
        payload_tier = payload.get("tier")
        if not isinstance(payload_tier, str) or not payload_tier:
            raise AiqEnqueueError("aiq: payload['tier'] is required", "client")
        if tier is None:
            tier = payload_tier
        if tier != payload_tier:
            raise AiqEnqueueError(f"aiq: tier {tier!r} differs from payload['tier'] {payload_tier!r}", "client")
        try:
            doc = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise AiqEnqueueError(f"aiq: the payload is not JSON: {e}", "client") from e
        return [
            kind,
            tier,
            org,
            doc,
            job_id or "",
            _number_arg("delay_ms", delay_ms),
            idempotency_key or "",
            self.idempotency_ttl_s,
            _number_arg("max_attempts", max_attempts),
        ]

    def _prepare_bulk(self, jobs: Iterable[Mapping[str, Any]]) -> List[List[Any]]:
        prepared = []
        for i, job in enumerate(jobs):
            if not isinstance(job, Mapping) or "kind" not in job or "payload" not in job:
                raise AiqEnqueueError(f"aiq: job {i} must be a dict with kind, payload and optional opts", "client")
            opts = job.get("opts") or {}
            unknown = [k for k in opts if k not in _OPTION_NAMES]
            if unknown:
                raise AiqEnqueueError(f"aiq: job {i} has an unknown option {unknown[0]!r}", "client")
            prepared.append(self._prepare(job["kind"], job["payload"], **opts))
        return prepared


class AiqQueue(_QueueBase):
    """Puts jobs into one aiq queue through a ``redis.Redis`` (or ``RedisCluster``) client."""

    def __init__(
        self,
        connection: Any,
        prefix: str = "aiq",
        idempotency_ttl_s: int = 86400,
        script_path: Union[str, os.PathLike, None] = None,
        cancel_script_path: Union[str, os.PathLike, None] = None,
    ):
        super().__init__(connection, prefix, idempotency_ttl_s, script_path, cancel_script_path)

    def add(
        self,
        kind: JobKind,
        payload: Mapping[str, Any],
        tier: Optional[Tier] = None,
        delay_ms: Union[int, float] = 0,
        idempotency_key: Optional[str] = None,
        job_id: Optional[str] = None,
        max_attempts: int = 0,
    ) -> AddResult:
        """Queues one job; returns ``(id, duplicate)``. Raises AiqEnqueueError when refused.

        The tier and organisation come from the payload; ``tier``, when given, must equal
        ``payload["tier"]``. ``max_attempts`` 0 means the daemon's AIQ_MAX_ATTEMPTS.
        """
        args = self._prepare(kind, payload, tier, delay_ms, idempotency_key, job_id, max_attempts)
        try:
            reply = self._script(keys=[self.base], args=args)
        except ResponseError as e:
            raise _to_enqueue_error(e) from e
        return _parse_reply(reply)

    def add_bulk(self, jobs: Iterable[Mapping[str, Any]]) -> List[AddResult]:
        """Queues several jobs in one round trip (a pipeline of EVALSHA calls), in order.

        Each job is ``{"kind": ..., "payload": {...}, "opts": {...}}`` with the keyword arguments
        of ``add`` in ``opts``. Every job is checked locally first: if one fails, none is sent.
        Each job is then atomic on its own; if the server refuses some, AiqBulkEnqueueError
        tells which (the others were queued).
        """
        prepared = self._prepare_bulk(jobs)
        if not prepared:
            return []
        pipe = self.connection.pipeline(transaction=False)
        for args in prepared:
            self._script(keys=[self.base], args=args, client=pipe)
        # The pipeline loads the script first (SCRIPT EXISTS / SCRIPT LOAD).
        replies = pipe.execute(raise_on_error=False)
        results: List[Union[AddResult, Exception]] = []
        for args, reply in zip(prepared, replies):
            if isinstance(reply, NoScriptError):
                # Flushed between the load and the call: the job did not run; send it again.
                try:
                    reply = self._script(keys=[self.base], args=args)
                except ResponseError as e:
                    reply = e
            if isinstance(reply, Exception):
                results.append(_to_enqueue_error(reply))  # type: ignore[arg-type]
            else:
                results.append(_parse_reply(reply))
        if any(isinstance(r, Exception) for r in results):
            raise AiqBulkEnqueueError(results)
        return results  # type: ignore[return-value]

    def get_job(self, job_id: str) -> Optional[JobStatus]:
        """The job's status, or None when the id exists nowhere in Redis (never "waiting").

        Reads ``{p}:job:<id>`` and then ``{p}:outcome:<id>`` in one MULTI, so the answer is one
        moment's. A field Redis holds wrong is named in ``status["problems"]``.
        """
        return self._step(Snapshot(check_job_id(job_id), False))[0]

    def wait(self, job_id: str, timeout: Optional[float] = None, block_ms: int = 5000) -> JobStatus:
        """Waits for the job to finish and returns its final status (at once if it already has).

        Raises AiqJobNotFound at once for an id that exists nowhere, and AiqTimeout when
        ``timeout`` seconds pass first (None: no limit). It blocks on the events stream (XREAD
        BLOCK on a connection of the client's pool) in slices of ``block_ms``, reading the status
        again between them, so it also ends when events are off.
        """
        return _run_to_end(self._drive(wait_machine(job_id, timeout, block_ms)))

    def events(
        self, from_id: Optional[str] = None, block_ms: int = 5000, count: int = 100, reconnect_timeout: float = 60.0
    ) -> Iterator[AiqEvent]:
        """Every event after ``from_id`` (an earlier event's ``id``; "0" for all the stream keeps;
        None or "$" for those written from now on), parsed, with its position in ``id``.

        When the connection drops it reconnects and goes on after the last event it yielded, so a
        consumer sees each event once; it raises when Redis stays unreachable for
        ``reconnect_timeout`` seconds. Stop it by breaking out of the loop.
        """
        return self._drive(events_machine(from_id, block_ms, count, reconnect_timeout))

    def cancel(self, job_id: str) -> CancelResult:
        """Cancels a waiting or delayed job (jobs/cancel.lua).

        Returns "cancelled" (it left its queue and will never run), "running" (a worker holds it:
        it finishes), "finished" (it had ended already) or "not_found".
        """
        script = self._cancel()
        return parse_cancel_reply(script(keys=[self.base], args=[check_job_id(job_id)]))

    def _drive(self, machine: Generator[Step, Any, Any]) -> Generator[AiqEvent, None, Any]:
        """Runs a machine's steps; yields the events it emits, returns what it returns."""
        answer: Any = None
        while not isinstance(step := _advance(machine, answer), _Done):
            if isinstance(step, Emit):
                answer = None
                yield step.event
            else:
                answer = self._step(step)
        return step.value

    def _step(self, step: Step) -> Any:
        if isinstance(step, Snapshot):
            with _reading_status(step.job_id):
                replies = self._snapshot_pipeline(self.connection.pipeline(transaction=True), step).execute()
            return self._snapshot_result(step, replies)
        if isinstance(step, XRead):
            try:
                reply = self.connection.xread({self.key("events"): step.after}, count=step.count, block=self._block_ms(step.block_ms))
            except _READ_ERRORS as e:
                return ReadFailed(e)
            return parse_xread(reply)
        if isinstance(step, EntryEvents):
            reply = self.connection.xrange(self.key("events"), step.entry, step.entry)
            return parse_xread([[self.key("events"), reply]])
        if isinstance(step, LastPosition):
            return first_stream_id(self.connection.xrevrange(self.key("events"), "+", "-", 1)) or "0-0"
        if isinstance(step, Pause):
            time.sleep(step.seconds)
            return None
        raise TypeError(f"aiq: unknown step {step!r}")


class AsyncAiqQueue(_QueueBase):
    """``AiqQueue`` for ``redis.asyncio`` clients: ``await q.add(...)``, ``await q.add_bulk(...)``."""

    def __init__(
        self,
        connection: Any,
        prefix: str = "aiq",
        idempotency_ttl_s: int = 86400,
        script_path: Union[str, os.PathLike, None] = None,
        cancel_script_path: Union[str, os.PathLike, None] = None,
    ):
        super().__init__(connection, prefix, idempotency_ttl_s, script_path, cancel_script_path)

    async def add(
        self,
        kind: JobKind,
        payload: Mapping[str, Any],
        tier: Optional[Tier] = None,
        delay_ms: Union[int, float] = 0,
        idempotency_key: Optional[str] = None,
        job_id: Optional[str] = None,
        max_attempts: int = 0,
    ) -> AddResult:
        """See AiqQueue.add."""
        args = self._prepare(kind, payload, tier, delay_ms, idempotency_key, job_id, max_attempts)
        try:
            reply = await self._script(keys=[self.base], args=args)
        except ResponseError as e:
            raise _to_enqueue_error(e) from e
        return _parse_reply(reply)

    async def add_bulk(self, jobs: Iterable[Mapping[str, Any]]) -> List[AddResult]:
        """See AiqQueue.add_bulk."""
        prepared = self._prepare_bulk(jobs)
        if not prepared:
            return []
        async with self.connection.pipeline(transaction=False) as pipe:
            for args in prepared:
                await self._script(keys=[self.base], args=args, client=pipe)
            replies = await pipe.execute(raise_on_error=False)
        results: List[Union[AddResult, Exception]] = []
        for args, reply in zip(prepared, replies):
            if isinstance(reply, NoScriptError):
                try:
                    reply = await self._script(keys=[self.base], args=args)
                except ResponseError as e:
                    reply = e
            if isinstance(reply, Exception):
                results.append(_to_enqueue_error(reply))  # type: ignore[arg-type]
            else:
                results.append(_parse_reply(reply))
        if any(isinstance(r, Exception) for r in results):
            raise AiqBulkEnqueueError(results)
        return results  # type: ignore[return-value]

    async def get_job(self, job_id: str) -> Optional[JobStatus]:
        """See AiqQueue.get_job."""
        return (await self._step(Snapshot(check_job_id(job_id), False)))[0]

    async def wait(self, job_id: str, timeout: Optional[float] = None, block_ms: int = 5000) -> JobStatus:
        """See AiqQueue.wait."""
        machine = wait_machine(job_id, timeout, block_ms)
        answer: Any = None
        while not isinstance(step := _advance(machine, answer), _Done):
            answer = await self._step(step)
        return step.value

    async def events(
        self, from_id: Optional[str] = None, block_ms: int = 5000, count: int = 100, reconnect_timeout: float = 60.0
    ) -> AsyncIterator[AiqEvent]:
        """See AiqQueue.events: ``async for event in q.events(...)``."""
        machine = events_machine(from_id, block_ms, count, reconnect_timeout)
        answer: Any = None
        while True:
            step = machine.send(answer)  # the machine never returns
            answer = None
            if isinstance(step, Emit):
                yield step.event
            else:
                answer = await self._step(step)

    async def cancel(self, job_id: str) -> CancelResult:
        """See AiqQueue.cancel."""
        script = self._cancel()
        return parse_cancel_reply(await script(keys=[self.base], args=[check_job_id(job_id)]))

    async def _step(self, step: Step) -> Any:
        if isinstance(step, Snapshot):
            async with self.connection.pipeline(transaction=True) as pipe:
                with _reading_status(step.job_id):
                    replies = await self._snapshot_pipeline(pipe, step).execute()
            return self._snapshot_result(step, replies)
        if isinstance(step, XRead):
            try:
                reply = await self.connection.xread(
                    {self.key("events"): step.after}, count=step.count, block=self._block_ms(step.block_ms)
                )
            except _READ_ERRORS as e:
                return ReadFailed(e)
            return parse_xread(reply)
        if isinstance(step, EntryEvents):
            reply = await self.connection.xrange(self.key("events"), step.entry, step.entry)
            return parse_xread([[self.key("events"), reply]])
        if isinstance(step, LastPosition):
            return first_stream_id(await self.connection.xrevrange(self.key("events"), "+", "-", 1)) or "0-0"
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
            return None
        raise TypeError(f"aiq: unknown step {step!r}")


def _run_to_end(gen: Generator[Any, None, Any]) -> Any:
    """A generator's return value (it yields nothing on the way)."""
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


class _Done(NamedTuple):
    """A machine's end and its return value."""

    value: Any


def _advance(machine: Generator[Step, Any, Any], answer: Any) -> Union[Step, _Done]:
    """Sends a machine the answer to its last step; its next step, or _Done when it returned."""
    try:
        return machine.send(answer)
    except StopIteration as done:
        return _Done(done.value)
