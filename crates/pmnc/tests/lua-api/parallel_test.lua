-- Lua-level tests of pmnc.parallel (docs/lua-api.md, docs/decisions/138).
local M = {}

local function sleeper(s, v)
  return function() pmnc.sleep(s) return v end
end

function M.test_branches_wait_at_once_and_keep_the_request()
  local t0 = pmnc.clock()
  local id = pmnc.request.id
  local entries, failed = pmnc.parallel{
    sleeper(0.2, "a"),
    function() pmnc.sleep(0.2) return pmnc.request.id, pmnc.request.interface end,
    function() return end,
  }
  local took = pmnc.clock() - t0
  assert(took >= 0.2 and took < 0.35, "two sleeps of 0.2 s at once took " .. took)
  assert(failed == 0)
  assert(entries[1].ok and entries[1].value == "a" and entries[1].n == 1)
  assert(entries[2][1] == id and entries[2][2] == "test" and entries[2].n == 2, "a branch runs in its request")
  assert(entries[3].ok and entries[3].n == 0 and entries[3].value == nil)
end

function M.test_each_branch_has_its_error()
  local entries, failed = pmnc.parallel{
    function() error("first failed") end,
    function() return 42 end,
    function() error({ code = "E1" }) end,
  }
  assert(failed == 2)
  assert(not entries[1].ok and entries[1].message:find("first failed", 1, true), entries[1].message)
  assert(entries[1].error == entries[1].message, "a string error is the value raised")
  assert(entries[2].ok and entries[2].value == 42)
  assert(not entries[3].ok and entries[3].error.code == "E1", "a table error keeps its fields")
end

function M.test_any_returns_the_first_and_closes_the_rest()
  local after = false
  local closed = false
  local entry = pmnc.parallel.any{
    function()
      local guard <close> = setmetatable({}, { __close = function() closed = true end })
      pmnc.sleep(0.3)
      after = true
    end,
    sleeper(0.02, "first"),
  }
  assert(entry.value == "first" and entry.index == 2)
  assert(closed, "the loser was closed when any returned")
  pmnc.sleep(0.4)
  assert(not after, "the loser did not go on after its wait")
end

function M.test_any_raises_every_error_when_all_fail()
  local ok, e = pcall(pmnc.parallel.any, { function() error("x1", 0) end, function() error("x2", 0) end })
  assert(not ok)
  assert(tostring(e) == "pmnc.parallel.any: every branch failed: [1] x1; [2] x2", tostring(e))
  assert(#e.errors == 2 and e.errors[2].error == "x2")
end

function M.test_timeout_stops_what_is_left()
  local t0 = pmnc.clock()
  local entries, failed = pmnc.parallel({ sleeper(0.01, 1), sleeper(10, 2) }, { timeout = 0.2 })
  assert(pmnc.clock() - t0 < 1)
  assert(failed == 1 and entries[1].value == 1)
  assert(entries[2].timeout == true and entries[2].message:find("timeout of 0.2 s", 1, true), entries[2].message)
  assert(pmnc.request.remain() > 3, "the request goes on after the call's timeout")
end

function M.test_branches_may_nest()
  local entries = pmnc.parallel{
    function()
      local inner = pmnc.parallel{ sleeper(0.05, "x"), sleeper(0.05, "y") }
      return inner[1].value .. inner[2].value
    end,
  }
  assert(entries[1].value == "xy")
end

function M.test_bad_arguments()
  local function raises(needle, ...)
    local args = table.pack(...)
    local ok, e = pcall(function() local r = pmnc.parallel(table.unpack(args, 1, args.n)); return r end)
    assert(not ok, "expected an error")
    assert(tostring(e):find(needle, 1, true), "error should mention " .. needle .. ", got: " .. tostring(e))
  end
  raises("branch 1 must be a function, got number", { 1 })
  raises("branches must be a table of functions", nil)
  raises("unknown option", { function() end }, { retries = 1 })
  local branches = {}
  for i = 1, 101 do branches[i] = function() end end
  raises("101 branches, over the limit of 100", branches)
end

return M
