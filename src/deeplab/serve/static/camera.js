// Live camera: getUserMedia -> JPEG frames over a WebSocket -> masks drawn over the video.
// At most two frames in flight; the server keeps only the newest waiting frame (it drops stale
// ones), so latency stays bounded when the model is slower than the camera.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("video"), view = $("view"), ctx = view.getContext("2d");
  const grab = document.createElement("canvas"), grabCtx = grab.getContext("2d");
  let stream = null, socket = null, classes = [], palette = [];
  let inFlight = 0, sent = 0, received = 0, dropped = 0, maskImage = null, pendingHeader = null;
  const sentAt = new Map(), doneTimes = [], latencies = [];
  const MAX_IN_FLIGHT = 2;

  fetch("/v1/model").then((r) => r.json()).then((m) => {
    classes = m.classes || []; palette = m.palette || [];
    $("model").textContent = `${m.arch} / ${m.backbone}, ${classes.length} classes`;
  });

  function status(text, error) { $("status").textContent = text; $("status").className = error ? "status error" : "status"; }

  function opacity() { return Number($("opacity").value) / 100; }
  $("opacity").addEventListener("input", () => { $("opacity-value").textContent = `${$("opacity").value}%`; view.dataset.opacity = String(opacity()); });

  function sendFrame() {
    if (!socket || socket.readyState !== WebSocket.OPEN || inFlight >= MAX_IN_FLIGHT || !video.videoWidth) return;
    const width = Number($("width").value), height = Math.round(width * video.videoHeight / video.videoWidth);
    grab.width = width; grab.height = height;
    grabCtx.drawImage(video, 0, 0, width, height);
    inFlight += 1;
    grab.toBlob((blob) => {
      if (!socket || socket.readyState !== WebSocket.OPEN) { inFlight -= 1; return; }
      sent += 1; sentAt.set(sent, performance.now());
      socket.send(blob);
    }, "image/jpeg", 0.8);
  }

  function draw() {
    if (!stream) return;
    if (video.videoWidth) {
      if (view.width !== video.videoWidth) { view.width = video.videoWidth; view.height = video.videoHeight; }
      ctx.globalAlpha = 1; ctx.drawImage(video, 0, 0, view.width, view.height);
      if (maskImage) { ctx.globalAlpha = opacity(); ctx.drawImage(maskImage, 0, 0, view.width, view.height); ctx.globalAlpha = 1; }
    }
    sendFrame();
    requestAnimationFrame(draw);
  }

  function showStats(header) {
    const now = performance.now();
    doneTimes.push(now);
    while (doneTimes.length && now - doneTimes[0] > 2000) doneTimes.shift();
    const fps = doneTimes.length > 1 ? (doneTimes.length - 1) * 1000 / (now - doneTimes[0]) : 0;
    const latency = sentAt.has(header.frame) ? now - sentAt.get(header.frame) : NaN;
    for (const key of sentAt.keys()) if (key <= header.frame) sentAt.delete(key);
    latencies.push(latency); if (latencies.length > 30) latencies.shift();
    const mean = latencies.reduce((a, b) => a + b, 0) / latencies.length;
    $("fps").textContent = `${fps.toFixed(1)} fps (masks received ${received}, frames sent ${sent}, dropped by the server ${header.dropped})`;
    $("latency").textContent = `latency ${latency.toFixed(0)} ms (mean ${mean.toFixed(0)} ms; server ${header.server_ms} ms, inference ${header.inference_ms} ms)`;
    view.dataset.fps = fps.toFixed(2); view.dataset.received = String(received); view.dataset.dropped = String(header.dropped);
    const legend = $("legend"); legend.textContent = "";
    for (const id of header.classes) {
      const li = document.createElement("li"), sw = document.createElement("span"), name = document.createElement("span");
      sw.className = "swatch"; const c = palette[id] || [0, 0, 0]; sw.style.background = `rgb(${c[0]},${c[1]},${c[2]})`;
      name.className = "name"; name.textContent = classes[id] || `class ${id}`;
      li.append(sw, name); legend.append(li);
    }
  }

  function onMessage(event) {
    if (typeof event.data === "string") {
      const header = JSON.parse(event.data);
      inFlight = Math.max(0, inFlight - 1);
      if (header.error) { status(`frame ${header.frame}: ${header.error}`, true); return; }
      pendingHeader = header;
      return;
    }
    const header = pendingHeader; pendingHeader = null;
    if (!header) return;
    received += 1;
    createImageBitmap(event.data).then((bitmap) => { maskImage = bitmap; view.dataset.ready = "1"; });
    showStats(header);
  }

  async function start() {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (err) { status(`no camera: ${err.message}`, true); return; }
    video.srcObject = stream; await video.play();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/v1/camera`);
    socket.binaryType = "blob";
    socket.onopen = () => { status("streaming"); requestAnimationFrame(draw); };
    socket.onmessage = onMessage;
    socket.onclose = (e) => { if (stream) status(`connection closed${e.reason ? ": " + e.reason : ""}`, true); };
    $("start").disabled = true; $("stop").disabled = false;
  }

  function stop() {
    if (socket) socket.close(); socket = null;
    if (stream) stream.getTracks().forEach((t) => t.stop()); stream = null;
    inFlight = 0; status("camera off");
    $("start").disabled = false; $("stop").disabled = true;
  }

  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
})();
