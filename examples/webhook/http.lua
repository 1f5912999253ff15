-- Receives signed JSON events: POST /hook with `X-Signature: sha256=<hex of HMAC-SHA256 of the
-- body under the shared secret>`.
local fieldcheck = require("fieldcheck")   -- lua_modules/share/lua/5.4/fieldcheck.lua

local M = {}

local SECRET = os.getenv("WEBHOOK_SECRET") or "development-secret"

local EVENT = { id = "string", type = "string", amount = "number" }

function M.signature(body)
  return "sha256=" .. pmnc.hex.encode(pmnc.crypto.hmac("sha256", SECRET, body))
end

function M.handle(request, response)
  if request.method ~= "POST" or request.path ~= "/hook" then
    response.status = 404
    return { error = "POST /hook" }
  end
  local given = request.headers["x-signature"] or ""
  -- Constant time, so the time of a refusal tells nothing about the right signature.
  if not pmnc.crypto.equal(given, M.signature(request.body)) then
    response.status = 401
    return { error = "bad signature" }
  end
  local ok, event = pcall(pmnc.json.decode, request.body)
  if not ok or type(event) ~= "table" then
    response.status = 400
    return { error = "the body is not a JSON object" }
  end
  local valid, problem = fieldcheck.check(event, EVENT)
  if not valid then
    response.status = 422
    return { error = problem }
  end
  pmnc.log.info("event", event.id, event.type, event.amount)
  return {
    received = event.id,
    receipt = pmnc.uuid.v7(),
    at = pmnc.time.format(pmnc.time.now(), "rfc3339"),
  }
end

return M
