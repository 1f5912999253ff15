-- Run with: pmnc test <app folder>
local M = {}

function M.test_ping()
  assert(pmnc.jobs.ping() == "pong from CAGE")
end

return M
