-- One order per message: stored in PostgreSQL and confirmed on MQTT topic orders/<id>/accepted,
-- both or neither (docs/interfaces/amqp.md, docs/resources/postgresql.md, docs/resources/mqtt.md).
local M = {}

local SCHEMA = [[
create table if not exists example_orders (
  id text primary key,
  customer text not null,
  total numeric(12, 2) not null,
  received_at timestamptz not null default now()
)]]

-- Checks what the message says before anything is written; an error here fails the attempt.
local function parse(body)
  local ok, order = pcall(pmnc.json.decode, body)
  if not ok or type(order) ~= "table" then error("not a JSON order: " .. tostring(body):sub(1, 80)) end
  if type(order.id) ~= "string" or not order.id:match("^[%w%-]+$") then error("order.id must be letters, digits and -") end
  if type(order.customer) ~= "string" or order.customer == "" then error("order " .. order.id .. ": no customer") end
  if type(order.total) ~= "number" or order.total < 0 then error("order " .. order.id .. ": total must be a number >= 0") end
  return order
end

-- The table is made once per worker, in a transaction of its own: the calls of one transaction
-- run in parallel, so it cannot come first inside the order's.
local schema_ready = false

function M.handle(message)
  local order = parse(message.body)
  if not schema_ready then
    pmnc.transaction.db.execute(SCHEMA)
    schema_ready = true
  end
  local xa = pmnc.transaction.create()
  -- A redelivered order (the broker lost our ack) must not be stored twice.
  xa.db.execute("insert into example_orders (id, customer, total) values ($1, $2, $3) on conflict (id) do nothing",
    order.id, order.customer, string.format("%.2f", order.total))
  xa.mq.publish("orders/" .. order.id .. "/accepted",
    pmnc.json.encode({ id = order.id, total = order.total, attempt = message.attempt }), { qos = 1 })
  xa.execute()    -- both committed, or neither; then the message is acknowledged
end

return M
