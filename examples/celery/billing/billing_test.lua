local M = {}

function M.test_amounts_become_cents()
  assert(pmnc.billing.cents("12.50") == 1250)
  assert(pmnc.billing.cents(0.1) == 10)
  assert(pmnc.billing.cents(-1) == nil and pmnc.billing.cents("x") == nil)
end

function M.test_a_bad_amount_is_an_error()
  local ok, e = pcall(pmnc.billing.refund, "c1", "ten")
  assert(not ok and tostring(e):find("amount must be a positive number", 1, true), tostring(e))
end

return M
