-- Tests of the worker cage: `pmnc test examples/two-cages` runs every test_* function.
local M = {}

function M.test_handle_squares_and_sums()
  local result = pmnc.work.handle({ n = 4 })
  assert(result.sum == 30, "1 + 4 + 9 + 16 should be 30, got " .. tostring(result.sum))
  assert(result.text == "1 + 4 + 9 + 16 = 30", "got " .. tostring(result.text))
end

function M.test_handle_refuses_a_bad_task()
  local ok, message = pcall(pmnc.work.handle, { n = "many" })
  assert(not ok and message:find("task.n must be a whole number", 1, true), tostring(message))
end

function M.test_slow_sleeps()
  local before = pmnc.request.remain()
  local result = pmnc.work.slow(0.05)
  local waited = before - pmnc.request.remain()
  assert(result.slept == 0.05 and waited >= 0.04, "waited only " .. waited .. " s")
end

return M
