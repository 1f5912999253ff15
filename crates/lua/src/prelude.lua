-- The Lua side of the pmnc API, run once in every VM before any module.
-- It receives the Rust helpers and the table of current module versions, and returns `pmnc`.
-- Rust helpers report failure as (false, message) so that errors are raised here with
-- error(message, 2) and point at the user's line, not at this file.

local rust, modules = ...
local error, type, select, setmetatable, rawget, tostring = error, type, select, setmetatable, rawget, tostring
local pairs, ipairs, pcall = pairs, ipairs, pcall
local pack, unpack = table.pack, table.unpack
local traceback = debug.traceback
local cage_name = rust.cage
local reserved = rust.reserved

local function check(ok, ...)
  if ok then return ... end
  error((...), 2)
end

-- pmnc.<module>.<function>: resolved at every access, so new calls always see the current version.
local function resolve(module, fn)
  local m = modules[module]
  if m == nil then
    error(("cage %s has no module %s (calling %s.%s)"):format(cage_name, module, module, tostring(fn)), 2)
  end
  if type(fn) ~= "string" then
    error(("cage %s: module %s: function name must be a string, got %s"):format(cage_name, module, type(fn)), 2)
  end
  if fn:sub(1, 1) == "_" then
    error(("cage %s: %s.%s is private (names starting with _ cannot be called through pmnc)"):format(cage_name, module, fn), 2)
  end
  local f = m[fn]
  if type(f) ~= "function" then
    error(("cage %s: module %s has no function %s"):format(cage_name, module, fn), 2)
  end
  return f
end

local module_proxies = {}
local function module_proxy(name)
  local p = module_proxies[name]
  if p == nil then
    p = setmetatable({}, {
      __index = function(_, fn) return resolve(name, fn) end,
      __newindex = function() error("module proxies are read-only", 2) end,
      __tostring = function() return "pmnc module " .. name end,
    })
    module_proxies[name] = p
  end
  return p
end

-- pmnc("<cage>", opts).<module>.<function>(...): a call through the transport.
local call_cage = rust.call_cage
local function cage_proxy(cage, opts)
  if type(cage) ~= "string" then error("pmnc(cage): cage name must be a string, got " .. type(cage), 2) end
  if opts ~= nil and type(opts) ~= "table" then error("pmnc(cage, options): options must be a table, got " .. type(opts), 2) end
  return setmetatable({}, {
    __index = function(_, module)
      if type(module) ~= "string" then error("module name must be a string", 2) end
      return setmetatable({}, {
        __index = function(_, fn)
          if type(fn) ~= "string" then error("function name must be a string", 2) end
          return function(...) return check(call_cage(cage, module, fn, opts, ...)) end
        end,
      })
    end,
  })
end

local pmnc = {}

pmnc.log = {}
for _, level in ipairs({ "debug", "info", "warn", "error" }) do
  local log = rust["log_" .. level]
  pmnc.log[level] = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    log(table.concat(parts, " "))
  end
end

local sleep = rust.sleep
function pmnc.sleep(seconds) return check(sleep(seconds)) end
pmnc.clock = rust.clock

local json_encode, json_decode = rust.json_encode, rust.json_decode
local array_mt = rust.array_mt
pmnc.json = {
  null = rust.null,
  encode = function(v) return check(json_encode(v)) end,
  decode = function(s) return check(json_decode(s)) end,
  array = function(t)
    if t == nil then t = {} end
    if type(t) ~= "table" then error("pmnc.json.array: expected a table, got " .. type(t), 2) end
    return setmetatable(t, array_mt)
  end,
}

local request_field = rust.request_field
pmnc.request = setmetatable({ remain = rust.remain }, {
  __index = function(_, k) return request_field(k) end,
  __newindex = function() error("pmnc.request is read-only", 2) end,
})

pmnc.cage = cage_name

-- Transactions: participant calls are recorded, then xa.execute() runs them all in parallel
-- through the cage's resources and commits or rolls back all of them.
local tx_run, tx_finish = rust.tx_run, rust.tx_finish
local tx_error_mt = {
  __name = "pmnc.transaction.error",
  __tostring = function(e)
    local text = ("resource %s (participant %s): %s"):format(tostring(e.resource), tostring(e.participant), tostring(e.message))
    if e.code ~= nil then text = text .. " [" .. tostring(e.code) .. "]" end
    return text
  end,
}
local function tx_error(fields) return setmetatable(fields, tx_error_mt) end

local tx_finish_calls = rust.tx_finish_calls
local function run_transaction(list, accept, sync_commit, calls)
  local with_calls = calls ~= nil and #calls > 0
  if #list == 0 then
    if with_calls then return unpack(check(tx_finish_calls(nil, calls))) end
    return
  end
  -- queue: `lasting` is true when a participant's effects outlive a rollback (issue 22 #9).
  local ok, tx, outcomes, lasting = tx_run(list)
  if not ok then error(tx_error(tx), 2) end
  local commit, failure = true, nil
  for _, o in ipairs(outcomes) do
    if not o.ok then
      o.error = tx_error(o.error)
      failure = failure or o.error
    end
  end
  if accept ~= nil then
    local aok, decision = pcall(accept, outcomes)
    if not aok then
      tx_finish(tx, false, true)
      error(decision, 0)
    end
    commit = decision and true or false
  else
    commit = failure == nil
  end
  local ids = {}
  if commit and with_calls then
    -- The durable calls are stored in the same SQLite commit as this cage's state writes.
    local fok, r = tx_finish_calls(tx, calls)
    if not fok then
      if type(r) == "table" then error(tx_error(r), 2) end
      error(r, 2)
    end
    ids = r
  else
    local fok, ferr = tx_finish(tx, commit, sync_commit)
    if not fok then error(tx_error(ferr), 2) end
  end
  if not commit then
    error(failure or tx_error({ resource = nil, participant = nil, recoverable = not lasting, message = "rejected by accept" }), 2)
  end
  local values = {}
  for i, o in ipairs(outcomes) do values[i] = o.value end
  for i, id in ipairs(ids) do values[#outcomes + i] = id end
  return unpack(values, 1, #outcomes + #ids)
end

local function new_transaction(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("pmnc.transaction.create(options): options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "accept" and k ~= "sync_commit" then
      error("pmnc.transaction.create: unknown option " .. tostring(k) .. " (known: accept, sync_commit)", 2)
    end
  end
  local accept = opts.accept
  if accept ~= nil and type(accept) ~= "function" then
    error("pmnc.transaction.create: accept must be a function, got " .. type(accept), 2)
  end
  local sync_commit = opts.sync_commit ~= false
  local list, executed = {}, false
  local calls = {}  -- xa.pmnc(cage, options).m.f(...): durable calls stored once the rest commits
  local xa = {}
  function xa.execute()
    if executed then error("this transaction was executed already; create a new one", 2) end
    executed = true
    return run_transaction(list, accept, sync_commit, calls)
  end
  local function xa_pmnc(cage, copts)
    if type(cage) ~= "string" then error("xa.pmnc(cage, options): cage name must be a string, got " .. type(cage), 2) end
    if type(copts) ~= "table" or copts.queue == nil then
      error("xa.pmnc(cage, options): a transaction takes durable calls only; options need a queue", 2)
    end
    return setmetatable({}, {
      __index = function(_, module)
        return setmetatable({}, {
          __index = function(_, fn)
            return function(...)
              if executed then error("this transaction was executed already; create a new one", 2) end
              calls[#calls + 1] = { cage = cage, opts = copts, module = module, fn = fn, args = pack(...) }
            end
          end,
        })
      end,
    })
  end
  return setmetatable(xa, {
    __index = function(_, resource)
      if resource == "pmnc" then return xa_pmnc end
      if type(resource) ~= "string" then error("resource name must be a string", 2) end
      return setmetatable({}, {
        __index = function(_, method)
          if type(method) ~= "string" then error("method name must be a string", 2) end
          return function(...)
            if executed then error("this transaction was executed already; create a new one", 2) end
            list[#list + 1] = { resource = resource, method = method, args = pack(...) }
          end
        end,
      })
    end,
    __newindex = function() error("transactions are read-only", 2) end,
  })
end

-- pmnc.transaction.RESOURCE.METHOD(...): a transaction of one participant.
local function shortcut(resource)
  return setmetatable({}, {
    __index = function(_, method)
      if type(method) ~= "string" then return nil end
      return function(...)
        local xa = new_transaction()
        xa[resource][method](...)
        return xa.execute()
      end
    end,
  })
end

pmnc.transaction = setmetatable({ create = function(opts) return new_transaction(opts) end }, {
  __index = function(_, resource)
    if type(resource) ~= "string" then return nil end
    return shortcut(resource)
  end,
})

-- pmnc.calls (queue, crates/lua/src/durable.rs): result(id [, cage]) reads the status of a
-- durable call; wait(id [, timeout]) parks the request until it is done or dead. Calls
-- forwarded from other cages' outboxes (`_queue.accept`) are answered in Rust, not here.
local call_result, call_wait = rust.call_result, rust.call_wait
pmnc.calls = {
  result = function(id, cage) return check(call_result(id, cage)) end,
  wait = function(id, timeout) return check(call_wait(id, timeout)) end,
}

-- pmnc.state.get/set/delete/keys: the cage's persistent state, each call its own transaction.
pmnc.state = shortcut("state")

-- pmnc.events: publish to the requests waiting on a topic, on every worker of the cage.
local events_publish, events_wait, events_stats = rust.events_publish, rust.events_wait, rust.events_stats
pmnc.events = {
  -- queue: an optional third argument publishes to the topic of another cage (issue 22 #10).
  publish = function(topic, value, cage) return check(events_publish(topic, value, cage)) end,
  wait = function(topic, timeout) return check(events_wait(topic, timeout)) end,
  stats = function(topic) return events_stats(topic) end,
}

setmetatable(pmnc, {
  __index = function(_, name)
    if type(name) ~= "string" then return nil end
    return module_proxy(name)
  end,
  __newindex = function(_, k) error("pmnc is read-only (tried to set " .. tostring(k) .. ")", 2) end,
  __call = function(_, cage, opts) return cage_proxy(cage, opts) end,
})

-- Runs a request: the body of every request coroutine. Errors come back as a marked table with
-- the traceback taken where the error happened.
local error_mt = { __name = "pmnc.failure" }
local function on_error(e)
  return setmetatable({ error = e, traceback = traceback(tostring(e), 2) }, error_mt)
end
local xpcall = xpcall
local function run(f, ...)
  return xpcall(f, on_error, ...)
end

-- Coroutines created by module code are time-sliced too: the hook suspends them like the
-- request's own coroutine and marks them; coroutine.resume then passes that suspension on up to
-- the worker (when it can yield) and resumes the coroutine where it stopped, so module code never
-- sees these yields. pmnc waits (sleep, calls) must be made from the request itself.
local hook_yields = rust.hook_yields   -- coroutine -> true, set by the hook (weak keys)
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local co_yield, co_running, isyieldable = coroutine.yield, coroutine.running, coroutine.isyieldable
local function resume_through(co, ...)
  hook_yields[co] = nil
  local r = pack(co_resume(co, ...))
  while r[1] and r.n == 1 and hook_yields[co] do
    hook_yields[co] = nil
    if isyieldable() then
      hook_yields[co_running()] = true
      co_yield()
    end
    r = pack(co_resume(co))
  end
  return r
end
coroutine.resume = function(co, ...)
  local r = resume_through(co, ...)
  return unpack(r, 1, r.n)
end
coroutine.wrap = function(f)
  local co = co_create(f)
  return function(...)
    local r = resume_through(co, ...)
    if r[1] then return unpack(r, 2, r.n) end
    co_close(co)
    error(r[2], 0)
  end
end

-- Module code may load Lua text, never bytecode: only bytecode we compiled is ever run.
local load = load
_G.load = function(chunk, name, mode, env)
  return load(chunk, name, "t", env)
end
_G.debug = nil
_G.dofile = nil
_G.loadfile = nil
-- The original, captured before the global is replaced (else the wrapper would call itself).
local collectgarbage = collectgarbage
_G.collectgarbage = function(opt, ...)
  if opt == nil or opt == "count" or opt == "step" or opt == "collect" or opt == "isrunning" then
    return collectgarbage(opt, ...)
  end
  error("collectgarbage: option " .. tostring(opt) .. " is not available to modules", 2)
end
if os then
  os.exit, os.execute, os.remove, os.rename, os.tmpname, os.setlocale = nil, nil, nil, nil, nil, nil
end
_G.pmnc = pmnc

return pmnc, run, resolve, error_mt
