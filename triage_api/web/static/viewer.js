// Canvas viewer: window/level (drag), zoom (wheel), pan (shift-drag), invert, heat-map overlay.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  var canvas = document.getElementById("canvas"), ctx = canvas.getContext("2d", { willReadFrequently: true });
  var wlText = document.getElementById("wl");
  var csrf = document.querySelector('meta[name="csrf-token"]');
  var src = null, grey = null, work = document.createElement("canvas"), heat = null;
  var state = { width: 256, level: 128, invert: false, heat: false, zoom: 1, x: 0, y: 0 };

  function loadImage(url) {
    return new Promise(function (ok, fail) { var im = new Image(); im.onload = function () { ok(im); }; im.onerror = fail; im.src = url; });
  }
  function reset() {
    state.width = 256; state.level = 128; state.zoom = 1; state.x = 0; state.y = 0; apply();
  }
  function apply() {  // window/level (+invert) into the working canvas, then draw
    if (!grey) return;
    var out = work.getContext("2d").createImageData(work.width, work.height), d = out.data;
    var lo = state.level - state.width / 2, scale = 255 / Math.max(1, state.width), lut = new Uint8ClampedArray(256);
    for (var v = 0; v < 256; v++) { var g = (v - lo) * scale; lut[v] = state.invert ? 255 - g : g; }
    for (var i = 0; i < grey.length; i++) { var o = lut[grey[i]], j = i * 4; d[j] = d[j + 1] = d[j + 2] = o; d[j + 3] = 255; }
    work.getContext("2d").putImageData(out, 0, 0);
    wlText.textContent = "W " + Math.round(state.width) + " / L " + Math.round(state.level) + " · zoom " + state.zoom.toFixed(2) + "×";
    draw();
  }
  function draw() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    var fit = Math.min(canvas.width / work.width, canvas.height / work.height) * state.zoom;
    var w = work.width * fit, h = work.height * fit;
    var x = (canvas.width - w) / 2 + state.x, y = (canvas.height - h) / 2 + state.y;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(work, x, y, w, h);
    if (state.heat && heat) { ctx.globalAlpha = 0.6; ctx.drawImage(heat, x, y, w, h); ctx.globalAlpha = 1; }
    root.dataset.ready = "1";
  }
  function size() {
    // The canvas's pixels must match its box on screen, or the browser stretches the picture:
    // the box is as wide as the column and at most 78% of the window high, and draw() fits the
    // image inside it with one scale for both axes (a radiograph is never distorted).
    var width = Math.max(1, Math.round(canvas.parentNode.clientWidth));
    var height = Math.max(1, Math.round(Math.min(width * 0.8, window.innerHeight * 0.78)));
    canvas.style.height = height + "px";
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  }
  function init(im) {
    src = im; work.width = im.naturalWidth; work.height = im.naturalHeight;
    size();
    window.addEventListener("resize", function () { size(); draw(); });
    var c = work.getContext("2d", { willReadFrequently: true }); c.drawImage(im, 0, 0);
    var px = c.getImageData(0, 0, work.width, work.height).data;
    grey = new Uint8Array(work.width * work.height);
    for (var i = 0; i < grey.length; i++) grey[i] = px[i * 4];
    reset();
  }
  var drag = null;
  canvas.addEventListener("pointerdown", function (e) { drag = { x: e.clientX, y: e.clientY, pan: e.shiftKey }; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointerup", function () { drag = null; });
  canvas.addEventListener("pointermove", function (e) {
    if (!drag) return;
    var dx = e.clientX - drag.x, dy = e.clientY - drag.y; drag.x = e.clientX; drag.y = e.clientY;
    if (drag.pan) { state.x += dx; state.y += dy; draw(); return; }
    state.width = Math.max(1, Math.min(512, state.width + dx)); state.level = Math.max(0, Math.min(255, state.level + dy));
    apply();
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault(); state.zoom = Math.max(0.25, Math.min(16, state.zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15))); apply();
  }, { passive: false });
  document.getElementById("reset").addEventListener("click", reset);
  var inv = document.getElementById("invert");
  inv.addEventListener("change", function () { state.invert = inv.checked; apply(); });
  var hm = document.getElementById("heatmap");
  if (hm) hm.addEventListener("change", function () {
    state.heat = hm.checked;
    if (state.heat && !heat) {
      hm.disabled = true;
      loadImage(root.dataset.heatmap).then(function (im) { heat = im; root.dataset.heatmapLoaded = "1"; draw(); })
        .catch(function () { wlText.textContent = "heat map unavailable"; state.heat = false; hm.checked = false; })
        .finally(function () { hm.disabled = false; });
    } else draw();
  });
  document.addEventListener("keydown", function (e) {
    if (e.target.closest("input, select, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "i") { inv.checked = !inv.checked; inv.dispatchEvent(new Event("change")); }
    else if (e.key === "h" && hm) { hm.checked = !hm.checked; hm.dispatchEvent(new Event("change")); }
    else if (e.key === "r") reset();
    else if (e.target === canvas && e.key.indexOf("Arrow") === 0) {  // keyboard window/level
      var step = e.shiftKey ? 16 : 4;
      if (e.key === "ArrowLeft") state.width = Math.max(1, state.width - step);
      if (e.key === "ArrowRight") state.width = Math.min(512, state.width + step);
      if (e.key === "ArrowUp") state.level = Math.max(0, state.level - step);
      if (e.key === "ArrowDown") state.level = Math.min(255, state.level + step);
      e.preventDefault(); apply();
    }
  });
  function post(url) {
    return fetch(url, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf ? csrf.content : "" } })
      .then(function (r) { return r.json().then(function (b) { if (!r.ok) throw new Error(b.error ? b.error.message : "HTTP " + r.status); return b; }); });
  }
  ["claim", "release"].forEach(function (name) {
    var b = document.getElementById(name);
    if (b) b.addEventListener("click", function () {
      post("/web/cases/" + encodeURIComponent(b.dataset.case) + "/" + name)
        .then(function () { location.reload(); })
        .catch(function (e) { document.getElementById("claim-state").textContent = e.message; });
    });
  });
  // A typed read is kept in this tab (sessionStorage) until it is saved: if the session ended
  // meanwhile, the reader signs in again, comes back to this page and finds it restored.
  var readForm = document.getElementById("read-form"), draftKey = "triage.draft." + location.pathname;
  if (new URLSearchParams(location.search).get("done") === "read") sessionStorage.removeItem(draftKey);
  if (readForm) {
    var draft = JSON.parse(sessionStorage.getItem(draftKey) || "null");
    if (draft) {
      Object.keys(draft).forEach(function (name) {
        readForm.querySelectorAll('[name="' + name + '"]').forEach(function (el) {
          if (el.type === "radio") el.checked = el.value === draft[name]; else el.value = draft[name];
        });
      });
      var note = document.createElement("p");
      note.id = "draft-restored"; note.className = "ok"; note.setAttribute("role", "status");
      note.textContent = "Your unsaved read was restored: check it and save.";
      readForm.prepend(note);
    }
    var keep = function () {
      var d = {};
      new FormData(readForm).forEach(function (v, k) { if (k !== "csrf_token") d[k] = v; });
      sessionStorage.setItem(draftKey, JSON.stringify(d));
    };
    ["input", "change", "submit"].forEach(function (ev) { readForm.addEventListener(ev, keep); });
  }
  loadImage(root.dataset.image).then(init).catch(function () { wlText.textContent = "image could not be loaded"; });
})();
