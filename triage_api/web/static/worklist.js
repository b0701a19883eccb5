// Worklist: fetch /web/api/worklist when the live stream (live.js) reports a change, render
// rows in deadline order, j/k/Enter/n keys. A slow refresh stays as the safety net for what
// the stream does not carry (new uploads, other readers' claims and reads).
(function () {
  "use strict";
  var REFRESH_MS = 60000, SETTLE_MS = 250;
  var body = document.querySelector("#worklist tbody");
  var form = document.getElementById("filters");
  var live = document.getElementById("live");
  var items = [], selected = 0, timer = null, seq = 0, soon = null;

  function left(deadline, now) {
    var s = Math.round((Date.parse(deadline) - now) / 1000), over = s < 0, a = Math.abs(s);
    var text = a >= 3600 ? Math.floor(a / 3600) + " h " + Math.floor((a % 3600) / 60) + " min" : Math.floor(a / 60) + " min " + (a % 60) + " s";
    return { over: over, text: over ? "overdue " + text : text };
  }
  function age(since, now) {  // how long a claim has been held, e.g. "12 min"
    var m = Math.max(0, Math.floor((now - Date.parse(since)) / 60000));
    return m >= 60 ? Math.floor(m / 60) + " h " + (m % 60) + " min" : m + " min";
  }
  function utc(iso) { var t = new Date(iso).toISOString(); return t.slice(0, 10) + " " + t.slice(11, 16) + " UTC"; }
  function line(td, text, cls) { var s = document.createElement("span"); s.className = cls; s.textContent = text; td.appendChild(s); }
  function cell(tr, text, cls) { var td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
  function render() {
    var now = Date.now(), rows = document.createDocumentFragment();
    items.forEach(function (it, i) {
      var tr = document.createElement("tr"), l = left(it.deadline, now);
      tr.dataset.case = it.id; tr.dataset.deadline = it.deadline; tr.tabIndex = -1;
      if (l.over) tr.className = "overdue";
      var t = cell(tr, ""), badge = document.createElement("span");
      badge.className = "tier tier-" + it.tier; badge.textContent = it.tier; t.appendChild(badge);
      // A case without an AI result is never shown as low risk: it says so, with the reason.
      if (it.risk === null) cell(tr, "no AI result" + (it.reason ? ": " + it.reason : " yet"), "no-ai");
      else cell(tr, (it.risk * 100).toFixed(1) + "%");
      cell(tr, it.model_version === null ? "—" : it.model_version + (it.calibration_id === null ? "" : " · cal #" + it.calibration_id));
      cell(tr, l.text, "left");
      // The study's identity and context; a picture without a DICOM header has none ("—").
      cell(tr, it.study || "—", "accession");
      var exam = cell(tr, it.description || "—", "study");
      line(exam, [it.modality, it.body_part, it.view && "view " + it.view].filter(Boolean).join(" · ") || "—", "sub");
      if (it.age_unchecked) line(exam, "age not checked (model for " + it.age_unchecked + ")", "age-note");
      var got = cell(tr, ""), when = document.createElement("time");
      when.dateTime = it.received_at; when.textContent = utc(it.received_at); got.appendChild(when);
      cell(tr, it.status.replace("_", " "));
      cell(tr, it.clinic);
      cell(tr, it.claimed_by ? (it.claimed_by_me ? "you" : it.claimed_by) + " · " + age(it.claimed_at, now) : "—", "claim");
      var c = cell(tr, ""), a = document.createElement("a");
      a.href = "/web/cases/" + encodeURIComponent(it.id); a.textContent = it.id.slice(0, 12); c.appendChild(a);
      if (i === selected) tr.classList.add("selected");
      tr.addEventListener("click", function (e) { if (e.target.tagName !== "A") open(i); });
      rows.appendChild(tr);
    });
    body.replaceChildren(rows);
    if (!items.length) { var tr = document.createElement("tr"); cell(tr, "Nothing to read.").colSpan = 11; body.appendChild(tr); }
  }
  function query() {
    var p = new URLSearchParams();
    new FormData(form).forEach(function (v, k) { if (v) p.set(k, v); });
    return p.toString();
  }
  function poll() {
    clearTimeout(timer);
    var mine = ++seq;  // a newer request (filters changed) makes older answers stale
    fetch("/web/api/worklist?" + query(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        if (mine !== seq) return;
        var id = items[selected] && items[selected].id, t0 = performance.now();
        items = data.items;
        var keep = items.findIndex(function (it) { return it.id === id; });
        selected = keep >= 0 ? keep : Math.min(selected, Math.max(items.length - 1, 0));
        render();
        document.body.dataset.renderMs = (performance.now() - t0).toFixed(2);  // read by bench/worklist_page.py
        live.textContent = items.length + " cases · updated " + data.now.slice(0, 10) + " " + data.now.slice(11, 16) + " UTC";
        document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
      })
      .catch(function (e) { if (mine === seq) live.textContent = "update failed (" + e.message + "); retrying"; })
      .finally(function () { if (mine === seq) timer = setTimeout(poll, REFRESH_MS); });
  }
  function open(i) { if (items[i]) location.href = "/web/cases/" + encodeURIComponent(items[i].id); }
  function move(d) { if (!items.length) return; selected = Math.max(0, Math.min(items.length - 1, selected + d)); render(); body.children[selected].scrollIntoView({ block: "nearest" }); }
  document.addEventListener("keydown", function (e) {
    if (e.target.closest("input, select, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "j") move(1);
    else if (e.key === "k") move(-1);
    else if (e.key === "Enter") open(selected);
    else if (e.key === "n") open(items.findIndex(function (it) { return !it.claimed_by || it.claimed_by_me; }));
    else return;
    e.preventDefault();
  });
  form.addEventListener("change", function () { selected = 0; poll(); });
  form.addEventListener("submit", function (e) { e.preventDefault(); poll(); });
  // a burst of scored cases makes one request, not one each
  document.addEventListener("triage:case", function () { clearTimeout(soon); soon = setTimeout(poll, SETTLE_MS); });
  setInterval(render, 1000);  // keep "time left" ticking between refreshes
  poll();
})();
