-- Run with: pmnc test APP
local M = {}

function M.test_hello()
  assert(pmnc.greeting.hello("Ann") == "Hello, Ann!")
  assert(pmnc.greeting.hello() == "Hello, world!")
end

return M
