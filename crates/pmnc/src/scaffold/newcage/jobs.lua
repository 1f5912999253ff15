-- A module of the CAGE cage; other cages call pmnc("CAGE").jobs.ping().
local M = {}

function M.ping()
  return "pong from " .. pmnc.cage
end

return M
