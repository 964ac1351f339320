//! The Lua scripts of the Redis broker. Each runs atomically on the shard of its keys, which is
//! what makes the order of seqs the order of delivery.
//!
//! The publish and history scripts share a prelude that finds (or starts) the channel's epoch.
//! Behind Sentinel it also compares the master's replication id with the one that numbered the
//! channel's last message: after a failover the new master may lack writes that the old one
//! acknowledged (Redis replicates asynchronously), and numbering again from its own last seq
//! would give a second message the seq of a lost one, which subscribers would drop as a repeat.
//! A new epoch instead tells every client that continuity was lost (`recovered: false`).

use redis::Script;

/// KEYS: seq, epoch, hist, line. ARGV[1]: a fresh epoch, ARGV[2]: channel TTL (s), ARGV[3]:
/// `1` to follow the master's lineage (Sentinel), else `0`. Leaves `epoch` set.
const PRELUDE: &str = r"
local epoch = redis.call('GET', KEYS[2])
local line = nil
if ARGV[3] == '1' then
  line = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
  local seen = redis.call('GET', KEYS[4])
  if epoch and seen and seen ~= line then epoch = false end
end
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
end
if line then redis.call('SET', KEYS[4], line, 'EX', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
";

/// ARGV[4]: data, ARGV[5]: history size, ARGV[6]: history TTL (ms), ARGV[7]: topic,
/// ARGV[8]: `PUBLISH` or `SPUBLISH`. With KEYS[5] (an idempotency key) and ARGV[9] (its window,
/// ms): a publish already made with that key answers its `{seq, epoch}` again and publishes
/// nothing; a new one is remembered for the window. Returns {seq, epoch}.
const PUBLISH: &str = r"
if KEYS[5] then
  local first = redis.call('GET', KEYS[5])
  if first then
    local seq, first_epoch = string.match(first, '^(%d+):(.+)$')
    return {tonumber(seq), first_epoch}
  end
end
local seq = redis.call('INCR', KEYS[1])
if seq == 1 then redis.call('DEL', KEYS[3]) end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[5], seq .. '-0', 'd', ARGV[4], 't', ms)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call(ARGV[8], ARGV[7], seq .. ':' .. epoch .. ':' .. ARGV[4])
if KEYS[5] then redis.call('SET', KEYS[5], seq .. ':' .. epoch, 'PX', ARGV[9]) end
return {seq, epoch}
";

/// ARGV[4]: after (or `none`), ARGV[5]: history TTL (ms). Returns {epoch, top, seq, data, seq,
/// data, ...}.
const HISTORY: &str = r"
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {epoch, top}
if ARGV[4] == 'none' or tonumber(ARGV[4]) >= top then return out end
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[5])
for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '(' .. ARGV[4] .. '-0', '+')) do
  local seq = tonumber(string.match(entry[1], '^(%d+)'))
  local fields = entry[2]
  local data, at = nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then data = fields[i + 1] elseif fields[i] == 't' then at = tonumber(fields[i + 1]) end
  end
  if data and at >= oldest then
    table.insert(out, seq)
    table.insert(out, data)
  end
end
return out
";

/// KEYS: session. ARGV: new owner, TTL (ms). Returns {record, previous owner}, or nil.
const CLAIM: &str = r"
local found = redis.call('HMGET', KEYS[1], 'record', 'owner')
if not found[1] then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return found
";

/// KEYS: session. ARGV: record, owner, TTL (ms). Saves unless another owner holds the session.
pub const SAVE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: session. ARGV: TTL (ms). Ends the session: no record to resume, and an owner no
/// connection has, so that every later save of it is refused.
pub const END: &str = r"
redis.call('HDEL', KEYS[1], 'record')
redis.call('HSET', KEYS[1], 'owner', 'ended')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// KEYS: the user's connections. ARGV: now (ms), limit, expiry (ms since the epoch), member,
/// TTL (ms). Returns 1 when the member was added, 0 when the user has the limit.
pub const ACQUIRE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// KEYS: the channel's presence set, its member records. ARGV[1]: now (ms since the epoch),
/// ARGV[2]: the expiry of the members added or reported again (ms since the epoch), ARGV[3]:
/// TTL of the keys (ms), ARGV[4]: `--presence-max-join-leave`, ARGV[5]: the channel's topic,
/// ARGV[6]: `PUBLISH` or `SPUBLISH`; then, from ARGV[7], the changes in their order, three
/// arguments each: `j` to add (or report again) a member or `l` to remove one, the member (a
/// connection's presence id), its record (JSON).
///
/// Removes expired members first, then makes the changes. Each member added that was absent, or
/// removed that was present (expired ones too), is published on the channel's topic as
/// `j:<count>:<record>` or `l:<count>:<record>`, `count` being the members after it, when
/// `presence::announced` allows it: a join while count <= max + 1, a leave while count <= max,
/// none when max is 0.
pub const PRESENCE_CHANGE: &str = r"
local max = tonumber(ARGV[4])
local function announce(kind, record)
  local count = redis.call('ZCARD', KEYS[1])
  local limit = max
  if kind == 'j' then limit = max + 1 end
  if max > 0 and count <= limit then
    redis.call(ARGV[6], ARGV[5], kind .. ':' .. count .. ':' .. record)
  end
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, member in ipairs(gone) do
  local record = redis.call('HGET', KEYS[2], member)
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
  if record then announce('l', record) end
end
for i = 7, #ARGV, 3 do
  local member, record = ARGV[i + 1], ARGV[i + 2]
  if ARGV[i] == 'j' then
    local added = redis.call('ZADD', KEYS[1], ARGV[2], member)
    redis.call('HSET', KEYS[2], member, record)
    if added == 1 then announce('j', record) end
  else
    local stored = redis.call('HGET', KEYS[2], member)
    redis.call('HDEL', KEYS[2], member)
    if redis.call('ZREM', KEYS[1], member) == 1 then announce('l', stored or record) end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
";

/// KEYS: as [`PRESENCE_CHANGE`]. ARGV: now (ms since the epoch), limit. Drops expired members
/// (a dead node's), then returns {count, record, record, ...} with at most `limit` records.
pub const PRESENCE_READ: &str = r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
local out = {redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')}
local sessions = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
if #sessions > 0 then
  for _, record in ipairs(redis.call('HMGET', KEYS[2], unpack(sessions))) do
    if record then table.insert(out, record) end
  end
end
return out
";

pub struct Scripts {
    pub publish: Script,
    pub history: Script,
    pub claim: Script,
    pub presence_change: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            publish: Script::new(&format!("{PRELUDE}{PUBLISH}")),
            history: Script::new(&format!("{PRELUDE}{HISTORY}")),
            claim: Script::new(CLAIM),
            presence_change: Script::new(PRESENCE_CHANGE),
        }
    }
}
