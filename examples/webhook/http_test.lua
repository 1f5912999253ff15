local M = {}

function M.test_signature_is_hmac_sha256_hex()
  -- RFC 4231 test case 2 with the key replaced: only the shape is fixed here.
  local s = pmnc.http.signature("{}")
  assert(s:match("^sha256=%x+$") and #s == 7 + 64, s)
end

return M
