// The status page: status.json rendered as tables and a chart. Every value from the
// server goes in through textContent, never as markup: reasons and host names come from
// remote servers.
"use strict";

const state = { data: null, window: "day", filter: "", sort: "failed", descending: true };
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function num(value, bad) {
  const td = el("td", value, "num");
  if (bad && value > 0) td.classList.add("bad");
  return td;
}

function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 16) + "Z";
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function badges(counts, className) {
  const td = el("td");
  for (const [name, count] of Object.entries(counts || {}).sort((a, b) => b[1] - a[1])) {
    const badge = el("span", `${name} ${count}`, "badge");
    if (className) badge.classList.add(className(name));
    td.appendChild(badge);
  }
  return td;
}

function fill(tableId, rows, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  if (!rows.length && empty) {
    const td = el("td", empty, "empty");
    td.colSpan = document.querySelectorAll(`#${tableId} thead th`).length;
    const tr = document.createElement("tr");
    tr.className = "empty";
    tr.appendChild(td);
    rows = [tr];
  }
  body.replaceChildren(...rows);
}

function renderSummary(data) {
  const queue = data.queue || {};
  const recipients = queue.recipients || {};
  const destinations = (data.destinations || []).map((d) => d[state.window]);
  const sessions = destinations.reduce((n, w) => n + w.succeeded + w.failed, 0);
  const failed = destinations.reduce((n, w) => n + w.failed, 0);
  const protectedCount = destinations.filter((w) => w.source !== "none" && w.succeeded + w.failed > 0).length;
  const cards = [
    ["Messages queued", queue.messages || 0, ""],
    ["Recipients deferred", recipients.deferred || 0, (recipients.deferred || 0) ? "bad" : "ok"],
    ["Oldest message", queue.oldest ? age(queue.oldest.age) : "none", ""],
    [`Sessions (${state.window})`, sessions, ""],
    [`Failed sessions (${state.window})`, failed, failed ? "bad" : "ok"],
    ["Destinations with a TLS policy", `${protectedCount} of ${destinations.filter((w) => w.succeeded + w.failed).length}`, ""],
  ];
  document.getElementById("summary").replaceChildren(...cards.map(([label, value, kind]) => {
    const card = el("div", null, `card ${kind}`);
    card.appendChild(el("div", value, "value"));
    card.appendChild(el("div", label, "label"));
    return card;
  }));
}

function sortValue(destination, key) {
  const w = destination[state.window];
  switch (key) {
    case "domain": return destination.domain;
    case "source": return w.source;
    case "level": return w.level;
    case "succeeded": return w.succeeded;
    case "failed": return w.failed;
    case "failures": return Object.values(w.failures).reduce((a, b) => a + b, 0);
    case "tls": return Object.keys(w.tls_versions).sort().join(",");
    case "last_failure": return destination.last_failure ? destination.last_failure.at : 0;
    default: return 0;
  }
}

function visibleDestinations(data) {
  const filter = state.filter.trim().toLowerCase();
  const list = (data.destinations || []).filter((d) => {
    const w = d[state.window];
    return w.succeeded + w.failed > 0 && (!filter || d.domain.includes(filter));
  });
  list.sort((a, b) => {
    const x = sortValue(a, state.sort), y = sortValue(b, state.sort);
    const order = typeof x === "string" ? x.localeCompare(y) : x - y;
    return (state.descending ? -order : order) || a.domain.localeCompare(b.domain);
  });
  return list;
}

function renderDestinations(data) {
  const list = visibleDestinations(data);
  fill("destinations", list.map((d) => {
    const w = d[state.window];
    const tr = row([
      el("td", d.domain),
      badges({ [w.source]: w.succeeded + w.failed }, (name) => name.replace(/ /g, "-")),
      el("td", w.level),
      num(w.succeeded),
      num(w.failed, true),
      badges(w.failures),
      badges(w.tls_versions),
      (() => {
        const td = el("td");
        if (d.last_failure) {
          td.appendChild(el("div", `${when(d.last_failure.at)} ${d.last_failure.result} at ${d.last_failure.mx}`));
          td.appendChild(el("div", d.last_failure.reason, "reason"));
        }
        return td;
      })(),
    ]);
    tr.dataset.domain = d.domain;
    return tr;
  }));
  document.getElementById("destinations-empty").hidden = list.length > 0;
  for (const th of document.querySelectorAll("#destinations th[data-key]")) {
    th.setAttribute("aria-sort", th.dataset.key === state.sort ? (state.descending ? "descending" : "ascending") : "none");
  }
}

function renderChart(data) {
  const hours = state.window === "day" ? 24 : 168;
  const timeline = (data.timeline || []).slice(-hours);
  const filter = state.filter.trim().toLowerCase();
  const width = 1200, height = 160, left = 40, bottom = 18;
  const totals = timeline.map((h) => {
    const failed = Object.values(h.failures).reduce((a, b) => a + b, 0);
    return { hour: h.hour, ok: h.success, bad: failed };
  });
  const top = Math.max(1, ...totals.map((t) => t.ok + t.bad));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Sessions per hour over the last ${state.window}` + (filter ? " (all destinations)" : ""));
  const step = (width - left) / Math.max(1, totals.length);
  const scale = (height - bottom - 6) / top;
  for (const fraction of [0, 0.5, 1]) {
    const y = height - bottom - fraction * top * scale;
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("x1", left); line.setAttribute("x2", width);
    line.setAttribute("y1", y); line.setAttribute("y2", y);
    line.setAttribute("class", "grid");
    svg.appendChild(line);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 2); label.setAttribute("y", y + 3);
    label.setAttribute("class", "axis");
    label.textContent = String(Math.round(fraction * top));
    svg.appendChild(label);
  }
  totals.forEach((t, i) => {
    const x = left + i * step + 1;
    const w = Math.max(1, step - 2);
    let y = height - bottom;
    for (const [kind, count] of [["ok", t.ok], ["bad", t.bad]]) {
      if (!count) continue;
      const h = count * scale;
      y -= h;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", x); rect.setAttribute("y", y);
      rect.setAttribute("width", w); rect.setAttribute("height", h);
      rect.setAttribute("class", `bar ${kind}`);
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${when(t.hour)}: ${count} ${kind === "ok" ? "succeeded" : "failed"}`;
      rect.appendChild(title);
      svg.appendChild(rect);
    }
    if (i % (state.window === "day" ? 3 : 24) === 0) {
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", x); label.setAttribute("y", height - 4);
      label.setAttribute("class", "axis");
      label.textContent = state.window === "day" ? when(t.hour).slice(11, 16) : when(t.hour).slice(5, 10);
      svg.appendChild(label);
    }
  });
  const figure = document.getElementById("chart");
  figure.querySelector("svg")?.remove();
  figure.appendChild(svg);
}

function renderQueue(data) {
  const queue = data.queue || {};
  const now = data.generated;
  fill("queue", (queue.by_destination || []).map((q) => row([
    el("td", q.domain), num(q.recipients), num(q.deferred, true),
    el("td", age(now - q.oldest)), el("td", q.last_reason, "reason"),
  ])), "Nothing waits.");
  fill("reasons", (queue.deferral_reasons || []).map((r) => row([
    el("td", r.reason, "reason"), num(r.recipients),
  ])), "No deferrals.");
}

function renderSts(data) {
  fill("mta-sts", (data.mta_sts || []).map((p) => row([
    el("td", p.domain), el("td", p.valid ? p.mode : `${p.mode || "none"} (expired)`),
    el("td", (p.mx || []).join(", ")), el("td", when(p.fetched)), el("td", when(p.expires)),
    el("td", p.last_error, p.last_error ? "bad" : ""),
  ])), "No MTA-STS policy cached (the mta_sts plugin is off, or no mail went to a domain that has one).");
}

function renderReports(data) {
  fill("reports", (data.reports_received || []).map((r) => row([
    el("td", r.organization), el("td", r.mx), num(r.reports), num(r.succeeded),
    num(r.failed, true), badges(r.by_type),
  ])), "No TLS reports received in the last week (tlsrpt.ini [receive]).");
}

function render() {
  const data = state.data;
  if (!data) return;
  document.getElementById("me").textContent = data.me ? `from ${data.me}` : "";
  document.getElementById("generated").textContent = when(data.generated);
  const errors = document.getElementById("errors");
  errors.hidden = !(data.errors && data.errors.length);
  errors.textContent = (data.errors || []).join("; ");
  renderSummary(data);
  renderDestinations(data);
  renderChart(data);
  renderQueue(data);
  renderSts(data);
  renderReports(data);
}

async function load() {
  try {
    const response = await fetch("status.json", { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state.data = await response.json();
    document.body.dataset.loaded = "yes";
    render();
  } catch (error) {
    const errors = document.getElementById("errors");
    errors.hidden = false;
    errors.textContent = `status.json could not be loaded: ${error.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", (event) => {
    state.filter = event.target.value;
    render();
  });
  for (const button of document.querySelectorAll("button.window")) {
    button.addEventListener("click", () => {
      state.window = button.id === "window-week" ? "week" : "day";
      for (const other of document.querySelectorAll("button.window")) {
        other.setAttribute("aria-pressed", String(other === button));
      }
      render();
    });
  }
  for (const th of document.querySelectorAll("#destinations th[data-key]")) {
    th.addEventListener("click", () => {
      state.descending = state.sort === th.dataset.key ? !state.descending : th.dataset.key !== "domain";
      state.sort = th.dataset.key;
      render();
    });
  }
  load();
  setInterval(load, 30000);
});
