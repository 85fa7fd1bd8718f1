// medassist chat page: streams answers from /v1/chat/completions (server-sent events).
// No framework and no build step; text is always inserted with textContent (never as HTML).
"use strict";

const KEY_STORE = "medassist.apiKey";
const SETTINGS_STORE = "medassist.settings";
const $ = (id) => document.getElementById(id);
const state = { messages: [], busy: false, controller: null, model: null };

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function headers() {
  const h = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

function openSettings(note) {
  $("settings").hidden = false;
  $("toggle-settings").setAttribute("aria-expanded", "true");
  $("settings-note").textContent = note || "";
  if (note) $("api-key").focus();
}

function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

function addMessage(role, text) {
  $("empty").hidden = true;
  const wrap = document.createElement("div");
  wrap.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "medassist";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  const sources = document.createElement("div");
  sources.className = "sources";
  sources.hidden = true;
  const meta = document.createElement("div");
  meta.className = "meta";
  wrap.append(who, body, sources, meta);
  $("log").appendChild(wrap);
  scrollDown();
  return { wrap, body, sources, meta };
}

// Only absolute http(s) URLs become links; anything else (javascript:, data:, relative) stays text.
function safeUrl(url) {
  try {
    const parsed = new URL(String(url));
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch (_) {
    return null;
  }
}

// The sources an answer used (the server's "sources" field), as links under the answer; or its note.
function showSources(view, sources, note) {
  view.sources.replaceChildren();
  if (Array.isArray(sources) && sources.length) {
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = "Sources:";
    const list = document.createElement("ol");
    for (const source of sources) {
      const item = document.createElement("li");
      const title = String(source.title || source.url || "source");
      const href = safeUrl(source.url);
      if (href) {
        const link = document.createElement("a");
        link.href = href;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        link.textContent = title;
        item.appendChild(link);
      } else {
        item.textContent = title;
      }
      list.appendChild(item);
    }
    view.sources.append(label, list);
    view.sources.hidden = false;
  } else if (note) {
    const text = document.createElement("span");
    text.className = "note";
    text.textContent = String(note);
    view.sources.appendChild(text);
    view.sources.hidden = false;
  }
}

async function errorMessage(resp) {
  try {
    const data = await resp.json();
    if (data && data.error && data.error.message) return data.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + resp.status;
}

// Reads a server-sent event stream and calls onData with each event's data (a string).
async function readEvents(stream, onData) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
      const raw = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
}

function requestBody() {
  const body = { messages: state.messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  return body;
}

async function send(question) {
  if (state.busy || !question) return;
  addMessage("user", question);
  state.messages.push({ role: "user", content: question });
  const view = addMessage("assistant", "");
  view.body.classList.add("streaming");
  setBusy(true);
  setStatus("Generating\u2026");
  state.controller = new AbortController();
  let answer = "";
  let finish = null;
  let usage = null;
  let sources = null;
  let sourcesNote = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!resp.ok) {
      const message = await errorMessage(resp);
      if (resp.status === 401) openSettings("The server needs an API key: " + message);
      throw new Error(resp.status === 429 ? "The server is busy; try again in a moment." : message);
    }
    await readEvents(resp.body, (data) => {
      if (data === "[DONE]") return false;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "generation failed");
      if (event.usage) usage = event.usage;
      if (Array.isArray(event.sources)) { sources = event.sources; sourcesNote = event.sources_note || null; }
      const choice = event.choices && event.choices[0];
      if (!choice) return true;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        view.body.textContent = answer.replace(/^\s+/, "");
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      return true;
    });
    state.messages.push({ role: "assistant", content: answer });
    if (!answer.trim()) view.body.textContent = "(empty answer)";
    showSources(view, sources, sourcesNote);
    const notes = [];
    if (finish === "length") notes.push("cut at the token limit");
    if (usage) notes.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " answer tokens");
    view.meta.textContent = notes.join(" \u00b7 ");
    setStatus("");
  } catch (err) {
    if (err.name === "AbortError") {
      state.messages.push({ role: "assistant", content: answer });
      view.meta.textContent = "stopped";
      setStatus("");
    } else {
      state.messages.pop();  // the question was not answered: do not send it again as history
      view.wrap.classList.add("error");
      view.body.textContent = answer ? answer + "\n\n" + err.message : err.message;
      setStatus("");
    }
  } finally {
    view.body.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

async function loadModel() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    if (health.auth_required && !apiKey()) openSettings("This server needs an API key.");
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.ok) {
      const data = await resp.json();
      state.model = data.data && data.data[0] ? data.data[0].id : null;
      $("model").textContent = state.model || "";
    } else {
      $("model").textContent = "";
      if (resp.status === 401) openSettings("Enter the server's API key.");
    }
  } catch (_) {
    setStatus("Cannot reach the server.");
  }
}

function restoreSettings() {
  $("api-key").value = apiKey();
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}");
    if (saved.maxTokens) $("max-tokens").value = saved.maxTokens;
    if (saved.temperature !== undefined && saved.temperature !== "") $("temperature").value = saved.temperature;
  } catch (_) { /* ignore broken storage */ }
}

function init() {
  restoreSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("input").value.trim();
    if (!question || state.busy) return;
    $("input").value = "";
    send(question);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    state.messages = [];
    for (const node of Array.from($("log").querySelectorAll(".msg"))) node.remove();
    $("empty").hidden = false;
    $("input").focus();
  });
  $("toggle-settings").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  });
  $("save-settings").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    localStorage.setItem(SETTINGS_STORE, JSON.stringify({
      maxTokens: $("max-tokens").value, temperature: $("temperature").value,
    }));
    $("settings-note").textContent = "";
    $("settings").hidden = true;
    $("toggle-settings").setAttribute("aria-expanded", "false");
    loadModel();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    $("api-key").value = "";
  });
  loadModel();
  $("input").focus();
}

document.addEventListener("DOMContentLoaded", init);
