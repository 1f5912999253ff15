-- The Lua side of the pmnc API and of the sandbox module code runs in, run once in every VM
-- before any module. It receives the Rust helpers and the table of current module versions, and
-- returns pmnc, the body of every request coroutine, the module resolver, the failure metatable
-- and the function that makes a module's environment.
-- Rust helpers report failure as (false, message) so that errors are raised here with
-- error(message, 2) and point at the user's line, not at this file.
-- Why each rule of the sandbox exists: docs/decisions/004-lua-sandbox.md.

local rust, modules = ...

-- The library functions as Lua made them, captured before anything below replaces them.
local error, type, select, rawget, rawequal, rawlen, next = error, type, select, rawget, rawequal, rawlen, next
local c_setmetatable, c_getmetatable, c_rawset = setmetatable, getmetatable, rawset
local c_tostring, c_pcall, c_xpcall, c_load, c_collectgarbage = tostring, pcall, xpcall, load, collectgarbage
local pairs, ipairs, tonumber, assert = pairs, ipairs, tonumber, assert
local pack, unpack, concat = table.pack, table.unpack, table.concat
local c_sort = table.sort
local sub, byte = string.sub, string.byte
local math_type = math.type
local traceback, raw_getmetatable = debug.traceback, debug.getmetatable
local co_create, co_close, co_status = coroutine.create, coroutine.close, coroutine.status
local co_yield, co_running, isyieldable = coroutine.yield, coroutine.running, coroutine.isyieldable
local cage_name = rust.cage

local setmetatable = c_setmetatable

-- ---------------------------------------------------------------------------------------------
-- Stopping: past its deadline, past the time it may run without yielding, or being closed, a
-- request's Lua code gets an error at every hook call. The functions that catch errors pass such
-- an error on instead of returning it, so no pcall can swallow the stop.
local stopping = rust.stopping

local function after_catch(ok, ...)
  if not ok and stopping() then error((...), 0) end
  return ok, ...
end

local function pcall(f, ...) return after_catch(c_pcall(f, ...)) end
local function xpcall(f, handler, ...) return after_catch(c_xpcall(f, handler, ...)) end

-- ---------------------------------------------------------------------------------------------
-- Tables that many modules share (the pmnc API, module proxies, shared metatables) are read-only
-- proxies; rawset would bypass __newindex, so it refuses them too.
local protected = c_setmetatable({}, { __mode = "k" })

local function rawset(t, k, v)
  local name = protected[t]
  if name ~= nil then error(name .. " is read-only (tried to set " .. c_tostring(k) .. ")", 2) end
  return c_rawset(t, k, v)
end

-- A read-only view of `t` (reads through __index, writes refused); `index` replaces t as the
-- source of reads when given (a function or another table).
local function readonly(t, name, index)
  local p = c_setmetatable({}, {
    __index = index or t,
    __newindex = function(_, k) error(name .. " is read-only (tried to set " .. c_tostring(k) .. ")", 2) end,
    __pairs = function() return next, t, nil end,
    __len = function() return #t end,
    __metatable = false,
  })
  protected[p] = name
  return p
end

-- A metatable shared by tables of many modules: getmetatable on such a table answers false, so
-- no module can change what the others see.
local function locked(mt)
  mt.__metatable = false
  return mt
end

-- Finalizers (__gc) run inside the garbage collector, where Lua runs no hooks: a loop there
-- would hold the worker forever. Module code has no need of them; Rust-owned objects keep their
-- own.
local function setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not available to module code (a finalizer runs inside the garbage collector, where no deadline can stop it)", 2)
  end
  return c_setmetatable(t, mt)
end

-- tostring calls __tostring itself, from Lua: a slow or looping __tostring is then time-sliced
-- and stopped at the deadline like any code (the C tostring would run it where it cannot yield).
local function tostring(v)
  local mt = raw_getmetatable(v)
  if mt ~= nil then
    local f = rawget(mt, "__tostring")
    if f ~= nil then
      local s = f(v)
      if type(s) == "number" then return c_tostring(s) end
      if type(s) ~= "string" then error("'__tostring' must return a string", 2) end
      return s
    end
  end
  return c_tostring(v)
end

local function check(ok, ...)
  if ok then return ... end
  error((...), 2)
end

-- ---------------------------------------------------------------------------------------------
-- Coroutines created by module code are time-sliced too: the hook suspends them like the
-- request's own coroutine and marks them; coroutine.resume then passes that suspension on up to
-- the worker (when it can yield) and resumes the coroutine where it stopped, so module code never
-- sees these yields. pmnc waits (sleep, calls) must be made from the request itself. The Rust
-- side is told which coroutine runs, so the watchdog's signal reaches the right one.
local hook_yields = rust.hook_yields   -- coroutine -> true, set by the hook (weak keys)
-- What a coroutine of module code yields to pass a suspension on to its parent. A value, not a
-- mark: the hook may suspend the coroutine again right before it yields (the watchdog arms the
-- hook at any instruction), and a mark would be consumed by that first suspension, leaving the
-- second yield looking like the module's own.
local PASS_UP = setmetatable({}, { __name = "pmnc.pass_up" })
-- chained(f, co, ...): f(co, ...) (coroutine.close) with `co` among the coroutines the watchdog's
-- signal arms while the call runs; one C call, so no slice can end in between. chained_resume(co,
-- ...) is coroutine.resume made the same way.
local chained, chained_resume = rust.chained, rust.chained_resume
local user_coroutines = c_setmetatable({}, { __mode = "k" })

local function resume_through(co, ...)
  hook_yields[co] = nil
  local r = pack(chained_resume(co, ...))
  while r[1] and ((r.n == 1 and hook_yields[co]) or (r.n == 2 and r[2] == PASS_UP)) do
    hook_yields[co] = nil
    if isyieldable() then co_yield(PASS_UP) end
    r = pack(chained_resume(co))
  end
  if not r[1] and stopping() then error(r[2], 0) end
  return r
end

local coroutine_lib = {}
for k, v in next, coroutine do coroutine_lib[k] = v end
coroutine_lib.create = function(f)
  local co = co_create(f)
  user_coroutines[co] = true
  return co
end
-- The argument check of resume and close, raised at their caller. Only coroutines of module
-- code may be resumed or closed: a request's own coroutine (what coroutine.running() gives in a
-- handler) is the runtime's, and once its request ends it is kept for a later request, which a
-- stale reference must not disturb.
local function module_coroutine(co, fname, done)
  if type(co) ~= "thread" then error("bad argument #1 to '" .. fname .. "' (coroutine expected)", 3) end
  if not user_coroutines[co] then
    error("bad argument #1 to '" .. fname .. "' (a request's own coroutine: only coroutines made by coroutine.create or coroutine.wrap can be " .. done .. ")", 3)
  end
end
coroutine_lib.resume = function(co, ...)
  module_coroutine(co, "resume", "resumed")
  local r = resume_through(co, ...)
  return unpack(r, 1, r.n)
end
-- As Lua's own wrap: an error closes the coroutine (an error of a __close handler then wins)
-- and a string error gets the position of the call to the wrapped function in front of it.
coroutine_lib.wrap = function(f)
  local co = co_create(f)
  user_coroutines[co] = true
  return function(...)
    local r = resume_through(co, ...)
    if r[1] then return unpack(r, 2, r.n) end
    local e = r[2]
    if co_status(co) == "dead" then
      local closed, close_error = chained(co_close, co)
      if not closed then e = close_error end
    end
    if type(e) == "string" and e ~= "not enough memory" then error(e, 2) end
    error(e, 0)
  end
end
coroutine_lib.close = function(co)
  module_coroutine(co, "close", "closed")
  -- Closing a running or normal coroutine is an error, raised without chaining.
  local status = co_status(co)
  local r = (status == "suspended" or status == "dead") and pack(chained(co_close, co)) or pack(co_close(co))
  if not r[1] and stopping() then error(r[2], 0) end
  return unpack(r, 1, r.n)
end

-- Gives the worker a turn when a long library call asks for it (the end of a time slice): from
-- the request's coroutine through an async Rust function, from a coroutine of module code by
-- passing the suspension up as the hook does. Where nothing can yield, the call goes on and the
-- Rust side bounds it.
local yield_slice = rust.yield_slice
local function pause()
  if not isyieldable() then return end
  local co = co_running()
  if user_coroutines[co] then
    co_yield(PASS_UP)
  else
    yield_slice()
  end
end

-- ---------------------------------------------------------------------------------------------
-- Pattern functions on a matcher that can stop at the end of a time slice (strings.rs): a long
-- search yields and goes on, and a search still running at the deadline ends there.
local S_SUSPEND, S_FAIL, S_DELEGATE = rust.str_suspend, rust.str_fail, rust.str_delegate
local s_find, s_match, s_gmatch, s_gmatch_step = rust.str_find, rust.str_match, rust.str_gmatch, rust.str_gmatch_step
local s_gsub, s_gsub_next, s_resume = rust.str_gsub, rust.str_gsub_next, rust.str_resume

local function settle(s, p, r1, ...)
  if r1 == S_SUSPEND then
    pause()
    return settle(s, p, s_resume((...), s, p))
  end
  return r1, ...
end

-- Tail-called by the library functions, so level 2 is the line of module code that called them.
local function checked(r1, ...)
  if r1 == S_FAIL then error((...), 2) end
  return r1, ...
end

local function find(s, p, init, plain) return checked(settle(s, p, s_find(s, p, init, plain))) end
local function match(s, p, init) return checked(settle(s, p, s_match(s, p, init))) end

local function gmatch(s, p, init)
  local s1, p1, it = s_gmatch(s, p, init)
  if s1 == S_FAIL then error(p1, 2) end
  return function() return checked(settle(s1, p1, s_gmatch_step(s1, p1, it))) end
end

-- gsub with a function or table: the loop runs here, so the replacement function is ordinary
-- (time-sliced) Lua code rather than a callback from C.
local function gsub_apply(repl, is_table, st, e, ...)
  if st == S_FAIL then return S_FAIL, e end
  if st == nil then return nil end
  local v
  if is_table then v = repl[(...)] else v = repl(...) end
  return st, e, v
end

local function gsub_loop(s, p, repl, max)
  local is_table = type(repl) == "table"
  local anchor = byte(p, 1) == 94
  local parts, np, pos, last, count = {}, 0, 1, -1, 0
  while count < max do
    local st, e, v = gsub_apply(repl, is_table, settle(s, p, s_gsub_next(s, p, pos, last, is_table)))
    if st == nil then break end
    if st == S_FAIL then error(e, 2) end
    count = count + 1
    if st > pos then
      np = np + 1
      parts[np] = sub(s, pos, st - 1)
    end
    if v == nil or v == false then
      v = sub(s, st, e)
    elseif type(v) ~= "string" and math_type(v) == nil then
      error("invalid replacement value (a " .. type(v) .. ")", 2)
    end
    np = np + 1
    parts[np] = v
    pos, last = e + 1, e
    if anchor then break end
  end
  np = np + 1
  parts[np] = sub(s, pos)
  return concat(parts, "", 1, np), count
end

local function gsub_start(s, p, repl, r1, ...)
  if r1 == S_DELEGATE then
    local s1, p1, max = ...
    return gsub_loop(s1, p1, repl, max)
  end
  return checked(settle(s, p, r1, ...))
end

local function gsub(s, p, repl, n) return gsub_start(s, p, repl, s_gsub(s, p, repl, n)) end

string.find, string.match, string.gmatch, string.gsub = find, match, gmatch, gsub

-- Library calls whose cost grows with a big input (a string.rep of 100 MB makes 10^8 copies)
-- run in pieces of about a megabyte with a turn for the worker between pieces.
local c_rep, c_upper, c_lower, c_reverse, c_concat = string.rep, string.upper, string.lower, string.reverse, table.concat
local tointeger = math.tointeger
local PIECE = 1 << 20
local PIECE_ITEMS = 1 << 16

local function rep(s, n, sep)
  local count = tointeger(n)
  if type(s) ~= "string" or count == nil or (sep ~= nil and type(sep) ~= "string") then
    return c_rep(s, n, sep)   -- converts or refuses its arguments as Lua does
  end
  local unit = #s + (sep and #sep or 0)
  if count <= 1 or unit == 0 or count > (1 << 62) // unit or unit * count <= PIECE then
    return c_rep(s, count, sep)   -- small, or too large (refused there)
  end
  sep = sep or ""
  local result, have = s, 1
  while have * 2 <= count do
    result = result .. sep .. result
    have = have * 2
    pause()
  end
  if have < count then result = result .. sep .. rep(s, count - have, sep) end
  return result
end

local function piecewise(f, backwards)
  return function(s, ...)
    if type(s) ~= "string" or #s <= PIECE or select("#", ...) > 0 then return f(s, ...) end
    local parts, np = {}, 0
    for i = 1, #s, PIECE do
      np = np + 1
      parts[np] = f(sub(s, i, i + PIECE - 1))
      pause()
    end
    if backwards then
      for i = 1, np // 2 do parts[i], parts[np + 1 - i] = parts[np + 1 - i], parts[i] end
    end
    return concat(parts, "", 1, np)
  end
end

string.rep, string.upper, string.lower = rep, piecewise(c_upper), piecewise(c_lower)
string.reverse = piecewise(c_reverse, true)

-- table.move copies index by index in C whether or not the indices hold anything, so a range of
-- 2^62 empty slots would never end: long ranges move in pieces (from the end when the pieces
-- overlap forwards, as the C function does).
local c_move = table.move
local MAXINTEGER = math.maxinteger
table.move = function(a1, f, e, t, a2)
  local first, last, to = tointeger(f), tointeger(e), tointeger(t)
  if first == nil or last == nil or to == nil or last - first < PIECE_ITEMS or type(a1) ~= "table"
     or (a2 ~= nil and type(a2) ~= "table") then
    return c_move(a1, f, e, t, a2)
  end
  if not (first > 0 or last < MAXINTEGER + first) then error("bad argument #3 to 'move' (too many elements to move)", 2) end
  local n = last - first + 1
  if to > MAXINTEGER - n + 1 then error("bad argument #4 to 'move' (destination wrap around)", 2) end
  local dest = a2 or a1
  if to > last or to <= first or not rawequal(a1, dest) then
    for i = 0, n - 1, PIECE_ITEMS do
      local k = i + PIECE_ITEMS - 1
      if k > n - 1 then k = n - 1 end
      c_move(a1, first + i, first + k, to + i, dest)
      pause()
    end
  else
    local i = n - PIECE_ITEMS
    while true do
      local lo = i < 0 and 0 or i
      c_move(a1, first + lo, first + i + PIECE_ITEMS - 1, to + lo, dest)
      pause()
      if lo == 0 then break end
      i = i - PIECE_ITEMS
    end
  end
  return dest
end

table.concat = function(t, sep, i, j)
  if type(t) ~= "table" then return c_concat(t, sep, i, j) end
  local first, last = tointeger(i or 1), tointeger(j or #t)
  if first == nil or last == nil or last - first < PIECE_ITEMS then return c_concat(t, sep, i, j) end
  local parts, np = {}, 0
  for a = first, last, PIECE_ITEMS do
    local b = a + PIECE_ITEMS - 1
    if b > last then b = last end
    np = np + 1
    parts[np] = c_concat(t, sep, a, b)
    pause()
  end
  return c_concat(parts, sep, 1, np)
end

-- table.sort: arrays of plain numbers or strings of moderate size go to the C sort (no Lua code
-- runs inside it); everything else is sorted here, where a comparator or __lt is ordinary,
-- time-sliced Lua code. Pivots are chosen at random so no input makes the sort quadratic.
local sortable = rust.sortable
local function less(a, b) return a < b end
local seed = 0x2545F491

local function insertion(t, lo, hi, lt)
  for i = lo + 1, hi do
    local v = t[i]
    local j = i - 1
    while j >= lo and lt(v, t[j]) do
      t[j + 1] = t[j]
      j = j - 1
    end
    t[j + 1] = v
  end
end

local function quicksort(t, lo, hi, lt)
  while hi - lo > 12 do
    seed = (seed * 1103515245 + 12345) & 0x7fffffff
    local r = lo + 1 + seed % (hi - lo - 1)
    local mid = (lo + hi) // 2
    t[r], t[mid] = t[mid], t[r]
    if lt(t[mid], t[lo]) then t[mid], t[lo] = t[lo], t[mid] end
    if lt(t[hi], t[mid]) then
      t[hi], t[mid] = t[mid], t[hi]
      if lt(t[mid], t[lo]) then t[mid], t[lo] = t[lo], t[mid] end
    end
    local pivot = t[mid]
    local i, j = lo, hi
    while i <= j do
      while lt(t[i], pivot) do
        i = i + 1
        if i > hi then error("invalid order function for sorting", 0) end
      end
      while lt(pivot, t[j]) do
        j = j - 1
        if j < lo then error("invalid order function for sorting", 0) end
      end
      if i <= j then
        t[i], t[j] = t[j], t[i]
        i, j = i + 1, j - 1
      end
    end
    -- The smaller part recursively, the larger by looping: the stack stays logarithmic.
    if j - lo < hi - i then
      quicksort(t, lo, j, lt)
      lo = i
    else
      quicksort(t, i, hi, lt)
      hi = j
    end
  end
  insertion(t, lo, hi, lt)
end

table.sort = function(t, lt)
  if type(t) ~= "table" then error("bad argument #1 to 'sort' (table expected, got " .. type(t) .. ")", 2) end
  if lt == nil and sortable(t) then return c_sort(t) end
  if lt ~= nil and type(lt) ~= "function" then
    error("bad argument #2 to 'sort' (function expected, got " .. type(lt) .. ")", 2)
  end
  local n = #t
  if n < 2 then return end
  local ok, e = c_pcall(quicksort, t, 1, n, lt or less)
  if not ok then
    if stopping() then error(e, 0) end
    -- "attempt to compare" raised by `less` here has no line (this chunk has none): as Lua's
    -- C sort, no position; errors of a comparator keep their own.
    if type(e) == "string" and sub(e, 1, 6) == "?:-1: " then e = sub(e, 7) end
    error(e, 0)
  end
end

-- ---------------------------------------------------------------------------------------------
-- The pmnc API.

-- pmnc.<module>.<function>: resolved at every access, so new calls always see the current version.
local function resolve(module, fn)
  local m = modules[module]
  if m == nil then
    error(("cage %s has no module %s (calling %s.%s)"):format(cage_name, module, module, c_tostring(fn)), 2)
  end
  if type(fn) ~= "string" then
    error(("cage %s: module %s: function name must be a string, got %s"):format(cage_name, module, type(fn)), 2)
  end
  if sub(fn, 1, 1) == "_" then
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
    p = c_setmetatable({}, locked({
      __index = function(_, fn) return resolve(name, fn) end,
      __newindex = function() error("module proxies are read-only", 2) end,
      __tostring = function() return "pmnc module " .. name end,
    }))
    protected[p] = "pmnc." .. name
    module_proxies[name] = p
  end
  return p
end

-- <proxy>.<module>.<function>(...) calling on_call(module, function, ...): the shape of
-- pmnc("<cage>", opts) and pmnc.workflow.step(cage, opts).
local function call_proxy(on_call)
  return c_setmetatable({}, locked({
    __index = function(_, module)
      if type(module) ~= "string" then error("module name must be a string", 2) end
      return c_setmetatable({}, locked({
        __index = function(_, fn)
          if type(fn) ~= "string" then error("function name must be a string", 2) end
          return function(...) return on_call(module, fn, ...) end
        end,
      }))
    end,
  }))
end

-- pmnc("<cage>", opts).<module>.<function>(...): a call through the transport.
local call_cage = rust.call_cage
local function cage_proxy(cage, opts)
  if type(cage) ~= "string" then error("pmnc(cage): cage name must be a string, got " .. type(cage), 2) end
  if opts ~= nil and type(opts) ~= "table" then error("pmnc(cage, options): options must be a table, got " .. type(opts), 2) end
  return call_proxy(function(module, fn, ...) return check(call_cage(cage, module, fn, opts, ...)) end)
end

local api = {}

local log = {}
for _, level in ipairs({ "debug", "info", "warn", "error" }) do
  local write = rust["log_" .. level]
  log[level] = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    write(concat(parts, " "))
  end
end
api.log = readonly(log, "pmnc.log")

local sleep = rust.sleep
api.sleep = function(seconds) return check(sleep(seconds)) end
api.clock = rust.clock

-- Big inputs are parsed and printed off the worker while the request waits (json.rs), where the
-- request can wait: not in module top-level code, not in a coroutine of module code.
local json_encode, json_decode = rust.json_encode, rust.json_decode
local json_decode_big, json_encode_finish = rust.json_decode_big, rust.json_encode_finish
local JSON_INLINE = 64 * 1024
local function can_wait() return isyieldable() and not user_coroutines[co_running()] end
local array_mt = locked(rust.array_mt)
api.json = readonly({
  null = rust.null,
  encode = function(v)
    local ok, r = json_encode(v, can_wait())
    if ok == "pending" then return check(json_encode_finish(r)) end
    if ok then return r end
    error(r, 2)
  end,
  decode = function(s)
    if type(s) == "string" and #s > JSON_INLINE and can_wait() then return check(json_decode_big(s)) end
    return check(json_decode(s))
  end,
  array = function(t)
    if t == nil then t = {} end
    if type(t) ~= "table" then error("pmnc.json.array: expected a table, got " .. type(t), 2) end
    return c_setmetatable(t, array_mt)
  end,
}, "pmnc.json")

local request_field = rust.request_field
local request_fields = { remain = rust.remain }
api.request = readonly(request_fields, "pmnc.request", function(_, k)
  local v = request_fields[k]
  if v ~= nil then return v end
  return request_field(k)
end)

api.cage = cage_name

-- Transactions: participant calls are recorded, then xa.execute() runs them all in parallel
-- through the cage's resources and commits or rolls back all of them.
local tx_run, tx_finish = rust.tx_run, rust.tx_finish
local tx_error_mt = locked({
  __name = "pmnc.transaction.error",
  __tostring = function(e)
    local text = ("resource %s (participant %s): %s"):format(c_tostring(e.resource), c_tostring(e.participant), c_tostring(e.message))
    if e.code ~= nil then text = text .. " [" .. c_tostring(e.code) .. "]" end
    return text
  end,
})
local function tx_error(fields) return c_setmetatable(fields, tx_error_mt) end

local tx_finish_calls = rust.tx_finish_calls
local function run_transaction(list, accept, sync_commit, calls)
  local with_calls = calls ~= nil and #calls > 0
  if #list == 0 then
    if with_calls then return unpack(check(tx_finish_calls(nil, calls))) end
    return
  end
  -- queue: `lasting` is true when a participant's effects outlive a rollback (issue 22 #9).
  -- `idle`: nothing to commit or roll back (read cache hits, decision 143).
  local ok, tx, outcomes, lasting, idle = tx_run(list)
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
  elseif not idle then
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

-- The read cache of resources (docs/decisions/143): RESOURCE.cached{key = ..., ttl = ...} and
-- RESOURCE.invalidates{key, "prefix:*", ...} check their table here, so that a mistake is
-- reported at the user's line and names the resource.
local MAX_CACHE_KEY, MAX_INVALIDATES, MAX_TTL = 1024, 1000, 31536000
local function cache_key_problem(key)
  if type(key) ~= "string" then return "must be a string, got " .. type(key) end
  if key == "" then return "must not be empty" end
  if #key > MAX_CACHE_KEY then return ("is %d bytes long, over the limit of %d"):format(#key, MAX_CACHE_KEY) end
  return nil
end
-- `where` prefixes messages ("xa.db"); errors point at the caller of the caller (level 3).
local function check_cached(where, opts, before)
  local what = where .. ".cached{key = ..., ttl = ...}"
  if before ~= nil then error(what .. ": cached is given twice", 3) end
  if type(opts) ~= "table" then error(what .. ": expected a table, got " .. type(opts), 3) end
  for k in pairs(opts) do
    if k ~= "key" and k ~= "ttl" then error(what .. ": unknown field " .. c_tostring(k) .. " (known: key, ttl)", 3) end
  end
  local key, ttl = opts.key, opts.ttl
  local problem = cache_key_problem(key)
  if problem ~= nil then error(what .. ": key " .. problem, 3) end
  if sub(key, -1) == "*" then
    error(what .. ": key " .. key .. " ends in *, which only invalidates uses (for a prefix)", 3)
  end
  if type(ttl) ~= "number" or ttl ~= ttl or ttl <= 0 or ttl > MAX_TTL then
    error(what .. ": ttl must be a number of seconds above 0 and at most " .. MAX_TTL .. ", got " .. c_tostring(ttl), 3)
  end
  return { key = key, ttl = ttl + 0.0 }
end
local function check_invalidates(what, keys, before)
  if type(keys) == "string" then keys = { keys } end
  if type(keys) ~= "table" then error(what .. ": expected a key or a list of keys, got " .. type(keys), 3) end
  local out = {}
  if before ~= nil then for i = 1, #before do out[i] = before[i] end end
  local n = rawlen(keys)
  if n == 0 then error(what .. ": the list of keys is empty", 3) end
  for i = 1, n do
    local problem = cache_key_problem(rawget(keys, i))
    if problem ~= nil then error(what .. ": key " .. i .. " " .. problem, 3) end
    out[#out + 1] = rawget(keys, i)
  end
  if #out > MAX_INVALIDATES then error(what .. ": more than " .. MAX_INVALIDATES .. " keys", 3) end
  return out
end
-- RESOURCE.cached and RESOURCE.invalidates of a view made by `make(resource, cached,
-- invalidates)`; nil for any other method name.
local function cache_options(make, where, resource, method, cached, invalidates)
  if method == "cached" then
    return function(opts) return make(resource, check_cached(where, opts, cached), invalidates) end
  elseif method == "invalidates" then
    return function(keys) return make(resource, cached, check_invalidates(where .. ".invalidates{...}", keys, invalidates)) end
  end
  return nil
end

-- `level`: where option errors point (create calls it as 3: through its own frame).
local function new_transaction(opts, level)
  level = level or 2
  if opts ~= nil and type(opts) ~= "table" then
    error("pmnc.transaction.create(options): options must be a table, got " .. type(opts), level)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "accept" and k ~= "sync_commit" then
      error("pmnc.transaction.create: unknown option " .. c_tostring(k) .. " (known: accept, sync_commit)", level)
    end
  end
  local accept = opts.accept
  if accept ~= nil and type(accept) ~= "function" then
    error("pmnc.transaction.create: accept must be a function, got " .. type(accept), level)
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
    return c_setmetatable({}, {
      __index = function(_, module)
        return c_setmetatable({}, {
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
  -- Records one participant; `cached` and `invalidates` come from cache_options (or are nil).
  local function add(resource, method, cached, invalidates, ...)
    if executed then error("this transaction was executed already; create a new one", 3) end
    list[#list + 1] = { resource = resource, method = method, args = pack(...), cached = cached, invalidates = invalidates }
  end
  -- xa.RESOURCE: its methods record calls; cached{...} and invalidates{...} give the same view
  -- with read cache options added (docs/decisions/143).
  local function methods(resource, cached, invalidates)
    return c_setmetatable({}, {
      __index = function(_, method)
        if type(method) ~= "string" then error("method name must be a string", 2) end
        local more = cache_options(methods, "xa." .. resource, resource, method, cached, invalidates)
        if more ~= nil then return more end
        return function(...) add(resource, method, cached, invalidates, ...) end
      end,
    })
  end
  return c_setmetatable(xa, locked({
    __index = function(_, resource)
      if resource == "pmnc" then return xa_pmnc end
      if type(resource) ~= "string" then error("resource name must be a string", 2) end
      return methods(resource)
    end,
    __newindex = function() error("transactions are read-only", 2) end,
  })), add
end

-- pmnc.transaction.RESOURCE.METHOD(...): a transaction of one participant.
-- Nothing is cached per name: names come from module code and could be endless.
local function shortcut(resource, cached, invalidates, name)
  name = name or ("pmnc.transaction." .. resource)
  local function again(r, c, i) return shortcut(r, c, i, name) end
  return readonly({}, name, function(_, method)
    if type(method) ~= "string" then return nil end
    local more = cache_options(again, name, resource, method, cached, invalidates)
    if more ~= nil then return more end
    return function(...)
      local xa, add = new_transaction()
      add(resource, method, cached, invalidates, ...)
      return xa.execute()
    end
  end)
end

local transaction_fields = { create = function(opts) return (new_transaction(opts, 3)) end }
api.transaction = readonly(transaction_fields, "pmnc.transaction", function(_, resource)
  local v = transaction_fields[resource]
  if v ~= nil then return v end
  if type(resource) ~= "string" then return nil end
  return shortcut(resource)
end)

-- pmnc.calls (crates/lua/src/durable.rs): result(id [, cage]) reads the status of a durable
-- call; wait(id [, timeout]) parks the request until it is done or dead. Calls forwarded from
-- other cages' outboxes (`_queue.accept`) are answered in Rust, not here.
-- cancel(id [, cage]) cancels it; fail_permanently(message) raises an error that a durable call
-- does not retry ({message = ..., retry = false}, read by crates/lua/src/request.rs).
local call_result, call_wait, call_cancel = rust.call_result, rust.call_wait, rust.call_cancel
local permanent_mt = { __name = "pmnc.permanent_failure", __tostring = function(e) return e.message end }
api.calls = readonly({
  result = function(id, cage) return check(call_result(id, cage)) end,
  wait = function(id, timeout) return check(call_wait(id, timeout)) end,
  cancel = function(id, cage) return check(call_cancel(id, cage)) end,
  fail_permanently = function(message)
    if type(message) ~= "string" then error("pmnc.calls.fail_permanently(message): message must be a string, got " .. type(message), 2) end
    error(c_setmetatable({ message = message, retry = false }, permanent_mt), 2)
  end,
}, "pmnc.calls")

-- pmnc.workflow (crates/lua/src/workflow.rs): step(cage, options).m.f(...) describes a durable
-- call without storing it; chain, group and chord store a list of them (docs/queues.md).
local wf_step, wf_start, wf_cancel, wf_status = rust.workflow_step, rust.workflow_start, rust.workflow_cancel, rust.workflow_status
api.workflow = readonly({
  step = function(cage, opts)
    if type(cage) ~= "string" then error("pmnc.workflow.step(cage, options): cage name must be a string, got " .. type(cage), 2) end
    if type(opts) ~= "table" then error("pmnc.workflow.step(cage, options): options must be a table with a queue, got " .. type(opts), 2) end
    return call_proxy(function(module, fn, ...) return check(wf_step(cage, opts, module, fn, ...)) end)
  end,
  chain = function(steps, opts) return check(wf_start("chain", steps, nil, opts)) end,
  group = function(steps, opts) return check(wf_start("group", steps, nil, opts)) end,
  chord = function(steps, body, opts) return check(wf_start("chord", steps, body, opts)) end,
  cancel = function(id) return check(wf_cancel(id)) end,
  status = function(id) return check(wf_status(id)) end,
}, "pmnc.workflow")

-- pmnc.state.get/set/delete/keys: the cage's persistent state, each call its own transaction.
api.state = shortcut("state", nil, nil, "pmnc.state")

-- pmnc.cache.invalidate(resource, keys): drops keys from a resource's read cache at once, for
-- code outside transactions (docs/decisions/143).
local cache_invalidate = rust.cache_invalidate
api.cache = readonly({
  invalidate = function(resource, keys)
    if type(resource) ~= "string" or resource == "" then
      error("pmnc.cache.invalidate(resource, keys): resource must be a resource name, got " .. type(resource), 2)
    end
    local list = check_invalidates("pmnc.cache.invalidate(" .. resource .. ", keys)", keys)
    return check(cache_invalidate(resource, list))
  end,
}, "pmnc.cache")

-- pmnc.events: publish to the requests waiting on a topic, on every worker of the cage.
local events_publish, events_wait, events_stats = rust.events_publish, rust.events_wait, rust.events_stats
api.events = readonly({
  -- An optional third argument publishes to the topic of another cage.
  publish = function(topic, value, cage) return check(events_publish(topic, value, cage)) end,
  wait = function(topic, timeout) return check(events_wait(topic, timeout)) end,
  stats = function(topic) return events_stats(topic) end,
}, "pmnc.events")

-- The helper families of crates/stdlib (pmnc.base64, pmnc.crypto, ...), read-only like the rest.
-- Each Rust function answers (true, values...), (false, message) or ("pending", job) for a big
-- input: the job runs off the worker where the request can wait, inline where nothing can
-- (docs/decisions/070).
local stdlib_wait, stdlib_run, stdlib_front = rust.stdlib_wait, rust.stdlib_run, rust.stdlib_front
local function stdlib_result(ok, ...)
  if ok == true then return ... end
  if ok == "pending" then
    if can_wait() then return check(stdlib_wait((...))) end
    return check(stdlib_run((...)))
  end
  error((...), 2)
end
for name, family in next, rust.stdlib do
  local wrapped = {}
  for fname, f in next, family do
    -- The most called helpers get a C function in front that answers plain calls itself and
    -- hands the rest to this wrapper (crates/stdlib/src/fast.rs).
    wrapped[fname] = stdlib_front(name, fname, function(...) return stdlib_result(f(...)) end)
  end
  api[name] = readonly(wrapped, "pmnc." .. name)
end

-- pmnc itself: its fields, then the modules of the cage; pmnc("<cage>") calls another cage.
c_setmetatable(api, {
  __index = function(_, name)
    if type(name) ~= "string" then return nil end
    return module_proxy(name)
  end,
})
local pmnc = c_setmetatable({}, {
  __index = api,
  __newindex = function(_, k) error("pmnc is read-only (tried to set " .. c_tostring(k) .. ")", 2) end,
  __call = function(_, cage, opts) return cage_proxy(cage, opts) end,
  __pairs = function() return next, api, nil end,
  __metatable = false,
})
protected[pmnc] = "pmnc"

-- ---------------------------------------------------------------------------------------------
-- Running a request: the body of every request coroutine. Errors come back as a marked table
-- with the traceback taken where the error happened.
local error_mt = { __name = "pmnc.failure" }

-- A message handler cannot yield, so no module code runs here: the text of an error object with
-- __tostring is taken afterwards, in `finish`, where it can be time-sliced.
local function on_error(e)
  local text = e
  local t = type(e)
  if t == "number" then text = c_tostring(e) elseif t ~= "string" then text = nil end
  return c_setmetatable({ error = e, traceback = traceback(text, 2) }, error_mt)
end

-- The text of an error value, for the log and the failure.
local function describe(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" or t == "nil" then return c_tostring(v) end
  if t == "table" then
    local mt = raw_getmetatable(v)
    local f = mt and rawget(mt, "__tostring")
    if f ~= nil then
      local ok, s = pcall(f, v)
      if ok and type(s) == "string" then return s end
    end
  end
  return nil
end

local started = rust.started
local function finish(ok, ...)
  if ok then return true, ... end
  local failure = ...
  if rawequal(raw_getmetatable(failure), error_mt) then
    local text = describe(failure.error)
    if text ~= nil then
      failure.message = text
      if type(failure.error) == "table" then failure.traceback = text .. "\n" .. failure.traceback end
    end
  end
  return false, failure
end

local function run(f, ...)
  started()
  return finish(c_xpcall(f, on_error, ...))
end

-- pmnc.parallel{f, g, ...} (api/parallel.rs): functions of one request run at once, each in a
-- coroutine of its own under the request's deadline (or the call's shorter timeout); returns an
-- entry per branch and the number that failed. pmnc.parallel.any returns the entry of the first
-- branch to return and closes the others. Branches may call pmnc.parallel again; at most
-- MAX_BRANCHES are alive in one request (the Rust side counts nested calls).
local parallel_run = rust.parallel
local MAX_BRANCHES = 100
local parallel_error_mt = locked({
  __name = "pmnc.parallel.error",
  __tostring = function(e) return e.message end,
})

local function parallel_call(any, name, branches, opts)
  if not can_wait() then
    error(name .. " may only be called from a request's own code or from a branch (not from module top-level code or a coroutine created by module code)", 3)
  end
  if type(branches) ~= "table" then
    error(name .. "(branches [, options]): branches must be a table of functions, got " .. type(branches), 3)
  end
  local n = rawlen(branches)
  if n > MAX_BRANCHES then
    error(("%s: %d branches, over the limit of %d"):format(name, n, MAX_BRANCHES), 3)
  end
  for k in next, branches do
    if math_type(k) ~= "integer" or k < 1 or k > n then
      error(("%s: the branches table holds only functions at 1..%d (found the key %s; options go in the second argument)"):format(name, n, c_tostring(k)), 3)
    end
  end
  for i = 1, n do
    local f = rawget(branches, i)
    if type(f) ~= "function" then
      error(("%s: branch %d must be a function, got %s"):format(name, i, type(f)), 3)
    end
  end
  if any and n == 0 then error(name .. ": no branches", 3) end
  local timeout
  if opts ~= nil then
    if type(opts) ~= "table" then error(name .. "(branches, options): options must be a table, got " .. type(opts), 3) end
    for k, v in next, opts do
      if k ~= "timeout" then error(name .. ": unknown option " .. c_tostring(k) .. " (known: timeout)", 3) end
      if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge then
        error(name .. ": timeout must be a number of seconds above zero, got " .. c_tostring(v), 3)
      end
      timeout = v
    end
  end
  local ok, entries, failed, winner = parallel_run(run, error_mt, branches, any, timeout)
  if not ok then error(entries, 3) end
  if not any then return entries, failed end
  if winner ~= nil then
    local entry = entries[winner]
    entry.index = winner
    return entry
  end
  local parts = {}
  for i = 1, n do
    local e = entries[i]
    parts[i] = "[" .. i .. "] " .. c_tostring(e and e.message)
  end
  error(c_setmetatable({ message = name .. ": every branch failed: " .. concat(parts, "; "), errors = entries }, parallel_error_mt), 3)
end

local parallel_fields = {
  any = function(branches, opts)
    local entry = parallel_call(true, "pmnc.parallel.any", branches, opts)
    return entry
  end,
}
local parallel_api = c_setmetatable({}, {
  __index = parallel_fields,
  __newindex = function(_, k) error("pmnc.parallel is read-only (tried to set " .. c_tostring(k) .. ")", 2) end,
  __call = function(_, branches, opts)
    local entries, failed = parallel_call(false, "pmnc.parallel", branches, opts)
    return entries, failed
  end,
  __pairs = function() return next, parallel_fields, nil end,
  __metatable = false,
})
protected[parallel_api] = "pmnc.parallel"
api.parallel = parallel_api

-- ---------------------------------------------------------------------------------------------
-- The globals every module starts with. Each module gets its own copy of this table and of the
-- library tables in it, so what one module sets (a global, string.trim, _G.pmnc) stays in that
-- module; the strings' own metatable, which every module shares, is locked.
local MAX_LOAD = 1 << 20
local function module_load(env)
  -- Module code may load Lua text, never bytecode; without an env, a chunk sees the globals of
  -- the module that loaded it.
  return function(chunk, name, mode, chunk_env)
    if type(chunk) ~= "string" then
      error("load: only a string chunk is accepted (a reader function would run where it cannot be time-limited)", 2)
    end
    if #chunk > MAX_LOAD then
      error(("load: the chunk has %d bytes, over the limit of %d"):format(#chunk, MAX_LOAD), 2)
    end
    if mode ~= nil and type(mode) ~= "string" then
      error("bad argument #3 to 'load' (string expected, got " .. type(mode) .. ")", 2)
    end
    if byte(chunk, 1) == 27 then return nil, "load: binary chunks are not accepted (only Lua text)" end
    if chunk_env == nil then chunk_env = env end
    -- Text only, whatever the mode: a mode without "t" refuses it as Lua's load would.
    return c_load(chunk, name, mode ~= nil and (find(mode, "t", 1, true) and "t" or mode) or "t", chunk_env)
  end
end

local function collectgarbage(opt, ...)
  if opt == nil or opt == "count" or opt == "step" or opt == "collect" or opt == "isrunning" then
    return c_collectgarbage(opt, ...)
  end
  error("collectgarbage: option " .. c_tostring(opt) .. " is not available to modules", 2)
end

local function print(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  rust.log_info(concat(parts, "\t"))
end

local function warn(first, ...)
  if type(first) == "string" and sub(first, 1, 1) == "@" and select("#", ...) == 0 then return end
  rust.log_warn(concat({ first, ... }))
end

local getenv = rust.getenv
local os_lib = {
  clock = os.clock, date = os.date, difftime = os.difftime, time = os.time,
  getenv = function(name)
    if type(name) ~= "string" then error("bad argument #1 to 'getenv' (string expected, got " .. type(name) .. ")", 2) end
    return getenv(name)
  end,
}

local template = {
  assert = assert, error = error, getmetatable = c_getmetatable, ipairs = ipairs, next = next, pairs = pairs,
  pcall = pcall, print = print, rawequal = rawequal, rawget = rawget, rawlen = rawlen, rawset = rawset,
  select = select, setmetatable = setmetatable, tonumber = tonumber, tostring = tostring, type = type,
  xpcall = xpcall, collectgarbage = collectgarbage, warn = warn, _VERSION = _VERSION, pmnc = pmnc,
}
local libraries = { string = string, table = table, math = math, utf8 = utf8, os = os_lib, coroutine = coroutine_lib }

-- require(name): a pure-Lua library from lua_modules/ (libraries.rs), run in the requiring
-- module's environment and kept in that module's own package.loaded, so no library table is
-- shared between modules. The library files a module's top level requires are recorded, and a
-- change to one reloads that module.
local find_library = rust.find_library
local function make_require(env)
  local loaded = {
    _G = env, string = env.string, table = env.table, math = env.math, utf8 = env.utf8, os = env.os,
    coroutine = env.coroutine,
  }
  local loading = {}
  local package = { loaded = loaded, path = "lua_modules/share/lua/5.4/?.lua;lua_modules/share/lua/5.4/?/init.lua", cpath = "" }
  local function require(name)
    if type(name) ~= "string" then
      error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
    end
    local have = loaded[name]
    if have ~= nil then return have end
    if loading[name] then error("require: '" .. name .. "' requires itself (through the libraries it requires)", 2) end
    local ok, chunk, file = find_library(name, env)
    if not ok then error(chunk, 2) end
    loading[name] = true
    local done, result = pcall(chunk, name, file)
    loading[name] = nil
    if not done then error(result, 0) end
    if result == nil then result = loaded[name] end
    if result == nil then result = true end
    loaded[name] = result
    return result, file
  end
  return require, package
end

local function new_env()
  local env = {}
  for k, v in next, template do env[k] = v end
  for name, lib in next, libraries do
    local copy = {}
    for k, v in next, lib do copy[k] = v end
    env[name] = copy
  end
  env._G = env
  env.load = module_load(env)
  env.require, env.package = make_require(env)
  return env
end

-- The strings' metatable is shared by every module; its __index is the string library as this
-- prelude left it (with the pattern functions above), and no module can change it.
c_getmetatable("").__metatable = false

-- The VM's own globals are never seen by module code (each module has its own), but helpers of
-- interfaces are loaded with them: give those the same rules.
_G.setmetatable, _G.tostring, _G.pcall, _G.xpcall, _G.rawset = setmetatable, tostring, pcall, xpcall, rawset
_G.coroutine = coroutine_lib
_G.load = module_load(_G)
_G.debug, _G.dofile, _G.loadfile, _G.print, _G.warn = nil, nil, nil, print, warn
_G.collectgarbage = collectgarbage
_G.os = os_lib
_G.pmnc = pmnc
-- For interface helpers: a read-only view of a table shared by many modules, and a locked
-- metatable (see readonly and locked above).
_G.__pmnc_readonly, _G.__pmnc_locked = readonly, locked
-- The plain setmetatable, for helpers of interfaces that make tables per request (their
-- metatables are ours, never __gc): the checked one costs a call per table.
_G.__pmnc_setmetatable = c_setmetatable

return pmnc, run, resolve, error_mt, new_env
