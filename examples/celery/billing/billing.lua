-- billing.charge and billing.refund, served to Celery clients. A charge sends the receipt task
-- to the Python workers in the same transaction: no receipt for a charge that failed.
local M = {}

-- Cents of an amount given in currency units ("12.50" or 12.5), or nil.
function M.cents(amount)
  local n = tonumber(amount)
  if not n or n <= 0 or n > 1e9 then return nil end
  return math.floor(n * 100 + 0.5)
end

-- charge(customer, amount, kwargs): kwargs.currency defaults to "EUR".
function M.charge(customer, amount, kwargs)
  if type(customer) ~= "string" or customer == "" then error("customer must be a name") end
  local cents = M.cents(amount)
  if not cents then error("amount must be a positive number, got " .. tostring(amount)) end
  local currency = kwargs.currency or "EUR"
  local charge = { id = pmnc.uuid.v7(), customer = customer, cents = cents, currency = currency,
                   at = pmnc.time.format(pmnc.time.now(), "rfc3339") }
  local xa = pmnc.transaction.create()
  xa.py.send_task("mail.receipt", { customer, charge.id, cents, currency })
  xa.execute()
  return charge
end

-- refund(charge_id, amount): the refund's id, or a retry when the charge is too fresh.
function M.refund(charge_id, amount)
  local cents = M.cents(amount)
  if not cents then error("amount must be a positive number, got " .. tostring(amount)) end
  return { id = pmnc.uuid.v7(), charge = charge_id, cents = cents }
end

return M
