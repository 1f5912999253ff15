local M = {}

function M.test_double()
  assert(pmnc.util.double(21) == 42)
end

return M
