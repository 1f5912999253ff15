-- The chat page: plain HTML and JavaScript, no build step. ?transport=ws uses the WebSocket,
-- else long-polls /wait.
local M = {}

local HTML = [==[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>chat</title>
<style>
  body { font-family: sans-serif; max-width: 40em; margin: 2em auto; }
  #log { list-style: none; padding: 0; border: 1px solid #ccc; min-height: 12em; }
  #log li { padding: 0.2em 0.5em; }
  #log b { margin-right: 0.5em; }
  form { display: flex; gap: 0.5em; margin-top: 0.5em; }
  #text { flex: 1; }
</style>
</head>
<body>
<h1>chat <small id="where"></small></h1>
<ul id="log"></ul>
<form id="form">
  <input id="name" placeholder="name" size="10">
  <input id="text" placeholder="message" autocomplete="off">
  <button id="send">send</button>
</form>
<p id="status">connecting</p>
<script>
const params = new URLSearchParams(location.search);
const room = params.get("room") || "lobby";
const transport = params.get("transport") === "ws" ? "ws" : "long-poll";
const q = "room=" + encodeURIComponent(room);
document.getElementById("where").textContent = room + " (" + transport + ")";
const log = document.getElementById("log");
const status = document.getElementById("status");

function show(m) {
  const li = document.createElement("li");
  const who = document.createElement("b");
  who.textContent = m.name;
  li.appendChild(who);
  li.appendChild(document.createTextNode(m.text));
  log.appendChild(li);
}

let socket = null;
async function longPoll() {
  status.textContent = "waiting";
  for (;;) {
    try {
      const r = await fetch("/wait?" + q);
      if (r.status === 200) show(await r.json());
      else if (r.status !== 204) await new Promise(ok => setTimeout(ok, 1000));
    } catch (e) {
      status.textContent = "reconnecting";
      await new Promise(ok => setTimeout(ok, 1000));
      status.textContent = "waiting";
    }
  }
}

function webSocket() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(proto + "//" + location.host + "/ws?" + q);
  socket.onopen = () => { status.textContent = "connected"; };
  socket.onmessage = e => show(JSON.parse(e.data));
  socket.onclose = () => { status.textContent = "reconnecting"; setTimeout(webSocket, 1000); };
}

document.getElementById("form").addEventListener("submit", async e => {
  e.preventDefault();
  const input = document.getElementById("text");
  const m = { name: document.getElementById("name").value || "anonymous", text: input.value };
  if (!m.text) return;
  input.value = "";
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(m));
  else await fetch("/send?" + q, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(m) });
});

if (transport === "ws") webSocket(); else longPoll();
</script>
</body>
</html>
]==]

function M.html()
  return HTML
end

return M
