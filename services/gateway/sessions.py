"""Session state in Redis: record, ownership leases with fencing epochs, bounded replay log, idle expiry.

What lives here is what must outlive a replica (DESIGN.md "Sessions and state"). The KV cache itself lives in
one LLMCore replica's memory, a session's streaming Whisper state in one AudioEncoder replica's memory; Redis says
WHICH replica owns them (a lease per role with a fencing epoch) and holds the replay log that rebuilds them.

Keys (all of a session's keys, one place: ``SessionKeys``; the ``{sid}`` hash tag keeps them in one Redis
Cluster slot so the Lua scripts may touch them together)::

    <ns>:{<sid>}:rec          hash    the session record (fields of ``SessionRecord``)
    <ns>:{<sid>}:log          list    replay log entries (``ReplayEntry.to_bytes``), oldest first
    <ns>:{<sid>}:lease:llm    hash    owner (replica id) + epoch of the KV-cache owner
    <ns>:{<sid>}:lease:audio  hash    owner + epoch of the streaming-audio-state owner

Every key of a session carries the same idle TTL and every call that uses the session refreshes all of them in
one script, so an idle session disappears from Redis as a whole; ``delete`` removes all of them at once.

Expiry and replicas (keyspace-free): Redis never notifies replicas. A replica learns that a session is gone in two
normal ways: (1) ``acquire``/``append_replay``/``check`` raise ``SessionNotFound`` when the record is gone, and
(2) a periodic sweep ``await store.missing(ids_i_hold)`` returns the ids whose record expired or was deleted;
the replica drops their KV / audio state. Keyspace notifications were not used on purpose: they are
fire-and-forget (a replica that is restarting misses them) and need server config (``notify-keyspace-events``)
that managed Redis often forbids; the sweep costs one pipelined EXISTS per period for all held sessions.

Ownership protocol (role "llm" for LLMCore, "audio" for AudioEncoder):
    On every request for a session a replica calls ``fence = await store.acquire(sid, role, my_replica_id)``.
    If it already owns the lease it gets its current epoch back (and the TTL is refreshed). Otherwise it takes
    the lease over with ``epoch + 1`` (the router sent the session here: the old owner died, was scaled away, or
    lost its rank). If ``fence.epoch`` differs from the epoch the replica built its local state under, that
    state is stale or absent: drop it and rebuild from ``await store.replay(sid)``. Writes that record new state
    (``append_replay(..., fence=fence)``) are refused with ``LeaseLost`` once another replica took over, so a
    stale owner never extends the log with state the new owner does not have. ``release(fence)`` gives the
    lease up (e.g. KV eviction under memory pressure) while keeping the epoch counter monotonic.

Replay log entries (``ReplayEntry``): what one prefill put into the session, enough to put it there again:
``kind`` (free-form label chosen by the caller, e.g. "system", "unit", "text", "answer"), ``n_tokens`` (LLM
positions it occupies: counted against the session limit), ``payload`` (opaque bytes: the serialized proto the
LLMCore prefill took, i.e. input ids plus encoder embeddings as ``minicpmo.v1.Tensor``), ``meta`` (small JSON).
Size trade-off: storing the ENCODED embeddings (the LLM's exact input) costs about n_tokens x hidden x 2 bytes in
bf16 (~180 KB per 1 s unit of audio at hidden 3584, ~460 KB per 64-query image) versus ~32-64 KB of raw PCM or a
JPEG, but a rebuild then needs no encoder at all and reproduces the KV exactly: raw streaming audio could not be
re-encoded elsewhere without also replaying the audio replica's Whisper KV in order, and re-encoding adds seconds
to a recovery. Generated answer tokens go in as entries too (ids only, tiny), so the log mirrors the KV exactly.
The log is bounded by the session limits below; raw inputs can still be stored by callers who prefer them.

Limits: ``max_tokens`` (default 8192, upstream's context reset point) is the session's KV budget; an append
that would pass it is REFUSED with ``SessionLimitExceeded`` (-> RESOURCE_EXHAUSTED, "close the session and start
a new one") rather than silently resetting the conversation as the upstream demo does: a client must know its
context is gone. ``max_replay_entries`` and ``max_replay_bytes`` bound the log's size in Redis the same way.
Because the log must hold everything the KV holds, its bound IS the session's bound. Sizing at the real model
(hidden 3584, bf16 embeddings): 8192 tokens x 7 KiB ~ 59 MB, plus ~64 KB of PCM per second if the audio stage logs
raw audio: ~65 MB of Redis per live session at the token cap, hence the 128 MiB default byte cap (the token
limit stays the binding one); lower it with fewer, smaller sessions in mind, never below what ``max_tokens`` needs.

Turn state: ``idle`` (created, only the system prompt) -> ``user_turn`` (inputs being appended) ->
``answering`` -> ``answered`` | ``interrupted`` -> ``user_turn`` ...; ``set_turn`` applies a transition
atomically and returns the previous state (the prompt builder needs it: after "answered" a new user turn starts
with ``<|im_end|>\\n<|im_start|>user\\n``, after "interrupted" with ``<|tts_eos|>`` first).

Public API (all coroutine methods; ``redis.asyncio`` client)
----------
``SessionStore(client, namespace="minicpmo", ttl_s=600, max_tokens=8192, max_replay_entries=4096,
max_replay_bytes=128 MiB)``, ``SessionStore.from_url(url, **kw)``, ``aclose()``.
``create(owner, mode, language, options=None, session_id=None) -> SessionRecord``
``get(sid) -> SessionRecord`` (``SessionNotFound``), ``get_owned(sid, owner) -> SessionRecord`` (also
``auth.PermissionDenied``), ``touch(sid) -> bool``, ``set_turn(sid, turn) -> str`` (previous turn; ``InvalidTurn``)
``acquire(sid, role, replica_id) -> Fence``, ``check(fence) -> bool``, ``require(fence)`` (``LeaseLost``),
``release(fence) -> bool``, ``lease(sid, role) -> Fence | None``
``append_replay(sid, entries, fence=None) -> SessionRecord`` (``SessionLimitExceeded``, ``LeaseLost``),
``replay(sid) -> list[ReplayEntry]``
``delete(sid) -> bool``, ``missing(sids) -> set[str]``, ``keys(sid) -> list[str]`` (``SessionKeys``)
Errors: ``SessionError`` base; ``SessionNotFound`` (NOT_FOUND), ``SessionLimitExceeded`` (RESOURCE_EXHAUSTED),
``LeaseLost`` (the replica must drop its state; the gateway retries -> UNAVAILABLE if it persists),
``StoreUnavailable`` (Redis unreachable -> UNAVAILABLE, retryable),
``InvalidTurn`` (FAILED_PRECONDITION), ``SessionInputError(ValueError)`` (INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from services.gateway.auth import check_owner

ROLES = ("llm", "audio")
TURN_STATES = ("idle", "user_turn", "answering", "interrupted", "answered")
TURN_TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"user_turn", "answering"}),
    "user_turn": frozenset({"user_turn", "answering"}),
    "answering": frozenset({"answered", "interrupted"}),
    "answered": frozenset({"user_turn", "answering"}),
    "interrupted": frozenset({"user_turn", "answering"}),
}


class SessionError(Exception):
    """Base of session-store errors."""


class SessionNotFound(SessionError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found (never created, closed, or expired after idling)")
        self.session_id = session_id

    def __reduce__(self):  # crosses Ray processes by pickle: rebuild from the id, not from the formatted message
        return type(self), (self.session_id,)


class SessionLimitExceeded(SessionError):
    """The session would pass its token / replay-log limit."""


class LeaseLost(SessionError):
    """Another replica took the session over; this replica's state for it is stale."""


class InvalidTurn(SessionError):
    """A turn transition that the conversation state does not allow (e.g. interrupt while idle)."""


class StoreUnavailable(SessionError):
    """Redis cannot be reached (down, restarting, network): retryable."""


class SessionInputError(ValueError):
    """A bad argument from a caller (unknown role, bad turn name, ...)."""


@dataclass(frozen=True)
class SessionKeys:
    """Every Redis key of one session (the one place that names them)."""

    namespace: str
    session_id: str

    def _k(self, suffix: str) -> str:
        return f"{self.namespace}:{{{self.session_id}}}:{suffix}"

    @property
    def record(self) -> str:
        return self._k("rec")

    @property
    def log(self) -> str:
        return self._k("log")

    def lease(self, role: str) -> str:
        return self._k(f"lease:{role}")

    def all(self) -> list[str]:
        """Order matters: the Lua scripts address them as KEYS[1..4]."""
        return [self.record, self.log, *(self.lease(r) for r in ROLES)]


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    owner: str  # hash of the API key that created the session (auth.key_hash)
    mode: str
    language: str
    turn: str
    tokens: int
    replay_entries: int
    replay_bytes: int
    created_at: float
    updated_at: float
    ttl_s: int
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, session_id: str, h: dict[bytes, bytes]) -> SessionRecord:
        s = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            session_id=session_id,
            owner=s["owner"],
            mode=s["mode"],
            language=s["language"],
            turn=s["turn"],
            tokens=int(s["tokens"]),
            replay_entries=int(s["replay_entries"]),
            replay_bytes=int(s["replay_bytes"]),
            created_at=float(s["created_at"]),
            updated_at=float(s["updated_at"]),
            ttl_s=int(s["ttl_s"]),
            options=json.loads(s["options"]),
        )


@dataclass(frozen=True)
class Fence:
    """Proof of ownership: valid while the lease's (owner, epoch) still equal these."""

    session_id: str
    role: str
    replica_id: str
    epoch: int
    took_over: bool = False  # True when this acquire moved the lease (the replica must (re)build state)


@dataclass(frozen=True)
class ReplayEntry:
    kind: str
    n_tokens: int
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    _HEADER = struct.Struct("<I")

    def to_bytes(self) -> bytes:
        header = json.dumps({"kind": self.kind, "n_tokens": self.n_tokens, "meta": self.meta}).encode()
        return self._HEADER.pack(len(header)) + header + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayEntry:
        (n,) = cls._HEADER.unpack_from(data)
        header = json.loads(data[cls._HEADER.size : cls._HEADER.size + n])
        payload = data[cls._HEADER.size + n :]
        return cls(kind=header["kind"], n_tokens=int(header["n_tokens"]), payload=payload, meta=header["meta"])


# Shared Lua prologue: KEYS = rec, log, lease:llm, lease:audio; ARGV[1] = ttl seconds. Refreshing the TTL of
# every key in the same script keeps them expiring together.
_LUA_REFRESH = """
local function refresh(ttl)
  for i = 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
"""

# KEYS[1] = rec; ARGV: ttl, field1, value1, ... -> 1 created / 0 already exists (never overwritten).
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# ARGV: ttl, now -> 1, or 0 when the session is gone.
_LUA_TOUCH = _LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return 1
"""

# ARGV: ttl, now, role index (3 or 4 in KEYS), replica id -> {epoch, took_over} or error 'GONE'.
_LUA_ACQUIRE = _LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
local lease = KEYS[tonumber(ARGV[3])]
local owner = redis.call('HGET', lease, 'owner')
local epoch = tonumber(redis.call('HGET', lease, 'epoch') or '0')
local took = 0
if owner ~= ARGV[4] then
  epoch = epoch + 1
  redis.call('HSET', lease, 'owner', ARGV[4], 'epoch', epoch)
  took = 1
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return {epoch, took}
"""

# ARGV: role index, replica id, epoch -> 1 valid / 0 lost, or error 'GONE'.
_LUA_CHECK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
local lease = KEYS[tonumber(ARGV[1])]
if redis.call('HGET', lease, 'owner') == ARGV[2] and redis.call('HGET', lease, 'epoch') == ARGV[3] then
  return 1
end
return 0
"""

# ARGV: role index, replica id, epoch -> 1 released / 0 not the owner (keeps 'epoch' so epochs never repeat).
_LUA_RELEASE = """
local lease = KEYS[tonumber(ARGV[1])]
if redis.call('HGET', lease, 'owner') == ARGV[2] and redis.call('HGET', lease, 'epoch') == ARGV[3] then
  redis.call('HDEL', lease, 'owner')
  return 1
end
return 0
"""

# ARGV: ttl, now, fenced (0/1), role index, replica id, epoch, max_tokens, max_entries, max_bytes,
#       n_entries, add_tokens, add_bytes, entry_1 .. entry_n -> the record (HGETALL) or an error naming the limit.
_LUA_APPEND = _LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
if ARGV[3] == '1' then
  local lease = KEYS[tonumber(ARGV[4])]
  if redis.call('HGET', lease, 'owner') ~= ARGV[5] or redis.call('HGET', lease, 'epoch') ~= ARGV[6] then
    return redis.error_reply('LEASE_LOST')
  end
end
local h = redis.call('HMGET', KEYS[1], 'tokens', 'replay_entries', 'replay_bytes')
local tokens = tonumber(h[1]) + tonumber(ARGV[11])
local entries = tonumber(h[2]) + tonumber(ARGV[10])
local bytes = tonumber(h[3]) + tonumber(ARGV[12])
if tokens > tonumber(ARGV[7]) then return redis.error_reply('LIMIT tokens ' .. h[1] .. ' ' .. ARGV[7]) end
if entries > tonumber(ARGV[8]) then return redis.error_reply('LIMIT entries ' .. h[2] .. ' ' .. ARGV[8]) end
if bytes > tonumber(ARGV[9]) then return redis.error_reply('LIMIT bytes ' .. h[3] .. ' ' .. ARGV[9]) end
for i = 13, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'replay_entries', entries, 'replay_bytes', bytes, 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: ttl, now, new turn, allowed-previous (space separated) -> previous turn, or error 'GONE' / 'TURN <prev>'.
_LUA_SET_TURN = _LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
local prev = redis.call('HGET', KEYS[1], 'turn')
if not string.find(' ' .. ARGV[4] .. ' ', ' ' .. prev .. ' ', 1, true) then
  return redis.error_reply('TURN ' .. prev)
end
redis.call('HSET', KEYS[1], 'turn', ARGV[3], 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return prev
"""


class SessionStore:
    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str = "minicpmo",
        ttl_s: int = 600,
        max_tokens: int = 8192,
        max_replay_entries: int = 4096,
        max_replay_bytes: int = 128 << 20,
    ) -> None:
        if ttl_s < 1:
            raise SessionInputError(f"ttl_s must be >= 1 second, got {ttl_s}")
        self.client = client
        self.namespace = namespace
        self.ttl_s = int(ttl_s)
        self.max_tokens = max_tokens
        self.max_replay_entries = max_replay_entries
        self.max_replay_bytes = max_replay_bytes
        self._create = client.register_script(_LUA_CREATE)
        self._touch = client.register_script(_LUA_TOUCH)
        self._acquire = client.register_script(_LUA_ACQUIRE)
        self._check = client.register_script(_LUA_CHECK)
        self._release = client.register_script(_LUA_RELEASE)
        self._append = client.register_script(_LUA_APPEND)
        self._set_turn = client.register_script(_LUA_SET_TURN)

    @classmethod
    def from_url(cls, url: str, socket_timeout_s: float = 5.0, **kwargs: Any) -> SessionStore:
        # Bounded socket waits: with Redis gone a call fails with StoreUnavailable instead of hanging an RPC.
        client = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        return cls(client, **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()

    def keys(self, session_id: str) -> list[str]:
        return SessionKeys(self.namespace, session_id).all()

    # ---- record ---------------------------------------------------------------------------------------------

    async def create(
        self,
        owner: str,
        mode: str,
        language: str,
        options: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> SessionRecord:
        sid = session_id or uuid.uuid4().hex
        now = time.time()
        fields = {
            "owner": owner, "mode": mode, "language": language, "turn": "idle",
            "tokens": 0, "replay_entries": 0, "replay_bytes": 0,
            "created_at": repr(now), "updated_at": repr(now), "ttl_s": self.ttl_s,
            "options": json.dumps(options or {}),
        }  # fmt: skip
        flat = [x for kv in fields.items() for x in kv]
        with self._errors(sid):
            created = await self._create(keys=[SessionKeys(self.namespace, sid).record], args=[self.ttl_s, *flat])
        if not created:
            raise SessionInputError(f"session {sid!r} already exists")
        return await self.get(sid)

    async def get(self, session_id: str) -> SessionRecord:
        with self._errors(session_id):
            h = await self.client.hgetall(SessionKeys(self.namespace, session_id).record)
        if not h:
            raise SessionNotFound(session_id)
        return SessionRecord.from_hash(session_id, h)

    async def get_owned(self, session_id: str, owner: str) -> SessionRecord:
        record = await self.get(session_id)
        check_owner(owner, record.owner)
        return record

    async def touch(self, session_id: str) -> bool:
        with self._errors(session_id):
            return bool(await self._touch(keys=self.keys(session_id), args=[self.ttl_s, repr(time.time())]))

    async def set_turn(self, session_id: str, turn: str) -> str:
        if turn not in TURN_STATES:
            raise SessionInputError(f"unknown turn state {turn!r}; one of {TURN_STATES}")
        allowed = " ".join(prev for prev, nxt in TURN_TRANSITIONS.items() if turn in nxt)
        with self._errors(session_id):
            prev = await self._set_turn(keys=self.keys(session_id), args=[self.ttl_s, repr(time.time()), turn, allowed])
        return prev.decode()

    async def delete(self, session_id: str) -> bool:
        with self._errors(session_id):
            return await self.client.delete(*self.keys(session_id)) > 0

    async def missing(self, session_ids: Iterable[str]) -> set[str]:
        ids = list(session_ids)
        if not ids:
            return set()
        with self._errors(ids[0]):
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.exists(SessionKeys(self.namespace, sid).record)
                found = await pipe.execute()
        return {sid for sid, n in zip(ids, found) if not n}

    # ---- ownership ------------------------------------------------------------------------------------------

    async def acquire(self, session_id: str, role: str, replica_id: str) -> Fence:
        idx = self._role_index(role)
        with self._errors(session_id):
            epoch, took = await self._acquire(
                keys=self.keys(session_id), args=[self.ttl_s, repr(time.time()), idx, replica_id]
            )
        return Fence(session_id, role, replica_id, int(epoch), took_over=bool(took))

    async def check(self, fence: Fence) -> bool:
        with self._errors(fence.session_id):
            ok = await self._check(
                keys=self.keys(fence.session_id),
                args=[self._role_index(fence.role), fence.replica_id, fence.epoch],
            )
        return bool(ok)

    async def require(self, fence: Fence) -> None:
        if not await self.check(fence):
            raise LeaseLost(
                f"replica {fence.replica_id} no longer owns the {fence.role} state of session {fence.session_id} "
                f"(epoch {fence.epoch} superseded)"
            )

    async def release(self, fence: Fence) -> bool:
        with self._errors(fence.session_id):
            return bool(
                await self._release(
                    keys=self.keys(fence.session_id),
                    args=[self._role_index(fence.role), fence.replica_id, fence.epoch],
                )
            )

    async def lease(self, session_id: str, role: str) -> Fence | None:
        self._role_index(role)
        with self._errors(session_id):
            h = await self.client.hgetall(SessionKeys(self.namespace, session_id).lease(role))
        if b"owner" not in h:
            return None
        return Fence(session_id, role, h[b"owner"].decode(), int(h[b"epoch"]))

    # ---- replay log -----------------------------------------------------------------------------------------

    async def append_replay(
        self, session_id: str, entries: ReplayEntry | Sequence[ReplayEntry], fence: Fence | None = None
    ) -> SessionRecord:
        """Append atomically (all or none), counting tokens against the limits; fenced when ``fence`` is given."""
        batch = [entries] if isinstance(entries, ReplayEntry) else list(entries)
        if not batch:
            raise SessionInputError("append_replay needs at least one entry")
        if any(e.n_tokens < 0 for e in batch):
            raise SessionInputError("ReplayEntry.n_tokens must be >= 0")
        blobs = [e.to_bytes() for e in batch]
        args: list[Any] = [
            self.ttl_s, repr(time.time()),
            int(fence is not None),
            self._role_index(fence.role) if fence else 0,
            fence.replica_id if fence else "",
            fence.epoch if fence else 0,
            self.max_tokens, self.max_replay_entries, self.max_replay_bytes,
            len(blobs), sum(e.n_tokens for e in batch), sum(len(b) for b in blobs),
            *blobs,
        ]  # fmt: skip
        with self._errors(session_id, fence):
            flat = await self._append(keys=self.keys(session_id), args=args)
        return SessionRecord.from_hash(session_id, dict(zip(flat[::2], flat[1::2])))

    async def replay(self, session_id: str) -> list[ReplayEntry]:
        keys = SessionKeys(self.namespace, session_id)
        with self._errors(session_id):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.exists(keys.record)
                pipe.lrange(keys.log, 0, -1)
                exists, blobs = await pipe.execute()
        if not exists:
            raise SessionNotFound(session_id)
        return [ReplayEntry.from_bytes(b) for b in blobs]

    # ---- helpers --------------------------------------------------------------------------------------------

    @staticmethod
    def _role_index(role: str) -> int:
        if role not in ROLES:
            raise SessionInputError(f"unknown role {role!r}; one of {ROLES}")
        return 3 + ROLES.index(role)  # KEYS[3] / KEYS[4] in SessionKeys.all()

    @contextmanager
    def _errors(self, session_id: str, fence: Fence | None = None) -> Iterator[None]:
        """Redis errors as the session errors callers map to gRPC codes."""
        try:
            yield
        except redis_errors.ResponseError as e:
            raise self._translate(e, session_id, fence) from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise StoreUnavailable(f"session store (Redis) unreachable: {e}; retry shortly") from e

    def _translate(self, err: redis_errors.ResponseError, session_id: str, fence: Fence | None = None) -> Exception:
        msg = str(err)
        if msg.startswith("GONE"):
            return SessionNotFound(session_id)
        if msg.startswith("LEASE_LOST") and fence is not None:
            return LeaseLost(
                f"replica {fence.replica_id} lost the {fence.role} lease of session {session_id} "
                f"(its epoch {fence.epoch} was superseded); its write was refused"
            )
        if msg.startswith("LIMIT"):
            _, what, have, limit = msg.split()
            return SessionLimitExceeded(
                f"session {session_id} would exceed its {what} limit ({have} used of {limit}); "
                "close it and start a new session"
            )
        if msg.startswith("TURN"):
            return InvalidTurn(f"session {session_id} is in turn state {msg.split()[1]!r}; that step is not allowed now")
        return err
