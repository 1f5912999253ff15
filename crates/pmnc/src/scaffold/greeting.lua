-- Called as pmnc.greeting.hello(name) from any module of this cage.
local M = {}

function M.hello(name)
  return "Hello, " .. (name or "world") .. "!"
end

return M
