-- The orders API: one function per route. Orders live in the cage's state (SQLite, under .data/).
local M = {}

local MAX_ATTACHMENT = 1024 * 1024

local function find(id)
  return pmnc.state.get("order:" .. id)
end

-- A 404 with a JSON body, for an order that does not exist.
local function not_found(response, id)
  response.status = 404
  return { error = "no order " .. id }
end

-- Checks a new order; errors starting with "bad request: " are answered 400 with their text.
-- Public, so that api_test.lua can call it as pmnc.api.validate.
function M.validate(order)
  if type(order) ~= "table" then error("bad request: send a JSON object", 2) end
  if type(order.item) ~= "string" or order.item == "" then error("bad request: item must be a non-empty string", 2) end
  local q = order.quantity or 1
  if math.type(q) ~= "integer" or q < 1 or q > 1000 then error("bad request: quantity must be an integer 1..1000", 2) end
  return { item = order.item, quantity = q }
end

M.routes = {
  -- A page with the two forms, for trying it from a browser.
  ["GET /"] = function(request, response)
    response.headers["content-type"] = "text/html; charset=utf-8"
    return pmnc.page.html(pmnc.state.keys("order:"))
  end,

  ["GET /orders"] = function(request, response)
    local orders = {}
    for _, key in ipairs(pmnc.state.keys("order:")) do
      orders[#orders + 1] = pmnc.state.get(key)
    end
    table.sort(orders, function(a, b) return a.id < b.id end)
    response.json = pmnc.json.array(orders)
  end,

  ["POST /orders"] = function(request, response)
    local order = M.validate(request.json)     -- a body that is not JSON: 400 by itself
    order.id = pmnc.request.id               -- unique per request, so unique per order
    order.notes = pmnc.json.array()
    pmnc.state.set("order:" .. order.id, order)
    response.status = 201
    response.headers.location = "/orders/" .. order.id
    return order
  end,

  ["GET /orders/{id}"] = function(request, response)
    return find(request.params.id) or not_found(response, request.params.id)
  end,

  ["DELETE /orders/{id}"] = function(request, response)
    if not pmnc.state.delete("order:" .. request.params.id) then
      return not_found(response, request.params.id)
    end
    pmnc.state.delete("attachment:" .. request.params.id)
    response.status = 204
  end,

  -- An HTML form posts here (application/x-www-form-urlencoded); the browser is sent back.
  ["POST /orders/{id}/notes"] = function(request, response)
    local order = find(request.params.id)
    if not order then return not_found(response, request.params.id) end
    local text = request.form.text
    if not text or text == "" then error("bad request: the note is empty") end
    order.notes[#order.notes + 1] = text
    pmnc.state.set("order:" .. order.id, order)
    response.status = 303
    response.headers.location = "/"
  end,

  -- A multipart upload (a form with a file input, or curl -F): the file arrives in a temporary
  -- file that goes when the request ends, so its bytes are kept in the state.
  ["POST /orders/{id}/attachment"] = function(request, response)
    local order = find(request.params.id)
    if not order then return not_found(response, request.params.id) end
    local file = request.files[1]
    if not file then error("bad request: no file in the form") end
    if file.size > MAX_ATTACHMENT then error("bad request: attachments are limited to 1 MiB") end
    pmnc.state.set("attachment:" .. order.id, { content_type = file.content_type, data = file.read() })
    order.attachment = { filename = file.filename, size = file.size }
    pmnc.state.set("order:" .. order.id, order)
    response.status = 303
    response.headers.location = "/"
  end,

  ["GET /orders/{id}/attachment"] = function(request, response)
    local a = pmnc.state.get("attachment:" .. request.params.id)
    if not a then return not_found(response, request.params.id) end
    response.headers["content-type"] = a.content_type or "application/octet-stream"
    return a.data
  end,
}

return M
