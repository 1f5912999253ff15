-- Handler of the interface named "http" (docs/interfaces/http.md).
local M = {}

function M.handle(request, response)
  if request.path == "/" then
    return pmnc.greeting.hello(request.query.name)
  end
  response.status = 404
  return { error = "not found", path = request.path }
end

return M
