-- The bed's work. Every attempt appends a line when it starts (S) and when it ends (E) to this
-- copy's effects/ran.log: "S call_id delivery unix_seconds". The file resource appends with
-- O_APPEND and syncs before the call goes on, so the log is the call's side effect, outside
-- the queue's bookkeeping: the bed counts calls lost (no E line anywhere) and calls run twice
-- (two E lines) from the three copies' logs, and which copy a call was running on when that
-- copy was killed (an S line with no E line after it).
local M = {}

local function note(what)
  local line = ("%s %s %d %.6f\n"):format(what, pmnc.request.call_id, pmnc.request.parameters.delivery, pmnc.time.now())
  pmnc.transaction.effects.append("ran.log", line)
end

-- Call i of the bed: takes `ms` milliseconds between its two notes, returns i.
function M.job(i, ms)
  note("S")
  if ms and ms > 0 then pmnc.sleep(ms / 1000) end
  note("E")
  return i
end

-- Call i of the throughput bench (crates/pmnc/tests/queue_bed.rs): one state write, committed
-- with the call's end in this copy's state file; no log.
function M.tally(i)
  pmnc.state.set("n:" .. i, true)
  return i
end

return M
