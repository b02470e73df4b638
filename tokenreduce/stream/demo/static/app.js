// tokenreduce streaming demo: plain JS, charts drawn on canvases, no external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, sid: null, events: null, frames: [], latencies: [], maxTokens: null, samples: {},
  image: new Image(), lastFrame: null,
};
window.demoState = state; // for tests and the curious

function setMsg(id, text, kind) {
  const el = $(id);
  el.textContent = text || "";
  el.className = "msg" + (kind ? " " + kind : "");
}

async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                               body: JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: `the server answered ${r.status}` }; }
  if (!r.ok) throw new Error(data.error || `the server answered ${r.status}`);
  return data;
}

// ---------------------------------------------------------------------------------------------- charts
function setupCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 150;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [ctx, w, h];
}

// series: [{label, color, values, dashed, bars, axis: "left"|"right"}]
function drawChart(canvas, series, opts = {}) {
  const [ctx, w, h] = setupCanvas(canvas);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 44, r: opts.right ? 48 : 10, t: 18, b: 20 };
  const n = Math.max(1, ...series.map((s) => s.values.length));
  const maxOf = (axis) => {
    const vals = series.filter((s) => (s.axis || "left") === axis).flatMap((s) => s.values)
      .filter((v) => v !== null && isFinite(v));
    return Math.max(1e-9, ...vals.map(Math.abs), opts[axis + "Min"] || 0);
  };
  const top = { left: maxOf("left") * 1.1, right: maxOf("right") * 1.1 };
  const minOf = (axis) => Math.min(0, ...series.filter((s) => (s.axis || "left") === axis).flatMap((s) => s.values)
    .filter((v) => v !== null && isFinite(v)));
  const bottom = { left: minOf("left"), right: minOf("right") };
  const X = (i) => pad.l + (n <= 1 ? 0.5 : i / (n - 1)) * (w - pad.l - pad.r);
  const Y = (v, axis) => pad.t + (1 - (v - bottom[axis]) / (top[axis] - bottom[axis] || 1)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#d5dbe5"; ctx.lineWidth = 1; ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#6b7385";
  for (let k = 0; k <= 4; k++) {
    const v = bottom.left + (top.left - bottom.left) * k / 4, y = Y(v, "left");
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(fmt(v), pad.l - 4, y + 4);
    if (opts.right) {
      const vr = bottom.right + (top.right - bottom.right) * k / 4;
      ctx.textAlign = "left"; ctx.fillText(fmt(vr), w - pad.r + 4, Y(vr, "right") + 4);
    }
  }
  ctx.textAlign = "center";
  ctx.fillText(opts.xlabel ? `${opts.xlabel} ${n}` : "", w / 2, h - 4);
  const barW = Math.max(2, Math.min(28, (w - pad.l - pad.r) / (n + 1) * 0.7));
  for (const s of series) {
    const axis = s.axis || "left";
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
    ctx.setLineDash(s.dashed ? [6, 4] : []);
    if (s.bars) {
      s.values.forEach((v, i) => { if (v !== null) ctx.fillRect(X(i) - barW / 2, Y(v, axis), barW, Y(0, axis) - Y(v, axis)); });
    } else {
      ctx.beginPath();
      let started = false;
      s.values.forEach((v, i) => {
        if (v === null || !isFinite(v)) { started = false; return; }
        if (!started) { ctx.moveTo(X(i), Y(v, axis)); started = true; } else ctx.lineTo(X(i), Y(v, axis));
      });
      ctx.stroke();
      if (s.values.length === 1 && s.values[0] !== null) { ctx.fillRect(X(0) - 2, Y(s.values[0], axis) - 2, 4, 4); }
    }
  }
  ctx.setLineDash([]);
  let lx = pad.l + 6;
  ctx.textAlign = "left";
  for (const s of series) {
    ctx.fillStyle = s.color; ctx.fillRect(lx, 5, 10, 3);
    ctx.fillStyle = "#1d2330"; ctx.fillText(s.label, lx + 14, 11);
    lx += 20 + ctx.measureText(s.label).width + 10;
  }
  canvas.dataset.points = String(Math.max(0, ...series.map((s) => s.values.length)));
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(a >= 1 ? 1 : 2);
}

function redrawCharts() {
  const f = state.frames;
  drawChart($("chart-tokens"), [
    { label: "arriving", color: "#9aa6ba", values: f.map((r) => r.arrived) },
    { label: "kept", color: "#2f6fdf", values: f.map((r) => r.kept) },
  ], { xlabel: "frames" });
  drawChart($("chart-saved"), [
    { label: "vision ms / frame", color: "#9aa6ba", values: f.map((r) => r.vision_ms) },
    { label: "saved ms (cumulative, right)", color: "#2e9b57", values: f.map((r) => r.saved_total_ms), axis: "right" },
  ], { xlabel: "frames", right: true });
  const kv = [{ label: "visual KV entries", color: "#8a4fd0", values: f.map((r) => r.visual_tokens) }];
  if (state.maxTokens) kv.push({ label: "budget", color: "#b6453c", dashed: true, values: f.map(() => state.maxTokens) });
  drawChart($("chart-kv"), kv, { xlabel: "frames" });
  drawChart($("chart-latency"), [
    { label: "answer latency ms", color: "#e08a1e", bars: true, values: state.latencies },
  ], { xlabel: "answers" });
}

// ---------------------------------------------------------------------------------------------- the frame
function drawFrame() {
  const r = state.lastFrame;
  const canvas = $("frame");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#222"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!r || !state.image.complete || !state.image.naturalWidth) return;
  const img = state.image;
  const s = Math.min(canvas.width / img.naturalWidth, canvas.height / img.naturalHeight);
  const w = img.naturalWidth * s, h = img.naturalHeight * s, x0 = (canvas.width - w) / 2, y0 = (canvas.height - h) / 2;
  ctx.drawImage(img, x0, y0, w, h);
  // the model sees the frame resized to a square: its token grid covers the whole frame
  const [gh, gw] = r.grid, cw = w / gw, ch = h / gh;
  const kept = new Set(r.rows.map((row, i) => row * gw + r.cols[i]));
  for (let i = 0; i < gh; i++) {
    for (let j = 0; j < gw; j++) {
      if (kept.has(i * gw + j)) {
        ctx.strokeStyle = "#37d67a"; ctx.lineWidth = 2;
        ctx.strokeRect(x0 + j * cw + 1, y0 + i * ch + 1, cw - 2, ch - 2);
      } else {
        ctx.fillStyle = "rgba(0,0,0,0.6)"; ctx.fillRect(x0 + j * cw, y0 + i * ch, cw, ch);
      }
    }
  }
  if (r.reference) {
    ctx.fillStyle = "#ffcc33"; ctx.fillRect(6, 6, 20, 18);
    ctx.fillStyle = "#1d2330"; ctx.font = "bold 13px system-ui"; ctx.fillText("R", 11, 20);
  }
}

function onFrame(r) {
  state.frames.push(r);
  state.lastFrame = r;
  state.image.onload = drawFrame;
  state.image.src = r.image;
  document.body.dataset.frames = String(state.frames.length);
  const ref = r.reference === null ? "" : r.reference ? " · reference" : " · cached";
  $("frame-info").textContent = `frame ${r.frame} · t=${r.t.toFixed(1)} s · kept ${r.kept}/${r.arrived} tokens` +
    ` · vision ${r.vision_ms.toFixed(1)} ms${ref}` + (r.lag ? ` · ${r.lag.toFixed(1)} s behind` : "");
  redrawCharts();
  renderStats(r);
}

function renderStats(r) {
  const total = state.frames.reduce((a, x) => a + x.arrived, 0), kept = state.frames.reduce((a, x) => a + x.kept, 0);
  const last = state.latencies.length ? state.latencies[state.latencies.length - 1] : null;
  const rows = [
    ["frames", state.frames.length], ["tokens kept", `${kept} / ${total} (${(100 * kept / Math.max(1, total)).toFixed(0)}%)`],
    ["KV entries (visual)", `${r.visual_tokens}${r.max_tokens ? " / " + r.max_tokens : ""}`],
    ["KV cache", `${(r.kv_bytes / 1024).toFixed(0)} KiB, ${r.kv_tokens} entries`],
    ["vision time", `${r.vision_total_ms.toFixed(0)} ms`], ["saved by the cacher", `${r.saved_total_ms.toFixed(1)} ms`],
    ["next position id", r.position], ["last answer", last === null ? "-" : `${last.toFixed(0)} ms`],
  ];
  $("stats").innerHTML = "";
  for (const [k, v] of rows) {
    const a = document.createElement("div"); a.textContent = k;
    const b = document.createElement("div"); b.textContent = String(v);
    $("stats").append(a, b);
  }
}

// ---------------------------------------------------------------------------------------------- controls
async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  state.info = info;
  $("model-info").textContent = `${info.model} · ${info.model_name} · uploads up to ${info.max_upload_mb} MB, ` +
    `${info.max_seconds} s`;
  for (const s of info.samples) {
    state.samples["sample:" + s.name] = s;
    $("video").add(new Option(`sample: ${s.name} (${s.seconds.toFixed(0)} s)`, "sample:" + s.name));
  }
  for (const p of info.plans) $("plan").add(new Option(`${p.label} — ${p.plan}`, p.plan));
  $("plan").value = "stc-cache+stc-prune";
  for (const p of info.protocols) $("protocol").add(new Option(p, p));
  fillQuestion();
}

function fillQuestion() {
  const s = state.samples[$("video").value];
  if (!s) return;
  $("question").value = s.question;
  for (let i = 0; i < 4; i++) $("opt-" + i).value = s.options[i] || "";
}

async function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  setMsg("upload-msg", `uploading ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  try {
    const r = await fetch("/api/upload", { method: "POST", body: form });
    let data;
    try { data = await r.json(); } catch (e) { data = { error: `the server answered ${r.status}` }; }
    if (!r.ok) throw new Error(data.error || `the server answered ${r.status}`);
    const opt = new Option(`upload: ${data.name} (${data.seconds.toFixed(0)} s)`, data.video);
    $("video").add(opt);
    $("video").value = data.video;
    setMsg("upload-msg", `${data.name}: ${data.width}x${data.height}, ${data.seconds.toFixed(1)} s, ready`, "ok");
  } catch (e) {
    setMsg("upload-msg", e.message, "error");
  } finally {
    $("upload").value = "";
  }
}

async function start() {
  stop(false);
  const plan = $("plan-custom").value.trim() || $("plan").value;
  const mt = $("max-tokens").value.trim();
  setMsg("start-msg", "starting…");
  try {
    const data = await postJSON("/api/start", {
      video: $("video").value, plan, max_tokens: mt ? Number(mt) : null, fps: Number($("fps").value),
      protocol: $("protocol").value, keep_positions: $("keep-positions").checked, realtime: $("realtime").checked,
    });
    state.sid = data.sid; state.frames = []; state.latencies = []; state.maxTokens = data.max_tokens;
    redrawCharts();
    setMsg("start-msg", `streaming with ${data.plan} · ${data.tokens_per_frame} tokens a frame (${data.grid.join("x")})` +
      (data.max_tokens ? ` · KV budget ${data.max_tokens}` : ""), "ok");
    $("stop").disabled = false; $("ask").disabled = false;
    document.querySelector("#qa .hint").textContent = "";
    const es = new EventSource(`/api/events/${data.sid}`);
    state.events = es;
    es.addEventListener("frame", (e) => onFrame(JSON.parse(e.data)));
    es.addEventListener("done", (e) => {
      setMsg("start-msg", `stream finished: ${JSON.parse(e.data).frames} frames; keep asking`, "ok");
      document.body.dataset.done = "1"; es.close();
    });
    es.addEventListener("error", (e) => {
      if (e.data) setMsg("start-msg", JSON.parse(e.data).error, "error");
      es.close();
    });
  } catch (e) {
    setMsg("start-msg", e.message, "error");
  }
}

function stop(tell = true) {
  if (state.events) { state.events.close(); state.events = null; }
  if (state.sid && tell) postJSON("/api/stop", { sid: state.sid }).catch(() => {});
  $("stop").disabled = true;
  if (tell) setMsg("start-msg", "stopped; the session stays until a new stream starts");
}

async function ask() {
  if (!state.sid) return;
  const options = [0, 1, 2, 3].map((i) => $("opt-" + i).value.trim()).filter((x) => x);
  $("answer").textContent = ""; $("answer-meta").textContent = ""; setMsg("ask-msg", "");
  document.body.dataset.answered = "0";
  $("ask").disabled = true;
  try {
    const r = await fetch("/api/ask", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sid: state.sid, question: $("question").value, options }) });
    if (!r.ok) {
      let data; try { data = await r.json(); } catch (e) { data = {}; }
      throw new Error(data.error || `the server answered ${r.status}`);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, k); buf = buf.slice(k + 2);
        const ev = /event: (.*)/.exec(block), data = /data: (.*)/.exec(block);
        if (ev && data) onAnswerEvent(ev[1], JSON.parse(data[1]));
      }
    }
  } catch (e) {
    setMsg("ask-msg", e.message, "error");
  } finally {
    $("ask").disabled = false;
  }
}

function onAnswerEvent(kind, d) {
  if (kind === "token") {
    $("answer").textContent += d.text;
    document.body.dataset.tokens = String(Number(document.body.dataset.tokens || 0) + 1);
  } else if (kind === "answer") {
    if (!d.text) $("answer").textContent = "(empty answer: the default model needs options)";
    const choice = d.letter ? `choice (${d.letter}) ${d.option || ""}` : "no letter";
    $("answer-meta").textContent = `${choice} · ${d.latency_ms.toFixed(0)} ms (first token ${
      (d.ttft_ms || 0).toFixed(0)} ms) · from ${d.frames} frames`;
    state.latencies.push(d.latency_ms);
    document.body.dataset.answered = "1";
    redrawCharts();
    if (state.lastFrame) renderStats(state.lastFrame);
  } else if (kind === "error") {
    setMsg("ask-msg", d.error, "error");
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("video").addEventListener("change", fillQuestion);
  $("upload").addEventListener("change", upload);
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => stop(true));
  $("ask").addEventListener("click", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
  window.addEventListener("resize", redrawCharts);
  loadInfo().then(() => { redrawCharts(); drawFrame(); document.body.dataset.ready = "1"; })
    .catch((e) => setMsg("start-msg", "cannot reach the server: " + e.message, "error"));
});
