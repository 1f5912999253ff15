// The monitor page: polls /api/series and /status and redraws graphs and tables in place.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (p) => token ? p + (p.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : p;
const COLORS = ["#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b", "#6d4c41", "#3949ab"];
let windowName = "5m";
const charts = new Map();

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function cageSection(cage) {
  let s = document.getElementById("cage-" + cage);
  if (!s) {
    s = el("section", { class: "cage", id: "cage-" + cage },
      el("h2", {}, "cage " + cage),
      el("div", { class: "summary" }),
      el("div", { class: "grid" }));
    document.getElementById("cages").append(s);
  }
  return s;
}

// What to draw: each chart is a title and a list of [series name, label].
function chartSpecs(names) {
  const specs = new Map();
  const add = (id, parent, title, key, label) => {
    if (!specs.has(id)) specs.set(id, { id, parent, title, series: [] });
    specs.get(id).series.push([key, label]);
  };
  for (const name of names) {
    const p = name.split("/");
    if (p[0] === "interface" && p.length === 4) {
      const [, cage, iface, m] = p;
      if (["requests_per_s", "errors_per_s", "in_flight"].includes(m)) add(`i/${cage}/${iface}/t`, cage, `interface ${iface}: requests/s, errors/s, in flight`, name, m);
      else add(`i/${cage}/${iface}/l`, cage, `interface ${iface}: latency (ms)`, name, m.replace("_ms", ""));
    } else if (p[0] === "resource" && p.length === 4) {
      const [, cage, res, m] = p;
      if (["calls_per_s", "errors_per_s"].includes(m)) add(`r/${cage}/${res}/t`, cage, `resource ${res}: calls/s, errors/s`, name, m);
      else if (["in_use", "idle", "waiting"].includes(m)) add(`r/${cage}/${res}/p`, cage, `resource ${res}: pool`, name, m);
      else add(`r/${cage}/${res}/l`, cage, `resource ${res}: latency (ms)`, name, m.replace("_ms", ""));
    } else if (p[0] === "vm" && p.length === 4) {
      add(`vm/${p[1]}`, p[1], "Lua memory per VM (MiB)", name, p[2]);
    } else if (p[0] === "gauge") {
      add(`g/${p[1]}`, null, p[1], name, p.slice(2).join("/") || p[1]);
    }
  }
  const order = ["requests_per_s", "calls_per_s", "errors_per_s", "in_flight", "in_use", "idle", "waiting", "p50", "p90", "p99"];
  const rank = (label) => { const i = order.indexOf(label); return i < 0 ? order.length : i; };
  for (const spec of specs.values()) spec.series.sort((a, b) => rank(a[1]) - rank(b[1]) || a[1].localeCompare(b[1]));
  return specs;
}

function draw(data) {
  const times = data.time;
  const specs = chartSpecs(Object.keys(data.series));
  let drawn = 0;
  for (const spec of specs.values()) {
    const columns = [times, ...spec.series.map(([key]) => data.series[key])];
    let c = charts.get(spec.id);
    if (!c || c.count !== spec.series.length) {
      if (c) c.box.remove();
      const box = el("div", { class: "chart", "data-chart": spec.id });
      const grid = spec.parent === null ? document.getElementById("gauge-charts") : cageSection(spec.parent).querySelector(".grid");
      if (spec.parent === null) document.getElementById("gauges-section").hidden = false;
      grid.append(box);
      const opts = {
        title: spec.title, width: 420, height: 200,
        scales: { x: { time: true } },
        series: [{}, ...spec.series.map(([, label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
        axes: [{}, { size: 60 }],
      };
      c = { box, count: spec.series.length, plot: new uPlot(opts, columns, box) };
      charts.set(spec.id, c);
    } else {
      c.plot.setData(columns);
    }
    c.box.setAttribute("data-points", String(times.length));
    drawn++;
  }
  document.body.setAttribute("data-charts", String(drawn));
  document.body.setAttribute("data-samples", String(times.length));
}

const fmt = (v, digits) => v == null ? "" : Number(v).toFixed(digits);
const ago = (t) => new Date(t * 1000).toLocaleTimeString();

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
}

function showStatus(st) {
  document.getElementById("process").textContent = `pid ${st.pid}, version ${st.version}, up ${Math.round(st.uptime_seconds)} s`;
  for (const cage of st.cages) {
    const summary = cageSection(cage.name).querySelector(".summary");
    const ifaces = cage.interfaces.map((i) => el("tr", { "data-interface": `${cage.name}/${i.name}` },
      el("td", {}, i.name), el("td", { class: "requests" }, i.requests), el("td", { class: "errors" }, i.errors),
      el("td", { class: "timeouts" }, i.timeouts), el("td", { class: "in_flight" }, i.in_flight),
      el("td", {}, fmt(i.requests_per_s, 1)), el("td", {}, fmt(i.errors_per_s, 1)),
      el("td", {}, fmt(i.p50_ms, 2)), el("td", {}, fmt(i.p90_ms, 2)), el("td", {}, fmt(i.p99_ms, 2)),
      // A message interface's broker figures; other interfaces have none.
      el("td", { class: "messages" }, i.messages ? Object.entries(i.messages).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(", ") : "")));
    const res = cage.resources.map((r) => el("tr", { "data-resource": `${cage.name}/${r.name}` },
      el("td", {}, r.name), el("td", { class: "calls" }, r.calls), el("td", { class: "errors" }, r.errors),
      el("td", {}, r.in_use), el("td", {}, r.idle), el("td", {}, r.waiting), el("td", {}, r.connect_failures),
      el("td", {}, fmt(r.p50_ms, 2)), el("td", {}, fmt(r.p99_ms, 2))));
    const broken = cage.broken_modules.map((b) => el("tr", {}, el("td", { class: "text module_error" }, b.module), el("td", { class: "message" }, b.message)));
    summary.replaceChildren(
      el("div", {}, `Lua memory ${fmt(cage.lua_memory_bytes / 1048576, 2)} MiB over ${cage.vms.length} VM(s); ${cage.reloads} reload(s), ${cage.module_errors} module load error(s)`),
      table(["interface", "requests", "errors", "timeouts", "in flight", "req/s", "err/s", "p50 ms", "p90 ms", "p99 ms", "messages"], ifaces),
      res.length ? table(["resource", "calls", "errors", "in use", "idle", "waiting", "connect failures", "p50 ms", "p99 ms"], res) : "",
      broken.length ? table(["broken module", "error (the previous version keeps running)"], broken) : "");
  }
  const cl = document.getElementById("cluster-section");
  cl.hidden = !st.cluster;
  if (st.cluster) {
    document.querySelector("#cluster tbody").replaceChildren(...st.cluster.map((i) => el("tr", { "data-instance": i.instance },
      el("td", {}, i.cage), el("td", {}, i.instance), el("td", {}, i.host), el("td", {}, i.pid), el("td", {}, i.version),
      el("td", {}, Math.round(i.uptime_seconds) + " s"), el("td", { class: i.up ? "up" : "down" }, i.up ? "up" : "down"),
      el("td", {}, i.load), el("td", {}, i.monitor_url ? el("a", { href: i.monitor_url }, "page") : ""))));
  }
  // Clustered queues: the stream's figures once per queue, then a row per copy of the flock.
  const cq = st.clustered_queues || [];
  document.getElementById("clustered-section").hidden = cq.length === 0;
  document.querySelector("#clustered tbody").replaceChildren(...cq.flatMap((q) => {
    const copies = q.copies.length ? q.copies : [null];
    return copies.map((c, i) => el("tr", { "data-queue": `${q.cage}/${q.queue}`, "data-copy": c ? c.instance : "" },
      el("td", {}, i === 0 ? q.cage : ""), el("td", {}, i === 0 ? q.queue : ""),
      el("td", { class: "waiting" }, i === 0 ? q.waiting : ""), el("td", { class: "held" }, i === 0 ? q.held : ""),
      el("td", {}, i === 0 && q.oldest_age_seconds != null ? q.oldest_age_seconds + " s" : ""),
      el("td", {}, i === 0 ? q.redelivered : ""), el("td", {}, i === 0 ? q.dead : ""),
      el("td", {}, c ? c.instance + (c.this ? " (this)" : "") : ""), el("td", {}, c ? c.host : ""), el("td", {}, c ? c.pid : ""),
      el("td", { class: c && c.up ? "up" : "down" }, c ? (c.up ? "up" : "down") : ""), el("td", { class: "running" }, c ? c.running : "")));
  }));
  const wf = st.workflows || [];
  document.getElementById("workflows-section").hidden = wf.length === 0;
  document.querySelector("#workflows tbody").replaceChildren(...wf.map((w) => el("tr", { "data-workflow": w.id },
    el("td", {}, ago(w.started)), el("td", {}, w.cage), el("td", {}, w.id), el("td", {}, w.kind),
    el("td", { class: w.status }, w.status), el("td", {}, w.steps_total != null ? `${w.steps_done} / ${w.steps_total}` : w.steps_done))));
  document.querySelector("#alerts tbody").replaceChildren(...st.alerts.map((a) => el("tr", {},
    el("td", {}, a.name), el("td", {}, a.kind), el("td", {}, a.cage || "any"), el("td", {}, a.threshold),
    el("td", { class: a.active ? "firing" : "" }, a.active ? "holding since " + ago(a.since) : "clear"), el("td", {}, a.fired), el("td", {}, a.target))));
  const target = decodeURIComponent(location.hash.replace(/^#request-/, ""));
  document.querySelector("#events tbody").replaceChildren(...st.events.map((e) => el("tr", { class: e.request_id && e.request_id === target ? "target" : "", id: e.request_id ? "request-" + e.request_id : "" },
    el("td", {}, ago(e.time)), el("td", { class: "text " + e.kind }, e.kind.replace("_", " ")), el("td", {}, e.cage), el("td", {}, e.subject),
    el("td", {}, e.request_id ? el("a", { href: "#request-" + e.request_id }, e.request_id) : ""), el("td", { class: "message" }, e.message))));
}

// The window's columns, kept here: the whole window is fetched once, then only newer samples.
let cache = null;

async function fetchSeries() {
  const fresh = !cache || cache.window !== windowName || cache.time.length === 0;
  const since = fresh ? "" : "&since=" + cache.time[cache.time.length - 1];
  const r = await fetch(withToken("api/series?window=" + windowName + since));
  if (!r.ok) throw new Error("series: HTTP " + r.status);
  const d = await r.json();
  if (fresh) {
    cache = { window: windowName, time: d.time, series: d.series };
    return cache;
  }
  const before = cache.time.length;
  for (const key of Object.keys(d.series)) {
    if (!cache.series[key]) cache.series[key] = new Array(before).fill(null);
  }
  for (const [key, column] of Object.entries(cache.series)) {
    column.push(...(d.series[key] || new Array(d.time.length).fill(null)));
  }
  cache.time.push(...d.time);
  const extra = cache.time.length - d.size;
  if (extra > 0) {
    cache.time.splice(0, extra);
    for (const column of Object.values(cache.series)) column.splice(0, extra);
  }
  return cache;
}

async function tick() {
  try {
    const [series, status] = await Promise.all([
      fetchSeries(),
      fetch(withToken("status")).then((r) => r.ok ? r.json() : Promise.reject(new Error("status: HTTP " + r.status))),
    ]);
    draw(series);
    showStatus(status);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e);
  }
}

for (const [id, name] of [["w5m", "5m"], ["w1h", "1h"]]) {
  document.getElementById(id).addEventListener("click", () => {
    windowName = name;
    document.getElementById("w5m").className = name === "5m" ? "on" : "";
    document.getElementById("w1h").className = name === "1h" ? "on" : "";
    tick();
  });
}
tick();
setInterval(tick, 1000);
