-- wrk: each thread cycles through its own slice of pre-signed events (unique webhook ids).
threads = {}  -- global: overload.lua reads it in done()
local counter = 1

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  local path, stride = args[1], tonumber(args[2])
  requests = {}
  local i = 0
  for line in io.lines(path) do
    if i % stride == id - 1 then
      local partner, mid, ts, sig, body = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)\t(.+)")
      requests[#requests + 1] = wrk.format("POST", "/v1/partners/" .. partner .. "/events", {
        ["content-type"] = "application/json", ["webhook-id"] = mid,
        ["webhook-timestamp"] = ts, ["webhook-signature"] = sig }, body)
    end
    i = i + 1
  end
  n = 0
end

function request()
  n = n + 1
  return requests[(n - 1) % #requests + 1]
end
