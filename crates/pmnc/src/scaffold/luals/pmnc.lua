---@meta
-- Type annotations of the pmnc API for lua-language-server (LuaLS): editors complete `pmnc.*`
-- with parameters and flag misspelt functions. Written by `pmnc new` into `.luals/`, with a
-- `.luarc.json` that points at it. The reference is docs/lua-api.md; a test keeps the two in step.

---@class pmnc.CallOptions
---@field queue string the queue of the target cage (a durable call)
---@field id? string de-duplicates: a call with an id the queue has seen is stored once
---@field expires_in? number seconds; default: the queue's expires_in
---@field expires_at? number Unix seconds
---@field max_attempts? integer failed attempts before dead letters; default: the queue's
---@field delay? number seconds before the first attempt
---@field at? number Unix seconds of the first attempt

---@class pmnc.CallStatus
---@field id string
---@field status "pending"|"running"|"failed"|"forwarded"|"done"|"dead"|"cancelled"
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

---What pmnc.parallel gives for each branch.
---@class pmnc.ParallelEntry
---@field ok boolean
---@field value any the first value the branch returned
---@field n? integer how many values it returned (at [1]..[n])
---@field error any the error value the branch raised, as raised
---@field message? string the error's text
---@field traceback? string
---@field timeout? boolean the call's timeout stopped the branch
---@field index? integer the winning branch (pmnc.parallel.any)

---Runs the functions at once, each as a coroutine of its own; an entry per branch and the number that failed.
---@class pmnc.parallel
---@overload fun(branches: (fun(): any)[], options?: {timeout?: number}): pmnc.ParallelEntry[], integer
pmnc.parallel = {}
---Runs the functions at once; the entry of the first to return, the others closed.
---@param branches (fun(): any)[]
---@param options? {timeout?: number}
---@return pmnc.ParallelEntry
function pmnc.parallel.any(branches, options) end

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

-- The helper families (docs/lua-api.md "Helper families"): errors are raised as strings.

pmnc.base64 = {}
---@class pmnc.Base64Options
---@field url? boolean URL-safe alphabet (- and _)
---@field pad? boolean trailing = when encoding (default true)
---@param data string
---@param options? pmnc.Base64Options
---@return string
function pmnc.base64.encode(data, options) end
---@param text string
---@param options? pmnc.Base64Options
---@return string
function pmnc.base64.decode(text, options) end

pmnc.hex = {}
---@param data string
---@return string
function pmnc.hex.encode(data) end
---@param text string
---@return string
function pmnc.hex.decode(text) end

pmnc.crypto = {}
---SHA-1 digest, raw bytes.
---@param data string
---@return string
function pmnc.crypto.sha1(data) end
---SHA-256 digest, raw bytes.
---@param data string
---@return string
function pmnc.crypto.sha256(data) end
---SHA-512 digest, raw bytes.
---@param data string
---@return string
function pmnc.crypto.sha512(data) end
---MD5 digest, raw bytes.
---@param data string
---@return string
function pmnc.crypto.md5(data) end
---HMAC of data under key, raw bytes.
---@param algorithm "sha1"|"sha256"|"sha512"|"md5"
---@param key string
---@param data string
---@return string
function pmnc.crypto.hmac(algorithm, key, data) end
---n bytes from the OS's CSPRNG.
---@param n integer
---@return string
function pmnc.crypto.random(n) end
---Constant-time comparison.
---@param a string
---@param b string
---@return boolean
function pmnc.crypto.equal(a, b) end
---Argon2id PHC string.
---@param password string
---@return string
function pmnc.crypto.password_hash(password) end
---@param password string
---@param hash string
---@return boolean
function pmnc.crypto.password_verify(password, hash) end

pmnc.uuid = {}
---@return string
function pmnc.uuid.v4() end
---Time-ordered UUID.
---@return string
function pmnc.uuid.v7() end

pmnc.time = {}
---Seconds since the Unix epoch (wall clock).
---@return number
function pmnc.time.now() end
---@param t number seconds since the epoch
---@param format? "rfc3339"|"http"|string strftime pattern otherwise
---@param zone? string IANA zone, default "UTC"
---@return string
function pmnc.time.format(t, format, zone) end
---@param text string
---@param format? "rfc3339"|"http"|string
---@param zone? string
---@return number
function pmnc.time.parse(text, format, zone) end

pmnc.url = {}
---@param s string
---@return string
function pmnc.url.encode(s) end
---@param text string
---@param options? {plus?: boolean}
---@return string
function pmnc.url.decode(text, options) end
---@class pmnc.Url
---@field scheme string
---@field user? string
---@field password? string
---@field host? string
---@field port? integer
---@field path string
---@field query? string
---@field fragment? string
---@field params table<string, string|string[]>
---@param url string
---@return pmnc.Url
function pmnc.url.parse(url) end
---@param t table<string, string|number|boolean|(string|number)[]>
---@return string
function pmnc.url.query(t) end

pmnc.xml = {}
---@class pmnc.XmlElement
---@field name string
---@field ns? string
---@field attrs table<string, string>
---@field children (pmnc.XmlElement|string)[]
---@field text? string
---@param text string
---@return pmnc.XmlElement
function pmnc.xml.decode(text) end
---@param element pmnc.XmlElement|table
---@param options? {declaration?: boolean}
---@return string
function pmnc.xml.encode(element, options) end

pmnc.re = {}
---@param subject string
---@param pattern string
---@param init? integer
---@return table?
function pmnc.re.match(subject, pattern, init) end
---@param subject string
---@param pattern string
---@param init? integer
---@return integer?, integer?
function pmnc.re.find(subject, pattern, init) end
---@param subject string
---@param pattern string
---@return fun(): table?
function pmnc.re.gmatch(subject, pattern) end
---@param subject string
---@param pattern string
---@param replacement string|table|fun(m: table): string?
---@param max? integer
---@return string, integer
function pmnc.re.gsub(subject, pattern, replacement, max) end
---@param subject string
---@param pattern string
---@param max? integer
---@return string[]
function pmnc.re.split(subject, pattern, max) end

pmnc.compress = {}
---@param data string
---@param level? integer 0-9
---@return string
function pmnc.compress.gzip(data, level) end
---@param data string
---@param max_size? integer default 1 MiB
---@return string
function pmnc.compress.gunzip(data, max_size) end
---zlib stream (HTTP's "deflate").
---@param data string
---@param level? integer 0-9
---@return string
function pmnc.compress.deflate(data, level) end
---@param data string
---@param max_size? integer default 1 MiB
---@return string
function pmnc.compress.inflate(data, max_size) end
---@param data string
---@param level? integer 1-19
---@return string
function pmnc.compress.zstd(data, level) end
---@param data string
---@param max_size? integer default 1 MiB
---@return string
function pmnc.compress.unzstd(data, max_size) end

pmnc.csv = {}
---@param text string
---@param options? {header?: boolean, separator?: string}
---@return table[]
function pmnc.csv.decode(text, options) end
---@param rows table[]
---@param options? {header?: string[], separator?: string}
---@return string
function pmnc.csv.encode(rows, options) end

pmnc.celery = {}
---Ends a celery task and has it run again later (Celery's self.retry); never returns.
---@param options? {countdown?: number, max_retries?: integer|false, reason?: string}
function pmnc.celery.retry(options) end

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

---The read cache of the cage's resources (docs/lua-api.md#pmnccacheinvalidate).
pmnc.cache = {}
---Drops keys (one or a list; "prefix*" for a prefix) from a resource's read cache at once.
---@param resource string
---@param keys string|string[]
function pmnc.cache.invalidate(resource, keys) end

pmnc.calls = {}
---@param id string
---@param cage? string
---@return pmnc.CallStatus?
function pmnc.calls.result(id, cage) end
---@param id string
---@param timeout? number
---@return pmnc.CallStatus?
function pmnc.calls.wait(id, timeout) end
---@param id string
---@param cage? string
---@return boolean cancelled
---@return string? status the status it was in (nil: no such call)
---@return string message
function pmnc.calls.cancel(id, cage) end
---@param message string
function pmnc.calls.fail_permanently(message) end

---Workflows of durable calls: chains, groups and chords (docs/lua-api.md#pmncworkflowchain).
pmnc.workflow = {}
---A durable call described, not stored: index it with a module and a function, then call it.
---@param cage string
---@param options table queue (required), delay, at, expires_in, expires_at, max_attempts
---@return table
function pmnc.workflow.step(cage, options) end
---@param steps userdata[]
---@param options? {id?: string, on_error?: userdata}
---@return string id
function pmnc.workflow.chain(steps, options) end
---@param steps userdata[]
---@param options? {id?: string}
---@return string id
function pmnc.workflow.group(steps, options) end
---@param steps userdata[]
---@param body userdata
---@param options? {id?: string, on_error?: userdata}
---@return string id
function pmnc.workflow.chord(steps, body, options) end
---@param id string
---@return boolean cancelled
---@return string? status
---@return string message
function pmnc.workflow.cancel(id) end
---@param id string
---@return {id: string, status: string, steps: {id: string, status: string, error?: string}[]}?
function pmnc.workflow.status(id) end

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

---@class pmnc.UploadedFile
---@field field string the form field's name
---@field filename string as the client sent it (never used as a path here)
---@field content_type? string
---@field size integer bytes
---@field path string the temporary file, deleted when the request ends
---@field read fun(): string the file's bytes

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
---@field json any the body decoded as JSON on first use (a bad body: 400 unless caught)
---@field form table<string, string> an x-www-form-urlencoded body on first use
---@field files pmnc.UploadedFile[] the files of a multipart/form-data body
---@field params table<string, string> the route's path parameters
---@field route? string the route's key, e.g. "GET /orders/{id}"
---@field tls? pmnc.HttpTls nil on a plain HTTP interface

---@class pmnc.HttpTls
---@field version string "TLSv1.3" or "TLSv1.2"
---@field cipher string
---@field alpn? string "h2" or "http/1.1"
---@field peer? pmnc.TlsPeer the verified client certificate, when one was sent

---@class pmnc.TlsPeer
---@field subject string "CN=alice, O=Example"
---@field sans string[] "DNS:...", "IP:...", "email:...", "URI:..."
---@field serial string upper-case hex
---@field not_after string "2031-01-02T00:00:00Z"

---@class pmnc.HttpResponse
---@field status integer
---@field headers table<string, string|number|(string|number)[]>
---@field body? string|table
---@field json? any sent as JSON (wins over body)
---@field stream fun(content_type?: string): pmnc.Stream
