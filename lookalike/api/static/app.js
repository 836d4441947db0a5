// The web page: search by a photo, browse the collection, view full size, add photos.
// Plain DOM, no build step; every request goes to this server.
"use strict";
const $ = (id) => document.getElementById(id);
const statusEl = $("status"), results = $("results"), added = $("added"), drop = $("drop");
const config = { needs_api_key: false, dedupe_threshold: null };
const browse = { offset: 0, total: 0, loadedFolders: false, seq: 0 };
let searchSeq = 0;  // a later search wins: an answer to an earlier one is dropped

function setStatus(text, isError) {
  statusEl.textContent = text;
  statusEl.className = isError ? "error" : "";
}

async function send(url, options) {
  try { return await fetch(url, options); }
  catch (e) { setStatus("Network error: the server could not be reached", true); return null; }
}

async function errorText(resp) {
  try { const body = await resp.json(); return body.detail || resp.statusText; }
  catch (e) { return resp.statusText; }
}

// -- cards and the full-size viewer ---------------------------------------------------------------
// item: {id, path, url, thumbnail_url, labels, score?, note?, width?, height?}
function card(item, list, index, extraClass) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "card" + (extraClass ? " " + extraClass : "");
  const scoreText = item.score === undefined ? "" : item.score.toFixed(3);
  b.title = item.path;
  b.setAttribute("aria-label", `${item.path}${scoreText ? ", similarity " + scoreText : ""}. View full size`);
  const img = document.createElement("img");
  img.src = item.thumbnail_url + "?size=256"; img.alt = item.path; img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  for (const [cls, text] of [["note", item.note], ["score", scoreText], ["path", item.path],
                             ["labels", (item.labels || []).join(", ")]]) {
    if ((cls === "note" || cls === "score") && !text) continue;
    const div = document.createElement("div");
    div.className = cls; div.textContent = text || "";
    meta.append(div);
  }
  b.append(img, meta);
  b.addEventListener("click", () => openViewer(list, index));
  li.append(b);
  return li;
}

const viewer = { list: [], index: 0 };

function openViewer(list, index) {
  viewer.list = list;
  showInViewer(index);
  if (!$("viewer").open) $("viewer").showModal();
}

function showInViewer(index) {
  const n = viewer.list.length;
  viewer.index = (index + n) % n;
  const item = viewer.list[viewer.index];
  $("viewer-img").src = item.url;
  $("viewer-img").alt = item.path;
  $("viewer-open").href = item.url;
  const parts = [item.path];
  if (item.score !== undefined) parts.push(`similarity ${item.score.toFixed(3)}`);
  if (item.width) parts.push(`${item.width}×${item.height}`);
  if (item.labels && item.labels.length) parts.push(item.labels.join(", "));
  parts.push(`${viewer.index + 1} / ${n}`);
  $("viewer-caption").textContent = parts.join(" · ");
}

$("viewer-prev").addEventListener("click", () => showInViewer(viewer.index - 1));
$("viewer-next").addEventListener("click", () => showInViewer(viewer.index + 1));
$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer-similar").addEventListener("click", () => {
  const item = viewer.list[viewer.index];
  $("viewer").close();
  location.hash = "#search";
  searchById(item.id, item.thumbnail_url + "?size=256");
});
$("viewer").addEventListener("keydown", (e) => {  // Esc closes the dialog by itself
  if (e.key === "ArrowLeft") { e.preventDefault(); showInViewer(viewer.index - 1); }
  if (e.key === "ArrowRight") { e.preventDefault(); showInViewer(viewer.index + 1); }
});

// -- search -----------------------------------------------------------------------------------------
function showQuery(src) {
  const q = $("query");
  q.querySelectorAll("img").forEach((n) => n.remove());
  if (src) { const img = document.createElement("img"); img.src = src; img.alt = "Query photo"; q.prepend(img); }
}

function clearResults() {
  results.replaceChildren();
  added.replaceChildren();
  showLabels([]);
}

function render(data) {
  clearResults();
  const list = data.results;
  list.forEach((r, i) => results.append(card(r, list, i)));
  setStatus(`${list.length} look-alikes in ${data.took_ms.toFixed(0)} ms`);
  window.scrollTo({ top: 0 });  // the query and its results, at the top of the screen
}

function showLabels(labels) {
  const el = $("labels");
  el.replaceChildren();
  el.hidden = !labels || !labels.length;
  if (el.hidden) return;
  el.append("Suggested labels: ");
  for (const l of labels) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `${l.label} ${Math.round(l.score * 100)}%`;
    el.append(chip);
  }
}

async function searchFile(file) {
  if (!file) return;
  location.hash = "#search";
  showQuery(URL.createObjectURL(file));
  setStatus("Searching…");
  const form = new FormData();
  form.append("file", file);
  const seq = ++searchSeq;
  // /suggest answers the look-alikes and, when the collection has labels, their vote
  const resp = await send(`/suggest?k=${$("k").value}`, { method: "POST", body: form });
  if (!resp || seq !== searchSeq) return;
  if (!resp.ok) { clearResults(); return setStatus("Error: " + await errorText(resp), true); }
  const data = await resp.json();
  if (seq !== searchSeq) return;
  render({ results: data.neighbours, took_ms: data.took_ms });
  showLabels(data.labels);
}

async function searchById(id, thumb) {
  showQuery(thumb);
  setStatus("Searching…");
  const seq = ++searchSeq;
  const resp = await send(`/images/${id}/similar?k=${$("k").value}`);
  if (!resp || seq !== searchSeq) return;
  if (!resp.ok) return setStatus("Error: " + await errorText(resp), true);
  const data = await resp.json();
  if (seq === searchSeq) render(data);
}

// -- add photos, then show the near-duplicates each already has -----------------------------------
async function addFiles(files) {
  if (!files.length) return;
  location.hash = "#search";
  const form = new FormData();
  for (const f of files) form.append("file", f);
  const headers = {};
  if ($("apikey").value) headers["X-API-Key"] = $("apikey").value;
  setStatus(`Adding ${files.length} photo(s)…`);
  const resp = await send("/images", { method: "POST", body: form, headers });
  if (!resp) return;
  if (!resp.ok) return setStatus("Could not add: " + await errorText(resp), true);
  const data = await resp.json();
  searchSeq++;  // a search still under way must not replace what follows
  clearResults();
  showQuery(null);
  sessionStorage.setItem("lookalike-api-key", $("apikey").value);
  await showNearDuplicates(data.ids, files);
  setStatus(`Added ${data.ids.length} photo(s)`);
  refreshCount();
  browse.loadedFolders = false;
}

async function showNearDuplicates(ids, files) {
  const t = config.dedupe_threshold;
  const h2 = document.createElement("h2");
  h2.textContent = t === null ? "Added photos and their closest look-alikes"
    : `Added photos and the near-duplicates already in the collection (similarity ≥ ${t.toFixed(3)})`;
  added.append(h2);
  for (const [i, id] of ids.entries()) {
    const resp = await send(`/images/${id}/similar?k=12`);
    const hits = resp && resp.ok ? (await resp.json()).results : [];
    const dups = t === null ? hits.slice(0, 3) : hits.filter((h) => h.score >= t);
    const name = files[i] ? files[i].name : `photo ${id}`;
    const self = { id, path: name, url: `/images/${id}`, thumbnail_url: `/images/${id}/thumbnail`, labels: [], note: "Added" };
    const list = [self, ...dups];
    const h3 = document.createElement("h3");
    h3.className = "dup-title";
    h3.textContent = dups.length ? `${name}: ${dups.length} near-duplicate(s) already in the collection`
      : `${name}: no near-duplicate in the collection`;
    const ul = document.createElement("ul");
    ul.className = "grid dup-group";
    list.forEach((item, j) => ul.append(card(item, list, j, j === 0 ? "added" : "")));
    added.append(h3, ul);
  }
}

// -- browse -----------------------------------------------------------------------------------------
async function loadFolders() {
  const resp = await send("/folders");
  if (!resp || !resp.ok) return;
  const select = $("folder"), keep = select.value;
  select.replaceChildren(new Option("All folders", ""));
  for (const f of (await resp.json()).folders) {
    select.append(new Option(`${f.path || "(top level)"} (${f.images})`, "/" + f.path));
  }
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
  browse.loadedFolders = true;
}

async function loadPage() {
  if (!browse.loadedFolders) await loadFolders();
  const limit = Number($("per-page").value);
  const params = new URLSearchParams({ offset: browse.offset, limit, order: $("order").value });
  if ($("folder").value) params.set("folder", $("folder").value.slice(1));
  const seq = ++browse.seq;
  const resp = await send(`/images?${params}`);
  if (!resp || seq !== browse.seq) return;
  if (!resp.ok) { $("page-info").textContent = "Error: " + await errorText(resp); return; }
  const data = await resp.json();
  if (seq !== browse.seq) return;  // the order, folder or page changed meanwhile
  browse.total = data.total;
  const list = data.images;
  $("grid").replaceChildren(...list.map((item, i) => card(item, list, i)));
  const first = list.length ? data.offset + 1 : 0;
  $("page-info").textContent = `${first}–${data.offset + list.length} of ${data.total}`;
  $("prev").disabled = data.offset === 0;
  $("next").disabled = data.offset + list.length >= data.total;
}

function turnPage(step) {
  const limit = Number($("per-page").value);
  browse.offset = Math.max(0, browse.offset + step * limit);
  loadPage();
}

for (const id of ["order", "folder", "per-page"]) {
  $(id).addEventListener("change", () => { browse.offset = 0; loadPage(); });
}
$("prev").addEventListener("click", () => turnPage(-1));
$("next").addEventListener("click", () => turnPage(1));

// -- the two views, the count, the settings --------------------------------------------------------
function showView() {
  const browsing = location.hash === "#browse";
  $("search-view").hidden = browsing;
  $("browse-view").hidden = !browsing;
  const [on, off] = browsing ? ["nav-browse", "nav-search"] : ["nav-search", "nav-browse"];
  $(on).setAttribute("aria-current", "page");
  $(off).removeAttribute("aria-current");
  if (browsing) loadPage();
}

async function refreshCount() {
  const resp = await send("/stats");
  if (resp && resp.ok) { const s = await resp.json(); $("count").textContent = `${s.images} photos`; }
}

async function loadConfig() {
  const resp = await send("/config");
  if (!resp || !resp.ok) return;
  Object.assign(config, await resp.json());
  $("key-box").hidden = !config.needs_api_key;
  if (config.needs_api_key) $("apikey").value = sessionStorage.getItem("lookalike-api-key") || "";
}

$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
$("add").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
$("k").addEventListener("change", () => { if ($("file").files[0]) searchFile($("file").files[0]); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
window.addEventListener("hashchange", showView);
showView();
loadConfig();
refreshCount();
