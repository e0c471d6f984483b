-- wrk script of benchmarks/bench_http.py: POST /v1/classify with the bodies of $BENCH_BODIES (one JSON body per
-- line) round-robin, each thread starting at its own offset. $BENCH_RATE > 0 paces each thread's requests to
-- that many per second on a fixed schedule (open loop: a request's send time does not move when an answer is
-- late, as long as a connection is free); 0 = closed loop. done() prints one JSON line with the counts and
-- wrk's latency percentiles (µs, send to answer).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local bodies, counter, thread_index = {}, 0, 0
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local interval, next_send = 0, nil
local auth = os.getenv("BENCH_AUTH") or ""

function setup(thread)
  thread:set("thread_index", thread_index)
  thread_index = thread_index + 1
end

function init(args)
  for line in io.lines(os.getenv("BENCH_BODIES")) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  counter = (thread_index or 0) * 7919
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if #auth > 0 then wrk.headers["Authorization"] = auth end
  if rate > 0 then interval = 1000 / rate end
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

function delay()
  if interval == 0 then return 0 end
  local now = now_ms()
  if next_send == nil then next_send = now end
  next_send = next_send + interval
  local wait = next_send - now
  if wait < 0 then return 0 end
  return wait
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "non_2xx": %d, "errors": %d, "p50": %.1f, "p90": %.1f, "p99": %.1f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
