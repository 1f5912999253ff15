local M = {}
-- Counts how often call i took effect on the state; returns i * 2 and its call id.
function M.count(i)
  local k = "n:" .. i
  pmnc.state.set(k, (pmnc.state.get(k) or 0) + 1)
  pmnc.state.set("id:" .. i, pmnc.request.call_id)
  return i * 2
end
-- Writes to the state, then fails: the write must never show.
function M.fail(i)
  pmnc.state.set("failed:" .. i, true)
  error("always fails " .. i)
end
function M.slow(i)
  pmnc.sleep(0.002)
  return M.count(i)
end
-- Takes a while, so that a caller waiting for it really waits.
function M.nap(i)
  pmnc.sleep(0.3)
  return M.count(i)
end
function M.ping() return "pong" end
-- Waits for an event on `topic` of this cage (published by another cage) and returns it.
function M.await(topic)
  return pmnc.events.wait(topic, 10)
end
return M
