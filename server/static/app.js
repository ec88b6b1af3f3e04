// The photo page: one conversation about one photo, sent whole on every question (as chat apps do;
// the server reuses what it has already evaluated), answers streamed, grounding boxes drawn.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SEND_BYTES = 8 * 1024 * 1024;   // bigger photos are re-encoded before sending
const MAX_SIDE = 2048;
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

const state = { model: null, photo: null, messages: [], controller: null, boxes: [] };

// Sampling from the page's address, e.g. /?temperature=0&max_tokens=64 (default: the model's own).
const SAMPLING = {};
for (const [name, parse] of [["max_tokens", parseInt], ["temperature", parseFloat], ["top_p", parseFloat],
                             ["top_k", parseInt], ["seed", parseInt]]) {
  const value = new URLSearchParams(location.search).get(name);
  if (value !== null && !Number.isNaN(parse(value))) SAMPLING[name] = parse(value);
}

function apiKey() { return localStorage.getItem("qwenvl-edge-api-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  let r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) {
    const key = prompt("This server needs an API key:");
    if (key) {
      localStorage.setItem("qwenvl-edge-api-key", key.trim());
      headers.Authorization = "Bearer " + key.trim();
      r = await fetch(path, Object.assign({}, options, { headers }));
    }
  }
  return r;
}

async function errorText(r) {
  try { return (await r.json()).error.message; } catch (_) { return r.status + " " + r.statusText; }
}

// --- server status -------------------------------------------------------------------------

async function watchHealth() {
  try {
    const r = await fetch("/health");
    if (r.ok) {
      const models = await api("/v1/models");
      if (models.ok) { state.model = (await models.json()).data[0].id; $("model").textContent = state.model; }
      $("status").textContent = "ready";
      return;
    }
    $("status").textContent = r.status === 503 ? "loading the model…" : await errorText(r);
  } catch (_) {
    $("status").textContent = "server not reachable";
  }
  setTimeout(watchHealth, 1000);
}

// --- the photo -----------------------------------------------------------------------------

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot read this image"));
    img.src = src;
  });
}

// A photo over the send limit is redrawn at most MAX_SIDE wide and sent as JPEG.
async function photoURL(file) {
  const url = await readAsDataURL(file);
  if (file.size <= MAX_SEND_BYTES) return url;
  const img = await loadImage(url);
  const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
}

async function pickPhoto(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError("that file is not an image"); return; }
  newChat();
  state.photo = await photoURL(file);
  $("photo").src = state.photo;
  $("figure").hidden = false;
  $("drop-hint").hidden = true;
  $("question").focus();
}

function drawBoxes(boxes) {
  state.boxes = boxes || [];
  const img = $("photo"), canvas = $("boxes"), list = $("box-list");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  list.textContent = "";
  g.lineWidth = 3;
  g.font = "14px system-ui, sans-serif";
  state.boxes.forEach((box, i) => {
    const color = COLORS[i % COLORS.length];
    const [x1, y1, x2, y2] = box.norm.map((v, k) => v / 1000 * (k % 2 ? canvas.height : canvas.width));
    g.strokeStyle = color;
    g.strokeRect(Math.min(x1, x2), Math.min(y1, y2), Math.abs(x2 - x1), Math.abs(y2 - y1));
    if (box.label) {
      const w = g.measureText(box.label).width + 8, top = Math.max(0, Math.min(y1, y2) - 20);
      g.fillStyle = color;
      g.fillRect(Math.min(x1, x2), top, w, 20);
      g.fillStyle = "#fff";
      g.fillText(box.label, Math.min(x1, x2) + 4, top + 15);
    }
    const li = document.createElement("li");
    li.style.color = color;
    li.textContent = `${box.label || "box"}: (${box.pixels.map(Math.round).join(", ")}) px`;
    list.appendChild(li);
  });
}

// --- the conversation ----------------------------------------------------------------------

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  $("transcript").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function showError(text) { addMessage("error", text); }

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("transcript").textContent = "";
  drawBoxes([]);
}

function userMessage(text) {
  if (state.messages.length === 0 && state.photo) {
    return { role: "user", content: [{ type: "image_url", image_url: { url: state.photo } }, { type: "text", text }] };
  }
  return { role: "user", content: text };
}

// Server-sent events from a fetch body: yields each event's {event, data}.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data };
    }
  }
}

async function ask(text) {
  const question = userMessage(text);
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const answerText = answer.querySelector(".text");
  let updates = 0;
  answer.classList.add("streaming");
  const body = Object.assign({ model: state.model || undefined, messages: state.messages.concat([question]),
                               stream: true, stream_options: { include_usage: true } }, SAMPLING);
  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  let reply = "", boxes = [], usage = null, firstAt = null;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                   signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const { event, data } of events(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (event === "error" || chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece && firstAt === null) firstAt = performance.now();
        reply += piece;
        if (choice.boxes) boxes = choice.boxes;
      }
      if (answerText.textContent !== reply) {
        answerText.textContent = reply;
        answer.dataset.updates = ++updates;   // how many times the answer grew while it streamed
      }
    }
    state.messages.push(question, { role: "assistant", content: reply });
    drawBoxes(boxes);
    const meta = document.createElement("span");
    meta.className = "meta";
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    const ttft = firstAt === null ? "" : `, first word after ${((firstAt - started) / 1000).toFixed(1)} s`;
    meta.textContent = (usage ? `${usage.completion_tokens} tokens in ${secs} s` : `${secs} s`) + ttft;
    answer.appendChild(meta);
  } catch (e) {
    answer.remove();
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    answer.classList.remove("streaming");
    answer.classList.add("done");
    state.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

// --- wiring --------------------------------------------------------------------------------

$("photo-input").addEventListener("change", (e) => pickPhoto(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => pickPhoto(e.dataTransfer.files[0]));
$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("question").value.trim();
  if (!text || state.controller) return;
  $("question").value = "";
  ask(text);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newChat);
window.addEventListener("resize", () => drawBoxes(state.boxes));
$("photo").addEventListener("load", () => drawBoxes(state.boxes));
watchHealth();
