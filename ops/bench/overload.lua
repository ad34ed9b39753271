-- wrk: the pre-signed events of events.lua, tallying statuses and whether every 429/503
-- carried retry-after. Printed by done() as "statuses: 201=… 429=… 503=… no-retry-after=…".
dofile("ops/bench/events.lua")

statuses = {}
missing = 0

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if (status == 429 or status == 503) and headers["retry-after"] == nil and headers["Retry-After"] == nil then
    missing = missing + 1
  end
end

function done(summary, latency, requests)
  local total, none = {}, 0
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do total[code] = (total[code] or 0) + n end
    none = none + t:get("missing")
  end
  local codes = {}
  for code in pairs(total) do codes[#codes + 1] = code end
  table.sort(codes)
  local out = "statuses:"
  for _, code in ipairs(codes) do out = out .. " " .. code .. "=" .. total[code] end
  io.write(out .. " no-retry-after=" .. none .. "\n")
end
