// Canvas viewer: the study's full-depth values (uint16) windowed here through a lookup table;
// window/level (drag, arrows, presets), fit / 1:1 / zoom (wheel, +/-), pan, invert, heat-map
// overlay with opacity, and length / angle / cardiothoracic-ratio measurements on an overlay.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  var canvas = document.getElementById("canvas"), ctx = canvas.getContext("2d");
  var overlay = document.getElementById("overlay"), octx = overlay.getContext("2d");
  var wlText = document.getElementById("wl"), list = document.getElementById("measurements");
  var csrf = document.querySelector('meta[name="csrf-token"]');
  var info = null, values = null, work = document.createElement("canvas"), heat = null;
  var state = { center: 128, width: 256, invert: false, heat: false, heatAlpha: 0.6, fit: "fit", zoom: 1, x: 0, y: 0, tool: "wl" };
  var measures = [], pending = null, preview = null, cursor = null;
  var NEEDS = { length: 2, angle: 3, ctr: 4 };
  var NAMES = { wl: "window/level", pan: "pan", length: "length", angle: "angle", ctr: "cardiothoracic ratio" };

  function loadImage(url) {
    return new Promise(function (ok, fail) { var im = new Image(); im.onload = function () { ok(im); }; im.onerror = fail; im.src = url; });
  }
  function unit() { return Math.pow(2, info ? info.bits : 8) / 256; }  // one 8-bit step in data units
  function setWindow(w) { state.center = w[0]; state.width = w[1]; apply(); }
  function preset(name) {
    if (!info) return;
    setWindow(name === "default" ? info.window : info.presets[name]);
    wlText.textContent += " · " + name + " preset";
  }
  function reset() {
    state.fit = "fit"; state.zoom = 1; state.x = 0; state.y = 0;
    if (info) setWindow(info.window);
  }
  function apply() {  // window/level (+invert) through a lookup table into the working canvas
    if (!values) return;
    var size = Math.pow(2, info.bits), lut = new Uint8ClampedArray(size);
    var c = state.center - 0.5, w = Math.max(1, state.width - 1);
    for (var v = 0; v < size; v++) {  // the VOI LUT's linear function (DICOM PS3.3 C.11.2.1.2)
      var g = ((v - c) / w + 0.5) * 255; lut[v] = state.invert ? 255 - g : g;
    }
    var out = work.getContext("2d").createImageData(work.width, work.height), d = out.data, top = size - 1;
    for (var i = 0; i < values.length; i++) { var o = lut[Math.min(values[i], top)], j = i * 4; d[j] = d[j + 1] = d[j + 2] = o; d[j + 3] = 255; }
    work.getContext("2d").putImageData(out, 0, 0);
    draw();
  }
  function view() {  // canvas pixels per image pixel, and where the image's corner lies
    var s = state.fit === "actual" ? 1 : Math.min(canvas.width / work.width, canvas.height / work.height) * state.zoom;
    return { s: s, x: (canvas.width - work.width * s) / 2 + state.x, y: (canvas.height - work.height * s) / 2 + state.y };
  }
  function draw() {
    if (!values) return;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    var t = view(), w = work.width * t.s, h = work.height * t.s;  // one scale for both axes: never stretched
    ctx.imageSmoothingEnabled = t.s < 1;
    ctx.drawImage(work, t.x, t.y, w, h);
    if (state.heat && heat) { ctx.globalAlpha = state.heatAlpha; ctx.drawImage(heat, t.x, t.y, w, h); ctx.globalAlpha = 1; }
    var zoom = state.fit === "actual" ? "1:1" : state.fit === "fit" ? "fit" : (t.s * (window.devicePixelRatio || 1)).toFixed(2) + "×";
    wlText.textContent = "W " + Math.round(state.width) + " / L " + Math.round(state.center) + " · " + zoom;
    ["fit", "actual"].forEach(function (id) { document.getElementById(id).setAttribute("aria-pressed", String(state.fit === id)); });
    drawOverlay();
    root.dataset.ready = "1";
  }

  // --- measurements: kept in image pixels, drawn on the overlay, listed as text -------------
  function spacing() { return info && info.spacing_mm; }
  function distance(a, b, horizontal) {  // {value, unit} between two image points
    var dx = b[0] - a[0], dy = horizontal ? 0 : b[1] - a[1], mm = spacing();
    if (mm) return { value: Math.hypot(dx * mm[1], dy * mm[0]), unit: "mm" };
    return { value: Math.hypot(dx, dy), unit: "px" };
  }
  function fmt(d) { return d.value.toFixed(1) + " " + d.unit; }
  function angle(p) {  // at the middle point, in the patient's geometry (pixels need not be square)
    var mm = spacing() || [1, 1], sy = mm[0], sx = mm[1];
    var a = Math.atan2((p[0][1] - p[1][1]) * sy, (p[0][0] - p[1][0]) * sx), b = Math.atan2((p[2][1] - p[1][1]) * sy, (p[2][0] - p[1][0]) * sx);
    var deg = Math.abs(a - b) * 180 / Math.PI; return deg > 180 ? 360 - deg : deg;
  }
  function describe(m) {
    var p = m.pts;
    if (m.kind === "length") return "Length: " + fmt(distance(p[0], p[1]));
    if (m.kind === "angle") return "Angle: " + angle(p).toFixed(1) + "°";
    var cardiac = distance(p[0], p[1], true);
    if (p.length < 4) return "Cardiothoracic ratio: cardiac width " + fmt(cardiac) + "; now draw the thoracic width";
    var thoracic = distance(p[2], p[3], true);
    return "Cardiothoracic ratio: " + (thoracic.value ? cardiac.value / thoracic.value : 0).toFixed(2) +
      " (cardiac " + fmt(cardiac) + " / thoracic " + fmt(thoracic) + ")";
  }
  function listMeasures() {
    list.textContent = "";
    var shown = measures.concat(pending && pending.kind === "ctr" && pending.pts.length >= 2 ? [pending] : []);
    shown.forEach(function (m) { var li = document.createElement("li"); li.textContent = describe(m); list.appendChild(li); });
    var note = spacing() ? (info.spacing_from === "ImagerPixelSpacing" ? "Lengths in mm at the detector (Imager Pixel Spacing)." : "") :
      "No pixel spacing in this file: lengths in image pixels (px).";
    if (shown.length && note) { var li = document.createElement("li"); li.className = "hint"; li.textContent = note; list.appendChild(li); }
  }
  function addPoint(pt) {
    if (!pending) pending = { kind: state.tool, pts: [] };
    var p = pending.pts;
    if (pending.kind === "ctr" && p.length % 2 === 1) pt = [pt[0], p[p.length - 1][1]];  // widths are horizontal
    p.push(pt); preview = null;
    if (p.length >= NEEDS[pending.kind]) { measures.push(pending); pending = null; }
    listMeasures(); drawOverlay();
  }
  function clearMeasures() { measures = []; pending = null; preview = null; listMeasures(); drawOverlay(); }
  function toScreen(pt, t) { return [t.x + pt[0] * t.s, t.y + pt[1] * t.s]; }
  function drawOverlay() {
    if (overlay.width !== canvas.width || overlay.height !== canvas.height) { overlay.width = canvas.width; overlay.height = canvas.height; }
    octx.clearRect(0, 0, overlay.width, overlay.height);
    if (!values) return;
    var t = view(), r = window.devicePixelRatio || 1;
    octx.lineWidth = 2 * r; octx.font = Math.round(13 * r) + "px system-ui, sans-serif";
    var all = measures.slice(); if (pending) all.push({ kind: pending.kind, pts: pending.pts.concat(preview ? [preview] : []), open: true });
    all.forEach(function (m) {
      var q = m.pts.map(function (p) { return toScreen(p, t); });
      octx.strokeStyle = "#ffd400"; octx.fillStyle = "#ffd400";
      octx.beginPath();
      for (var i = 0; i < q.length; i++) {
        if (m.kind === "ctr" && i % 2 === 0) octx.moveTo(q[i][0], q[i][1]); else if (i === 0) octx.moveTo(q[i][0], q[i][1]); else octx.lineTo(q[i][0], q[i][1]);
      }
      octx.stroke();
      q.forEach(function (p) { octx.fillRect(p[0] - 2 * r, p[1] - 2 * r, 4 * r, 4 * r); });
      if (!m.open && q.length) {
        var label = describe(m).replace(/^[^:]*: /, ""), at = q[q.length - 1], wide = octx.measureText(label).width + 8 * r;
        var left = at[0] + 6 * r + wide > overlay.width ? at[0] - 6 * r - wide : at[0] + 6 * r;  // keep it inside the view
        octx.fillStyle = "rgba(0,0,0,0.7)"; octx.fillRect(left, at[1] - 16 * r, wide, 20 * r);
        octx.fillStyle = "#ffd400"; octx.fillText(label, left + 4 * r, at[1]);
      }
    });
    if (cursor && NEEDS[state.tool]) {  // the keyboard's crosshair
      var c = toScreen(cursor, t); octx.strokeStyle = "#00e5ff"; octx.beginPath();
      octx.moveTo(c[0] - 10 * r, c[1]); octx.lineTo(c[0] + 10 * r, c[1]); octx.moveTo(c[0], c[1] - 10 * r); octx.lineTo(c[0], c[1] + 10 * r); octx.stroke();
    }
  }

  // --- layout, tools and input --------------------------------------------------------------
  function size() {
    // The canvas's pixels must match its box on screen (times the device's pixel ratio, so that
    // 1:1 is one image pixel per screen pixel), or the browser stretches the picture: the box is
    // as wide as the column and at most 78% of the window high, and draw() fits the image inside
    // it with one scale for both axes (a radiograph is never distorted).
    var width = Math.max(1, Math.round(canvas.parentNode.clientWidth));
    var height = Math.max(1, Math.round(Math.min(width * 0.8, window.innerHeight * 0.78)));
    var r = window.devicePixelRatio || 1;
    canvas.style.height = height + "px"; overlay.style.height = height + "px";
    if (canvas.width !== Math.round(width * r) || canvas.height !== Math.round(height * r)) {
      canvas.width = Math.round(width * r); canvas.height = Math.round(height * r);
    }
  }
  function init(meta, data) {
    info = meta; values = data; work.width = info.width; work.height = info.height;
    size();
    window.addEventListener("resize", function () { size(); draw(); });
    reset();
  }
  function setTool(name) {
    state.tool = name; pending = null; preview = null; cursor = null;  // the crosshair comes with the first key
    root.querySelectorAll("[data-tool]").forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.tool === name)); });
    canvas.setAttribute("aria-label", "Study image. Tool: " + NAMES[name] + ". " + (NEEDS[name] ?
      "Click or drag to place points; arrow keys move the crosshair, Enter places a point, Escape clears." :
      name === "pan" ? "Drag or arrow keys pan." : "Drag or arrow keys change window and level; shift-drag pans."));
    listMeasures(); drawOverlay();
  }
  function setFit(mode) { state.fit = mode; state.zoom = 1; state.x = 0; state.y = 0; draw(); }
  function zoomBy(f) {
    var s = view().s * f, fit = Math.min(canvas.width / work.width, canvas.height / work.height);
    state.zoom = Math.max(0.25, Math.min(32 / fit, s / fit)); state.fit = "free"; draw();
  }
  function toImage(e) {  // a pointer event's position in image pixels
    var b = canvas.getBoundingClientRect(), k = canvas.width / b.width, t = view();
    return [((e.clientX - b.left) * k - t.x) / t.s, ((e.clientY - b.top) * k - t.y) / t.s];
  }
  var drag = null;
  canvas.addEventListener("pointerdown", function (e) {
    canvas.focus(); canvas.setPointerCapture(e.pointerId);
    var measure = NEEDS[state.tool] && !e.shiftKey;
    drag = { x: e.clientX, y: e.clientY, x0: e.clientX, y0: e.clientY, pan: e.shiftKey || state.tool === "pan", measure: measure };
    if (measure) addPoint(toImage(e));
  });
  canvas.addEventListener("pointerup", function (e) {
    if (drag && drag.measure && pending && Math.hypot(e.clientX - drag.x0, e.clientY - drag.y0) > 4) addPoint(toImage(e));
    drag = null;
  });
  canvas.addEventListener("pointermove", function (e) {
    if (!drag) return;
    if (drag.measure) { if (pending) { preview = toImage(e); if (pending.kind === "ctr" && pending.pts.length % 2 === 1) preview[1] = pending.pts[pending.pts.length - 1][1]; drawOverlay(); } return; }
    var r = window.devicePixelRatio || 1, dx = e.clientX - drag.x, dy = e.clientY - drag.y; drag.x = e.clientX; drag.y = e.clientY;
    if (drag.pan) { state.x += dx * r; state.y += dy * r; draw(); return; }
    var u = unit(), top = Math.pow(2, info.bits);
    state.width = Math.max(2, Math.min(2 * top, state.width + dx * u)); state.center = Math.max(0, Math.min(top, state.center + dy * u));
    apply();
  });
  canvas.addEventListener("wheel", function (e) { e.preventDefault(); zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15); }, { passive: false });
  document.getElementById("reset").addEventListener("click", reset);
  document.getElementById("fit").addEventListener("click", function () { setFit("fit"); });
  document.getElementById("actual").addEventListener("click", function () { setFit("actual"); });
  document.getElementById("clear").addEventListener("click", clearMeasures);
  root.querySelectorAll("[data-preset]").forEach(function (b) { b.addEventListener("click", function () { preset(b.dataset.preset); }); });
  root.querySelectorAll("[data-tool]").forEach(function (b) { b.addEventListener("click", function () { setTool(b.dataset.tool); }); });
  var inv = document.getElementById("invert");
  inv.addEventListener("change", function () { state.invert = inv.checked; apply(); });
  var hm = document.getElementById("heatmap"), opacity = document.getElementById("heat-opacity");
  if (opacity) opacity.addEventListener("input", function () { state.heatAlpha = Number(opacity.value) / 100; draw(); });
  if (hm) hm.addEventListener("change", function () {
    state.heat = hm.checked;
    if (state.heat && !heat) {
      hm.disabled = true;
      loadImage(root.dataset.heatmap).then(function (im) { heat = im; root.dataset.heatmapLoaded = "1"; draw(); })
        .catch(function () { wlText.textContent = "heat map unavailable"; state.heat = false; hm.checked = false; })
        .finally(function () { hm.disabled = false; });
    } else draw();
  });
  var KEYS = { f: function () { setFit("fit"); }, z: function () { setFit("actual"); }, "+": function () { zoomBy(1.25); },
    "=": function () { zoomBy(1.25); }, "-": function () { zoomBy(0.8); }, r: reset, Escape: clearMeasures,
    "1": function () { preset("default"); }, "2": function () { preset("lung"); }, "3": function () { preset("soft"); }, "4": function () { preset("bone"); },
    w: function () { setTool("wl"); }, p: function () { setTool("pan"); }, l: function () { setTool("length"); },
    g: function () { setTool("angle"); }, t: function () { setTool("ctr"); } };
  document.addEventListener("keydown", function (e) {
    if (e.target.closest("input, select, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "Escape" && !measures.length && !pending) return;  // nothing to clear: leave it to the page
    if (e.key === "i") { inv.checked = !inv.checked; inv.dispatchEvent(new Event("change")); }
    else if (e.key === "h" && hm) { hm.checked = !hm.checked; hm.dispatchEvent(new Event("change")); }
    else if (KEYS[e.key]) KEYS[e.key]();
    else if (e.target === canvas && values && NEEDS[state.tool] && !cursor && (e.key.indexOf("Arrow") === 0 || e.key === "Enter" || e.key === " ")) {
      cursor = [Math.round(work.width / 2), Math.round(work.height / 2)]; drawOverlay();  // first key: the crosshair, centred
      if (e.key === "Enter" || e.key === " ") addPoint(cursor.slice());
    } else if (e.target === canvas && values && e.key.indexOf("Arrow") === 0) {
      var step = e.shiftKey ? 4 : 1, dx = { ArrowLeft: -1, ArrowRight: 1 }[e.key] || 0, dy = { ArrowUp: -1, ArrowDown: 1 }[e.key] || 0;
      if (NEEDS[state.tool]) {  // move the crosshair (image pixels)
        cursor = [Math.max(0, Math.min(work.width, cursor[0] + dx * step * 2.5)), Math.max(0, Math.min(work.height, cursor[1] + dy * step * 2.5))];
        drawOverlay();
      } else if (state.tool === "pan") { state.x -= dx * step * 20; state.y -= dy * step * 20; draw(); }
      else {  // keyboard window/level
        var u = unit() * 4 * step, top = Math.pow(2, info.bits);
        state.width = Math.max(2, Math.min(2 * top, state.width + dx * u)); state.center = Math.max(0, Math.min(top, state.center + dy * u));
        apply();
      }
    } else if (e.target === canvas && NEEDS[state.tool] && cursor && (e.key === "Enter" || e.key === " ")) addPoint(cursor.slice());
    else return;
    e.preventDefault();
  });
  function loadPixels(url) {  // little-endian uint16 values, their geometry and windows in X-Pixel-Info
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      var meta = r.headers.get("X-Pixel-Info");
      if (!r.ok || !meta) throw new Error("HTTP " + r.status);
      return r.arrayBuffer().then(function (buf) {
        var data = new Uint16Array(buf);
        if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {  // a big-endian machine: swap
          var view = new DataView(buf); data = new Uint16Array(buf.byteLength / 2);
          for (var i = 0; i < data.length; i++) data[i] = view.getUint16(2 * i, true);
        }
        return [JSON.parse(meta), data];
      });
    });
  }
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
  loadPixels(root.dataset.pixels).then(function (got) { init(got[0], got[1]); })
    .catch(function () { wlText.textContent = "image could not be loaded"; });
})();
