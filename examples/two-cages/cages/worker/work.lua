-- Work done for other cages: pmnc("worker").work.handle({ n = 5 }) from the web cage.
local M = {}

-- handle(task): the squares of 1..task.n and their sum, with a line in the log.
function M.handle(task)
  local n = type(task) == "table" and math.tointeger(task.n)
  if not n or n < 0 then
    error("task.n must be a whole number, 0 or more", 2)
  end
  local squares = pmnc.json.array() -- stays a JSON array even when empty (n = 0)
  local sum = 0
  for i = 1, n do
    squares[i] = i * i
    sum = sum + i * i
  end
  pmnc.log.info("squared", n, "number(s) for cage", pmnc.request.caller, "sum", sum)
  return {
    n = n,
    squares = squares,
    sum = sum,
    text = pmnc.text.sum_line(squares, sum), -- text.lua comes from cages/.shared
    worked_for = pmnc.request.caller,
  }
end

-- slow(seconds): waits without holding the worker thread (never past the caller's deadline).
function M.slow(seconds)
  pmnc.log.info("sleeping", seconds, "s for cage", pmnc.request.caller)
  pmnc.sleep(seconds)
  return { slept = seconds, remain = pmnc.request.remain() }
end

return M
