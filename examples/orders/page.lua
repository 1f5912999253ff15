-- The HTML page of GET /: the orders with a form for a note and one for an attachment each.
local M = {}

local function escape(s)
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }))
end

function M.html(keys)
  local rows = {}
  for _, key in ipairs(keys) do
    local o = pmnc.state.get(key)
    if o then
      local id = escape(o.id)
      local notes = {}
      for _, n in ipairs(o.notes) do notes[#notes + 1] = "<li>" .. escape(n) .. "</li>" end
      local attachment = o.attachment
        and ('<a href="/orders/' .. id .. '/attachment">' .. escape(o.attachment.filename) .. "</a>")
        or ""
      rows[#rows + 1] = table.concat({
        "<tr><td>", escape(o.item), " &times; ", escape(o.quantity), "</td><td><ul>", table.concat(notes), "</ul>",
        '<form method="post" action="/orders/', id, '/notes"><input name="text"><button>note</button></form></td>',
        "<td>", attachment,
        '<form method="post" enctype="multipart/form-data" action="/orders/', id, '/attachment">',
        '<input type="file" name="file"><button>upload</button></form></td></tr>',
      })
    end
  end
  return table.concat({
    "<!doctype html><title>orders</title><h1>Orders</h1>",
    "<p>Create one with <code>curl -d '{\"item\":\"tea\",\"quantity\":2}' localhost:8080/orders</code></p>",
    "<table>", table.concat(rows), "</table>",
  })
end

return M
