-- The handler of the web cage's interface "http".
local M = {}

function M.handle(request, response)
  if request.path == "/" then
    return pmnc.text.greeting(pmnc.cage) .. "\n" -- text.lua comes from cages/.shared
  elseif request.path == "/work" then
    local n = math.tointeger(tonumber(request.query.n or 5))
    if n == nil or n < 0 or n > 1000 then
      response.status = 400
      return { error = "n must be a whole number from 0 to 1000" }
    end
    -- A call to another cage: the table is copied over and the result copied back.
    local result = pmnc("worker").work.handle({ n = n })
    return { cage = pmnc.cage, request = pmnc.request.id, result = result }
  elseif request.path == "/slow" then
    local s = tonumber(request.query.s or 0.5)
    if s == nil or s < 0 then
      response.status = 400
      return { error = "s must be a number of seconds, 0 or more" }
    end
    -- The worker sleeps under this request's deadline (request_timeout of the web cage).
    return pmnc("worker").work.slow(s)
  end
  response.status = 404
  return "not found: " .. request.path .. "\n"
end

return M
