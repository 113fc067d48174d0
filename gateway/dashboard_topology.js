"use strict";
// The mesh's topology as SVG: each node a box (name, role, memory bar, each model with its
// slots, tokens/s and prompt-cache hit rate), the coordinator on top, every other node
// linked to it by a line coloured by its last heartbeat's age; nodes seen lately but gone
// now drawn dashed as unreachable. Uses svg(), number() and showTip() of
// dashboard_charts.js. Names are untrusted: text only.

const BOX = {width: 250, gapX: 28, gapY: 70, head: 54, model: 38, foot: 10, perRow: 4};

function gib(bytes) {
  return (bytes / 2 ** 30).toFixed(1);
}

function ago(seconds) {
  return seconds === null || seconds === undefined ? "—" : `${Number(seconds).toFixed(1)} s`;
}

// Cut a name to what fits a box; the whole name is in the box's tooltip.
function fit(text, chars) {
  const s = String(text);
  return s.length > chars ? `${s.slice(0, chars - 1)}…` : s;
}

function percent(rate) {
  return rate === null || rate === undefined ? "—" : `${Math.round(rate * 100)}%`;
}

// ok, warn or bad for a heartbeat age, from the mesh's own interval and timeout.
function linkKind(age, heartbeat) {
  if (age === null || age === undefined) return "warn";
  if (age <= 2 * heartbeat.interval_s) return "ok";
  return age <= heartbeat.timeout_s ? "warn" : "bad";
}

function boxHeight(node) {
  return BOX.head + Math.max(1, (node.models || []).length) * BOX.model + BOX.foot;
}

function nodeBox(node, x, y, height) {
  const g = svg("g", {class: `node ${node.role}`, transform: `translate(${x},${y})`});
  g.dataset.node = node.node_id;
  g.dataset.role = node.role;
  g.dataset.state = "live";
  const w = BOX.width;
  g.append(svg("rect", {class: "box", width: w, height, rx: 10}),
           svg("text", {class: "name", x: 12, y: 20}, fit(node.node_id, 22)));
  if (node.role === "coordinator") {
    g.append(svg("rect", {class: "badge", x: w - 96, y: 7, width: 86, height: 18, rx: 9}),
             svg("text", {class: "badge-text", x: w - 53, y: 20, "text-anchor": "middle"},
                 "coordinator"));
  } else {
    g.append(svg("text", {class: "muted", x: w - 12, y: 20, "text-anchor": "end"},
                 node.role));
  }
  const used = node.mem_total ? (node.mem_total - node.mem_free) / node.mem_total : 0;
  g.append(svg("rect", {class: "bar-bg", x: 12, y: 30, width: w - 24, height: 8, rx: 4}),
           svg("rect", {class: used > 0.9 ? "bar high" : "bar", x: 12, y: 30,
                        width: Math.max(0, (w - 24) * used), height: 8, rx: 4}),
           svg("text", {class: "muted", x: 12, y: 50},
               node.mem_total ? `memory ${gib(node.mem_total - node.mem_free)} / ` +
                 `${gib(node.mem_total)} GiB` : "memory —"));
  if (typeof node.protocol === "number") {  // null: a node of our own version
    g.append(svg("text", {class: "muted", x: w - 12, y: 50, "text-anchor": "end"},
                 `protocol ${fit(node.protocol, 12)}`));
  }
  const models = node.models || [];
  if (!models.length) {
    g.append(svg("text", {class: "muted", x: 12, y: BOX.head + 16}, "no workers"));
  }
  models.forEach((m, i) => g.append(modelRow(m, BOX.head + i * BOX.model)));
  const tip = [`${node.node_id} (${node.role})`,
               `${node.workers} worker(s), slots ${node.slots_in_use}/${node.slots_total}`,
               `${number(node.tokens_per_s)} tokens/s, prompt cache ${percent(node.cache_hit_rate)}`,
               `last heartbeat ${ago(node.heartbeat_age_s)} ago`,
               ...models.map((m) => `${m.model_id}${m.tiers.length ? ` (${m.tiers.join(", ")})` : ""}` +
                                    `${m.engine === "synthetic" ? " [synthetic]" : ""}`)];
  g.addEventListener("mousemove", (evt) => showTip(evt, tip.join("\n")));
  g.addEventListener("mouseleave", hideTip);
  return g;
}

function modelRow(m, y) {
  const g = svg("g", {class: "model", transform: `translate(12,${y})`});
  g.dataset.model = m.model_id;
  const name = m.engine === "synthetic" ? `${m.model_id} [synthetic]` : m.model_id;
  g.append(svg("text", {x: 0, y: 12}, fit(name, 34)));
  const shown = Math.min(m.slots_total, 16);
  for (let i = 0; i < shown; i++) {
    g.append(svg("rect", {class: i < m.slots_in_use ? "slot busy" : "slot",
                          x: i * 10, y: 19, width: 8, height: 8, rx: 1.5}));
  }
  const x = Math.max(shown * 10 + 6, 0);
  g.append(svg("text", {class: "muted", x, y: 27},
               `${m.slots_in_use}/${m.slots_total} slots · ${number(m.tokens_per_s)} tok/s · ` +
               `cache ${percent(m.cache_hit_rate)} · queue ${m.queue}`));
  return g;
}

function unreachableBox(node, x, y, height, now) {
  const g = svg("g", {class: "node unreachable", transform: `translate(${x},${y})`});
  g.dataset.node = node.node_id;
  g.dataset.role = node.role;
  g.dataset.state = "unreachable";
  const since = Math.max(0, now - node.last_seen);
  g.append(svg("rect", {class: "box", width: BOX.width, height, rx: 10}),
           svg("text", {class: "name", x: 12, y: 20}, fit(node.node_id, 22)),
           svg("text", {x: BOX.width - 12, y: 20, "text-anchor": "end"}, "unreachable"),
           svg("text", {x: 12, y: 44}, `was ${node.role}; last seen ${ago(since)} ago`));
  return g;
}

function link(from, to, kind, label) {
  const g = svg("g", {class: "link-group"});
  const midY = (from.y + to.y) / 2;
  g.append(svg("path", {class: kind === "unreachable" ? "link unreachable" : `link kind-${kind}`,
                        d: `M${from.x},${from.y} C${from.x},${midY} ${to.x},${midY} ${to.x},${to.y}`,
                        fill: "none"}));
  if (label) {
    g.append(svg("text", {class: "muted", x: (from.x + to.x) / 2 + 6, y: midY - 4}, label));
  }
  return g;
}

// Draw ``view`` (the JSON of /mesh/status) into ``chart``; ``stale`` greys it (the broker
// is not answering: this is the last picture known).
function drawTopology(chart, view, stale) {
  const live = view.nodes || [];
  const gone = view.unreachable || [];
  const lead = live.find((n) => n.role === "coordinator");
  const others = [...live.filter((n) => n !== lead), ...gone.map((n) => ({...n, gone: true}))];
  const rows = [];
  if (lead) rows.push([lead]);
  for (let i = 0; i < others.length; i += BOX.perRow) rows.push(others.slice(i, i + BOX.perRow));
  const perRow = Math.max(1, ...rows.map((r) => r.length));
  const width = perRow * BOX.width + (perRow - 1) * BOX.gapX + 20;
  const parts = [];
  const links = [];
  const places = [];
  let y = 10;
  for (const row of rows) {
    const height = Math.max(...row.map(boxHeight));
    const rowWidth = row.length * BOX.width + (row.length - 1) * BOX.gapX;
    row.forEach((node, i) => {
      const x = (width - rowWidth) / 2 + i * (BOX.width + BOX.gapX);
      places.push({node, x, y, height});
    });
    y += height + BOX.gapY;
  }
  const now = Date.now() / 1000;
  const top = places.find((p) => p.node === lead);
  for (const p of places) {
    if (p.node.gone) parts.push(unreachableBox(p.node, p.x, p.y, p.height, now));
    else parts.push(nodeBox(p.node, p.x, p.y, p.height));
    if (!top || p === top) continue;
    const kind = p.node.gone ? "unreachable" : linkKind(p.node.heartbeat_age_s, view.heartbeat);
    const label = p.node.gone ? "" : ago(p.node.heartbeat_age_s);
    links.push(link({x: p.x + BOX.width / 2, y: p.y},
                    {x: top.x + BOX.width / 2, y: top.y + top.height}, kind, label));
  }
  if (!places.length) {
    parts.push(svg("text", {class: "muted", x: 10, y: 24}, "no live nodes"));
  }
  chart.setAttribute("viewBox", `0 0 ${width} ${Math.max(y - BOX.gapY + 10, 40)}`);
  chart.style.maxWidth = `${width * 1.2}px`;
  chart.classList.toggle("stale", Boolean(stale));
  chart.replaceChildren(...links, ...parts);
}
