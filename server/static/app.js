// The photo page: one conversation about one photo, sent whole on every question (as chat apps do;
// the server reuses what it has already evaluated), answers streamed, grounding boxes drawn.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SEND_BYTES = 8 * 1024 * 1024;   // bigger photos are re-encoded before sending
const MAX_SIDE = 2048;
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

// boxes: the photo's boxes now drawn; pinned: the one a click highlighted (-1: none); chat: bumped by New chat
const state = { model: null, photo: null, messages: [], controller: null, boxes: [], pinned: -1, chat: 0 };

// Sampling from the page's address, e.g. /?temperature=0&max_tokens=64 (default: the model's own).
const SAMPLING = {};
for (const [name, parse] of [["max_tokens", parseInt], ["temperature", parseFloat], ["top_p", parseFloat],
                             ["top_k", parseInt], ["seed", parseInt]]) {
  const value = new URLSearchParams(location.search).get(name);
  if (value !== null && !Number.isNaN(parse(value))) SAMPLING[name] = parse(value);
}

// "1 token", "2 tokens": a count with its word.
function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

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
  const g = canvas.getContext("2d");
  g.fillStyle = "#fff";  // JPEG has no alpha: transparent pixels go white, as the model sees them
  g.fillRect(0, 0, canvas.width, canvas.height);
  g.drawImage(img, 0, 0, canvas.width, canvas.height);
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

// Each box in its colour with its number (the chip in the answer shows the same); `highlight` is drawn
// thick and the others faint, so the box a chip points at stands out.
function drawBoxes(boxes, highlight = -1) {
  state.boxes = boxes || [];
  const img = $("photo"), canvas = $("boxes"), list = $("box-list");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  list.textContent = "";
  g.font = "14px system-ui, sans-serif";
  state.boxes.forEach((box, i) => {
    const color = COLORS[i % COLORS.length];
    const [x1, y1, x2, y2] = box.norm.map((v, k) => v / 1000 * (k % 2 ? canvas.height : canvas.width));
    const left = Math.min(x1, x2), top = Math.min(y1, y2);
    g.globalAlpha = highlight < 0 || highlight === i ? 1 : 0.35;
    g.lineWidth = highlight === i ? 6 : 3;
    g.strokeStyle = color;
    g.strokeRect(left, top, Math.abs(x2 - x1), Math.abs(y2 - y1));
    const tag = box.label ? `${i + 1} ${box.label}` : `${i + 1}`;
    const w = g.measureText(tag).width + 8, labelTop = Math.max(0, top - 20);
    g.fillStyle = color;
    g.fillRect(left, labelTop, w, 20);
    g.fillStyle = "#fff";
    g.fillText(tag, left + 4, labelTop + 15);
    const li = document.createElement("li");
    li.style.color = color;
    li.dataset.box = i;
    li.classList.toggle("on", highlight === i);
    li.textContent = `${box.label || "box"}: (${box.pixels.map(Math.round).join(", ")}) px`;
    list.appendChild(li);
  });
  g.globalAlpha = 1;
}

// --- grounded answers: <ref>the dog</ref><box>(x1,y1),(x2,y2)</box> as a person reads it ----------

// The tags as runtime/boxes.py reads them: corners 0..1000 of the image, clamped; a <box> without a
// <ref> before it takes the last label seen.
const TAGS = /<ref>([\s\S]*?)<\/ref>|<box>\s*\((-?\d+)\s*,\s*(-?\d+)\)\s*,\s*\((-?\d+)\s*,\s*(-?\d+)\)\s*<\/box>/g;
const OPENERS = ["<ref>", "<box>"];

// The answer's pieces ({text} | {ref} | {box: index}) and boxes ({label, norm, pixels}); while it
// streams, a tag still being written is held back instead of shown as half a tag.
function parseAnswer(text, streaming) {
  const pieces = [], boxes = [];
  const img = $("photo"), size = [img.naturalWidth || 0, img.naturalHeight || 0];
  let label = "", at = 0;
  for (const m of text.matchAll(TAGS)) {
    if (m.index > at) pieces.push({ text: text.slice(at, m.index) });
    at = m.index + m[0].length;
    if (m[1] !== undefined) { label = m[1].trim(); pieces.push({ ref: m[1] }); continue; }
    const norm = m.slice(2, 6).map((v) => Math.min(Math.max(parseInt(v, 10), 0), 1000));
    boxes.push({ label, norm, pixels: norm.map((v, k) => v / 1000 * size[k % 2]) });
    pieces.push({ box: boxes.length - 1 });
  }
  let tail = text.slice(at);
  if (streaming) tail = holdBackOpenTag(tail, pieces);
  if (tail) pieces.push({ text: tail });
  return { pieces, boxes };
}

// The streamed tail without an unfinished tag: "<ref>the d" shows as the ref so far, "<box>(1" and
// a trailing "<bo" not at all.
function holdBackOpenTag(tail, pieces) {
  const box = tail.indexOf("<box>"), ref = tail.indexOf("<ref>");
  if (ref >= 0 && (box < 0 || ref < box)) {
    if (ref > 0) pieces.push({ text: tail.slice(0, ref) });
    pieces.push({ ref: tail.slice(ref + 5).replace(/<\/?r?e?f?$/, "") });
    return "";
  }
  if (box >= 0) return tail.slice(0, box);
  for (let k = Math.min(tail.length, 5); k > 0; k--) {
    if (OPENERS.some((o) => o.startsWith(tail.slice(-k)))) return tail.slice(0, -k);
  }
  return tail;
}

// The answer's readable view: ref text inline (underlined in its box's colour), each box a numbered
// chip in the colour of the box drawn on the photo.
function renderAnswer(answer, text, streaming = false) {
  const { pieces, boxes } = parseAnswer(text, streaming);
  const view = answer.querySelector(".text");
  view.textContent = "";
  pieces.forEach((piece, k) => {
    if (piece.text !== undefined) { view.append(piece.text); return; }
    if (piece.ref !== undefined) {
      const span = document.createElement("span");
      span.className = "ref";
      const next = pieces.slice(k + 1).find((p) => p.text === undefined || p.text.trim());
      if (next && next.box !== undefined) span.style.setProperty("--c", COLORS[next.box % COLORS.length]);
      span.textContent = piece.ref;
      view.append(span);
      return;
    }
    view.append(chip(piece.box, boxes[piece.box]));
  });
  answer.querySelector(".raw").textContent = text;
  answer.boxes = boxes;
  answer.dataset.boxes = boxes.length;
  return boxes;
}

function chip(i, box) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "chip";
  button.dataset.box = i;
  button.style.setProperty("--c", COLORS[i % COLORS.length]);
  button.textContent = String(i + 1);
  button.setAttribute("aria-label", `box ${i + 1}: ${box.label || "unnamed"}`);
  button.title = `${box.label || "box"} ${i + 1}: (${box.norm[0]},${box.norm[1]}),(${box.norm[2]},${box.norm[3]})`
    + " of 1000 — click to highlight it on the photo";
  return button;
}

// The answer whose boxes the photo shows: the newest with boxes, or the one whose chip was clicked.
function shownAnswer() {
  return $("transcript").querySelector(".msg.assistant.shown");
}

function showAnswerBoxes(answer, highlight = -1) {
  document.querySelectorAll(".msg.assistant.shown").forEach((a) => a !== answer && a.classList.remove("shown"));
  if (answer) answer.classList.add("shown");
  drawBoxes(answer ? answer.boxes : [], highlight);
  document.querySelectorAll(".chip.on").forEach((c) => c.classList.remove("on"));
  if (answer && highlight >= 0) {
    answer.querySelectorAll(`.chip[data-box="${highlight}"]`).forEach((c) => c.classList.add("on"));
  }
}

// Hover previews a chip's box; a click pins it (a second click unpins); leaving restores the pinned view.
function wireChips() {
  const transcript = $("transcript");
  const target = (e) => e.target.closest && e.target.closest(".chip");
  transcript.addEventListener("mouseover", (e) => {
    const c = target(e);
    if (c) drawBoxes(c.closest(".msg").boxes, Number(c.dataset.box));
  });
  transcript.addEventListener("mouseout", (e) => { if (target(e)) showAnswerBoxes(shownAnswer(), state.pinned); });
  transcript.addEventListener("click", (e) => {
    const c = target(e);
    if (!c) return;
    const answer = c.closest(".msg"), i = Number(c.dataset.box);
    state.pinned = answer === shownAnswer() && state.pinned === i ? -1 : i;
    showAnswerBoxes(answer, state.pinned);
  });
  $("box-list").addEventListener("click", (e) => {
    const li = e.target.closest("li");
    if (!li) return;
    const i = Number(li.dataset.box);
    state.pinned = state.pinned === i ? -1 : i;
    showAnswerBoxes(shownAnswer(), state.pinned);
  });
}

// "raw" shows the model's own text, tags and all; "formatted" goes back.
function rawToggle(answer) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "raw-toggle";
  button.textContent = "raw";
  button.addEventListener("click", () => {
    const raw = answer.querySelector(".raw");
    raw.hidden = !raw.hidden;
    answer.querySelector(".text").hidden = !raw.hidden;
    button.textContent = raw.hidden ? "raw" : "formatted";
  });
  return button;
}

// --- the conversation ----------------------------------------------------------------------

// One message; an answer also keeps its raw text (hidden until "raw"), a question with the photo shows
// a thumbnail of it, on white as the model sees it.
function addMessage(role, text, photo = null) {
  const li = document.createElement("li");
  li.className = "msg " + role;
  if (photo) {
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    thumb.alt = "the photo sent with this question";
    thumb.src = photo;
    li.appendChild(thumb);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  if (role === "assistant") {
    const raw = document.createElement("code");
    raw.className = "raw";
    raw.hidden = true;
    li.appendChild(raw);
  }
  $("transcript").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function showError(text) { addMessage("error", text); }

function newChat() {
  state.chat++;  // an answer still streaming belongs to the old chat: it must not land in this one
  if (state.controller) state.controller.abort();
  state.messages = [];
  state.pinned = -1;
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

// Ask, stream the answer in; Stop keeps what came so far as the answer (marked stopped), and the
// next question is sent with it, as chat apps do.
async function ask(text) {
  const question = userMessage(text), chat = state.chat;
  addMessage("user", text, Array.isArray(question.content) ? state.photo : null);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const body = Object.assign({ model: state.model || undefined, messages: state.messages.concat([question]),
                               stream: true, stream_options: { include_usage: true } }, SAMPLING);
  state.controller = new AbortController();
  busy(true);
  const started = performance.now();
  const got = { reply: "", usage: null, firstAt: null };
  let failure = null;
  try {
    await streamAnswer(body, answer, got);
  } catch (e) {
    failure = e;
  } finally {
    answer.classList.remove("streaming");
    answer.classList.add("done");
    state.controller = null;
    busy(false);
  }
  if (chat !== state.chat) return;  // New chat while it streamed: the turn went with the old chat
  if (failure && failure.name !== "AbortError") { answer.remove(); showError(failure.message); return; }
  finishAnswer(answer, got, failure !== null, started);
  state.messages.push(question, { role: "assistant", content: got.reply });
}

// Reads the server-sent events into `got` (reply, usage, first-token time), redrawing the answer as it grows.
async function streamAnswer(body, answer, got) {
  const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                 signal: state.controller.signal });
  if (!r.ok) throw new Error(await errorText(r));
  let shown = "", updates = 0;
  for await (const { event, data } of events(r)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (event === "error" || chunk.error) throw new Error(chunk.error.message);
    if (chunk.usage) got.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece && got.firstAt === null) got.firstAt = performance.now();
      got.reply += piece;
    }
    if (got.reply !== shown) {
      renderAnswer(answer, got.reply, true);
      shown = got.reply;
      answer.dataset.updates = ++updates;   // how many times the answer grew while it streamed
    }
  }
}

// The answer's final view, its boxes on the photo, and its line of numbers (or "stopped").
function finishAnswer(answer, got, stopped, started) {
  const boxes = renderAnswer(answer, got.reply);
  if (boxes.length) { state.pinned = -1; showAnswerBoxes(answer); }
  const meta = document.createElement("span");
  meta.className = "meta";
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  const ttft = got.firstAt === null ? "" : `, first word after ${((got.firstAt - started) / 1000).toFixed(1)} s`;
  if (stopped) {
    answer.classList.add("stopped");
    meta.textContent = got.reply ? `stopped after ${secs} s${ttft}` : "stopped before the answer began";
  } else {
    meta.textContent = (got.usage ? `${plural(got.usage.completion_tokens, "token")} in ${secs} s` : `${secs} s`) + ttft;
  }
  if (answer.querySelector(".text").textContent !== got.reply) meta.appendChild(rawToggle(answer));
  answer.appendChild(meta);
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
window.addEventListener("resize", () => drawBoxes(state.boxes, state.pinned));
$("photo").addEventListener("load", () => drawBoxes(state.boxes, state.pinned));
wireChips();
watchHealth();
