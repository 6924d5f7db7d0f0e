// nanoseek's chat page: plain JavaScript, no dependencies. It talks to the server that serves it, through its
// OpenAI-compatible API: GET /v1/models for the model's name, POST /v1/chat/completions with stream: true
// (server-sent events). With "Reasoning" on, the request asks for R1's <think> section (`think: true`), which
// arrives as `reasoning_content` deltas and is shown folded; as in R1's chat template, only the answers go back
// into the conversation. Stop aborts the fetch: the server sees the client go and cancels the generation.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "think"]; // kept in localStorage
const state = { model: null, history: [], controller: null, conversation: 0 };

// ---- settings -------------------------------------------------------------------------------------------------
function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("nanoseek." + id);
    if (saved === null) continue;
    if ($(id).type === "checkbox") $(id).checked = saved === "true";
    else $(id).value = saved;
  }
  $("api-key").value = sessionStorage.getItem("nanoseek.api-key") || "";
}

function saveSetting(event) {
  const el = event.target;
  if (el.id === "api-key") sessionStorage.setItem("nanoseek.api-key", el.value);
  else localStorage.setItem("nanoseek." + el.id, el.type === "checkbox" ? String(el.checked) : el.value);
}

function number(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = parse(raw);
  if (!Number.isFinite(v)) throw new Error(`${$(id).labels[0].textContent} must be a number, got "${raw}"`);
  return v;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      $("model-name").textContent = "?";
      setStatus("This server needs an API key: enter it in the API key field.", true);
      return;
    }
    if (!r.ok) throw new Error(await errorMessage(r));
    state.model = (await r.json()).data[0].id;
    $("model-name").textContent = state.model;
    setStatus("Ready.");
  } catch (e) {
    setStatus("Cannot reach the server: " + e.message, true);
  }
}

// ---- the conversation's view ----------------------------------------------------------------------------------
function scrolledToEnd() {
  const m = $("messages");
  return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
}

function addMessage(role, text = "") {
  const follow = scrolledToEnd();
  const root = document.createElement("div");
  root.className = "message " + role;
  root.dataset.role = role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  root.append(body);
  $("messages").append(root);
  if (follow) root.scrollIntoView({ block: "end" });
  return root;
}

// An assistant message: a folded <details> for the reasoning (made when some arrives), the answer, a line of
// numbers at the end.
function assistantView() {
  const root = addMessage("assistant");
  root.dataset.state = "streaming";
  const content = root.querySelector(".content");
  let details = null;
  return {
    root,
    update(reasoning, answer) {
      const follow = scrolledToEnd();
      if (reasoning && !details) {
        details = document.createElement("details");
        details.className = "reasoning";
        details.innerHTML = "<summary>Thinking…</summary><div class=\"thought\"></div>";
        root.insertBefore(details, content);
      }
      if (details) details.querySelector(".thought").textContent = reasoning;
      content.textContent = answer;
      if (follow) root.scrollIntoView({ block: "end" });
    },
    finish(stateName, summary, meta) {
      root.dataset.state = stateName;
      if (details) details.querySelector("summary").textContent = summary;
      const line = document.createElement("div");
      line.className = "meta";
      line.textContent = meta;
      root.append(line);
    },
  };
}

// A model that writes its reasoning into the answer itself ("<think>...</think> answer", as an R1 model served
// without a reasoning parser does) gets it folded too: (reasoning, answer) of such a text; while it streams, a
// start that may still become "<think>" shows nothing yet.
function splitThink(text, final = false) {
  const start = text.trimStart();
  if (!final && "<think>".startsWith(start)) return ["", ""];
  if (!start.startsWith("<think>")) return ["", text];
  const rest = start.slice("<think>".length);
  const end = rest.indexOf("</think>");
  return end < 0 ? [rest, ""] : [rest.slice(0, end), rest.slice(end + "</think>".length).trimStart()];
}

// ---- server-sent events ---------------------------------------------------------------------------------------
// The `data:` payloads of a text/event-stream response, as they arrive.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

// ---- one turn -------------------------------------------------------------------------------------------------
function requestBody() {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const body = { model: state.model || "", messages, stream: true, stream_options: { include_usage: true } };
  const temperature = number("temperature", parseFloat);
  const topP = number("top-p", parseFloat);
  const maxTokens = number("max-tokens", (s) => parseInt(s, 10));
  if (temperature !== undefined) body.temperature = temperature;
  if (topP !== undefined) body.top_p = topP;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if ($("think").checked) body.think = true;
  return body;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

async function send(text) {
  let body;
  try {
    if (!state.model) await loadModel();
    state.history.push({ role: "user", content: text });
    body = requestBody();
  } catch (e) {
    state.history.pop();
    setStatus(e.message, true);
    return;
  }
  addMessage("user", text);
  const conversation = state.conversation;
  const view = assistantView();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("Generating…");
  let reasoning = "", answer = "", finish = null, usage = null, error = null, deltas = 0;
  const start = performance.now();
  let firstAt = null, thoughtFor = null, thought = "", shown = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content || d.content) {
          if (firstAt === null) firstAt = performance.now();
          deltas += 1;
        }
        if (d.reasoning_content) reasoning += d.reasoning_content;
        if (d.content) answer += d.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      [thought, shown] = splitThink(answer);
      if (thoughtFor === null && shown && (reasoning || thought)) thoughtFor = (performance.now() - start) / 1000;
      view.update(reasoning + thought, shown);
      view.root.dataset.deltas = String(deltas);
    }
  } catch (e) {
    if (e.name !== "AbortError") error = e.message;
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
  const stopped = controller.signal.aborted;
  const seconds = (performance.now() - start) / 1000;
  const parts = [];
  if (usage) {
    parts.push(`${usage.completion_tokens} tokens`);
    if (firstAt !== null) parts.push(`first after ${((firstAt - start) / 1000).toFixed(2)} s`);
    parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
  }
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : "finished");
  if (stopped) parts.push(`stopped after ${seconds.toFixed(1)} s`);
  if (error) parts.push("error: " + error);
  if (conversation !== state.conversation) return; // a new conversation began meanwhile
  [thought, shown] = splitThink(answer, true);
  view.update(reasoning + thought, shown);
  const thinking = thoughtFor ?? seconds;
  view.finish(error ? "error" : stopped ? "stopped" : "done",
              `Thought for ${thinking.toFixed(1)} s${shown ? "" : " (no answer yet)"}`, parts.join(" · "));
  if (answer || reasoning) state.history.push({ role: "assistant", content: answer });
  else state.history.pop(); // nothing came back: the question was not answered, so it leaves the history
  setStatus(error ? "Error: " + error : stopped ? "Stopped." : "Ready.", Boolean(error));
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newConversation() {
  stop();
  state.conversation += 1;
  state.history = [];
  $("messages").replaceChildren();
  setStatus("New conversation.");
  $("input").focus();
}

// ---- wiring ---------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  for (const id of [...SETTINGS, "api-key"]) $(id).addEventListener("change", saveSetting);
  $("api-key").addEventListener("change", loadModel);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  loadModel();
  $("input").focus();
});
