// The atlas explorer page: plain JavaScript, no build step, everything served by the program.
"use strict";

const state = {
  info: null, node: null, z: [], inflight: false, dirty: false, pendingSince: null,
  walk: null, walkFrame: 0, timer: null,
};
// What a test (or a curious user) can read: update latencies in ms, renders, the last result.
window.atlasExplorer = { latencies: [], renders: 0, last: null, ready: false };

const $ = (id) => document.getElementById(id);
const percent = (v) => (v === null || v === undefined) ? "–" : `${Math.round(100 * v)} %`;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  setTimeout(() => { box.hidden = true; }, 6000);
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

// --- crops with heat overlays on hover or with the toggle ---

function cropImage(urls, extra) {
  const img = document.createElement("img");
  img.className = "crop" + (extra ? " " + extra : "");
  img.dataset.crop = urls.crop;
  img.dataset.heat = urls.heat;
  img.src = $("heat-toggle").checked ? urls.heat : urls.crop;
  img.addEventListener("mouseenter", () => { img.src = img.dataset.heat; });
  img.addEventListener("mouseleave", () => {
    img.src = $("heat-toggle").checked ? img.dataset.heat : img.dataset.crop;
  });
  return img;
}

function refreshHeat() {
  const heat = $("heat-toggle").checked;
  for (const img of document.querySelectorAll("img.crop")) {
    img.src = heat ? img.dataset.heat : img.dataset.crop;
  }
}

// --- overview ---

function checkText(f) {
  if (f.generated_rate === null || f.generated_rate === undefined) return "no check yet";
  const verdict = f.passes ? '<span class="pass">passes</span>' : '<span class="fail">below</span>';
  return `activates the node: generated ${percent(f.generated_rate)}, real ` +
    `${percent(f.real_rate)} (median ${percent(f.real_median_rate)}), random ` +
    `${percent(f.random_rate)} — ${verdict}`;
}

function purityText(f) {
  return (f.purity === null || f.purity === undefined) ? "" :
    `purity ${percent(f.purity)} (${f.feature})`;
}

function renderOverview() {
  const cards = $("cards");
  cards.replaceChildren();
  for (const f of state.info.features) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.node = f.node;
    const title = document.createElement("h3");
    title.textContent = `node ${f.node}`;
    const crops = document.createElement("div");
    crops.className = "crops";
    for (const urls of f.shown) crops.append(cropImage(urls));
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.innerHTML = `${f.crops} crops ${purityText(f) ? "· " + purityText(f) : ""}<br>` +
      checkText(f);
    card.append(title, crops, stats);
    card.addEventListener("click", () => { location.hash = `feature=${f.node}`; });
    cards.append(card);
  }
}

// --- the feature view ---

function buildSliders() {
  const box = $("sliders");
  box.replaceChildren();
  const bound = state.info.bound;
  for (let i = 0; i < state.info.latent_dim; i++) {
    const row = document.createElement("div");
    row.className = "slider";
    const label = document.createElement("label");
    label.textContent = `z${i + 1}`;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: -bound, max: bound, step: 0.01, value: 0 });
    input.id = `z${i}`;
    input.setAttribute("aria-label", `latent dimension ${i + 1}`);
    const out = document.createElement("output");
    out.id = `z${i}-value`;
    out.textContent = "0.00";
    input.addEventListener("input", () => {
      state.z[i] = parseFloat(input.value);
      out.textContent = state.z[i].toFixed(2);
      requestImage();
    });
    label.htmlFor = input.id;
    row.append(label, input, out);
    box.append(row);
  }
}

function setLatent(z) {
  state.z = z.map((v) => Math.max(-state.info.bound, Math.min(state.info.bound, v)));
  state.z.forEach((v, i) => {
    $(`z${i}`).value = v;
    $(`z${i}-value`).textContent = v.toFixed(2);
  });
  requestImage();
}

// At most one request in flight: moves made meanwhile are coalesced into the next request, so
// the image follows the slider continuously while dragging without queueing stale requests.
function requestImage() {
  if (state.pendingSince === null) state.pendingSince = performance.now();
  if (state.inflight) { state.dirty = true; return; }
  state.inflight = true;
  state.dirty = false;
  const since = state.pendingSince;
  state.pendingSince = null;
  const node = state.node;
  const query = new URLSearchParams({ node, z: state.z.map((v) => v.toFixed(4)).join(",") });
  api(`/api/generate?${query}`).then((result) => new Promise((resolve) => {
    if (node !== state.node) { resolve(); return; }
    const img = $("generated");
    img.onload = () => {
      const ms = performance.now() - since;
      window.atlasExplorer.latencies.push(ms);
      window.atlasExplorer.renders += 1;
      window.atlasExplorer.last = result;
      $("latency").textContent = `update ${ms.toFixed(0)} ms (server ${result.server_ms.toFixed(1)} ms)`;
      resolve();
    };
    img.src = result.image;
    showActivation(result.activation);
    showNearest(result.nearest);
  })).catch((e) => showError(e.message)).finally(() => {
    state.inflight = false;
    if (state.dirty) requestImage();
  });
}

function showActivation(a) {
  const f = state.info.features.find((x) => x.node === state.node);
  const median = f.real_median_rate;
  const on = median === null || median === undefined ? a.rate > 0.5 : a.rate >= median;
  $("activation").innerHTML =
    `node value <b id="activation-value">${a.value.toFixed(3)}</b>` +
    (f.threshold !== null && state.info.rule === "percentile" ?
      ` (threshold ${f.threshold.toFixed(3)})` : "") +
    `<br>activated in <b id="activation-rate">${percent(a.rate)}</b> of contexts ` +
    `(median real crop ${percent(median)}): ` +
    (on ? '<span class="pass">triggers the feature</span>' :
      '<span class="fail">does not trigger it</span>');
}

function showNearest(nearest) {
  const box = $("nearest");
  box.replaceChildren();
  for (const n of nearest) {
    const img = cropImage(n);
    img.title = `library crop ${n.index}, distance ${n.distance.toFixed(1)}`;
    box.append(img);
  }
}

async function showLibrary(node) {
  const { crops } = await api(`/api/library?${new URLSearchParams({ node })}`);
  $("library-count").textContent = `${crops.length} crops`;
  const box = $("library");
  box.replaceChildren();
  for (const c of crops) {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = c.source_name;
    figure.title = `${c.source_name}, window (${c.y0}, ${c.x0}) size ${c.size}, ` +
      `score ${c.score.toFixed(2)}, activation ${c.activation.toFixed(2)}`;
    figure.append(cropImage(c, "small"), caption);
    figure.addEventListener("click", () => showSource(node, c));
    box.append(figure);
  }
}

function showSource(node, c) {
  $("source-image").src = `/api/source?${new URLSearchParams({ node, index: c.index })}`;
  $("source-caption").textContent = `${c.source_name}: window at (${c.y0}, ${c.x0}), ` +
    `${c.size} px, score ${c.score.toFixed(2)}, node value ${c.activation.toFixed(2)}`;
  $("source-view").hidden = false;
}

function openFeature(node) {
  const f = state.info.features.find((x) => x.node === node);
  if (!f) { showError(`no feature ${node}`); location.hash = ""; return; }
  stopWalk();
  state.node = node;
  $("overview").hidden = true;
  $("feature").hidden = false;
  $("feature-title").textContent = `node ${node}`;
  $("feature-summary").innerHTML = `${f.crops} crops ${purityText(f) ? "· " + purityText(f) : ""}` +
    ` · ${checkText(f)}`;
  $("movie-link").hidden = true;
  $("source-view").hidden = true;
  buildSliders();
  setLatent(new Array(state.info.latent_dim).fill(0));
  showLibrary(node).catch((e) => showError(e.message));
}

function openOverview() {
  stopWalk();
  state.node = null;
  $("feature").hidden = true;
  $("overview").hidden = false;
}

// --- random walk and movies ---

function gaussian() {
  const u = 1 - Math.random(), v = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

async function playWalk() {
  const seed = Math.floor(Math.random() * 1e6);
  const query = new URLSearchParams({ node: state.node, frames: 240, step: 0.1, seed });
  state.walk = (await api(`/api/walk?${query}`)).walk;
  state.walkFrame = 0;
  $("play").disabled = true;
  $("pause").disabled = false;
  tick();
}

function tick() {
  if (!state.walk) return;
  setLatent(state.walk[state.walkFrame]);
  state.walkFrame = (state.walkFrame + 1) % state.walk.length;
  const speed = parseFloat($("speed").value);
  state.timer = setTimeout(tick, 1000 / (12 * speed));
}

function stopWalk() {
  clearTimeout(state.timer);
  state.timer = null;
  state.walk = null;
  $("play").disabled = false;
  $("pause").disabled = true;
}

async function saveMovie() {
  const format = $("movie-format").value;
  const frames = parseInt($("movie-frames").value, 10);
  $("movie-status").textContent = "writing the movie…";
  $("movie-link").hidden = true;
  try {
    const query = new URLSearchParams({
      node: state.node, format, frames, step: 0.1, seed: Math.floor(Math.random() * 1e6),
      fps: 12 * parseFloat($("speed").value),
    });
    const movie = await api(`/api/movie?${query}`, { method: "POST" });
    const link = $("movie-link");
    link.href = movie.url;
    link.download = movie.name;
    link.textContent = `download ${movie.name}`;
    link.hidden = false;
    $("movie-status").textContent = `written to the atlas: ${movie.url.replace("/files/", "")}`;
  } catch (e) {
    $("movie-status").textContent = "";
    showError(e.message);
  }
}

// --- start ---

function route() {
  const match = location.hash.match(/^#feature=(.+)$/);
  if (match) openFeature(decodeURIComponent(match[1])); else openOverview();
}

async function start() {
  try {
    state.info = await api("/api/atlas");
  } catch (e) {
    showError(`cannot read the atlas: ${e.message}`);
    return;
  }
  renderOverview();
  $("heat-toggle").addEventListener("change", refreshHeat);
  $("to-overview").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; });
  $("centre").addEventListener("click", () => setLatent(new Array(state.info.latent_dim).fill(0)));
  $("random").addEventListener("click", () => setLatent(
    Array.from({ length: state.info.latent_dim }, gaussian)));
  $("play").addEventListener("click", () => playWalk().catch((e) => showError(e.message)));
  $("pause").addEventListener("click", stopWalk);
  $("save-movie").addEventListener("click", saveMovie);
  window.addEventListener("hashchange", route);
  route();
  window.atlasExplorer.ready = true;
}

start();
