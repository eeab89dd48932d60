-- wrk -t2 -c16 -d10s -s benches/wrk/ingest.lua URL -- 2
-- POSTs to /webhooks/argyle the signed deliveries in the file named by WRK_REQUESTS_FILE, as written
-- by `loadgen --write-requests`: per delivery a line `<signature> <body length>`, the body's exact
-- bytes, a newline. The argument after `--` is wrk's thread count (-t): thread k of n sends
-- deliveries k, k+n, k+2n, ... once each, in order. A thread that runs out starts again from its
-- first delivery (redeliveries, cheaper than new events); `done` then says so, and the run should
-- be made shorter or the file longer.
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("id", #threads)
end

local requests = {}
local next_request = 0
wrapped = false

function init(args)
  local n = tonumber(args[1] or "1")
  local file = assert(io.open(assert(os.getenv("WRK_REQUESTS_FILE"), "WRK_REQUESTS_FILE"), "rb"))
  local data = file:read("*a")
  file:close()
  local at, index = 1, 0
  while at <= #data do
    local line_end = assert(data:find("\n", at, true), "truncated request file")
    local signature, length = data:sub(at, line_end - 1):match("^(%x+) (%d+)$")
    assert(signature, "malformed request file")
    length = tonumber(length)
    index = index + 1
    if (index - 1) % n == id - 1 then
      requests[#requests + 1] = wrk.format("POST", "/webhooks/argyle", {
        ["Content-Type"] = "application/json",
        ["X-Argyle-Signature"] = signature,
      }, data:sub(line_end + 1, line_end + length))
    end
    at = line_end + length + 2
  end
  assert(#requests > 0, "no requests for this thread")
end

function request()
  if next_request == #requests then
    wrapped = true
    next_request = 0
  end
  next_request = next_request + 1
  return requests[next_request]
end

function done()
  for _, thread in ipairs(threads) do
    if thread:get("wrapped") then
      io.write("WRAPPED: a thread sent all its deliveries and started again\n")
      return
    end
  end
end
