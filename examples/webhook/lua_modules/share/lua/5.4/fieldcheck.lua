-- fieldcheck: checks that a table has fields of the given Lua types. A pure-Lua library as
-- `luarocks --tree lua_modules --lua-version 5.4 install NAME` would place it.
local fieldcheck = { _VERSION = "0.1" }

--- ok, or nil and a message naming the first field that is missing or of the wrong type.
function fieldcheck.check(t, schema)
  local names = {}
  for name in pairs(schema) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local want, got = schema[name], type(t[name])
    if got ~= want then
      return nil, string.format("field %s: want %s, got %s", name, want, got)
    end
  end
  return true
end

return fieldcheck
