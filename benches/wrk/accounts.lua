-- wrk -s benches/wrk/accounts.lua URL: GET /v1/accounts/{id} for ids read from the file named by
-- WRK_IDS_FILE (one per line), in turn, so every request is a different primary-key lookup.
local ids = {}
for line in io.lines(os.getenv("WRK_IDS_FILE")) do
  ids[#ids + 1] = line
end
local next_id = 0
request = function()
  next_id = next_id % #ids + 1
  return wrk.format("GET", "/v1/accounts/" .. ids[next_id])
end
