-- Token buckets on Redis' own clock: check every bucket in KEYS, debit all of them only if all allow.
--
-- KEYS[i]      a hash {tokens, ts} (ts in ms of Redis TIME); an absent key is a full bucket.
-- ARGV[3i-2]   refill rate in tokens per millisecond (> 0)
-- ARGV[3i-1]   burst: the bucket's capacity (>= 1)
-- ARGV[3i]     cost to debit; a negative cost is a refund (the result is capped at burst)
-- ARGV[3n+1]   optional: '1' forces the debit even when a bucket cannot pay (it goes into debt: below zero, so
--              later calls wait until it refills), for usage found after the fact; `allowed` still says if it fit
--
-- Returns, per bucket, {allowed, remaining, retry_after_ms, reset_after_ms}, flattened, as strings (floats survive):
--   allowed         1 if this bucket alone could pay its cost now, else 0
--   remaining       tokens left after this call (undebited when any bucket denied)
--   retry_after_ms  0 when allowed; -1 when cost > burst (never); else the wait until the bucket holds cost
--   reset_after_ms  the wait until the bucket is full again
-- A full bucket is deleted; otherwise the key expires when it would be full (PEXPIRE).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local n = #KEYS
local force = ARGV[3 * n + 1] == '1'
local rates, bursts, costs, levels = {}, {}, {}, {}
local all_allowed = true
for i = 1, n do
  local rate, burst, cost = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
  elseif now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate)
  end
  rates[i], bursts[i], costs[i], levels[i] = rate, burst, cost, tokens
  if tokens < cost and not force then all_allowed = false end
end

local out = {}
for i = 1, n do
  local rate, burst, cost, tokens = rates[i], bursts[i], costs[i], levels[i]
  local allowed = tokens >= cost
  local retry_after = 0
  if not allowed then
    if cost > burst then retry_after = -1 else retry_after = (cost - tokens) / rate end
  end
  if all_allowed then
    tokens = math.min(burst, tokens - cost)
    if tokens >= burst then
      redis.call('DEL', KEYS[i])
    else
      redis.call('HSET', KEYS[i], 'tokens', tokens, 'ts', now)
      redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tokens) / rate))
    end
  end
  out[4 * i - 3] = allowed and '1' or '0'
  out[4 * i - 2] = tostring(tokens)
  out[4 * i - 1] = tostring(retry_after)
  out[4 * i] = tostring((burst - tokens) / rate)
end
return out
