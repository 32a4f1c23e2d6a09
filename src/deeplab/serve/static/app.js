// The page of `deeplab serve`: everything here is served by the server itself (no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, mask: null, name: "image" };

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "status error" : "status";
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    const parts = [m.arch, m.backbone, m.output_stride ? "OS " + m.output_stride : null,
                   m.num_classes + " classes", m.precision, m.backend].filter(Boolean);
    $("model").textContent = (m.source ? m.source + ": " : "") + parts.join(" · ");
    $("model").title = m.classes.join(", ");
    if (m.inference) {
      $("mode").value = m.inference.mode;
      $("flip").checked = !!m.inference.flip;
      $("scales").value = m.inference.scales.join(",");
    }
  } catch (e) {
    $("model").textContent = "model info unavailable: " + e;
  }
}

function viewMode() {
  return document.querySelector('input[name="view"]:checked').value;
}

function draw() {
  const canvas = $("view");
  if (!state.image) return;
  canvas.width = state.image.width;
  canvas.height = state.image.height;
  const ctx = canvas.getContext("2d");
  const mode = viewMode();
  const alpha = Number($("opacity").value) / 100;
  ctx.globalAlpha = 1;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (mode !== "mask" || !state.mask) ctx.drawImage(state.image, 0, 0);
  if (state.mask && mode !== "image") {
    ctx.globalAlpha = mode === "mask" ? 1 : alpha;
    ctx.drawImage(state.mask, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  canvas.dataset.view = mode;
  canvas.dataset.opacity = String(alpha);
}

function showLegend(classes) {
  const ul = $("legend");
  ul.replaceChildren();
  for (const c of classes) {
    const li = document.createElement("li");
    li.dataset.classId = c.id;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${c.color[0]}, ${c.color[1]}, ${c.color[2]})`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.name;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = c.share < 0.001 ? "<0.1%" : (100 * c.share).toFixed(1) + "%";
    li.append(sw, name, share);
    ul.append(li);
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

function query() {
  const p = new URLSearchParams({ format: "json", mask: "png", mode: $("mode").value, flip: $("flip").checked });
  const scales = $("scales").value.trim();
  if (scales) p.set("scales", scales);
  return p.toString();
}

async function segment(file) {
  if (!file) return;
  state.name = (file.name || "pasted").replace(/\.[^.]*$/, "") || "image";
  $("view").dataset.ready = "0";
  setStatus("segmenting " + (file.name || "pasted image") + " …", false);
  try {
    const response = await fetch("/v1/segment?" + query(), {
      method: "POST", body: file, headers: { "Accept": "application/json" },
    });
    const body = await response.json().catch(() => ({ detail: "HTTP " + response.status }));
    if (!response.ok) {
      setStatus(`error ${response.status}: ${body.detail}`, true);
      return;
    }
    const url = URL.createObjectURL(file);
    state.image = await loadImage(url);
    const maskUrl = "data:image/png;base64," + body.mask.data;
    state.mask = await loadImage(maskUrl);
    showLegend(body.classes);
    const t = body.latency_ms;
    $("latency").textContent = `server ${t.server_ms.toFixed(0)} ms (inference ${t.inference_ms.toFixed(0)} ms) · ${body.size.width}×${body.size.height}`;
    const link = $("download");
    link.href = maskUrl;
    link.download = state.name + "_mask.png";
    link.hidden = false;
    setStatus("", false);
    draw();
    $("view").dataset.ready = "1";
  } catch (e) {
    setStatus("error: " + e.message, true);
  }
}

function init() {
  loadModel();
  $("file").addEventListener("change", (e) => segment(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) segment(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) {
      if (item.kind === "file") { segment(item.getAsFile()); break; }
    }
  });
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = $("opacity").value + "%";
    draw();
  });
  for (const r of document.querySelectorAll('input[name="view"]')) r.addEventListener("change", draw);
}

init();
