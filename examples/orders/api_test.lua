-- `pmnc test examples/orders`: the checks of a new order (the routes are tested over HTTP by
-- crates/pmnc/tests/example_orders.rs).
local M = {}

function M.test_a_good_order_passes_with_its_default_quantity()
  local order = pmnc.api.validate({ item = "tea" })
  assert(order.item == "tea" and order.quantity == 1)
end

function M.test_bad_orders_are_bad_requests()
  for _, body in ipairs({ "text", { quantity = 2 }, { item = "tea", quantity = 0 }, { item = "tea", quantity = 1.5 } }) do
    local ok, err = pcall(pmnc.api.validate, body)
    assert(not ok and tostring(err):find("bad request: ", 1, true), tostring(err))
  end
end

return M
