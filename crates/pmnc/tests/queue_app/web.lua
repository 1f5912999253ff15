local M = {}
local function try(f)
  local ok, r = pcall(f)
  if ok then return tostring(r) end
  return "ERR " .. tostring(r)
end
local function opts(q)
  return { queue = q.queue or "retry", id = q.id, delay = tonumber(q.delay), expires_in = tonumber(q.expires_in) }
end
local function status(r)
  if r == nil then return "none" end
  return ("%s %s %s %s %s"):format(r.status, tostring(r.value), tostring(r.attempts), tostring(r.cage), tostring(r.error))
end
function M.handle(request)
  local q, p = request.query, request.path
  if p == "/plain" then
    return try(function() return pmnc(q.cage or "worker", opts(q)).work[q.fn or "count"](q.arg or tonumber(q.n) or 21) end)
  elseif p == "/xa" then
    local xa = pmnc.transaction.create()
    xa.state.set("sent:" .. tostring(q.id), true)
    xa.pmnc(q.cage or "worker", opts(q)).work[q.fn or "count"](tonumber(q.n) or 21)
    local ok, _, id = pcall(xa.execute)
    if ok then return "ok " .. tostring(id) end
    return "ERR " .. tostring(_)
  elseif p == "/pair" then
    -- A durable call on this cage's own queue and one through the outbox, in one request.
    local a = pmnc("web", { queue = "own", id = "own-" .. q.i }).mine.note(q.i)
    local xa = pmnc.transaction.create()
    xa.pmnc("worker", { queue = "retry", id = "out-" .. q.i }).work.count(tonumber(q.i))
    local b = xa.execute()
    return a .. " " .. b
  elseif p == "/result" then
    local ok, r = pcall(pmnc.calls.result, q.id, q.cage)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/wait" then
    local ok, r = pcall(pmnc.calls.wait, q.id, tonumber(q.timeout))
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/submit_wait" then
    local id = pmnc("worker", opts(q)).work[q.fn or "nap"](tonumber(q.n) or 21)
    local ok, r = pcall(pmnc.calls.wait, id, tonumber(q.timeout) or 10)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/submit_event" then
    local id = pmnc("worker", opts(q)).work[q.fn or "nap"](tonumber(q.n) or 21)
    local ok, r = pcall(pmnc.events.wait, "call:" .. id, 10)
    if not ok then return "ERR " .. tostring(r) end
    return status(r)
  elseif p == "/hostile" then
    return pmnc.hostile[q.set]()
  elseif p == "/big" then
    -- A durable call (or with xa=1 an xa.pmnc) whose argument is q.kb KiB.
    local big = ("x"):rep(tonumber(q.kb) * 1024)
    if q.xa then
      local xa = pmnc.transaction.create()
      xa.state.set("sent:" .. tostring(q.id), true)
      xa.pmnc(q.cage or "worker", opts(q)).work.count(big)
      return try(function() return select(2, xa.execute()) end)
    end
    return try(function() return pmnc(q.cage or "worker", opts(q)).work.count(big) end)
  elseif p == "/publish" then
    -- Publishes on a topic of another cage (q.cage) until one of its requests was woken.
    local ok, r = pcall(pmnc.events.publish, q.topic, q.value, q.cage)
    if not ok then return "ERR " .. tostring(r) end
    return tostring(r)
  elseif p == "/state" then
    return tostring(pmnc.state.get(q.key))
  end
end
return M
