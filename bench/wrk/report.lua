-- The common end of every bench script: one machine-readable BENCH line
-- (microseconds) that seckill-bench parses, and a BENCH_CDF line with a
-- grid of percentiles, so that the runs of several wrk processes (one per
-- VIP in `bench/run --cluster`) can be merged into one distribution.
-- Used alone for plain GETs.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50=%d p90=%d p99=%d p999=%d socket_errors=%d status_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.timeout, e.status))
  -- 1..99, then finer towards the tail; 100 is the maximum (wrk's
  -- percentile(100) has no answer).
  local grid = {}
  for p = 1, 99 do grid[#grid + 1] = p end
  for k = 1, 9 do grid[#grid + 1] = 99 + k / 10 end
  for k = 1, 9 do grid[#grid + 1] = 99.9 + k / 100 end
  local cells = {}
  for _, p in ipairs(grid) do
    cells[#cells + 1] = string.format("%g=%d", p, latency:percentile(p))
  end
  cells[#cells + 1] = string.format("100=%d", latency.max)
  io.write("BENCH_CDF " .. table.concat(cells, " ") .. "\n")
end
