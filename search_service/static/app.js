// The search page: text, image (file picker, drag and drop, paste) and "more like this" searches against the HTTP API.
"use strict";

const $ = (id) => document.getElementById(id);
// `search` numbers the searches: only the latest one's answer is shown, so a slower, older answer (a target switch
// re-running the text query while an image is uploading) never replaces a newer one.
const state = { token: sessionStorage.getItem("imgtxt-token") || "", limit: 24, search: 0 };

function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) {
    const token = window.prompt("This search service needs a token:");
    if (token) {
      state.token = token;
      sessionStorage.setItem("imgtxt-token", token);
      return api(path, options);
    }
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function target() {
  return document.querySelector("input[name=target]:checked").value;
}

async function thumbnail(img, url) {
  // Fetched with the token (an <img src> cannot send one), shown from a blob URL.
  try {
    const blob = await (await api(url)).blob();
    img.src = URL.createObjectURL(blob);
  } catch (err) {
    img.alt = "no thumbnail";
  }
}

function show(result, label) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of result.hits) {
    const item = $("hit").content.firstElementChild.cloneNode(true);
    item.dataset.id = hit.id;
    const img = item.querySelector("img");
    if (hit.thumbnail) {
      img.alt = hit.key;
      thumbnail(img, hit.thumbnail);
    } else {
      item.querySelector(".thumb").classList.add("none");
    }
    item.querySelector(".caption").textContent = hit.caption || hit.image_key || hit.key;
    item.querySelector(".score").textContent = hit.score.toFixed(3);
    item.querySelector(".kind").textContent = hit.kind;
    item.querySelector(".more").addEventListener("click", () => run({ point_id: hit.id }, `more like ${hit.key}`));
    list.appendChild(item);
  }
  const ms = result.latency_ms.toFixed(1);
  $("status").textContent = `${result.hits.length} ${result.target} results for ${label} in ${ms} ms (server)`;
  $("status").dataset.latencyMs = ms;
}

// One search: numbered, so only the latest one's answer (or error) is shown.
async function search(path, init, label) {
  const mine = ++state.search;
  $("status").textContent = "searching…";
  try {
    const result = await (await api(path, { method: "POST", ...init })).json();
    if (mine === state.search) show(result, label);
  } catch (err) {
    if (mine === state.search) $("status").textContent = `error: ${err.message}`;
  }
}

function run(body, label) {
  const request = { ...body, target: target(), limit: state.limit };
  return search("/v1/search", { headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) }, label);
}

function runImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("status").textContent = "error: that is not an image";
    return;
  }
  $("query-thumb").src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  const path = `/v1/search/image?target=${target()}&limit=${state.limit}`;
  return search(path, { headers: { "Content-Type": file.type }, body: file }, file.name || "the pasted image");
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (text) {
    $("query-image").hidden = true;
    run({ text }, `“${text}”`);
  }
});
$("file").addEventListener("change", (event) => runImage(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  runImage(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (item) runImage(item.getAsFile());
});
for (const radio of document.querySelectorAll("input[name=target]")) {
  radio.addEventListener("change", () => {
    const text = $("query").value.trim();
    if (text) run({ text }, `“${text}”`);
  });
}

(async () => {
  try {
    const info = await (await api("/v1/info")).json();
    state.limit = Math.min(state.limit, info.max_limit);
    const p = info.points;
    $("info").textContent = `${info.collection}: ${p.image} images, ${p.text} captions, ${p.unit} units`;
  } catch (err) {
    $("info").textContent = `error: ${err.message}`;
  }
})();
