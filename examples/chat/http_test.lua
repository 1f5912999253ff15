-- Run with: pmnc test examples/chat
local M = {}

function M.test_page_is_served()
  local html = pmnc.page.html()
  assert(html:find("<!doctype html>", 1, true), "the page starts as HTML")
  assert(html:find("/wait?", 1, true) and html:find("/ws?", 1, true), "the page uses both transports")
end

return M
