//! The Lua scripts. Each touches exactly one key (`KEYS[1]`, a record string in the
//! encoding of [`crate::record`]), so each runs atomically on the primary that owns the
//! record's slot.
//!
//! A fresh claim needs no script: `SET key record NX GET` claims the key or returns the
//! record, and every answer that changes nothing (a replay, a mismatch, a live lease, the
//! caller's own earlier claim) is read from that record in Rust. Only a reclaim writes
//! over an existing record, with [`Scripts::claim`]: a compare-and-set against the record
//! the decision was made on. The finishing scripts compare fixed byte ranges (token, state,
//! lease deadline, nonce) and splice their caller's bytes in: no parsing, no formatting.
//!
//! A script that writes keeps the key's TTL (`KEEPTTL`) unless it is given one.

use std::sync::OnceLock;

use redis::Script;

/// The lease deadline of a released claim (`Timestamp::MIN`, big-endian), as Lua source.
const RELEASED: &str = r"'\128\0\0\0\0\0\0\0'";

/// The compiled scripts (their SHA-1s are computed once).
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) finish: Script,
    pub(crate) extend: Script,
    pub(crate) release: Script,
    pub(crate) abandon: Script,
    pub(crate) purge_one: Script,
}

/// The scripts, built once per process.
pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        claim: Script::new(CLAIM),
        finish: Script::new(&FINISH.replace("RELEASED", RELEASED)),
        extend: Script::new(&EXTEND.replace("RELEASED", RELEASED)),
        release: Script::new(&RELEASE.replace("RELEASED", RELEASED)),
        abandon: Script::new(&ABANDON.replace("RELEASED", RELEASED)),
        purge_one: Script::new(PURGE_ONE),
    })
}

/// Reclaims a key: writes `ARGV[2]` if the record is still exactly `ARGV[1]`, the record
/// the caller decided on. ARGV[3]: TTL in ms (`''` keeps the key's). Replies 1 (written),
/// or the record as it is now (nil if gone), to decide again.
const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] then return v end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"#;

/// `complete` / `fail`, fenced by the token. ARGV: token (8 bytes), header bytes 26..60
/// (state, change, updated, retention deadline, nonce, note and outcome lengths), note,
/// outcome, TTL in ms (`''` keeps the key's). Replies 1 (written now, or by an earlier
/// attempt of this call), 0 (lease lost) or -1 (the record cannot be read).
const FINISH: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 3, 10) ~= ARGV[1] then return 0 end
if string.byte(v, 1) ~= 1 or #v < 60 then return -1 end
if string.byte(v, 27) ~= 112 then
  if string.sub(v, 27, 28) == string.sub(ARGV[2], 1, 2)
     and string.sub(v, 45, 52) == string.sub(ARGV[2], 19, 26) then return 1 end
  return 0
end
if string.sub(v, 11, 18) == RELEASED then return 0 end
if #v ~= 60 + string.byte(v, 2) then return -1 end
local r = string.sub(v, 1, 26) .. ARGV[2] .. string.sub(v, 61) .. ARGV[3] .. ARGV[4]
if ARGV[5] == '' then
  redis.call('SET', KEYS[1], r, 'KEEPTTL')
else
  redis.call('SET', KEYS[1], r, 'PX', ARGV[5])
end
return 1
"#;

/// `extend`, fenced by the token; repeating it is harmless. ARGV: token, lease_until,
/// expires_at, now (8 bytes each), ttl grace in ms (`''` for none). Replies 1, 0 (lease
/// lost) or -1 (the record cannot be read).
const EXTEND: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 3, 10) ~= ARGV[1] or string.byte(v, 27) ~= 112
   or string.sub(v, 11, 18) == RELEASED then return 0 end
if string.byte(v, 1) ~= 1 or #v ~= 60 + string.byte(v, 2) then return -1 end
local ea = string.sub(v, 37, 44)
local old, new = struct.unpack('>i8', ea), struct.unpack('>i8', ARGV[3])
if new > old then ea = ARGV[3]; old = new end
local r = string.sub(v, 1, 10) .. ARGV[2] .. string.sub(v, 19, 28) .. ARGV[4] .. ea
          .. string.sub(v, 45)
if ARGV[5] == '' then
  redis.call('SET', KEYS[1], r, 'KEEPTTL')
else
  local ttl = math.max(1, old - struct.unpack('>i8', ARGV[4]) + tonumber(ARGV[5]))
  redis.call('SET', KEYS[1], r, 'PX', ttl)
end
return 1
"#;

/// `release`, fenced by the token. ARGV: token, now, call nonce (8 bytes each). Replies 1
/// (released now, or by an earlier attempt of this call), 0 (lease lost) or -1 (the record
/// cannot be read). The token is kept, so the next claim gets a larger one.
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 3, 10) ~= ARGV[1] or string.byte(v, 27) ~= 112 then return 0 end
if string.byte(v, 1) ~= 1 or #v ~= 60 + string.byte(v, 2) then return -1 end
if string.sub(v, 11, 18) == RELEASED then
  if string.sub(v, 45, 52) == ARGV[3] and string.byte(v, 28) == 0 then return 1 end
  return 0
end
local r = string.sub(v, 1, 10) .. RELEASED .. string.sub(v, 19, 27) .. '\0' .. ARGV[2]
          .. string.sub(v, 37, 44) .. ARGV[3] .. string.sub(v, 53)
redis.call('SET', KEYS[1], r, 'KEEPTTL')
return 1
"#;

/// Gives back the claim a failed or cancelled `begin` call may have made, identified by
/// that call's nonce (its caller never received the lease, so no one else can hold it).
/// ARGV: the begin call's nonce, now (8 bytes each). Replies 1 (released) or 0 (no such
/// claim). Marks the nonce abandoned, so a late copy of that call does not claim again.
const ABANDON: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.byte(v, 27) ~= 112 or string.sub(v, 11, 18) == RELEASED
   or string.sub(v, 45, 52) ~= ARGV[1] or string.byte(v, 28) == 120 then return 0 end
if string.byte(v, 1) ~= 1 or #v ~= 60 + string.byte(v, 2) then return 0 end
local r = string.sub(v, 1, 10) .. RELEASED .. string.sub(v, 19, 27) .. 'x' .. ARGV[2]
          .. string.sub(v, 37)
redis.call('SET', KEYS[1], r, 'KEEPTTL')
return 1
"#;

/// Deletes the record if its retention has passed, atomically with the check. ARGV: now.
/// Replies 1 (deleted), 0 (kept) or -1 (not a readable record: kept, reported).
const PURGE_ONE: &str = r#"
local h = redis.pcall('GETRANGE', KEYS[1], 0, 59)
if type(h) ~= 'string' or #h ~= 60 or string.byte(h, 1) ~= 1 then return -1 end
if struct.unpack('>i8', h, 37) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;
