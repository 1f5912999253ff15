-- Tests of the web cage: `pmnc test examples/two-cages` runs every test_* function.
local M = {}

function M.test_greeting_comes_from_shared_text()
  assert(pmnc.text.greeting("web") == "Hello from the web cage!")
end

function M.test_work_calls_the_worker_cage()
  local result = pmnc("worker").work.handle({ n = 3 })
  assert(result.sum == 14, "1 + 4 + 9 should be 14, got " .. tostring(result.sum))
  assert(result.worked_for == "web", "the worker should see the web cage as its caller")
end

function M.test_handler_routes_work_and_refuses_bad_n()
  local response = { status = 200, headers = {} }
  local body = pmnc.http.handle({ path = "/work", query = { n = "2" } }, response)
  assert(response.status == 200 and body.result.sum == 5, "n=2 should give 1 + 4 = 5")
  body = pmnc.http.handle({ path = "/work", query = { n = "two" } }, response)
  assert(response.status == 400, "n=two should be refused with 400, got " .. response.status)
end

return M
