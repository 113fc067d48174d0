"use strict";
// Time-series charts drawn as SVG, with the mesh's events marked on the time axis.
// Every value comes from the mesh and is untrusted: it is only ever set as text
// (textContent, setAttribute), never parsed as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#0969da", "#1a7f37", "#8250df", "#bf3989", "#bc4c00", "#1b7c83",
                 "#9a6700", "#6e7781"];
const EVENT_KINDS = {
  worker_lost: "bad", node_lost: "bad", broker_down: "bad", failover: "warn",
  broker_lost: "warn", coordinator_change: "info", worker_joined: "ok", node_joined: "ok",
  broker_up: "ok",
};
// Seconds between two labels of the time axis: the first of these that makes at most 5.
const TICKS = [15, 30, 60, 120, 300];
const CHART = {width: 560, height: 190, left: 46, right: 12, top: 14, bottom: 24};

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function eventClass(kind) {
  return `kind-${EVENT_KINDS[kind] || "info"}`;
}

function tooltip() {
  return document.getElementById("tooltip");
}

function showTip(evt, text) {
  const tip = tooltip();
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${Math.min(evt.clientX + 12, window.innerWidth - 300)}px`;
  tip.style.top = `${evt.clientY + 12}px`;
}

function hideTip() {
  tooltip().hidden = true;
}

// The smallest "nice" number (1, 2, 2.5, 5 times a power of ten) at least max.
function niceMax(max) {
  if (!(max > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= max) return step * power;
  return 10 * power;
}

function number(value) {
  if (value === null || value === undefined) return "—";
  return Math.abs(value) >= 100 ? value.toFixed(0) : Number(value.toPrecision(3)).toString();
}

// Draw ``series`` ([{name, points: [[time, value or null]], total}]) from ``start`` to
// ``end`` (seconds), with ``events`` ([{time, kind, text}]) as marked vertical lines.
// Each series' path says its name and its latest value (data-series, data-last).
function drawChart(chart, series, events, start, end, legendId) {
  const {width, height, left, right, top, bottom} = CHART;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
  const max = niceMax(Math.max(0, ...values));
  const x = (t) => left + ((t - start) / Math.max(end - start, 1)) * plotW;
  const y = (v) => top + plotH - (v / max) * plotH;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const parts = [];
  const axis = svg("g", {class: "axis"});
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    axis.append(svg("line", {class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v)}),
                svg("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"},
                    Number(v.toPrecision(2)).toString()));
  }
  const step = TICKS.find((s) => (end - start) / s <= 5) || TICKS[TICKS.length - 1];
  for (let back = 0; end - back >= start; back += step) {
    const label = back === 0 ? "now" : back < 60 ? `−${back} s` : `−${back / 60} min`;
    axis.append(svg("text", {x: x(end - back), y: height - 6,
                             "text-anchor": back ? "middle" : "end"}, label));
  }
  parts.push(axis);
  series.forEach((s, i) => {
    let d = "";
    let pen = "M";
    let last = null;
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
      last = v;
    }
    const path = svg("path", {d: d || "M0,0", class: s.total ? "series total" : "series",
                              stroke: PALETTE[i % PALETTE.length]});
    path.dataset.series = s.name;
    path.dataset.last = last === null ? "" : String(last);
    path.append(svg("title", {}, `${s.name}: ${number(last)}`));
    parts.push(path);
  });
  for (const e of events) {
    if (e.time < start || e.time > end) continue;
    const mark = svg("g", {class: `event ${eventClass(e.kind)}`});
    mark.dataset.kind = e.kind;
    mark.dataset.time = String(e.time);
    const text = `${clock(e.time)} ${e.kind.replaceAll("_", " ")}: ${e.text}`;
    mark.append(svg("title", {}, text),
                svg("line", {x1: x(e.time), x2: x(e.time), y1: top, y2: top + plotH}),
                svg("circle", {cx: x(e.time), cy: top - 4, r: 4}));
    mark.addEventListener("mousemove", (evt) => showTip(evt, text));
    mark.addEventListener("mouseleave", hideTip);
    parts.push(mark);
  }
  chart.replaceChildren(...parts);
  hover(chart, series, start, end, x);
  legend(legendId, series);
}

// A tooltip with every series' value at the sample nearest the pointer.
function hover(chart, series, start, end, x) {
  chart.onmousemove = (evt) => {
    if (evt.target.closest(".event")) return;
    const box = chart.getBoundingClientRect();
    const at = start + ((evt.clientX - box.left) / box.width * CHART.width - CHART.left) /
      (CHART.width - CHART.left - CHART.right) * (end - start);
    const lines = [];
    let when = null;
    for (const s of series) {
      let best = null;
      for (const p of s.points) if (!best || Math.abs(p[0] - at) < Math.abs(best[0] - at)) best = p;
      if (best) { when = best[0]; lines.push(`${s.name}: ${number(best[1])}`); }
    }
    if (when === null) return hideTip();
    showTip(evt, [clock(when), ...lines].join("\n"));
  };
  chart.onmouseleave = hideTip;
}

function legend(id, series) {
  const box = document.getElementById(id);
  if (!box) return;
  box.replaceChildren(...series.map((s, i) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = PALETTE[i % PALETTE.length];
    item.append(swatch, document.createTextNode(s.name));
    return item;
  }));
}

// The series of one figure of the samples: ``pick(sample)`` gives {name: value} or null.
function seriesOf(samples, pick, options) {
  const names = new Set();
  const picked = samples.map((s) => {
    const values = s.up || (options && options.always) ? pick(s) : null;
    if (values) for (const name of Object.keys(values)) names.add(name);
    return [s.time, values];
  });
  const order = (options && options.order) || [...names].sort();
  return order.filter((name) => names.has(name)).map((name) => ({
    name, total: options && options.total === name,
    points: picked.map(([t, values]) => [t, values && name in values ? values[name] : null]),
  }));
}

// Requests per second between successive samples, by status (a counter that went down
// means the gateway restarted: no point there).
function requestRates(samples) {
  const rates = [];
  for (let i = 0; i < samples.length; i++) {
    const now = samples[i];
    const before = samples[i - 1];
    const rate = {};
    if (before && now.time > before.time) {
      for (const [status, count] of Object.entries(now.requests || {})) {
        const delta = count - ((before.requests || {})[status] || 0);
        rate[status] = delta >= 0 ? delta / (now.time - before.time) : null;
      }
    }
    rates.push({time: now.time, up: true, requests: now.requests, rate});
  }
  return rates;
}

function drawCharts(samples, events, windowSeconds) {
  const end = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  // The whole window once it is full; until then the samples there are, at least a minute.
  const first = samples.length ? samples[0].time : end;
  const start = Math.max(end - windowSeconds, Math.min(first, end - 60));
  const nodeNames = new Set(samples.flatMap((s) => Object.keys(s.nodes || {})));
  const tokens = seriesOf(samples, (s) => ({mesh: s.tokens_per_s, ...prefixed(s.nodes)}),
                          {total: "mesh", order: ["mesh", ...[...nodeNames].sort()
                            .map((n) => `node ${n}`)]});
  drawChart(document.getElementById("chart-tokens"), tokens, events, start, end,
            "legend-tokens");
  const ttft = seriesOf(samples, (s) => ({p50: s.ttft_p50, p90: s.ttft_p90}),
                        {always: true, order: ["p50", "p90"]});
  drawChart(document.getElementById("chart-ttft"), ttft, events, start, end, "legend-ttft");
  drawChart(document.getElementById("chart-queues"), seriesOf(samples, (s) => s.queues),
            events, start, end, "legend-queues");
  drawChart(document.getElementById("chart-requests"),
            seriesOf(requestRates(samples), (s) => s.rate), events, start, end,
            "legend-requests");
}

function prefixed(nodes) {
  return Object.fromEntries(Object.entries(nodes || {}).map(([n, v]) => [`node ${n}`, v]));
}
