-- What the bed (and you, with curl) talks to: enqueue calls, read one call's result.
local M = {}

function M.handle(request)
  local q, p = request.query, request.path
  if p == "/enqueue" then
    -- Calls <prefix><from> .. <prefix><to> of work.job (or work.<fn>) on the queue "jobs";
    -- stops at the first call not accepted and says which, so a client sends again from there
    -- (an id already accepted is not stored twice).
    local from = tonumber(q.from) or 1
    local to = tonumber(q.to) or from
    local ms = tonumber(q.ms) or 0
    local prefix = q.prefix or "c"
    local fn = q.fn or "job"
    for i = from, to do
      local ok, err = pcall(function()
        return pmnc("worker", { queue = "jobs", id = prefix .. i }).work[fn](i, ms)
      end)
      if not ok then
        return ("ERR at %d: %s"):format(i, tostring(err))
      end
    end
    return "ok"
  elseif p == "/result" then
    local ok, r = pcall(pmnc.calls.result, q.id)
    if not ok then return "ERR " .. tostring(r) end
    if r == nil then return "none" end
    return ("%s value=%s attempts=%s error=%s"):format(r.status, tostring(r.value), tostring(r.attempts), tostring(r.error))
  elseif p == "/missing" then
    -- How many of the calls 1..n of work.tally left no state write here.
    local missing = 0
    for i = 1, tonumber(q.n) or 0 do
      if pmnc.state.get("n:" .. i) == nil then missing = missing + 1 end
    end
    return tostring(missing)
  end
  return "paths: /enqueue?from=1&to=100&ms=5, /result?id=c1"
end

return M
