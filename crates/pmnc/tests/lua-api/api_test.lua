-- Lua-level tests of the pmnc API: `pmnc test crates/pmnc/tests/lua-api`.
local M = {}

local function raises(f, needle, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error")
  assert(tostring(err):find(needle, 1, true), "error should mention " .. needle .. ", got: " .. tostring(err))
end

function M.test_clock_is_monotonic_and_measures_sleeps()
  local t0 = pmnc.clock()
  assert(type(t0) == "number")
  pmnc.sleep(0.05)
  local took = pmnc.clock() - t0
  assert(took >= 0.05 and took < 2, "pmnc.sleep(0.05) took " .. took)
end

function M.test_sleep_refuses_bad_arguments()
  raises(pmnc.sleep, "seconds must be a number", "soon")
  raises(pmnc.sleep, "seconds must be zero or more", -1)
end

function M.test_json_round_trip_keeps_arrays_and_maps()
  local text = pmnc.json.encode({ a = { 1, 2, 3 }, b = "x" })
  local back = pmnc.json.decode(text)
  assert(back.b == "x" and #back.a == 3 and back.a[3] == 3)
  raises(pmnc.json.decode, "", "{not json")
end

function M.test_state_set_get_delete()
  pmnc.state.set("k", { n = 1 })
  assert(pmnc.state.get("k").n == 1)
  pmnc.state.delete("k")
  assert(pmnc.state.get("k") == nil)
end

function M.test_events_without_waiters_and_wait_timeout()
  assert(pmnc.events.publish("nobody", { x = 1 }) == 0, "nobody waits, nobody is woken")
  local t0 = pmnc.clock()
  assert(pmnc.events.wait("quiet", 0.1) == nil, "a wait with no publish times out with nil")
  assert(pmnc.clock() - t0 >= 0.1)
  raises(pmnc.events.publish, "", string.rep("t", 300), 1)
end

function M.test_request_fields()
  assert(pmnc.request.interface == "test")
  assert(type(pmnc.request.id) == "string" and #pmnc.request.id > 0)
  local left = pmnc.request.remain()
  assert(left > 0 and left <= 5, "the cage's request_timeout bounds a test, remain " .. left)
end

return M
