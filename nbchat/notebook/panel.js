// The nbchat chat panel's front end (an anywidget ES module: no build step, no CDN).
//
// It draws what the kernel side (nbchat/notebook/panel.py) syncs -- the transcript, busy state,
// status, settings, attachments, the error line -- and streams the reply from custom "delta"
// messages. Message HTML comes rendered by the kernel (markdown-it with raw HTML disabled), so a
// model's output never carries markup of its own. Actions go back as custom messages
// ({action: "send" | "stop" | "retry" | "undo" | "new_chat" | "settings" | "attach" | "detach"}).

const SETTING_FIELDS = [
  ["model", "Model", "text"],
  ["system", "System prompt", "textarea"],
  ["temperature", "Temperature", "number"],
  ["top_p", "Top p", "number"],
  ["top_k", "Top k", "number"],
  ["max_tokens", "Max tokens", "number"],
  ["seed", "Seed", "number"],
];

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Insecure contexts (plain http on a LAN address) have no clipboard API.
    const area = element("textarea", { class: "nbchat-offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.dataset.copied = "true";
  setTimeout(() => delete button.dataset.copied, 1200);
}

function setBody(body, html) {
  body.innerHTML = html; // rendered by the kernel with raw HTML disabled: no markup from the model
  for (const pre of body.querySelectorAll("pre")) {
    const copy = element("button", { class: "nbchat-copy-code", "aria-label": "Copy", title: "Copy code", text: "Copy" });
    copy.addEventListener("click", () => copyText(pre.querySelector("code")?.textContent ?? pre.textContent, copy));
    pre.prepend(copy);
  }
}

function render({ model, el }) {
  const root = element("div", { class: "nbchat-panel" });

  // Header: status line and the buttons that act on the whole chat.
  const status = element("div", { class: "nbchat-status", role: "status", "aria-live": "polite" });
  const settingsButton = element("button", { "aria-label": "Settings", "aria-expanded": "false", text: "⚙ Settings" });
  const newChatButton = element("button", { "aria-label": "New chat", text: "New chat" });
  const header = element("div", { class: "nbchat-header" }, [status, element("div", { class: "nbchat-actions" }, [newChatButton, settingsButton])]);

  // Settings drawer.
  const drawer = element("form", { class: "nbchat-settings", hidden: "" });
  const fields = {};
  const modelList = element("datalist", { id: `nbchat-models-${Math.random().toString(36).slice(2)}` });
  for (const [key, label, kind] of SETTING_FIELDS) {
    const input = kind === "textarea" ? element("textarea", { rows: "2" }) : element("input", { type: kind === "number" ? "text" : kind, inputmode: kind === "number" ? "decimal" : "text" });
    input.name = key;
    input.setAttribute("aria-label", label);
    if (key === "model") input.setAttribute("list", modelList.id);
    fields[key] = input;
    drawer.append(element("label", {}, [element("span", { text: label }), input]));
  }
  const applyButton = element("button", { type: "submit", "aria-label": "Apply settings", text: "Apply" });
  drawer.append(modelList, element("div", { class: "nbchat-drawer-actions" }, [applyButton]));

  const list = element("div", { class: "nbchat-messages", role: "log", "aria-label": "Messages" });
  const errorLine = element("div", { class: "nbchat-error", role: "alert" });
  const chips = element("div", { class: "nbchat-chips" });

  // Input row.
  const input = element("textarea", { class: "nbchat-input", "aria-label": "Message", rows: "2", placeholder: "Message (Enter sends, Shift+Enter: new line; {var}, {In[3]} interpolate)" });
  const sendButton = element("button", { class: "nbchat-primary", "aria-label": "Send", text: "Send" });
  const stopButton = element("button", { "aria-label": "Stop", text: "■ Stop" });
  const retryButton = element("button", { "aria-label": "Retry", text: "↻ Retry" });
  const undoButton = element("button", { "aria-label": "Undo", text: "↶ Undo" });
  const attachCell = element("input", { class: "nbchat-attach-cell", "aria-label": "Cell number", placeholder: "cell #", inputmode: "numeric" });
  const attachPart = element("select", { "aria-label": "Attach what" }, [
    element("option", { value: "source", text: "source" }),
    element("option", { value: "output", text: "output" }),
    element("option", { value: "both", text: "source + output" }),
  ]);
  const attachButton = element("button", { "aria-label": "Attach", title: "Attach a cell (empty: the cell just run)", text: "+ Attach" });
  const controls = element("div", { class: "nbchat-controls" }, [
    element("div", { class: "nbchat-attach" }, [attachCell, attachPart, attachButton]),
    element("div", { class: "nbchat-buttons" }, [undoButton, retryButton, stopButton, sendButton]),
  ]);
  root.append(header, drawer, list, errorLine, chips, input, controls);
  el.append(root);

  const action = (name, extra = {}) => model.send({ action: name, ...extra });

  // --- messages ---
  const nodes = new Map();
  function messageNode(entry) {
    const body = element("div", { class: "nbchat-body" });
    const copy = element("button", { class: "nbchat-copy", "aria-label": "Copy", title: "Copy message", text: "Copy" });
    const node = element("div", { class: "nbchat-message", "data-role": entry.role }, [
      element("div", { class: "nbchat-role" }, [element("span", { text: entry.role }), copy]),
      body,
    ]);
    node.dataset.id = entry.id;
    node.nbchatText = entry.text ?? "";
    copy.addEventListener("click", () => copyText(node.nbchatText, copy));
    setBody(body, entry.html ?? "");
    if (entry.interrupted) node.dataset.interrupted = "true";
    return node;
  }
  function atBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  }
  function append(entry) {
    const node = messageNode(entry);
    nodes.set(entry.id, node);
    list.append(node);
    return node;
  }
  function drawTranscript() {
    const follow = atBottom();
    list.replaceChildren();
    nodes.clear();
    for (const entry of model.get("transcript")) append(entry);
    if (follow) list.scrollTop = list.scrollHeight;
  }

  function onCustom(message) {
    const follow = atBottom();
    if (message.kind === "begin") {
      // Keep the first `keep` messages (a retry drops the reply it regenerates), then the prompt.
      [...list.children].slice(message.keep).forEach((node) => node.remove());
      for (const entry of message.entries) append(entry);
      const pending = append({ id: "pending", role: "assistant", text: "", html: "" });
      pending.dataset.streaming = "true";
    } else if (message.kind === "delta") {
      const node = nodes.get(message.id);
      if (!node) return;
      node.nbchatText += message.append ?? "";
      setBody(node.querySelector(".nbchat-body"), message.html ?? "");
      if (message.interrupted) node.dataset.interrupted = "true";
    } else if (message.kind === "discard") {
      nodes.get(message.id)?.remove();
      nodes.delete(message.id);
    }
    if (follow) list.scrollTop = list.scrollHeight;
  }

  // --- state ---
  function drawBusy() {
    const busy = model.get("busy");
    root.dataset.busy = busy ? "true" : "false";
    for (const button of [sendButton, retryButton, undoButton, newChatButton]) button.disabled = busy;
    stopButton.disabled = !busy;
  }
  function drawStatus() {
    const s = model.get("status") ?? {};
    const parts = [s.model ?? ""];
    if (s.context_tokens != null || s.context_length != null) {
      parts.push(`context ${s.context_tokens ?? 0} / ${s.context_length ?? "?"} tokens`);
    }
    if (s.tok_s != null) parts.push(`${s.tok_s} tok/s`);
    if (s.note) parts.push(s.note);
    status.textContent = parts.filter(Boolean).join(" · ");
  }
  function drawError() {
    errorLine.textContent = model.get("error") ?? "";
    errorLine.hidden = !model.get("error");
  }
  function drawSettings() {
    const state = model.get("settings_state") ?? {};
    for (const [key, input] of Object.entries(fields)) {
      if (document.activeElement === input) continue; // do not overwrite what the user is typing
      const field = state[key] ?? { value: "", effective: null };
      input.value = field.value;
      input.placeholder = field.effective == null ? "default" : String(field.effective);
    }
    modelList.replaceChildren(...(model.get("model_choices") ?? []).map((name) => element("option", { value: name })));
  }
  function drawChips() {
    chips.replaceChildren(
      ...(model.get("attachments") ?? []).map((chip) => {
        const remove = element("button", { "aria-label": `Remove ${chip.label}`, title: "Remove", text: "×" });
        remove.addEventListener("click", () => action("detach", { id: chip.id }));
        return element("span", { class: "nbchat-chip", title: chip.text }, [element("span", { text: chip.label }), remove]);
      }),
    );
  }

  // --- user input ---
  function send() {
    const text = input.value;
    if (model.get("busy") || (!text.trim() && !(model.get("attachments") ?? []).length)) return;
    action("send", { text });
    input.value = "";
  }
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  // Keys typed here belong to the panel, not to the notebook's shortcuts (e.g. "a", "b", "dd").
  root.addEventListener("keydown", (event) => event.stopPropagation());
  sendButton.addEventListener("click", send);
  stopButton.addEventListener("click", () => action("stop"));
  retryButton.addEventListener("click", () => action("retry"));
  undoButton.addEventListener("click", () => action("undo"));
  newChatButton.addEventListener("click", () => action("new_chat"));
  attachButton.addEventListener("click", () => {
    action("attach", { cell: attachCell.value.trim() || null, part: attachPart.value });
    attachCell.value = "";
  });
  settingsButton.addEventListener("click", () => {
    drawer.hidden = !drawer.hidden;
    settingsButton.setAttribute("aria-expanded", String(!drawer.hidden));
    if (!drawer.hidden) fields.model.focus();
  });
  drawer.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = Object.fromEntries(Object.entries(fields).map(([key, field]) => [key, field.value]));
    action("settings", { values });
    applyButton.blur();
  });

  const listeners = [
    ["change:transcript", drawTranscript],
    ["change:busy", drawBusy],
    ["change:status", drawStatus],
    ["change:error", drawError],
    ["change:settings_state", drawSettings],
    ["change:model_choices", drawSettings],
    ["change:attachments", drawChips],
    ["msg:custom", onCustom],
  ];
  for (const [name, listener] of listeners) model.on(name, listener);
  drawTranscript();
  drawBusy();
  drawStatus();
  drawError();
  drawSettings();
  drawChips();
  return () => {
    for (const [name, listener] of listeners) model.off(name, listener);
  };
}

export default { render };
