"""Live sessions' records in Redis, as the gateway keeps them: owner key, mode, options, turn state (with the
lease of the answer that holds the turn), and the live input not yet cut into a unit.

The stages' half of a session (leases on their state, replay logs) is `services.runtime.ownership`; both use
the same keys (`SessionKeys`) and the same idle TTL, refreshed together.

Turn state: ``idle`` (created, only the system prompt) -> ``user_turn`` (inputs being appended) ->
``answering`` -> ``answered`` | ``interrupted`` -> ``user_turn`` ... The prompt builder needs the previous
state (after "answered" a new user turn starts with ``<|im_end|>\\n<|im_start|>user\\n``, after "interrupted"
with ``<|tts_eos|>`` first), so every transition returns it.

The answering turn is leased: `begin_answer` records the answer's id and a deadline that the running answer
extends (`heartbeat`) while it streams. A gateway replica that dies mid-answer stops extending it, so after at
most one lease period the next Respond or input takes the turn over (as if the dead answer was interrupted);
`interrupt` clears the turn at once whoever holds it. An answer that ends after it lost the turn changes
nothing (`end_answer` checks the id).

Per-key quota: each API key's live sessions are listed under the key (a sorted set with its own hash tag, so it
may live in another Redis Cluster slot than the sessions), and `claim` refuses a session past
`limits.max_live_sessions_per_key`. A session is added once its record exists and removed when it is deleted;
one that expired is pruned at its key's next claim (its record is gone), so the list never counts the dead.

Live input (`LiveInput`): the audio of the second not yet complete, the latest frame waiting for its unit, and
the unit count, kept with the session so another gateway replica continues a session whose replica died. It is
versioned: a replica writes it only over the version it last read or wrote (`StaleLiveInput` otherwise), so a
replica whose in-memory copy is old (the session was served by another replica meanwhile) cannot write it back.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from services.gateway.auth import check_owner
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.runtime.ownership import (LUA_REFRESH, SessionKeys, SessionNotFound, missing_sessions, redis_client,
                                       store_errors)

TURN_STATES = ("idle", "user_turn", "answering", "interrupted", "answered")


class InvalidTurn(FailedPrecondition):
    """A turn transition that the conversation state does not allow (e.g. Respond while an answer runs).

    `lease_deadline`: when the running answer refused the transition, the end of its lease as last renewed (a
    later refusal with a later deadline shows that answer alive: it renewed meanwhile)."""

    def __init__(self, message: str, lease_deadline: float | None = None):
        super().__init__(message)
        self.lease_deadline = lease_deadline


class SessionQuotaExceeded(ResourceExhausted):
    """The API key holds as many live sessions as its quota allows."""


class StaleLiveInput(Unavailable):
    """The live input changed in Redis since this replica read it: another gateway replica served the session."""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    owner: str  # hash of the API key that created the session (auth.key_hash)
    mode: str
    language: str
    turn: str
    tokens: int  # LLM KV tokens the session's replay log holds
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
            tokens=int(s.get("tokens", 0)),
            created_at=float(s["created_at"]),
            updated_at=float(s["updated_at"]),
            ttl_s=int(s["ttl_s"]),
            options=json.loads(s["options"]),
        )


@dataclass
class LiveInput:
    """The gateway's unfinished live input of a session (see the module doc)."""

    pending_pcm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # 16 kHz float32
    pending_frame: bytes | None = None
    units: int = 0
    version: int = 0  # how many times it was saved


# KEYS[1] = rec; ARGV: ttl, field1, value1, ... -> 1 created / 0 already exists (never overwritten).
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS[1] = an owner's live sessions (zset: session id -> claim time); ARGV: quota, session id, now
# -> 1 claimed / 0 the owner holds `quota` sessions already (atomic: concurrent claims never pass the quota).
_LUA_CLAIM = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""

# A turn change. ARGV: ttl, now, new turn, allowed previous turns (space separated), answer id ('' = none),
# lease seconds, mode -> previous turn, or error 'GONE' / 'TURN <prev> <answer lease deadline>'.
#   mode 'set':   allowed transition, or the answering turn's lease has expired (its answer is dead: the
#                 previous turn comes back as 'answering', and the caller stops that answer)
#   mode 'begin': as 'set', and the new answering turn is leased to the answer id
#   mode 'end':   only the answer that holds the turn may end it (others: returns 'STALE')
#   mode 'force': always (Interrupt)
_LUA_TURN = LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
local now = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'turn', 'answer_id', 'answer_deadline')
local prev, holder, deadline = h[1], h[2] or '', tonumber(h[3] or '0')
local mode = ARGV[7]
if mode == 'end' then
  if prev ~= 'answering' or holder ~= ARGV[5] then return 'STALE' end
elseif mode ~= 'force' then
  local allowed = string.find(' ' .. ARGV[4] .. ' ', ' ' .. prev .. ' ', 1, true)
  local dead_answer = prev == 'answering' and deadline < now
  if not allowed and not dead_answer then return redis.error_reply('TURN ' .. prev .. ' ' .. (h[3] or '0')) end
end
redis.call('HSET', KEYS[1], 'turn', ARGV[3], 'updated_at', ARGV[2])
if mode == 'begin' then
  redis.call('HSET', KEYS[1], 'answer_id', ARGV[5], 'answer_deadline', now + tonumber(ARGV[6]))
elseif ARGV[3] ~= 'answering' then
  redis.call('HDEL', KEYS[1], 'answer_id', 'answer_deadline')
end
refresh(tonumber(ARGV[1]))
return prev
"""

# Live input of one AppendUnit call, with the user turn started when it begins one. ARGV: ttl, now, start turn
# (0/1), lease unused, pcm, frame, units, the version it replaces -> previous turn ('' when not starting), or error
# 'GONE' / 'STALE' (the stored version is another) / 'TURN <prev> <answer lease deadline>'.
_LUA_INPUT = LUA_REFRESH + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE') end
local version = tonumber(ARGV[8])
if tonumber(redis.call('HGET', KEYS[2], 'version') or '0') ~= version then return redis.error_reply('STALE') end
local prev = ''
if ARGV[3] == '1' then
  local h = redis.call('HMGET', KEYS[1], 'turn', 'answer_deadline')
  prev = h[1]
  if prev == 'answering' then
    if tonumber(h[2] or '0') >= tonumber(ARGV[2]) then return redis.error_reply('TURN ' .. prev .. ' ' .. h[2]) end
    redis.call('HDEL', KEYS[1], 'answer_id', 'answer_deadline')
  end
  redis.call('HSET', KEYS[1], 'turn', 'user_turn')
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('HSET', KEYS[2], 'pcm', ARGV[5], 'frame', ARGV[6], 'units', ARGV[7], 'version', version + 1)
refresh(tonumber(ARGV[1]))
return prev
"""

# ARGV: ttl, now, answer id, lease seconds -> 1 extended / 0 the answer no longer holds the turn.
_LUA_HEARTBEAT = LUA_REFRESH + """
local h = redis.call('HMGET', KEYS[1], 'turn', 'answer_id')
if h[1] ~= 'answering' or h[2] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'answer_deadline', tonumber(ARGV[2]) + tonumber(ARGV[4]), 'updated_at', ARGV[2])
refresh(tonumber(ARGV[1]))
return 1
"""

# Which transitions are normal (the answering lease overrides these when its answer is dead).
_ALLOWED_BEFORE = {"answering": "idle user_turn answered interrupted"}


class SessionRecords:
    """The gateway's session records (see the module doc)."""

    DEFAULT_ANSWER_LEASE_S = 3.0  # a few of the running answer's heartbeats (live.HEARTBEAT_S)

    def __init__(self, client: aioredis.Redis, namespace: str = "minicpmo", ttl_s: int = 600,
                 answer_lease_s: float = DEFAULT_ANSWER_LEASE_S) -> None:  # fmt: skip
        if ttl_s < 1:
            raise InvalidArgument(f"ttl_s must be >= 1 second, got {ttl_s}")
        self.client = client
        self.namespace = namespace
        self.ttl_s = int(ttl_s)
        self.answer_lease_s = answer_lease_s
        self._create = client.register_script(_LUA_CREATE)
        self._claim = client.register_script(_LUA_CLAIM)
        self._turn = client.register_script(_LUA_TURN)
        self._heartbeat = client.register_script(_LUA_HEARTBEAT)
        self._input = client.register_script(_LUA_INPUT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SessionRecords:
        return cls(redis_client(url), **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()

    def keys(self, session_id: str) -> list[str]:
        return SessionKeys(self.namespace, session_id).all()

    # ---- record ---------------------------------------------------------------------------------------------

    async def create(self, owner: str, mode: str, language: str, options: dict[str, Any] | None = None,
                     session_id: str | None = None) -> SessionRecord:  # fmt: skip
        sid = session_id or uuid.uuid4().hex
        now = repr(time.time())
        fields = {
            "owner": owner, "mode": mode, "language": language, "turn": "idle", "tokens": 0,
            "created_at": now, "updated_at": now, "ttl_s": self.ttl_s, "options": json.dumps(options or {}),
        }  # fmt: skip
        flat = [x for kv in fields.items() for x in kv]
        with store_errors(sid):
            created = await self._create(keys=[SessionKeys(self.namespace, sid).record], args=[self.ttl_s, *flat])
        if not created:
            raise InvalidArgument(f"session {sid!r} already exists")
        return await self.get(sid)

    def owned_sessions_key(self, owner: str) -> str:
        return f"{self.namespace}:owner:{{{owner}}}:sessions"

    async def claim(self, owner: str, session_id: str, quota: int) -> None:
        """Count the created session `session_id` against its owner's quota of live sessions (`SessionQuotaExceeded`
        when the owner holds `quota` already); sessions that expired are pruned first."""
        key = self.owned_sessions_key(owner)
        with store_errors(session_id):
            held = [m.decode() for m in await self.client.zrange(key, 0, -1)]
            gone = await self.missing(held)
            if gone:
                await self.client.zrem(key, *gone)
            claimed = await self._claim(keys=[key], args=[quota, session_id, repr(time.time())])
        if not claimed:
            raise SessionQuotaExceeded(
                f"this API key holds {quota} live sessions, its quota (limits.max_live_sessions_per_key): close one "
                f"(CloseSession) or let an idle one expire before creating another"
            )

    async def get(self, session_id: str) -> SessionRecord:
        with store_errors(session_id):
            h = await self.client.hgetall(SessionKeys(self.namespace, session_id).record)
        if not h:
            raise SessionNotFound(session_id)
        return SessionRecord.from_hash(session_id, h)

    async def get_owned(self, session_id: str, owner: str) -> SessionRecord:
        record = await self.get(session_id)
        check_owner(owner, record.owner)
        return record

    async def missing(self, session_ids) -> set[str]:
        return await missing_sessions(self.client, self.namespace, session_ids)

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:  # any failure to answer means not serving
            return False

    async def delete(self, session_id: str, owner: str) -> bool:
        """Delete the session's keys and take it off its owner's quota."""
        with store_errors(session_id):
            async with self.client.pipeline(transaction=False) as pipe:  # one round trip (two slots in a cluster)
                pipe.delete(*self.keys(session_id))
                pipe.zrem(self.owned_sessions_key(owner), session_id)
                deleted, _ = await pipe.execute()
        return deleted > 0

    # ---- turns ----------------------------------------------------------------------------------------------

    async def _transition(self, session_id: str, turn: str, mode: str, answer_id: str = "") -> str:
        if turn not in TURN_STATES:
            raise InvalidArgument(f"unknown turn state {turn!r}; one of {TURN_STATES}")
        args = [self.ttl_s, repr(time.time()), turn, _ALLOWED_BEFORE.get(turn, ""), answer_id, self.answer_lease_s, mode]
        with store_errors(session_id):
            prev = await self._turn(keys=self.keys(session_id), args=args)
        return prev.decode()

    async def begin_answer(self, session_id: str, answer_id: str) -> str:
        """Respond: lease the answering turn to `answer_id`; returns the previous turn ("answering" when it took
        the turn over from a dead answer)."""
        try:
            return await self._transition(session_id, "answering", "begin", answer_id)
        except Exception as e:
            raise _turn_error(e, session_id) from None

    async def heartbeat(self, session_id: str, answer_id: str) -> bool:
        """Extend the running answer's lease; False when it no longer holds the turn (interrupted, taken over)."""
        with store_errors(session_id):
            args = [self.ttl_s, repr(time.time()), answer_id, self.answer_lease_s]
            return bool(await self._heartbeat(keys=self.keys(session_id), args=args))

    async def end_answer(self, session_id: str, answer_id: str, turn: str) -> bool:
        """The answer ended as `turn` ("answered" / "interrupted"); False if it had lost the turn already."""
        return await self._transition(session_id, turn, "end", answer_id) != "STALE"

    async def interrupt(self, session_id: str) -> bool:
        """Clear the turn whoever holds it; True if an answer held it."""
        return await self._transition(session_id, "interrupted", "force") == "answering"

    # ---- live input -----------------------------------------------------------------------------------------

    async def load(self, session_id: str) -> tuple[SessionRecord, LiveInput]:
        """The record and the live input (a gateway replica picking up a session), in one round trip."""
        keys = SessionKeys(self.namespace, session_id)
        with store_errors(session_id):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.record)
                pipe.hgetall(keys.live)
                rec, live = await pipe.execute()
        if not rec:
            raise SessionNotFound(session_id)
        return SessionRecord.from_hash(session_id, rec), LiveInput(
            pending_pcm=np.frombuffer(live.get(b"pcm", b""), dtype="<f4").copy(),
            pending_frame=live.get(b"frame") or None,
            units=int(live.get(b"units", 0)),
            version=int(live.get(b"version", 0)),
        )

    async def save_input(self, session_id: str, live: LiveInput, start_turn: bool) -> str | None:
        """Store the unfinished live input as version `live.version + 1` (`StaleLiveInput` unless the stored one is
        `live.version`) and refresh the session's TTL, starting the user turn first when `start_turn` (returns the
        previous turn then, as `start_user_turn`); one round trip."""
        args = [
            self.ttl_s, repr(time.time()), int(start_turn), "",
            live.pending_pcm.astype("<f4").tobytes(), live.pending_frame or b"", live.units, live.version,
        ]  # fmt: skip
        try:
            with store_errors(session_id):
                prev = await self._input(keys=self.keys(session_id), args=args)
        except Exception as e:
            raise _turn_error(e, session_id) from None
        return prev.decode() or None if start_turn else None


def _turn_error(err: Exception, session_id: str) -> Exception:
    msg = str(err)
    if msg == "STALE":
        return StaleLiveInput(f"session {session_id} was served by another gateway replica meanwhile; retry")
    if msg.startswith("TURN"):
        deadline = msg.split()[2:3]
        return InvalidTurn(
            f"session {session_id} is answering: Interrupt the running answer first (or wait for it to end)",
            lease_deadline=float(deadline[0]) if deadline else None,
        )
    return err
