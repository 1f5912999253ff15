-- The handler of the interface named "http".
local M = {}

function M.handle(request, response)
  if request.path == "/" then
    return "Hello, world!"
  elseif request.path == "/double" then
    local n = tonumber(request.query.n) or 21
    return { n = n, doubled = pmnc.util.double(n) }
  elseif request.path == "/slow" then
    pmnc.sleep(tonumber(request.query.s) or 1)
    return { slept = tonumber(request.query.s) or 1, remain = pmnc.request.remain() }
  elseif request.path == "/visits" then
    -- pmnc.state: the cage's persistent key/value state (SQLite in .data/), kept across restarts
    local n = (pmnc.state.get("visits") or 0) + 1
    pmnc.state.set("visits", n)
    return { visits = n }
  elseif request.path == "/spin" then
    while true do end -- preempted, then stopped at the deadline: 504
  end
  response.status = 404
  return "not found: " .. request.path
end

return M
