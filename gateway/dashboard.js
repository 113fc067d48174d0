"use strict";
// The page's loop: /mesh/status every second (the mesh now: topology and tables) and
// /mesh/history for the samples and events it has not seen (the charts). Every value
// shown comes from the mesh and is untrusted: it is only ever set as text (textContent,
// setAttribute), never parsed as HTML.
const REFRESH_MS = 1000;
const TIMEOUT_MS = 3000;
const EVENTS_LISTED = 12;
const recorded = {seq: 0, samples: [], events: [], window: 900};

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fill(tbody, rows, columns, emptyText) {
  if (rows.length === 0) {
    const td = el("td", emptyText, "empty");
    td.colSpan = columns;
    const tr = el("tr");
    tr.append(td);
    tbody.replaceChildren(tr);
  } else {
    tbody.replaceChildren(...rows);
  }
}

function nodeRow(n) {
  const tr = el("tr");
  tr.dataset.node = n.node_id;
  tr.dataset.workers = n.workers;
  const models = el("td");
  for (const m of n.models) {
    const line = el("div", m.model_id);
    if (m.tiers.length) line.append(` (${m.tiers.join(", ")})`);
    if (m.engine === "synthetic") line.append(" [synthetic]");
    line.append(` · queue ${m.queue}`);
    models.append(line);
  }
  const memory = n.mem_total ? `${gib(n.mem_free)} / ${gib(n.mem_total)} GiB` : "—";
  const heard = n.heartbeat_age_s === null ? "—" : `${ago(n.heartbeat_age_s)} ago`;
  tr.append(el("td", n.node_id), el("td", n.role, n.role), models,
            el("td", n.workers, "num"), el("td", `${n.slots_in_use} / ${n.slots_total}`, "num"),
            el("td", memory, "num"), el("td", heard, "num"));
  return tr;
}

function tierRow(t) {
  const tr = el("tr");
  tr.dataset.tier = t.tier;
  const model = el("td", t.model);
  if (t.ambiguous.length) {
    tr.dataset.ambiguous = t.ambiguous.join(",");
    const others = t.ambiguous.filter((m) => m !== t.model).join(", ");
    model.append(el("div", `ambiguous: also served by ${others}; only ${t.model} answers. ` +
                           "Give one of them another tier", "ambiguous"));
  }
  tr.append(el("td", t.tier), model, el("td", t.nodes.join(", ")), el("td", t.queued, "num"));
  return tr;
}

function routeRow(r) {
  const tr = el("tr");
  tr.dataset.job = r.job_id;
  const candidates = el("td");
  for (const c of r.candidates || []) {
    const chosen = c.worker_id === r.worker_id;
    const cached = c.cached ? `, cached ${c.cached}` : "";
    candidates.append(el("div", `${c.worker_id} (${c.score}${cached})`,
                         chosen ? "chosen" : ""));
  }
  const choice = r.worker_id ? `${r.node_id} / ${r.worker_id}` : "—";
  const wait = r.queue_wait_ms === undefined ? "—" : `${r.queue_wait_ms} ms`;
  // What the worker's prompt cache served, by its RELEASE (known once the job went well):
  // set beside the candidates' predicted "cached" characters, it shows a miss.
  const prompt = (r.reused || 0) + (r.computed || 0);
  const fromCache = prompt ? `${r.reused} of ${prompt}` : "—";
  const job = el("td");
  job.append(el("code", String(r.job_id).slice(0, 8)));
  job.title = r.job_id;
  tr.append(el("td", clock(r.time), "num"), job, el("td", r.model), candidates,
            el("td", choice), el("td", wait, "num"), el("td", fromCache, "num"),
            el("td", r.retries, "num"),
            el("td", r.outcome, r.outcome));
  return tr;
}

function setState(text, down) {
  const state = document.getElementById("state");
  state.textContent = text;
  state.className = down ? "down" : "";
}

let lastView = null;

function render(view) {
  setState(view.up ? "live" : `broker unreachable: ${view.error}`, !view.up);
  const coord = view.coordinator;
  document.getElementById("coordinator").textContent =
    coord ? (coord.node_id || coord.endpoint || "none") : "?";
  document.getElementById("epoch").textContent = coord ? coord.epoch : "?";
  document.getElementById("gateway").textContent =
    `${view.gateway.node_id} → broker ${view.gateway.broker}`;
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  if (!view.up) {  // keep the last known picture on screen, greyed
    if (lastView) drawTopology(document.getElementById("topology"), lastView, true);
    return;
  }
  lastView = view;
  drawTopology(document.getElementById("topology"), view, false);
  fill(document.querySelector("#nodes tbody"), view.nodes.map(nodeRow), 7, "no live nodes");
  fill(document.querySelector("#tiers tbody"), view.tiers.map(tierRow), 4, "no tiers served");
  fill(document.querySelector("#routes tbody"), view.routes.map(routeRow), 9,
       "no requests routed yet");
}

function listEvents(events) {
  const list = document.getElementById("events");
  const recent = events.slice(-EVENTS_LISTED).reverse();
  if (!recent.length) return;
  list.replaceChildren(...recent.map((e) => {
    const li = el("li", null, eventClass(e.kind));
    li.dataset.kind = e.kind;
    const when = el("time", clock(e.time));
    li.append(when, `${e.kind.replaceAll("_", " ")}: ${e.text}`);
    return li;
  }));
}

// Take the samples and events newer than the last seen; a gateway that restarted
// (its sequence went back) is read again from the start.
function remember(answer) {
  if (answer.seq < recorded.seq) {
    recorded.seq = 0;
    recorded.samples = [];
    recorded.events = [];
    return false;
  }
  recorded.window = answer.window_s;
  recorded.samples.push(...answer.samples);
  recorded.events.push(...answer.events);
  recorded.seq = answer.seq;
  const last = recorded.samples.length ? recorded.samples[recorded.samples.length - 1].time : 0;
  const start = last - recorded.window;
  recorded.samples = recorded.samples.filter((s) => s.time >= start);
  recorded.events = recorded.events.filter((e) => e.time >= start);
  return answer.samples.length > 0 || answer.events.length > 0;
}

async function getJson(url) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch(url, {signal: abort.signal, cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  try {
    const [view, answer] = await Promise.all([
      getJson("/mesh/status"), getJson(`/mesh/history?after=${recorded.seq}`)]);
    render(view);
    if (remember(answer)) {
      drawCharts(recorded.samples, recorded.events, recorded.window);
      listEvents(recorded.events);
      document.body.dataset.samples = recorded.samples.length;
    }
  } catch (err) {
    setState(`gateway unreachable: ${err.message}`, true);
    if (lastView) document.getElementById("topology").classList.add("stale");
  } finally {
    document.body.dataset.polls = Number(document.body.dataset.polls) + 1;
    setTimeout(poll, REFRESH_MS);
  }
}

drawCharts([], [], recorded.window);
poll();
