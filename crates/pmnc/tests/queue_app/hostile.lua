-- Attacks on the durable call surface, one per line of the answer: "<case> => OK <result>" or
-- "<case> => ERR <message>".
local M = {}

local function run(cases)
  local out = {}
  for _, c in ipairs(cases) do
    local ok, r = pcall(c[2])
    out[#out + 1] = c[1] .. " => " .. (ok and "OK " or "ERR ") .. tostring(r)
  end
  return table.concat(out, "\n")
end

local function durable(cage, opts) return pmnc(cage, opts or { queue = "retry" }) end
local function in_tx(f)
  return function()
    local xa = pmnc.transaction.create()
    xa.state.set("hostile", true)
    f(xa)
    return (select(2, xa.execute()))
  end
end

function M.names()
  return run({
    { "bad cage", function() return durable("../etc").work.count(1) end },
    { "wildcard cage", function() return durable("worker.>").work.count(1) end },
    { "empty cage", function() return durable("").work.count(1) end },
    { "long queue", function() return durable("worker", { queue = ("q"):rep(300) }).work.count(1) end },
    { "empty queue", function() return durable("worker", { queue = "" }).work.count(1) end },
    { "private function", function() return durable("worker").work._secret(1) end },
    { "reserved module", function() return durable("worker")._queue.accept(1) end },
    { "bad module", function() return durable("worker")["a.b"].f(1) end },
    { "plain reserved", function() return pmnc("worker")._queue.accept("retry", "forged", "work", "count", 0, 0, { 1 }) end },
    { "long id", function() return durable("worker", { queue = "retry", id = ("i"):rep(257) }).work.count(1) end },
    { "xa bad cage", in_tx(function(xa) xa.pmnc("../x", { queue = "retry" }).work.count(1) end) },
    { "xa private", in_tx(function(xa) xa.pmnc("worker", { queue = "retry" }).work._secret(1) end) },
  })
end

function M.values()
  local cycle = {}
  cycle.self = cycle
  local deep = {}
  local d = deep
  for _ = 1, 300 do d.x = {} d = d.x end
  local huge = ("x"):rep(17 * 1024 * 1024)
  return run({
    { "function", function() return durable("worker").work.count(function() end) end },
    { "coroutine", function() return durable("worker").work.count(coroutine.create(print)) end },
    { "cycle", function() return durable("worker").work.count(cycle) end },
    { "deep", function() return durable("worker").work.count(deep) end },
    { "huge", function() return durable("worker").work.count(huge) end },
    { "xa function", in_tx(function(xa) xa.pmnc("worker", { queue = "retry" }).work.count(print) end) },
    { "xa huge", in_tx(function(xa) xa.pmnc("worker", { queue = "retry" }).work.count(huge) end) },
    { "negative delay", function() return durable("worker", { queue = "retry", delay = -1 }).work.count(1) end },
    { "text delay", function() return durable("worker", { queue = "retry", delay = "soon" }).work.count(1) end },
    { "nan expiry", function() return durable("worker", { queue = "retry", expires_in = 0 / 0 }).work.count(1) end },
    { "wait bad id", function() return pmnc.calls.wait({}, 1) end },
    { "result bad cage", function() return pmnc.calls.result("x", "../etc") end },
  })
end

return M
