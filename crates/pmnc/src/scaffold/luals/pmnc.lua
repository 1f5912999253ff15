---@meta
-- Type annotations of the pmnc API for lua-language-server (LuaLS): editors complete `pmnc.*`
-- with parameters and flag misspelt functions. Written by `pmnc new` into `.luals/`, with a
-- `.luarc.json` that points at it. The reference is docs/lua-api.md; a test keeps the two in step.

---@class pmnc.CallOptions
---@field queue string the queue of the target cage (a durable call)
---@field id? string de-duplicates: a call with an id the queue has seen is stored once
---@field expires_in? number seconds; default: the queue's expires_in
---@field expires_at? number Unix seconds
---@field delay? number seconds before the first attempt
---@field at? number Unix seconds of the first attempt

---@class pmnc.CallStatus
---@field id string
---@field status "pending"|"running"|"failed"|"forwarded"|"done"|"dead"
---@field cage string
---@field attempts? integer
---@field value any
---@field values? any[]
---@field error? string

---@class pmnc.TransactionError
---@field resource? string
---@field participant? integer
---@field recoverable boolean
---@field code? string
---@field message string

---@class pmnc.TransactionOptions
---@field accept? fun(outcomes: {ok: boolean, value: any, error: pmnc.TransactionError}[]): boolean
---@field sync_commit? boolean

---@class pmnc.Transaction
---@field [string] table a resource: xa.NAME.METHOD(...) records a participant
local Transaction = {}

---Runs every recorded participant in parallel, then commits or rolls back all of them.
---@return any ... one result per participant, then one call id per durable call
function Transaction.execute() end

---A durable call stored in the same commit as the transaction (options need a queue).
---@param cage string
---@param options pmnc.CallOptions
---@return table
function Transaction.pmnc(cage, options) end

---@class pmnc.request
---@field id string
---@field interface string
---@field cage string
---@field caller? string
---@field deadline number
---@field parameters any
---@field call_id? string

---@class pmnc.api
---@overload fun(cage: string, options?: pmnc.CallOptions): table
---@field cage string this cage's name
---@field request pmnc.request
---@field [string] table a module of this cage: pmnc.MODULE.FUNCTION(...)
pmnc = {}

pmnc.log = {}
---@param ... any
function pmnc.log.debug(...) end
---@param ... any
function pmnc.log.info(...) end
---@param ... any
function pmnc.log.warn(...) end
---@param ... any
function pmnc.log.error(...) end

---Waits `seconds` (bounded by the request's deadline).
---@param seconds number
function pmnc.sleep(seconds) end

---Monotonic seconds, for measuring durations.
---@return number
function pmnc.clock() end

pmnc.json = {}
---@param value any
---@return string
function pmnc.json.encode(value) end
---@param text string
---@return any
function pmnc.json.decode(text) end
---JSON null (a value that stays null in arrays and maps).
pmnc.json.null = nil
---Marks a table as an array, so an empty one encodes as [].
---@param t? table
---@return table
function pmnc.json.array(t) end

pmnc.request = {}
---Seconds left before the request's deadline.
---@return number
function pmnc.request.remain() end

pmnc.transaction = {}
---@param options? pmnc.TransactionOptions
---@return pmnc.Transaction
function pmnc.transaction.create(options) end

pmnc.state = {}
---@param key string
---@return any
function pmnc.state.get(key) end
---@param key string
---@param value any
function pmnc.state.set(key, value) end
---@param key string
---@return boolean existed
function pmnc.state.delete(key) end
---@param prefix string
---@return string[]
function pmnc.state.keys(prefix) end

pmnc.calls = {}
---@param id string
---@param cage? string
---@return pmnc.CallStatus?
function pmnc.calls.result(id, cage) end
---@param id string
---@param timeout? number
---@return pmnc.CallStatus?
function pmnc.calls.wait(id, timeout) end

pmnc.events = {}
---@param topic string
---@param value any
---@param cage? string another cage's topic
---@return integer woken waiters woken in this process
function pmnc.events.publish(topic, value, cage) end
---@param topic string
---@param timeout? number
---@return any
function pmnc.events.wait(topic, timeout) end
---@param topic? string
---@return table
function pmnc.events.stats(topic) end

---Loads a pure-Lua library from lua_modules/.
---@param name string
---@return any
function require(name) end

---@class pmnc.Stream
local Stream = {}
---@param chunk string
function Stream.send(chunk) end
---@param event {id?: string, event?: string, data?: any, retry?: integer, comment?: string}
function Stream.event(event) end

---@class pmnc.WebSocket
local WebSocket = {}
---@param timeout? number
---@param topic? string
---@return string?, string?
function WebSocket.receive(timeout, topic) end
---@param data string|table
---@param kind? "text"|"binary"
function WebSocket.send(data, kind) end
---@param code? integer
---@param reason? string
function WebSocket.close(code, reason) end

---@class pmnc.HttpRequest
---@field method string
---@field path string
---@field uri string
---@field query table<string, string>
---@field headers table<string, string>
---@field body string
---@field remote_addr string
---@field version string
---@field websocket boolean
---@field upgrade? fun(): pmnc.WebSocket

---@class pmnc.HttpResponse
---@field status integer
---@field headers table<string, string|number|(string|number)[]>
---@field body? string|table
---@field stream fun(content_type?: string): pmnc.Stream
