// mailgrid webmail: one ES module, no dependencies, talks only to the JSON API (/v1).
// Mail content is never put into this page's DOM as HTML: text goes in with
// textContent, HTML only into the sandboxed reading frame (see gateway/webmail.py).

const PAGE_SIZE = 50;
const POLL_TIMEOUT = 25;
const TOKEN_KEY = "mailgrid.token";
const ADDRESS_KEY = "mailgrid.address";
const ROLE_ORDER = ["inbox", "starred", "drafts", "sent", "archive", "spam", "trash"];

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  address: sessionStorage.getItem(ADDRESS_KEY) || "",
  folders: [],
  folderId: "",            // the folder shown (when not searching)
  query: "",               // the search shown ("" = a folder)
  pages: [""],             // cursors of the pages seen; the last is the current one
  nextCursor: null,
  messages: [],
  selected: -1,
  message: null,           // the full message in the reading pane
  remoteImages: false,
  compose: { draftId: null, files: [], inReplyTo: null },
  events: { socket: null, cursor: null, stopped: false, polling: false, generation: 0 },
};

// ---- API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, { method = "GET", json, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const reply = await fetch(path, { method, headers, body, signal });
  if (reply.status === 401 && state.token) {
    signOut("Your session has expired: sign in again.");
  }
  if (!reply.ok) {
    let problem = null;
    try { problem = await reply.json(); } catch { /* not JSON */ }
    throw new ApiError(reply.status, problem);
  }
  return reply.status === 204 ? null : reply.json();
}

// multipart upload with progress: fetch() reports no upload progress, XHR does.
function upload(method, path, message, files, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("message", JSON.stringify(message));
    for (const file of files) form.append("attachments", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    xhr.setRequestHeader("Authorization", `Bearer ${state.token}`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(Math.round((100 * e.loaded) / e.total));
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* empty */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, { detail: "network error" })));
    xhr.send(form);
  });
}

// ---- small helpers ----------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

let statusTimer = 0;
function toast(text) {
  const box = $("status");
  box.textContent = text;
  box.classList.add("show");
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => box.classList.remove("show"), 3000);
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function formatDate(iso, long = false) {
  if (!iso) return "";
  const date = new Date(iso);
  if (long) return date.toLocaleString();
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  const sameYear = date.getFullYear() === now.getFullYear();
  return date.toLocaleDateString([], sameYear ? { month: "short", day: "numeric" }
    : { year: "numeric", month: "short", day: "numeric" });
}

function addressText(a) {
  if (!a) return "";
  return a.name ? `${a.name} <${a.email}>` : a.email;
}

function splitAddresses(text) {
  return text.split(/[,;\n]/).map((s) => s.trim()).filter(Boolean);
}

function folderById(id) {
  return state.folders.find((f) => f.id === id || f.role === id);
}

// ---- sign in / out ----------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const address = $("login-address").value.trim();
  const password = $("login-password").value;
  $("login-error").textContent = "";
  try {
    const reply = await api("/v1/auth/token", { method: "POST", json: { address, password } });
    state.token = reply.access_token;
    state.address = address;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    sessionStorage.setItem(ADDRESS_KEY, address);
    $("login-password").value = "";
    await start();
  } catch (err) {
    $("login-error").textContent = err.status === 401 ? "Wrong address or password." : err.message;
  }
}

function signOut(message = "") {
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ADDRESS_KEY);
  stopEvents();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-address").focus();
}

async function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = state.address;
  document.body.dataset.user = state.address;
  startEvents();  // subscribe first, then load: no event is lost in between
  try {
    await loadFolders();
    const inbox = folderById("inbox");
    await openFolder(inbox ? inbox.id : (state.folders[0] || {}).id);
  } catch (err) {
    if (err.status !== 401) toast(err.message);
  }
}

// ---- folders ----------------------------------------------------------------------

async function loadFolders() {
  const reply = await api("/v1/folders");
  state.folders = reply.folders;
  renderFolders();
}

function updateFolders(changed) {
  for (const f of changed || []) {
    const i = state.folders.findIndex((g) => g.id === f.id);
    if (i >= 0) state.folders[i] = f;
    else state.folders.push(f);
  }
  renderFolders();
}

function sortedFolders() {
  const rank = (f) => {
    const i = ROLE_ORDER.indexOf(f.role);
    return i < 0 ? ROLE_ORDER.length : i;
  };
  return [...state.folders].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
}

function renderFolders() {
  const list = $("folder-list");
  list.replaceChildren();
  for (const f of sortedFolders()) {
    const label = f.unread ? `${f.name}, ${f.unread} unread` : f.name;
    const button = el("button", {
      type: "button", "data-folder": f.role, "aria-label": label,
      "aria-current": !state.query && f.id === state.folderId ? "true" : "false",
      onclick: () => { closeMenu(); openFolder(f.id); },
    }, el("span", { text: f.name }),
    el("span", { class: "count", text: f.unread ? String(f.unread) : "" }));
    list.append(el("li", {}, button));
  }
  const move = $("move-select");
  const current = move.value;
  move.replaceChildren(el("option", { value: "", text: "Move to…" }));
  for (const f of sortedFolders()) move.append(el("option", { value: f.id, text: f.name }));
  move.value = current && folderById(current) ? current : "";
  const shown = folderById(state.folderId);
  document.title = shown && shown.role === "inbox" && shown.unread
    ? `(${shown.unread}) mailgrid` : "mailgrid";
}

async function openFolder(folderId) {
  if (!folderId) return;
  state.folderId = folderId;
  state.query = "";
  $("search-input").value = "";
  state.pages = [""];
  await loadPage();
  renderFolders();
}

// ---- message list -----------------------------------------------------------------

async function loadPage() {
  const cursor = state.pages[state.pages.length - 1];
  let reply;
  if (state.query) {
    const params = new URLSearchParams({ q: state.query, limit: String(PAGE_SIZE) });
    if (cursor) params.set("cursor", cursor);
    // The events cursor is the EVENTS sequence this page has seen: asking the index for
    // at least that much finds every message the list has shown, even while indexing
    // waits for a busy server to have CPU to spare.
    if (state.events.cursor) params.set("min_seq", state.events.cursor);
    try {
      reply = await api(`/v1/search?${params}`);
    } catch (err) {
      if (err.status !== 503 || !params.has("min_seq")) throw err;
      params.delete("min_seq");  // the index is late: what it holds beats no answer
      reply = await api(`/v1/search?${params}`);
    }
  } else {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (cursor) params.set("cursor", cursor);
    reply = await api(`/v1/folders/${encodeURIComponent(state.folderId)}/messages?${params}`);
  }
  state.messages = reply.messages;
  state.nextCursor = reply.next_cursor;
  state.selected = -1;
  renderList();
  clearReader();
}

function listTitle() {
  if (state.query) return `Search: ${state.query}`;
  const f = folderById(state.folderId);
  return f ? f.name : "";
}

function renderList() {
  $("list-title").textContent = listTitle();
  const first = (state.pages.length - 1) * PAGE_SIZE + 1;
  $("list-range").textContent = state.messages.length
    ? `${first}–${first + state.messages.length - 1}` : "";
  $("newer-button").disabled = state.pages.length <= 1;
  $("older-button").disabled = !state.nextCursor;
  const list = $("message-list");
  list.replaceChildren(...state.messages.map(messageRow));
  $("list-empty").hidden = state.messages.length > 0;
}

function snippetNode(hit) {
  // The search snippet with its highlights as <mark> (code point spans, as text nodes).
  const text = Array.from(hit.snippet.text);
  const node = el("span", { class: "preview" });
  let at = 0;
  for (const [start, end] of hit.snippet.highlights) {
    node.append(text.slice(at, start).join(""), el("mark", { text: text.slice(start, end).join("") }));
    at = end;
  }
  node.append(text.slice(at).join(""));
  return node;
}

function messageRow(m, index) {
  // Sent shows the sender too: summaries carry no recipients.
  const sender = m.from.name || m.from.email;
  const star = el("button", {
    type: "button", class: "star", "aria-pressed": m.is_starred ? "true" : "false",
    "aria-label": m.is_starred ? "Unstar" : "Star", tabindex: "-1",
    onclick: (e) => { e.stopPropagation(); setFlags(m, { is_starred: !m.is_starred }); },
  }, m.is_starred ? "★" : "☆");
  const from = el("span", { class: "from", text: sender, title: m.from.email });
  const date = el("span", { class: "date" }, m.has_attachments
    ? el("span", { class: "clip", "aria-label": "has attachments", title: "Has attachments", text: "file" }) : null,
  formatDate(m.date));
  const subject = el("span", { class: "subject", text: m.subject || "(no subject)" });
  const preview = m.snippet ? snippetNode(m) : el("span", { class: "preview", text: m.preview });
  const label = `${m.is_read ? "" : "Unread, "}${m.is_starred ? "starred, " : ""}`
    + `from ${m.from.name || m.from.email}, ${m.subject || "no subject"}, ${formatDate(m.date)}`;
  return el("li", {
    role: "option", id: `msg-${m.id}`, "data-id": m.id, class: m.is_read ? "read" : "unread",
    "aria-selected": index === state.selected ? "true" : "false", "aria-label": label,
    onclick: () => select(index),
  }, star, from, date, subject, preview);
}

function refreshRow(index) {
  const list = $("message-list");
  const old = list.children[index];
  if (old) old.replaceWith(messageRow(state.messages[index], index));
}

async function select(index) {
  if (index < 0 || index >= state.messages.length) return;
  const previous = state.selected;
  state.selected = index;
  if (previous >= 0) refreshRow(previous);
  refreshRow(index);
  const row = $("message-list").children[index];
  if (row) row.scrollIntoView({ block: "nearest" });
  await openMessage(state.messages[index]);
}

// ---- reading ----------------------------------------------------------------------

function clearReader() {
  state.message = null;
  $("reader-content").hidden = true;
  $("reader-empty").hidden = false;
  $("app").classList.remove("reading");
}

async function openMessage(summary) {
  const message = await api(`/v1/messages/${summary.id}`);
  state.message = message;
  state.remoteImages = false;
  $("reader-empty").hidden = true;
  $("reader-content").hidden = false;
  $("app").classList.add("reading");
  $("reader-subject").textContent = message.subject || "(no subject)";
  $("reader-from").textContent = addressText(message.from);
  $("reader-to").textContent = message.to.map(addressText).join(", ");
  $("reader-cc").textContent = message.cc.map(addressText).join(", ");
  $("reader-cc").hidden = $("reader-cc-label").hidden = message.cc.length === 0;
  $("reader-date").textContent = formatDate(message.date || message.received_at, true);
  const isDraft = folderById(message.folder_id)?.role === "drafts";
  $("edit-draft-button").hidden = !isDraft;
  renderFlags();
  renderAttachments(message);
  await renderBody();
  if (!summary.is_read) await setFlags(summary, { is_read: true }, { quiet: true });
  document.body.dataset.opened = message.id;  // for tests: the pane is settled
}

function renderFlags() {
  const m = state.message;
  if (!m) return;
  const star = $("star-button");
  star.setAttribute("aria-pressed", m.is_starred ? "true" : "false");
  star.textContent = m.is_starred ? "★ Starred" : "☆ Star";
  $("unread-button").textContent = m.is_read ? "Mark unread" : "Mark read";
  $("move-select").value = "";
}

async function renderBody() {
  const m = state.message;
  const frame = $("reader-frame");
  const text = $("reader-text");
  const bar = $("images-bar");
  if (!m.html) {
    frame.hidden = true;
    frame.removeAttribute("srcdoc");
    bar.hidden = true;
    text.hidden = false;
    text.textContent = m.text;
    return;
  }
  const safe = await api(`/v1/messages/${m.id}/html?remote_images=${state.remoteImages}`);
  if (state.message !== m) return;  // another message was opened meanwhile
  text.hidden = true;
  bar.hidden = safe.blocked_images === 0;
  $("images-text").textContent = `${safe.blocked_images} remote image(s) hidden to protect your privacy.`;
  frame.hidden = false;
  frame.srcdoc = frameDocument(safe.html, state.remoteImages);
}

function frameDocument(html, remoteImages) {
  // The frame's own policy on top of the sandbox (no allow-scripts): nothing runs, and
  // nothing is fetched but the images the user asked for.
  const images = remoteImages ? "data: https: http:" : "data:";
  const csp = `default-src 'none'; img-src ${images}; style-src 'unsafe-inline'; form-action 'none'`;
  return "<!doctype html><html><head><meta charset=\"utf-8\">"
    + `<meta http-equiv="Content-Security-Policy" content="${csp}">`
    + "<meta name=\"referrer\" content=\"no-referrer\"><base target=\"_blank\">"
    + "<style>body{font:14px/1.45 system-ui,sans-serif;margin:8px;overflow-wrap:anywhere}"
    + "img{max-width:100%;height:auto}</style></head><body>"
    + html + "</body></html>";
}

function renderAttachments(message) {
  const files = message.attachments.filter((a) => !a.inline || a.filename);
  $("attachments").hidden = files.length === 0;
  $("attachment-list").replaceChildren(...files.map((a) => el("li", {},
    el("span", { text: a.filename || "attachment" }),
    el("span", { class: "muted", text: formatSize(a.size) }),
    el("button", {
      type: "button", "aria-label": `Download ${a.filename || "attachment"}`,
      onclick: () => download(message, a),
    }, "Download"))));
}

async function attachmentBlob(message, a) {
  const reply = await fetch(`/v1/messages/${message.id}/attachments/${encodeURIComponent(a.id)}`,
    { headers: { Authorization: `Bearer ${state.token}` } });
  if (!reply.ok) throw new ApiError(reply.status, null);
  return reply.blob();
}

async function download(message, a) {
  // The endpoint answers Content-Disposition: attachment; a blob URL with download=
  // saves it and never renders it on our origin.
  try {
    const blob = await attachmentBlob(message, a);
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: a.filename || "attachment" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    toast(`Download failed: ${err.message}`);
  }
}

// ---- actions ----------------------------------------------------------------------

function current() {
  return state.selected >= 0 ? state.messages[state.selected] : null;
}

async function setFlags(summary, patch, { quiet = false } = {}) {
  try {
    const updated = await api(`/v1/messages/${summary.id}`, { method: "PATCH", json: patch });
    applySummary(updated);
    if (!quiet && patch.is_starred !== undefined) toast(patch.is_starred ? "Starred" : "Unstarred");
    if (!quiet && patch.is_read === false) toast("Marked unread");
    await loadFolders();
  } catch (err) {
    toast(err.message);
  }
}

function applySummary(updated) {
  const index = state.messages.findIndex((m) => m.id === updated.id);
  if (index >= 0) {
    state.messages[index] = { ...state.messages[index], ...updated };
    refreshRow(index);
  }
  if (state.message && state.message.id === updated.id) {
    state.message.is_read = updated.is_read;
    state.message.is_starred = updated.is_starred;
    renderFlags();
  }
}

function removeRow(id) {
  const index = state.messages.findIndex((m) => m.id === id);
  if (index < 0) return;
  state.messages.splice(index, 1);
  if (state.selected === index) {
    state.selected = -1;
    clearReader();
  } else if (state.selected > index) {
    state.selected -= 1;
  }
  renderList();
  return index;
}

async function deleteCurrent() {
  const m = current();
  if (!m) return;
  try {
    const reply = await api(`/v1/messages/${m.id}`, { method: "DELETE" });
    toast(reply.permanent ? "Deleted for good" : "Moved to Trash");
    const index = removeRow(m.id);
    await loadFolders();
    if (state.messages.length) await select(Math.min(index, state.messages.length - 1));
  } catch (err) {
    toast(err.message);
  }
}

async function moveCurrent(folderId) {
  const m = current();
  if (!m || !folderId) return;
  try {
    await api(`/v1/messages/${m.id}`, { method: "PATCH", json: { folder_id: folderId } });
    toast(`Moved to ${folderById(folderId)?.name || "folder"}`);
    if (!state.query) removeRow(m.id);
    await loadFolders();
  } catch (err) {
    toast(err.message);
  }
}

function move(step) {
  if (!state.messages.length) return;
  const next = state.selected < 0 ? 0 : state.selected + step;
  if (next >= 0 && next < state.messages.length) select(next);
}

async function runSearch(event) {
  event.preventDefault();
  const q = $("search-input").value.trim();
  if (!q) {
    await openFolder(state.folderId || "inbox");
    return;
  }
  state.query = q;
  state.pages = [""];
  try {
    await loadPage();
  } catch (err) {
    state.messages = [];
    renderList();
    $("list-empty").hidden = false;
    $("list-empty").textContent = `Search failed: ${err.message}`;
    return;
  }
  $("list-empty").textContent = "No messages.";
  renderFolders();
}

// ---- compose ----------------------------------------------------------------------

function quote(message) {
  const who = addressText(message.from);
  const when = formatDate(message.date || message.received_at, true);
  const body = (message.text || "").split("\n").map((line) => `> ${line}`).join("\n");
  return `\n\nOn ${when}, ${who} wrote:\n${body}`;
}

function prefixed(prefix, subject) {
  return subject.toLowerCase().startsWith(prefix.toLowerCase()) ? subject : `${prefix} ${subject}`;
}

function openCompose({ to = [], cc = [], bcc = [], subject = "", body = "", files = [],
  inReplyTo = null, draftId = null, title = "New message" } = {}) {
  $("compose-title").textContent = title;
  $("compose-to").value = to.join(", ");
  $("compose-cc").value = cc.join(", ");
  $("compose-bcc").value = bcc.join(", ");
  $("compose-subject").value = subject;
  $("compose-body").value = body;
  $("compose-error").textContent = "";
  $("compose-progress").hidden = true;
  $("compose-files").value = "";
  state.compose = { draftId, files: [...files], inReplyTo };
  renderComposeFiles();
  $("compose").showModal();
  (to.length ? $("compose-body") : $("compose-to")).focus();
  if (to.length) $("compose-body").setSelectionRange(0, 0);
}

function renderComposeFiles() {
  $("compose-file-list").replaceChildren(...state.compose.files.map((file, i) => el("li", {},
    el("span", { text: file.name }),
    el("span", { class: "muted", text: formatSize(file.size) }),
    el("button", {
      type: "button", class: "link", "aria-label": `Remove ${file.name}`,
      onclick: () => { state.compose.files.splice(i, 1); renderComposeFiles(); },
    }, "✕"))));
}

function reply(all) {
  const m = state.message;
  if (!m) return;
  const target = m.reply_to.length ? m.reply_to : [m.from];
  const me = state.address.toLowerCase();
  let to = target.map((a) => a.email);
  let cc = [];
  if (all) {
    const others = [...m.to, ...m.cc].map((a) => a.email)
      .filter((e) => e.toLowerCase() !== me && !to.includes(e));
    if (m.from.email.toLowerCase() === me) to = m.to.map((a) => a.email);
    else cc = others;
  }
  openCompose({
    to, cc, subject: prefixed("Re:", m.subject), body: quote(m), inReplyTo: m.id,
    title: all ? "Reply all" : "Reply",
  });
}

async function forward() {
  const m = state.message;
  if (!m) return;
  const header = ["", "", "---------- Forwarded message ----------",
    `From: ${addressText(m.from)}`, `Date: ${formatDate(m.date, true)}`,
    `Subject: ${m.subject}`, `To: ${m.to.map(addressText).join(", ")}`, "", m.text || ""].join("\n");
  let files = [];
  try {
    files = await Promise.all(m.attachments.filter((a) => !a.inline).map(async (a) => new File(
      [await attachmentBlob(m, a)], a.filename || "attachment", { type: a.content_type })));
  } catch (err) {
    toast(`Attachments not included: ${err.message}`);
  }
  openCompose({ subject: prefixed("Fwd:", m.subject), body: header, files, title: "Forward" });
}

function editDraft() {
  const m = state.message;
  if (!m) return;
  openCompose({
    to: m.to.map((a) => a.email), cc: m.cc.map((a) => a.email), bcc: m.bcc.map((a) => a.email),
    subject: m.subject, body: m.text, draftId: m.id, title: "Edit draft",
  });
}

function composedMessage() {
  const message = {
    to: splitAddresses($("compose-to").value),
    cc: splitAddresses($("compose-cc").value),
    bcc: splitAddresses($("compose-bcc").value),
    subject: $("compose-subject").value,
    text: $("compose-body").value,
  };
  if (state.compose.inReplyTo) message.in_reply_to = state.compose.inReplyTo;
  return message;
}

function progress(percent) {
  const bar = $("compose-progress");
  bar.hidden = false;
  bar.value = percent;
}

function composeFailed(err) {
  const field = err.problem && err.problem.field ? ` (${err.problem.field})` : "";
  $("compose-error").textContent = `${err.message}${field}`;
  $("send-button").disabled = $("draft-button").disabled = false;
}

async function saveDraft() {
  const message = composedMessage();
  const { draftId, files } = state.compose;
  const path = draftId ? `/v1/drafts/${draftId}` : "/v1/drafts";
  const reply = await upload(draftId ? "PUT" : "POST", path, message, files, progress);
  state.compose.draftId = reply.id;  // a replaced draft gets a new id
  return reply.id;
}

async function send() {
  $("send-button").disabled = $("draft-button").disabled = true;
  try {
    if (state.compose.draftId) {
      const id = await saveDraft();
      await api(`/v1/drafts/${id}/send`, { method: "POST" });
    } else {
      await upload("POST", "/v1/messages", composedMessage(), state.compose.files, progress);
    }
  } catch (err) {
    composeFailed(err);
    return;
  }
  $("send-button").disabled = $("draft-button").disabled = false;
  $("compose").close();
  toast("Message sent");
  await loadFolders();
}

async function draft() {
  $("send-button").disabled = $("draft-button").disabled = true;
  try {
    await saveDraft();
  } catch (err) {
    composeFailed(err);
    return;
  }
  $("send-button").disabled = $("draft-button").disabled = false;
  $("compose").close();
  toast("Draft saved");
  await loadFolders();
  if (!state.query && folderById(state.folderId)?.role === "drafts") await loadPage();
}

// ---- live updates -----------------------------------------------------------------

function onEvent(event) {
  if (event.cursor) state.events.cursor = event.cursor;
  switch (event.type) {
    case "message_added":
      updateFolders(event.folders);
      addLive(event.message);
      break;
    case "message_updated":
      updateFolders(event.folders);
      if (event.previous_folder_id && !state.query && event.message.folder_id !== state.folderId) {
        removeRow(event.message.id);
      } else {
        applySummary(event.message);
      }
      break;
    case "message_deleted":
      updateFolders(event.folders);
      if (event.permanent || !state.query) removeRow(event.email_id);
      break;
    case "resync":
      state.events.cursor = event.cursor || null;
      loadFolders().then(loadPage).catch(() => {});
      break;
    default:
      break;  // ready, heartbeat
  }
}

function addLive(message) {
  const onFirstPage = state.pages.length === 1 && !state.query;
  const shown = folderById(state.folderId);
  if (!onFirstPage || !shown || message.folder_id !== shown.id) return;
  if (state.messages.some((m) => m.id === message.id)) return;
  state.messages.unshift(message);
  if (state.selected >= 0) state.selected += 1;
  if (state.messages.length > PAGE_SIZE) state.messages.pop();
  renderList();
  if (shown.role === "inbox" && !message.is_read) {
    toast(`New mail from ${message.from.name || message.from.email}`);
  }
}

function eventsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const since = state.events.cursor ? `?since=${encodeURIComponent(state.events.cursor)}` : "";
  return `${scheme}//${location.host}/v1/events${since}`;
}

function startEvents() {
  stopEvents();
  state.events.stopped = false;
  const generation = ++state.events.generation;
  if (typeof WebSocket === "undefined") {
    poll(generation);
    return;
  }
  let opened = false;
  const socket = new WebSocket(eventsUrl());
  state.events.socket = socket;
  document.body.dataset.live = "connecting";
  socket.addEventListener("open", () => {
    // Browsers cannot set headers on a WebSocket: the token is the first message.
    socket.send(JSON.stringify({ token: state.token }));
  });
  socket.addEventListener("message", (e) => {
    const event = JSON.parse(e.data);
    if (event.type === "ready") {
      opened = true;
      document.body.dataset.live = "websocket";
    }
    onEvent(event);
  });
  socket.addEventListener("close", (e) => {
    if (generation !== state.events.generation || state.events.stopped) return;
    state.events.socket = null;
    if (e.code === 4401) {
      signOut("Your session has expired: sign in again.");
    } else if (!opened) {
      poll(generation);  // no WebSocket through here: long-poll instead
    } else {
      setTimeout(() => { if (generation === state.events.generation) startEvents(); }, 1000);
    }
  });
}

async function poll(generation) {
  state.events.polling = true;
  let timeout = state.events.cursor ? POLL_TIMEOUT : 0;  // first learn where "now" is
  while (!state.events.stopped && generation === state.events.generation && state.token) {
    try {
      const params = new URLSearchParams({ timeout: String(timeout) });
      if (state.events.cursor) params.set("since", state.events.cursor);
      const batch = await api(`/v1/events/poll?${params}`);
      if (generation !== state.events.generation) return;
      for (const event of batch.events) onEvent(event);
      if (batch.cursor) state.events.cursor = batch.cursor;
      timeout = POLL_TIMEOUT;
      document.body.dataset.live = "poll";
    } catch (err) {
      if (err.status === 401) return;
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

function stopEvents() {
  state.events.stopped = true;
  state.events.generation += 1;
  if (state.events.socket) {
    state.events.socket.close(1000);
    state.events.socket = null;
  }
}

// ---- keyboard ---------------------------------------------------------------------

const SHORTCUTS = {
  j: () => move(1),
  ArrowDown: () => move(1),
  k: () => move(-1),
  ArrowUp: () => move(-1),
  r: () => reply(false),
  a: () => reply(true),
  f: () => forward(),
  c: () => openCompose(),
  "#": () => deleteCurrent(),
  Delete: () => deleteCurrent(),
  s: () => { const m = current(); if (m) setFlags(m, { is_starred: !m.is_starred }); },
  u: () => { const m = current(); if (m) setFlags(m, { is_read: false }); },
  "/": () => $("search-input").focus(),
  Escape: () => { clearReader(); renderList(); },
};

function onKey(event) {
  if ($("app").hidden || $("compose").open) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target.closest && target.closest("input, textarea, select, [contenteditable]")) {
    if (event.key === "Escape") target.blur();
    return;
  }
  const action = SHORTCUTS[event.key];
  if (!action) return;
  event.preventDefault();
  action();
}

// ---- wiring -----------------------------------------------------------------------

function closeMenu() {
  $("app").classList.remove("show-folders");
  $("menu-button").setAttribute("aria-expanded", "false");
}

function wire() {
  $("login-form").addEventListener("submit", signIn);
  $("logout-button").addEventListener("click", () => signOut());
  $("search-form").addEventListener("submit", runSearch);
  $("compose-button").addEventListener("click", () => openCompose());
  $("newer-button").addEventListener("click", () => { state.pages.pop(); loadPage(); });
  $("older-button").addEventListener("click", () => {
    if (state.nextCursor) { state.pages.push(state.nextCursor); loadPage(); }
  });
  $("back-button").addEventListener("click", () => { clearReader(); renderList(); });
  $("menu-button").addEventListener("click", () => {
    const open = $("app").classList.toggle("show-folders");
    $("menu-button").setAttribute("aria-expanded", open ? "true" : "false");
  });
  $("reply-button").addEventListener("click", () => reply(false));
  $("reply-all-button").addEventListener("click", () => reply(true));
  $("forward-button").addEventListener("click", () => forward());
  $("edit-draft-button").addEventListener("click", () => editDraft());
  $("star-button").addEventListener("click", () => SHORTCUTS.s());
  $("unread-button").addEventListener("click", () => {
    const m = current();
    if (m) setFlags(m, { is_read: !m.is_read });
  });
  $("delete-button").addEventListener("click", () => deleteCurrent());
  $("move-select").addEventListener("change", (e) => moveCurrent(e.target.value));
  $("images-button").addEventListener("click", () => { state.remoteImages = true; renderBody(); });
  $("compose-files").addEventListener("change", (e) => {
    state.compose.files.push(...e.target.files);
    e.target.value = "";
    renderComposeFiles();
  });
  $("send-button").addEventListener("click", send);
  $("draft-button").addEventListener("click", draft);
  $("discard-button").addEventListener("click", () => $("compose").close());
  document.addEventListener("keydown", onKey);
}

wire();
if (state.token) start();
else $("login-address").focus();
