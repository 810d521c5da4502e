"""Who holds a live session's state, and the logs that rebuild it: leases with fencing epochs and replay logs
in Redis (DESIGN.md "Sessions and state").

A session's LLM KV lives in one LLMCore replica and its streaming Whisper state in one AudioEncoder replica
("roles" "llm" and "audio"). Redis says which replica holds each (a lease with a fencing epoch) and keeps, per
role, the replay log that builds that state again elsewhere. The session record itself (owner key, mode, turn)
belongs to the gateway (`services.gateway.sessions`); this module only needs to know that it exists, and keeps
the log counters in it.

Keys (one place: `SessionKeys`; the `{sid}` hash tag keeps a session in one Redis Cluster slot, so the Lua
scripts may touch all of its keys)::

    <ns>:{<sid>}:rec          hash   the record (gateway fields + tokens, entries:<role>, bytes:<role>)
    <ns>:{<sid>}:log:<role>   list   replay entries (serialized minicpmo.v1.ReplayEntry), oldest first
    <ns>:{<sid>}:lease:<role> hash   owner (replica id) + epoch
    <ns>:{<sid>}:live         hash   the gateway's live-input state (services.gateway.sessions)

Every key carries the session's idle TTL and every call that uses the session refreshes all of them in one
script, so an idle session disappears from Redis as a whole.

Ownership protocol: on every request a replica calls `fence = await store.acquire(sid, role, my_id)`. If it
owns the lease it gets its epoch back; otherwise it takes the lease over with epoch + 1. If `fence.epoch`
differs from the epoch it built its local state under, that state is stale or absent: it rebuilds from
`await store.log(sid, role)`. Writes (`append`, `rewrite`) carry the fence and are refused with `LeaseLost`
once another replica took over, so a stale owner never extends a log with state the new owner lacks. (A
replica that holds a session's state may skip the acquire when its next call is such a write: the write is
the check, `services.runtime.session_stage`.)

Limits: `max_tokens` (the session's LLM KV budget) and per-role `max_entries` / `max_bytes` bound what a log
may hold; an append past them is refused with `SessionLimitExceeded` (RESOURCE_EXHAUSTED), all or nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from protos.minicpmo.v1 import replay_pb2
from services.runtime.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

ROLES = ("llm", "audio")


class SessionNotFound(NotFound):
    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    @property
    def message(self) -> str:
        return f"session {self.session_id!r} not found (never created, closed, or expired after idling)"

    def __str__(self) -> str:
        return self.message


class SessionLimitExceeded(ResourceExhausted):
    """The session would pass its token / replay-log limit."""


class LeaseLost(Unavailable):
    """Another replica took the session over; this replica's state for it is stale (the caller retries)."""


class StoreUnavailable(Unavailable):
    """Redis cannot be reached (down, restarting, network): retryable."""


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
    def live(self) -> str:
        return self._k("live")

    def log(self, role: str) -> str:
        return self._k(f"log:{role}")

    def lease(self, role: str) -> str:
        return self._k(f"lease:{role}")

    def all(self) -> list[str]:
        """Order matters: the Lua scripts address them as KEYS[1..]: rec, live, then log and lease per role."""
        return [self.record, self.live, *(k for r in ROLES for k in (self.log(r), self.lease(r)))]


def _log_index(role: str) -> int:
    """1-based KEYS index of the role's log (its lease follows it)."""
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; one of {ROLES}")
    return 3 + 2 * ROLES.index(role)


@dataclass(frozen=True)
class Fence:
    """Proof of ownership: valid while the lease's (owner, epoch) still equal these."""

    session_id: str
    role: str
    replica_id: str
    epoch: int
    took_over: bool = False  # this acquire moved the lease (the replica must (re)build its state)


@dataclass(frozen=True)
class LogCounters:
    """What a session's logs hold after a write (kept in its record)."""

    tokens: int  # LLM KV positions of the llm log
    entries: int  # entries of the written role's log
    bytes: int  # bytes of the written role's log


# Lua prologue of every script over a session's keys (here and the gateway's): refresh the TTL of every existing
# key of the session (they expire together).
LUA_REFRESH = """
local function refresh(ttl)
  for i = 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
"""
_LUA_REFRESH = LUA_REFRESH + """
local function gone() return redis.call('EXISTS', KEYS[1]) == 0 end
local function owns(lease, replica, epoch)
  return redis.call('HGET', lease, 'owner') == replica and redis.call('HGET', lease, 'epoch') == epoch
end
"""

# ARGV: ttl, now -> 1, or 0 when the session is gone.
_LUA_TOUCH = _LUA_REFRESH + """
if gone() then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return 1
"""

# ARGV: ttl, now, log index, replica id -> {epoch, took_over} or error 'GONE'.
_LUA_ACQUIRE = _LUA_REFRESH + """
if gone() then return redis.error_reply('GONE') end
local lease = KEYS[tonumber(ARGV[3]) + 1]
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

# ARGV: log index, replica id, epoch -> 1 valid / 0 lost, or error 'GONE'.
_LUA_CHECK = _LUA_REFRESH + """
if gone() then return redis.error_reply('GONE') end
if owns(KEYS[tonumber(ARGV[1]) + 1], ARGV[2], ARGV[3]) then return 1 end
return 0
"""

# ARGV: log index, replica id, epoch -> 1 released / 0 not the owner (keeps 'epoch' so epochs never repeat).
_LUA_RELEASE = _LUA_REFRESH + """
local lease = KEYS[tonumber(ARGV[1]) + 1]
if owns(lease, ARGV[2], ARGV[3]) then
  redis.call('HDEL', lease, 'owner')
  return 1
end
return 0
"""

# ARGV: ttl, now, log index, role, fenced (0/1), replica id, epoch, max_tokens, max_entries, max_bytes,
#       add_tokens, add_bytes, entry_1 .. entry_n -> {tokens, entries, bytes} or an error naming the limit.
_LUA_APPEND = _LUA_REFRESH + """
if gone() then return redis.error_reply('GONE') end
local log = KEYS[tonumber(ARGV[3])]
if ARGV[5] == '1' and not owns(KEYS[tonumber(ARGV[3]) + 1], ARGV[6], ARGV[7]) then
  return redis.error_reply('LEASE_LOST')
end
local h = redis.call('HMGET', KEYS[1], 'tokens', 'entries:' .. ARGV[4], 'bytes:' .. ARGV[4])
local tokens = tonumber(h[1] or '0') + tonumber(ARGV[11])
local entries = tonumber(h[2] or '0') + (#ARGV - 12)
local bytes = tonumber(h[3] or '0') + tonumber(ARGV[12])
if tokens > tonumber(ARGV[8]) then return redis.error_reply('LIMIT tokens ' .. (h[1] or '0') .. ' ' .. ARGV[8]) end
if entries > tonumber(ARGV[9]) then return redis.error_reply('LIMIT entries ' .. (h[2] or '0') .. ' ' .. ARGV[9]) end
if bytes > tonumber(ARGV[10]) then return redis.error_reply('LIMIT bytes ' .. (h[3] or '0') .. ' ' .. ARGV[10]) end
for i = 13, #ARGV do redis.call('RPUSH', log, ARGV[i]) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'entries:' .. ARGV[4], entries, 'bytes:' .. ARGV[4], bytes,
           'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return {tokens, entries, bytes}
"""

# Replace a role's whole log (context-window trim), fenced. ARGV: ttl, now, log index, role, replica id, epoch,
# tokens (of the new llm log, or -1 to keep the count), bytes, entry_1 .. entry_n -> {tokens, entries, bytes}.
_LUA_REWRITE = _LUA_REFRESH + """
if gone() then return redis.error_reply('GONE') end
local log = KEYS[tonumber(ARGV[3])]
if not owns(KEYS[tonumber(ARGV[3]) + 1], ARGV[5], ARGV[6]) then return redis.error_reply('LEASE_LOST') end
redis.call('DEL', log)
for i = 9, #ARGV do redis.call('RPUSH', log, ARGV[i]) end
local entries = #ARGV - 8
if ARGV[7] ~= '-1' then redis.call('HSET', KEYS[1], 'tokens', ARGV[7]) end
redis.call('HSET', KEYS[1], 'entries:' .. ARGV[4], entries, 'bytes:' .. ARGV[4], ARGV[8], 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return {tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0'), entries, tonumber(ARGV[8])}
"""


def redis_client(url: str, socket_timeout_s: float = 5.0) -> aioredis.Redis:
    """An asyncio Redis client that survives a Redis restart: a pooled connection the old server closed is
    retried on a fresh connection instead of failing the call (redis-py's clients do not retry by default).
    Socket waits stay bounded, so with Redis down calls fail fast (StoreUnavailable) instead of hanging."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        retry_on_error=[redis_errors.ConnectionError],
    )


@contextmanager
def store_errors(session_id: str, fence: Fence | None = None) -> Iterator[None]:
    """Redis errors as the session errors callers map to gRPC codes (shared with the gateway's record store)."""
    try:
        yield
    except redis_errors.ResponseError as e:
        raise _translate(e, session_id, fence) from None
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
        raise StoreUnavailable(f"session store (Redis) unreachable: {e}; retry shortly") from e


def _translate(err: redis_errors.ResponseError, session_id: str, fence: Fence | None) -> Exception:
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
    return err


async def missing_sessions(client: aioredis.Redis, namespace: str, session_ids: Iterable[str]) -> set[str]:
    """The ids among `session_ids` whose session is gone (closed or expired): one pipelined EXISTS each."""
    ids = list(session_ids)
    if not ids:
        return set()
    with store_errors(ids[0]):
        async with client.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.exists(SessionKeys(namespace, sid).record)
            found = await pipe.execute()
    return {sid for sid, n in zip(ids, found) if not n}


class OwnershipStore:
    """Leases and replay logs of live sessions (see the module doc)."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str = "minicpmo",
        ttl_s: int = 600,
        max_tokens: int = 8192,
        max_entries: int = 4096,
        max_bytes: int = 128 << 20,
    ) -> None:
        if ttl_s < 1:
            raise InvalidArgument(f"ttl_s must be >= 1 second, got {ttl_s}")
        self.client = client
        self.namespace = namespace
        self.ttl_s = int(ttl_s)
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._touch = client.register_script(_LUA_TOUCH)
        self._acquire = client.register_script(_LUA_ACQUIRE)
        self._check = client.register_script(_LUA_CHECK)
        self._release = client.register_script(_LUA_RELEASE)
        self._append = client.register_script(_LUA_APPEND)
        self._rewrite = client.register_script(_LUA_REWRITE)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> OwnershipStore:
        return cls(redis_client(url), **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()

    def keys(self, session_id: str) -> list[str]:
        return SessionKeys(self.namespace, session_id).all()

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (redis_errors.RedisError, OSError):
            return False

    async def touch(self, session_id: str) -> bool:
        with store_errors(session_id):
            return bool(await self._touch(keys=self.keys(session_id), args=[self.ttl_s, repr(time.time())]))

    async def superseded(self, held: Mapping[str, int], role: str, replica_id: str) -> set[str]:
        """The sessions among `held` (session id -> epoch this replica's state was built under) whose state it can
        no longer vouch for: closed or expired, or their `role` lease now another replica's (a scale-up moved them)
        or at another epoch. One pipelined round trip; reads only, so the TTLs are not refreshed."""
        ids = list(held)
        if not ids:
            return set()
        with store_errors(ids[0]):
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in ids:
                    keys = SessionKeys(self.namespace, sid)
                    pipe.exists(keys.record)
                    pipe.hmget(keys.lease(role), "owner", "epoch")
                found = await pipe.execute()
        mine = replica_id.encode()
        return {
            sid
            for sid, exists, (owner, epoch) in zip(ids, found[::2], found[1::2])
            if not exists or owner != mine or epoch is None or int(epoch) != held[sid]
        }

    # ---- leases ---------------------------------------------------------------------------------------------

    async def acquire(self, session_id: str, role: str, replica_id: str) -> Fence:
        idx = _log_index(role)
        with store_errors(session_id):
            epoch, took = await self._acquire(
                keys=self.keys(session_id), args=[self.ttl_s, repr(time.time()), idx, replica_id]
            )
        return Fence(session_id, role, replica_id, int(epoch), took_over=bool(took))

    async def check(self, fence: Fence) -> bool:
        with store_errors(fence.session_id):
            ok = await self._check(
                keys=self.keys(fence.session_id), args=[_log_index(fence.role), fence.replica_id, fence.epoch]
            )
        return bool(ok)

    async def require(self, fence: Fence) -> None:
        if not await self.check(fence):
            raise LeaseLost(
                f"replica {fence.replica_id} no longer owns the {fence.role} state of session {fence.session_id} "
                f"(epoch {fence.epoch} superseded)"
            )

    async def release(self, fence: Fence) -> bool:
        with store_errors(fence.session_id):
            return bool(
                await self._release(
                    keys=self.keys(fence.session_id), args=[_log_index(fence.role), fence.replica_id, fence.epoch]
                )
            )

    async def lease(self, session_id: str, role: str) -> Fence | None:
        _log_index(role)
        with store_errors(session_id):
            h = await self.client.hgetall(SessionKeys(self.namespace, session_id).lease(role))
        if b"owner" not in h:
            return None
        return Fence(session_id, role, h[b"owner"].decode(), int(h[b"epoch"]))

    # ---- replay logs ----------------------------------------------------------------------------------------

    async def append(
        self, session_id: str, role: str, entries: Sequence[replay_pb2.ReplayEntry], fence: Fence | None = None
    ) -> LogCounters:
        """Append to a role's log atomically (all or none), counting against the limits; fenced when `fence`."""
        if not entries:
            raise InvalidArgument("append needs at least one entry")
        blobs = [e.SerializeToString() for e in entries]
        args = [
            self.ttl_s, repr(time.time()), _log_index(role), role,
            int(fence is not None), fence.replica_id if fence else "", fence.epoch if fence else 0,
            self.max_tokens, self.max_entries, self.max_bytes,
            sum(e.llm_tokens for e in entries), sum(len(b) for b in blobs), *blobs,
        ]  # fmt: skip
        with store_errors(session_id, fence):
            tokens, n, size = await self._append(keys=self.keys(session_id), args=args)
        return LogCounters(int(tokens), int(n), int(size))

    async def rewrite(
        self, session_id: str, fence: Fence, entries: Sequence[replay_pb2.ReplayEntry]
    ) -> LogCounters:
        """Replace the fence's role log by `entries` (a context-window trim); the llm log's token count follows."""
        blobs = [e.SerializeToString() for e in entries]
        tokens = sum(e.llm_tokens for e in entries) if fence.role == "llm" else -1
        args = [
            self.ttl_s, repr(time.time()), _log_index(fence.role), fence.role, fence.replica_id, fence.epoch,
            tokens, sum(len(b) for b in blobs), *blobs,
        ]  # fmt: skip
        with store_errors(session_id, fence):
            tokens, n, size = await self._rewrite(keys=self.keys(session_id), args=args)
        return LogCounters(int(tokens), int(n), int(size))

    async def log(self, session_id: str, role: str) -> list[replay_pb2.ReplayEntry]:
        """A role's replay log, oldest first (SessionNotFound when the session is gone)."""
        keys = SessionKeys(self.namespace, session_id)
        _log_index(role)
        with store_errors(session_id):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.exists(keys.record)
                pipe.lrange(keys.log(role), 0, -1)
                exists, blobs = await pipe.execute()
        if not exists:
            raise SessionNotFound(session_id)
        return [replay_pb2.ReplayEntry.FromString(b) for b in blobs]
