-- A module of cages/.shared: every cage of the app has it as pmnc.text (unless the cage has a
-- text.lua of its own, which wins). Used by web/http.lua and worker/work.lua.
local M = {}

function M.greeting(cage)
  return "Hello from the " .. cage .. " cage!"
end

-- sum_line({1, 4, 9}, 14) == "1 + 4 + 9 = 14"; an empty list gives "0 = 0".
function M.sum_line(numbers, sum)
  if #numbers == 0 then
    return "0 = " .. sum
  end
  return table.concat(numbers, " + ") .. " = " .. sum
end

return M
