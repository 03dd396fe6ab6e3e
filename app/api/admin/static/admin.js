// The clawbot admin dashboard: reads the admin API with the master key, draws tables and SVG
// charts, and refreshes every few seconds. Data is only ever inserted as text, never as HTML.
"use strict";

(() => {
  const STORE = "clawbot.masterKey";
  const REFRESH_MS = 5000;
  const BUCKETS = { "1h": "5m", "24h": "1h", "7d": "6h" };
  const MAX_SERIES = 8;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
    "#65a30d", "#6b7280"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0;
  let refreshes = 0;

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    const key = sessionStorage.getItem(STORE) || "";
    const response = await fetch(path, {
      headers: { Authorization: `Bearer ${key}` },
      cache: "no-store",
      credentials: "omit",
    });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      throw new ApiError(response.status, message || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  // ---- small DOM helpers

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      tr.append(cell instanceof Node ? cell : el("td", cell));
    }
    return tr;
  }

  function fillTable(id, rows, emptyText, columns) {
    const body = $(id).tBodies[0];
    if (!rows.length) {
      const td = el("td", emptyText, "empty");
      td.colSpan = columns;
      body.replaceChildren(row([td]));
      return;
    }
    body.replaceChildren(...rows);
  }

  function num(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString();
  }

  function timeText(iso) {
    if (!iso) return "never";
    return new Date(iso).toLocaleString();
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 60) return `${Math.round(seconds)} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} d ago`;
  }

  function cell(text, className, title) {
    const td = el("td", text, className);
    if (title) td.title = title;
    return td;
  }

  // ---- panels

  function renderBackends(data) {
    const rows = [];
    for (const model of data.data) {
      for (const d of model.deployments) {
        const failures = `${d.recent_failures} / ${d.total_failures}`;
        const cooling = d.cooldown_remaining_s > 0;
        const cooldown = cooling ? `${d.cooldown_remaining_s.toFixed(1)} s` : "–";
        const checked = d.checked_at ? ago(new Date(d.checked_at * 1000).toISOString()) : "–";
        rows.push(row([
          cell(model.model, null, `strategy: ${model.strategy}`),
          cell(d.name),
          cell(d.backend, "mono"),
          cell(d.healthy ? "yes" : "no", d.healthy ? "ok" : "bad"),
          cell(d.state, d.state === "closed" ? null : "warn"),
          cell(d.max_parallel ? `${d.in_flight} / ${d.max_parallel}` : String(d.in_flight), "num"),
          cell(failures, d.recent_failures ? "num warn" : "num"),
          cell(cooldown, "num"),
          cell(checked, d.check_error ? "bad" : null, d.check_error || ""),
        ]));
      }
    }
    fillTable("backends", rows, "No models configured.", 9);
  }

  function keyStatus(key) {
    if (key.revoked) return ["revoked", "bad"];
    if (key.expires_at && new Date(key.expires_at).getTime() <= Date.now()) {
      return ["expired", "bad"];
    }
    if (key.rotated_to) return [`rotated, until ${timeText(key.expires_at)}`, "warn"];
    if (key.expires_at) return [`active, until ${timeText(key.expires_at)}`, "ok"];
    return ["active", "ok"];
  }

  function limitsText(key) {
    const parts = [];
    if (key.requests_per_minute) parts.push(`${num(key.requests_per_minute)} rpm`);
    if (key.tokens_per_minute) parts.push(`${num(key.tokens_per_minute)} tpm`);
    if (key.max_parallel) parts.push(`${key.max_parallel} parallel`);
    if (key.budget_period_tokens) {
      parts.push(`${num(key.budget_period_tokens)} tokens/${key.budget_period || "period"}`);
    }
    if (key.budget_total_tokens) parts.push(`${num(key.budget_total_tokens)} tokens total`);
    return parts.length ? parts.join(" · ") : "none";
  }

  function renderKeys(keys) {
    const rows = keys.map((key) => {
      const [status, statusClass] = keyStatus(key);
      return row([
        cell(key.name, null, key.owner ? `owner: ${key.owner}` : ""),
        cell(key.id, "mono"),
        cell(key.models ? key.models.join(", ") : "all"),
        cell(limitsText(key)),
        cell(status, statusClass),
        cell(num(key.spent_tokens), "num"),
        cell(ago(key.last_used_at), null, key.last_used_at ? timeText(key.last_used_at) : ""),
      ]);
    });
    fillTable("keys", rows, "No keys yet: create one with POST /admin/keys.", 7);
  }

  function keyLabel(names, keyId) {
    if (!keyId) return "(master key or none)";
    return names.get(keyId) || keyId;
  }

  function renderErrors(errors, names) {
    const rows = errors.map((e) => row([
      cell(timeText(e.ts)),
      cell(e.status, "num bad"),
      cell(e.error_type || "–"),
      cell(e.route, "mono"),
      cell(e.model || "–"),
      cell(keyLabel(names, e.key_id), null, e.key_id || ""),
      cell(e.request_id, "mono rid"),
    ]));
    fillTable("errors", rows, "No errors.", 7);
  }

  // ---- charts

  // A round step (1, 2 or 5 times a power of ten, at least 1: every metric is a count) that
  // covers `value` in four gridlines.
  function tickStep(value) {
    const rough = Math.max(1, value / 4);
    const power = 10 ** Math.floor(Math.log10(rough));
    for (const step of [1, 2, 5, 10]) {
      if (step * power >= rough) return step * power;
    }
    return 10 * power;
  }

  function axisLabel(ms, bucketSeconds) {
    const date = new Date(ms);
    if (bucketSeconds >= 3600 * 6) {
      return date.toLocaleString(undefined, { weekday: "short", hour: "2-digit" });
    }
    return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  }

  // Zero-filled values per series over every bucket from `since` to `until`; the largest
  // series first, those past MAX_SERIES summed into "other".
  function seriesOf(series, field, labelOf, metric) {
    const start = Date.parse(series.since);
    const step = series.bucket_s * 1000;
    const count = Math.max(1, Math.ceil((Date.parse(series.until) - start) / step));
    const byName = new Map();
    for (const point of series.data) {
      const name = labelOf(point[field]);
      const index = Math.floor((Date.parse(point.bucket) - start) / step);
      if (index < 0 || index >= count) continue;
      if (!byName.has(name)) byName.set(name, new Array(count).fill(0));
      byName.get(name)[index] += point[metric];
    }
    const total = (values) => values.reduce((a, b) => a + b, 0);
    let lines = [...byName.entries()]
      .map(([name, values]) => ({ name, values, total: total(values) }))
      .sort((a, b) => b.total - a.total || a.name.localeCompare(b.name));
    if (lines.length > MAX_SERIES) {
      const rest = lines.slice(MAX_SERIES - 1);
      const other = new Array(count).fill(0);
      for (const line of rest) line.values.forEach((v, i) => { other[i] += v; });
      lines = [...lines.slice(0, MAX_SERIES - 1), { name: `other (${rest.length})`, values: other,
        total: total(other) }];
    }
    const times = Array.from({ length: count }, (_, i) => start + i * step);
    return { times, lines };
  }

  function drawChart(containerId, legendId, data, unit, bucketSeconds) {
    const container = $(containerId);
    const width = Math.max(320, Math.round(container.clientWidth || 560));
    const height = 220;
    const pad = { left: 52, right: 12, top: 12, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width: String(width), height: String(height),
      role: "img", "aria-label": `${unit} over time`,
    });
    const lines = data.lines.filter((line) => line.total > 0);
    const step = tickStep(Math.max(0, ...lines.flatMap((line) => line.values)));
    const max = step * 4;
    const n = data.times.length;
    const x = (i) => pad.left + (n === 1 ? plotW / 2 : (i * plotW) / (n - 1));
    const y = (v) => pad.top + plotH - (v / max) * plotH;

    for (let t = 0; t <= 4; t += 1) {
      const value = step * t;
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value),
        class: "grid" }));
      const label = svg("text", { x: pad.left - 6, y: y(value) + 4, "text-anchor": "end",
        class: "tick" });
      label.textContent = value.toLocaleString();
      chart.append(label);
    }
    const every = Math.max(1, Math.ceil(n / 6));
    for (let i = 0; i < n; i += every) {
      const label = svg("text", { x: x(i), y: height - 8, "text-anchor": "middle",
        class: "tick" });
      label.textContent = axisLabel(data.times[i], bucketSeconds);
      chart.append(label);
    }
    chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0),
      class: "axis" }));

    const legend = $(legendId);
    legend.replaceChildren();
    if (!lines.length) {
      const empty = svg("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2,
        "text-anchor": "middle", class: "no-data" });
      empty.textContent = `No ${unit} in this period`;
      chart.append(empty);
    }
    lines.forEach((line, index) => {
      const color = COLORS[index % COLORS.length];
      const d = line.values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`)
        .join(" ");
      chart.append(svg("path", { d, stroke: color, fill: "none", "stroke-width": "2",
        class: "series", "data-series": line.name }));
      line.values.forEach((v, i) => {
        if (!v) return;
        const dot = svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: "3",
          fill: color, class: "point" });
        const title = svg("title");
        title.textContent = `${line.name}, ${new Date(data.times[i]).toLocaleString()}: `
          + `${v.toLocaleString()} ${unit}`;
        dot.append(title);
        chart.append(dot);
      });
      const item = el("li");
      const swatch = svg("svg", { width: "12", height: "12", "aria-hidden": "true" });
      swatch.append(svg("rect", { width: "12", height: "12", rx: "2", fill: color }));
      item.append(swatch, el("span", line.name), el("span", line.total.toLocaleString(), "subtle"));
      legend.append(item);
    });
    container.replaceChildren(chart);
  }

  const UNITS = { requests: "requests", total_tokens: "tokens", errors: "errors" };

  function renderUsage(series, names) {
    const metric = $("metric").value;
    const unit = UNITS[metric];
    const perKey = seriesOf(series, "key_id", (id) => keyLabel(names, id), metric);
    const perModel = seriesOf(series, "model", (m) => m || "(no model)", metric);
    drawChart("chart-keys", "legend-keys", perKey, unit, series.bucket_s);
    drawChart("chart-models", "legend-models", perModel, unit, series.bucket_s);
  }

  // ---- refresh loop and login

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function showLogin(message) {
    clearTimeout(timer);
    generation += 1;
    sessionStorage.removeItem(STORE);
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    setStatus("");
    $("master-key").value = "";
    $("master-key").focus();
  }

  async function refresh(mine) {
    try {
      const range = $("range").value;
      const [backends, keys, series, errors] = await Promise.all([
        api("/admin/backends"),
        api("/admin/keys"),
        api(`/admin/usage/series?since=${range}&bucket=${BUCKETS[range]}`),
        api("/admin/errors?limit=50"),
      ]);
      if (mine !== generation) return;
      const names = new Map(keys.data.map((key) => [key.id, key.name]));
      renderBackends(backends);
      renderKeys(keys.data);
      renderUsage(series, names);
      renderErrors(errors.data, names);
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      setStatus(`Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        showLogin(`The gateway refused the key: ${error.message}`);
        return;
      }
      setStatus(`Refresh failed: ${error.message}`, true);
    }
    if (mine === generation) timer = setTimeout(() => refresh(mine), REFRESH_MS);
  }

  function start() {
    clearTimeout(timer);
    generation += 1;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    refresh(generation);
  }

  async function login(event) {
    event.preventDefault();
    const key = $("master-key").value.trim();
    if (!key) return;
    const button = event.submitter || $("login-form").querySelector("button");
    button.disabled = true;
    sessionStorage.setItem(STORE, key);
    try {
      await api("/admin/backends");
      $("master-key").value = "";
      start();
    } catch (error) {
      const reason = error instanceof ApiError
        ? error.message
        : `cannot reach the gateway (${error.message})`;
      showLogin(`Login failed: ${reason}`);
    } finally {
      button.disabled = false;
    }
  }

  function restart() {
    if (!$("dashboard").hidden) {
      start();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", () => showLogin(""));
    $("range").addEventListener("change", restart);
    $("metric").addEventListener("change", restart);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) restart();
    });
    if (sessionStorage.getItem(STORE)) {
      start();
    } else {
      showLogin("");
    }
  });
})();
