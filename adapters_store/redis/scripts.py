"""The Lua scripts that change an adapter: each runs atomically inside Redis on one adapter's keys (one hash-tag
slot; key names as in ``layout``), so no reader can see a half-made version."""
from __future__ import annotations

from typing import NamedTuple

import redis.asyncio
from redis.commands.core import AsyncScript

# Publish one version. KEYS: cur, next, versions. ARGV: key base, blob, info JSON lacking its opening '{'
# and "version" (allocated here, so the script completes the JSON), grace in ms, channel, id. One script: no
# reader can see cur naming a missing blob. The previous version expires after the grace; expired members
# of the versions set are pruned.
PUBLISH_LUA = """
local base = ARGV[1]
local n = redis.call('INCR', KEYS[2])
local info = '{"version": ' .. n .. ', ' .. ARGV[3]
local prev = redis.call('GET', KEYS[1])
redis.call('SET', base .. ':blob:' .. n, ARGV[2])
redis.call('SET', base .. ':info:' .. n, info)
redis.call('SET', KEYS[1], info)
redis.call('SADD', KEYS[3], n)
if prev then
  local p = cjson.decode(prev).version
  for _, k in ipairs({base .. ':blob:' .. p, base .. ':info:' .. p}) do
    if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', k, ARGV[4]) else redis.call('DEL', k) end
  end
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('EXISTS', base .. ':info:' .. m) == 0 then redis.call('SREM', KEYS[3], m) end
end
redis.call('PUBLISH', ARGV[5], cjson.encode({op = 'put', id = ARGV[6], version = n}))
return info
"""

# Read info and blob of the current version (ARGV[2] == '') or of version ARGV[2], in one atomic step: the
# fallback of a two-GET read that lost its blob between the two (see ``blobs.Blobs.read``).
# KEYS: cur. ARGV: key base, version. Returns nil (no such info) or {info, blob or false}.
READ_LUA = """
local base, v = ARGV[1], ARGV[2]
local info
if v == '' then info = redis.call('GET', KEYS[1]) else info = redis.call('GET', base .. ':info:' .. v) end
if not info then return nil end
if v == '' then v = cjson.decode(info).version end
return {info, redis.call('GET', base .. ':blob:' .. v)}
"""

# Delete every version (the counter stays) and announce it. KEYS: cur, versions. ARGV: key base, channel, id.
DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local base = ARGV[1]
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('DEL', base .. ':blob:' .. m, base .. ':info:' .. m)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'delete', id = ARGV[3]}))
return 1
"""


class Scripts(NamedTuple):
    publish: AsyncScript
    read: AsyncScript
    delete: AsyncScript


def register_scripts(client: redis.asyncio.Redis) -> Scripts:
    """The scripts bound to ``client`` (sent by EVALSHA, loaded on first use)."""
    return Scripts(*map(client.register_script, (PUBLISH_LUA, READ_LUA, DELETE_LUA)))
