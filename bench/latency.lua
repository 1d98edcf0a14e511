-- wrk script for workload 1: only a done() hook, so wrk still sends its one static request and
-- reads answers without calling Lua per response. wrk's --latency prints the 50/75/90/99th
-- percentiles; this adds the 95th and 99.9th (the tail beyond p99, where stalls of the whole
-- host and per-connection delays show), in microseconds, for bench/parse.py.
done = function(summary, latency, requests)
  io.write(string.format("sluice-bench p95_us %.0f p999_us %.0f\n",
    latency:percentile(95), latency:percentile(99.9)))
end
