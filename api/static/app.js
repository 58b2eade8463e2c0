// The dashboard: a jobs list (polled), and for the selected job charts, workers and events:
// first its history in one request (GET /jobs/{id}/history), then what is new from the
// server-sent event stream GET /jobs/{id}/stream.
"use strict";

const S = { selected: null, es: null, series: null, lastStep: null, lastEval: null, job: null,
            lastSeq: -1, lastEventId: 0, drawQueued: false, ended: false, retry: null,
            marks: [] };
// the B-hat chart's marks: the warm-up's end (the bound is frozen from there) and the
// guard's actions, in the colour of what they did
const MARK_COLORS = { bound: "#6b7280", warn: "#d97706", tighten: "#2563eb", fail: "#dc2626",
                      rollback: "#7c3aed" };
const $ = sel => document.querySelector(sel);
const fmt = (v, d = 4) => (v === null || v === undefined || !Number.isFinite(v)) ? "–" : Number(v.toPrecision(d)).toString();
const when = iso => iso ? new Date(iso).toLocaleString() : "–";
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

async function getJSON(url) {
  const r = await fetch(url, { headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

async function refreshJobs() {
  try {
    const page = await getJSON("/jobs?limit=50");
    $("#jobs-total").textContent = `(${page.total})`;
    $("#no-jobs").hidden = page.items.length > 0;
    const tbody = $("#jobs tbody");
    tbody.innerHTML = page.items.map(j => `
      <tr data-job-id="${esc(j.id)}" class="${j.id === S.selected ? "selected" : ""}" title="created ${when(j.created_at)}">
        <td><code>${esc(j.id)}</code></td><td>${esc(j.name)}</td>
        <td><span class="state ${esc(j.state)}">${esc(j.state)}</span></td>
        <td>${j.step}/${j.total_steps ?? "?"}</td></tr>`).join("");
    for (const tr of tbody.querySelectorAll("tr")) tr.onclick = () => select(tr.dataset.jobId);
    if (!S.selected && page.items.length) {
      const fromHash = new URLSearchParams(location.hash.slice(1)).get("job");
      select(fromHash && page.items.some(j => j.id === fromHash) ? fromHash : page.items[0].id);
    }
  } catch (e) { console.warn(e); }
}

async function refreshReady() {
  const pill = $("#ready");
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    pill.textContent = body.status; pill.className = "pill " + (r.ok ? "ok" : "bad");
  } catch (e) { pill.textContent = "unreachable"; pill.className = "pill bad"; }
}

function newSeries() {
  return { steps: new Columns(["loss", "b_hat", "b_hat_max", "bound"]), evals: new Columns(["test_accuracy"]) };
}

const charts = {
  loss: new StepChart($("#chart-loss"), { series: [{ label: "loss", color: "#2563eb" }] }),
  acc: new StepChart($("#chart-acc"), {
    series: [{ label: "test accuracy", color: "#16a34a" }], yRange: () => [0, 1] }),
  bhat: new StepChart($("#chart-bhat"), {
    series: [{ label: "B̂", color: "#9333ea" }, { label: "B̂ max", color: "#db2777" },
             { label: "bound", color: "#6b7280", dash: [5, 4] }],
    yRange: (min, max) => [0, max > 0 ? max * 1.05 : 1] }),
};
$("#loss-log").onchange = e => charts.loss.setLog(e.target.checked);

async function select(id) {
  if (S.es) S.es.close();
  clearTimeout(S.retry);
  Object.assign(S, { selected: id, es: null, series: newSeries(), lastStep: null, lastEval: null,
                     job: null, lastSeq: -1, lastEventId: 0, ended: false, marks: [] });
  history.replaceState(null, "", "#job=" + encodeURIComponent(id));
  for (const tr of document.querySelectorAll("#jobs tbody tr")) tr.classList.toggle("selected", tr.dataset.jobId === id);
  $("#detail").hidden = false;
  $("#events").innerHTML = "";
  queueDraw();
  // the history in one request (thinned on the server for long jobs), then the stream
  // for what is newer only
  try {
    const h = await getJSON(`/jobs/${encodeURIComponent(id)}/history`);
    if (S.selected !== id) return;
    for (const r of h.steps.items) addMetric(r);
    for (const r of h.evals.items) addMetric(r);
    for (const ev of h.events) renderEvent(ev);
    S.lastSeq = h.last_seq; S.lastEventId = h.last_event_id;
    // every mark of the run, however old (the history holds the latest events only)
    const q = `/jobs/${encodeURIComponent(id)}/events?limit=1000&kind=`;
    const [bound, guard] = await Promise.all([getJSON(q + "bound"), getJSON(q + "guard")]);
    if (S.selected !== id) return;
    for (const ev of [...bound.items, ...guard.items]) addMark(ev);
  } catch (e) { console.warn(e); }
  if (S.selected !== id) return;
  openStream();
  queueDraw();
}

function addMetric(r) {
  if (r.kind === "eval") {
    S.series.evals.push(r);
    if (!S.lastEval || r.seq > S.lastEval.seq) S.lastEval = r;
  } else {
    S.series.steps.push(r);
    if (!S.lastStep || r.seq > S.lastStep.seq) S.lastStep = r;
  }
}

function openStream() {
  const id = S.selected;
  // a reconnection by the browser itself sends the id of the last message (Last-Event-ID):
  // the server goes on from there, whatever this URL says
  const es = new EventSource(`/jobs/${encodeURIComponent(id)}/stream?after_seq=${S.lastSeq}&after_id=${S.lastEventId}`);
  S.es = es;
  es.addEventListener("job", e => {
    const prev = S.job && S.job.state;
    S.job = JSON.parse(e.data);
    queueDraw();
    if (prev !== S.job.state) refreshJobs();  // keep the list's state in step
  });
  // a run of new records in one message (a JSON array, in seq order)
  es.addEventListener("metrics", e => {
    let added = false;
    for (const r of JSON.parse(e.data)) {
      if (r.seq <= S.lastSeq) continue;
      S.lastSeq = r.seq;
      addMetric(r);
      added = true;
    }
    if (added) queueDraw();
  });
  es.addEventListener("event", e => {
    const ev = JSON.parse(e.data);
    if (ev.id <= S.lastEventId) return;
    S.lastEventId = ev.id;
    renderEvent(ev);
  });
  es.addEventListener("end", () => { S.ended = true; es.close(); queueDraw(); });
  es.onerror = () => {
    // CONNECTING: the browser reconnects by itself. CLOSED: it gave up (a 429 past the
    // server's limit on streams, a restart): try again from where we are, a bit later.
    if (es.readyState !== EventSource.CLOSED || S.ended || S.selected !== id) return;
    S.retry = setTimeout(() => { if (S.selected === id && S.es === es) openStream(); }, 3000);
  };
}

function renderJob() {
  const j = S.job;
  if (!j) return;
  $("#job-title").textContent = `${j.name} · ${j.id}`;
  const st = $("#job-state");
  st.textContent = j.state; st.className = "state " + j.state;
  $("#job-progress").style.width = `${Math.round(100 * j.progress)}%`;
  const ratio = (j.b_hat_max !== null && j.bound) ? j.b_hat_max / j.bound : null;
  const last = S.lastStep || {};
  const lastEval = S.lastEval || {};
  const stats = [
    ["step", `${j.step} / ${j.total_steps ?? "?"}`], ["loss", fmt(last.loss)],
    ["test accuracy", fmt(lastEval.test_accuracy, 3)], ["samples/s", fmt(last.samples_per_s, 3)],
    ["B̂ max", fmt(j.b_hat_max, 3)], ["B̂ mean", fmt(j.b_hat_mean, 3)],
    ["bound", fmt(j.bound, 3)], ["B̂ max / bound", fmt(ratio, 3)],
    ["workers", String(j.workers.length)], ["started", when(j.started_at)],
  ];
  $("#job-stats").innerHTML = stats.map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${esc(v)}</dd></div>`).join("");
  const err = $("#job-error");
  err.hidden = !j.error; err.textContent = j.error || "";
  $("#workers tbody").innerHTML = j.workers.map(w => `<tr><td>${w.id}</td><td>${esc(w.state)}</td>
    <td><code>${esc((w.node || "–").slice(0, 8))}</code></td><td>${w.step ?? "–"}</td></tr>`).join("");
}

function addMark(ev) {
  if ((ev.kind !== "bound" && ev.kind !== "guard") || ev.step === null) return;
  if (S.marks.some(m => m.id === ev.id)) return;
  const what = ev.kind === "bound" ? "bound" : (ev.guard || "warn");
  const label = ev.kind === "bound" ? "bound frozen" : `guard: ${what}`;
  S.marks.push({ id: ev.id, x: ev.step, color: MARK_COLORS[what] || "#111827", label });
  S.marks.sort((a, b) => a.x - b.x);
  queueDraw();
}

function renderEvent(ev) {
  addMark(ev);
  const li = document.createElement("li");
  const step = ev.step === null ? "" : ` step ${ev.step}`;
  li.innerHTML = `<span class="muted">${new Date(ev.wall_time).toLocaleTimeString()}${step}</span>
    <span class="kind ${esc(ev.kind)}">${esc(ev.kind)}</span>${ev.target ? `<code>${esc(ev.target)}</code> ` : ""}${esc(ev.detail)}`;
  const list = $("#events");
  list.insertBefore(li, list.firstChild);
  while (list.children.length > 200) list.removeChild(list.lastChild);
}

function queueDraw() {
  if (S.drawQueued) return;
  S.drawQueued = true;
  requestAnimationFrame(() => { S.drawQueued = false; draw(); renderJob(); });
}

function draw() {
  if (!S.series) return;
  charts.loss.setData(S.series.steps.cols.slice(0, 2));
  charts.acc.setData(S.series.evals.cols);
  const [xs, , bHat, bHatMax, bound] = S.series.steps.cols;
  charts.bhat.setData([xs, bHat, bHatMax, bound]);
  charts.bhat.setMarks(S.marks);
}

refreshJobs(); refreshReady();
setInterval(refreshJobs, 2000);
setInterval(refreshReady, 5000);
