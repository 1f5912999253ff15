-- The handler of the interface "http": the page, /send, the /wait long-poll and the /ws
-- WebSocket. Rooms are event topics "room:NAME"; a message is published to whoever waits on the
-- room at that moment (on any worker thread).
local M = {}

local function room_of(request)
  local room = request.query.room or "lobby"
  if #room == 0 or #room > 64 or room:find("[^%w_%-]") then
    return nil
  end
  return room
end

-- A message as the clients see it; nil when the input is not one.
local function message(name, text)
  if type(text) ~= "string" or #text == 0 or #text > 2000 then return nil end
  if type(name) ~= "string" or #name == 0 then name = "anonymous" end
  return { name = name:sub(1, 40), text = text, time = os.time() }
end

local function bad(response, text)
  response.status = 400
  return text .. "\n"
end

function M.handle(request, response)
  local path = request.path
  if path == "/" then
    response.headers["content-type"] = "text/html; charset=utf-8"
    return pmnc.page.html()
  end
  local room = room_of(request)
  if room == nil then return bad(response, "room: 1-64 letters, digits, _ or -") end
  local topic = "room:" .. room

  if path == "/send" and request.method == "POST" then
    local ok, body = pcall(pmnc.json.decode, request.body)
    if not ok or type(body) ~= "table" then return bad(response, "send a JSON object {name, text}") end
    local m = message(body.name, body.text)
    if m == nil then return bad(response, "text: 1-2000 bytes") end
    return { delivered = pmnc.events.publish(topic, m) }

  elseif path == "/wait" then
    local timeout = math.min(tonumber(request.query.timeout) or 25, 55)
    local m = pmnc.events.wait(topic, timeout)
    if m == nil then
      response.status = 204
      return ""
    end
    return m

  elseif path == "/ws" then
    if not request.websocket then return bad(response, "/ws is a WebSocket endpoint") end
    local ws = request.upgrade()
    while true do
      -- A message from this client, or one published to the room by anybody.
      local data, kind = ws.receive(60, topic)
      if kind == "closed" then return end
      if kind == "event" then
        ws.send(pmnc.json.encode(data))
      elseif kind == "text" then
        local ok, body = pcall(pmnc.json.decode, data)
        local m = ok and type(body) == "table" and message(body.name, body.text)
        if m then pmnc.events.publish(topic, m) end
      end
    end

  elseif path == "/stats" then
    local s = pmnc.events.stats(topic)
    return { room = room, waiting = s.topic_waiters, waiting_in_cage = s.waiters }
  end
  response.status = 404
  return "not found: " .. path .. "\n"
end

return M
