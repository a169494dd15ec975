// The queenbee dashboard: polls /v1/workers and /stats and redraws the page.
// Everything a worker reports is shown with textContent, never parsed as HTML: workers are not trusted.
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 60;
const throughputHistory = [];
// A queen with --stats-key serves this page as /?key=KEY; the polls carry the key in a header.
const STATS_KEY = new URLSearchParams(window.location.search).get("key");

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmtNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtMiB(mib) {
  if (!mib) return "-";
  return mib >= 1024 ? `${fmtNumber(mib / 1024, 1)} GiB` : `${fmtNumber(mib)} MiB`;
}

function fmtDuration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function lines(...texts) {
  const cell = el("td");
  texts.forEach((text, i) => {
    if (i > 0) cell.appendChild(el("br"));
    cell.appendChild(document.createTextNode(text));
  });
  return cell;
}

function hardwareCell(hardware) {
  const cpus = `${hardware.cpu_count} ${hardware.cpu_count === 1 ? "CPU" : "CPUs"}`;
  const texts = [hardware.memory ? `${cpus}, ${fmtMiB(hardware.memory)} RAM` : cpus];
  for (const gpu of hardware.gpus) {
    texts.push(`${gpu.name} (${fmtMiB(gpu.memory)})`);
  }
  if (hardware.gpus.length === 0) texts.push("no GPU");
  return lines(...texts);
}

function slotsCell(slots) {
  const cell = el("td", null, "num");
  const meter = el("meter");
  meter.min = 0;
  meter.max = slots.total;
  meter.value = slots.busy;
  meter.title = `${slots.busy} busy, ${slots.free} free`;
  cell.appendChild(meter);
  cell.appendChild(document.createTextNode(` ${slots.busy} / ${slots.total}`));
  return cell;
}

function speedCell(speed) {
  const texts = Object.entries(speed).map(([model, s]) => {
    const tps = s.tokens_per_second === null ? "-" : fmtNumber(s.tokens_per_second, 1);
    const ttft = s.ttft === null ? "-" : `${fmtNumber(s.ttft, 2)}s`;
    return `${model}: ${tps} tok/s, TTFT ${ttft}`;
  });
  return lines(...(texts.length ? texts : ["not measured yet"]));
}

function renderWorkers(workers) {
  const body = $("workers").querySelector("tbody");
  const rows = workers.map((worker) => {
    const row = el("tr");
    row.dataset.workerId = worker.id;
    // In a hive of replicas, every replica lists every worker, with the replica it is connected to.
    const version = worker.replica ? `v${worker.version}, on ${worker.replica}` : `v${worker.version}`;
    const name = lines(worker.id, version);
    if (worker.benched) name.appendChild(el("div", "benched after failures", "benched"));
    row.appendChild(name);
    row.appendChild(hardwareCell(worker.hardware));
    row.appendChild(lines(...worker.models.map((model) => model.id)));
    row.appendChild(slotsCell(worker.slots));
    row.appendChild(speedCell(worker.speed));
    row.appendChild(el("td", fmtDuration(worker.uptime), "num"));
    const served = worker.served;
    row.appendChild(
      lines(
        `${fmtNumber(served.requests)} ${served.requests === 1 ? "request" : "requests"}`,
        `${fmtNumber(served.prompt_tokens + served.completion_tokens)} tokens`,
      ),
    );
    return row;
  });
  body.replaceChildren(...rows);
  $("workers-empty").hidden = workers.length > 0;
}

function renderModels(models) {
  const body = $("models").querySelector("tbody");
  const rows = models.map((model) => {
    const row = el("tr");
    row.dataset.model = model.id;
    row.appendChild(el("td", model.id));
    row.appendChild(el("td", model.workers, "num"));
    row.appendChild(el("td", `${model.slots_busy} / ${model.slots_total}`, "num"));
    row.appendChild(el("td", model.queue_depth, "num"));
    return row;
  });
  body.replaceChildren(...rows);
  $("models-empty").hidden = models.length > 0;
}

function renderStats(stats) {
  $("stat-workers").textContent = fmtNumber(stats.workers);
  $("stat-models").textContent = fmtNumber(stats.models.length);
  $("stat-slots").textContent = `${stats.slots.busy} / ${stats.slots.total}`;
  $("stat-queue").textContent = fmtNumber(stats.queue_depth);
  // In a hive of replicas, the traffic of every replica's clients, not only of this one's.
  const traffic = stats.hive ?? stats;
  $("stat-rpm").textContent = fmtNumber(traffic.throughput.requests_per_minute, 1);
  $("stat-tps").textContent = fmtNumber(traffic.throughput.completion_tokens_per_second, 1);
  $("stat-tokens").textContent = fmtNumber(traffic.totals.prompt_tokens + traffic.totals.completion_tokens);
  throughputHistory.push(traffic.throughput.completion_tokens_per_second);
  if (throughputHistory.length > HISTORY) throughputHistory.shift();
  drawThroughput();
}

function drawThroughput() {
  const canvas = $("throughput");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  if (throughputHistory.length < 2) return;
  const top = Math.max(1, ...throughputHistory);
  const step = width / (HISTORY - 1);
  const offset = (HISTORY - throughputHistory.length) * step;
  context.beginPath();
  throughputHistory.forEach((value, i) => {
    const x = offset + i * step;
    const y = height - 8 - (value / top) * (height - 16);
    if (i === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.strokeStyle = "#d99a00";
  context.lineWidth = 2;
  context.stroke();
  context.fillStyle = "#6f6a60";
  context.font = "12px sans-serif";
  context.fillText(`max ${fmtNumber(top, 1)} tok/s`, 8, 16);
}

async function fetchJson(path) {
  const headers = { Accept: "application/json" };
  if (STATS_KEY) headers.Authorization = `Bearer ${STATS_KEY}`;
  const response = await fetch(path, { cache: "no-store", headers });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

async function update() {
  let workers, stats;
  try {
    [workers, stats] = await Promise.all([fetchJson("/v1/workers"), fetchJson("/stats")]);
  } catch (error) {
    // The queen restarting is expected: say so on the page and keep polling.
    setStatus("offline", "queen unreachable");
    return;
  }
  // Outside the try: a bug in drawing the page must show up as an error, not as "unreachable".
  renderWorkers(workers.data);
  renderModels(stats.models);
  renderStats(stats);
  setStatus("live", "live");
  const hive = stats.hive ? `replica ${stats.hive.replica} of ${stats.hive.replicas.length}, ` : "";
  $("updated").textContent = `${hive}updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  try {
    await update();
  } finally {
    // Polls one at a time, at a steady pace, whatever happened to the last one.
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
