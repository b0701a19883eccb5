// Live updates: one EventSource on /web/api/worklist/stream. Announces critical arrivals
// (banner, page title count, optional sound), shows the criticals due within 15 min, and
// tells the worklist to refresh ("triage:case" events). The browser reconnects by itself,
// sending Last-Event-ID, when the server ends a stream.
(function () {
  "use strict";
  var box = document.getElementById("live-alerts");
  if (!box || !window.EventSource) return;
  var banner = document.getElementById("critical-banner");
  var list = document.getElementById("critical-list");
  var due = document.getElementById("critical-due");
  var sound = document.getElementById("critical-sound");
  var baseTitle = document.title, unseen = 0, audio = null;

  sound.checked = localStorage.getItem("triage.sound") === "on";
  sound.addEventListener("change", function () { localStorage.setItem("triage.sound", sound.checked ? "on" : "off"); });

  function beep() {
    try {
      audio = audio || new (window.AudioContext || window.webkitAudioContext)();
      var osc = audio.createOscillator(), gain = audio.createGain();
      osc.frequency.value = 880; gain.gain.value = 0.15;
      osc.connect(gain); gain.connect(audio.destination);
      osc.start(); osc.stop(audio.currentTime + 0.4);
    } catch (e) { /* no audio device: the banner and title still show */ }
  }
  function title() { document.title = unseen ? "(" + unseen + " critical) " + baseTitle : baseTitle; }
  function announce(ev) {
    unseen += 1;
    var li = document.createElement("li"), a = document.createElement("a");
    a.href = "/web/cases/" + encodeURIComponent(ev.case_id);
    a.textContent = "Critical case " + ev.case_id.slice(0, 12) + " (" + ev.clinic + ")";
    li.appendChild(a); list.prepend(li);
    banner.hidden = false;
    title();
    if (sound.checked) beep();
  }
  document.getElementById("critical-dismiss").addEventListener("click", function () {
    unseen = 0; list.replaceChildren(); banner.hidden = true; title();
  });

  var source = new EventSource("/web/api/worklist/stream");
  source.addEventListener("case", function (e) {
    var ev = JSON.parse(e.data);
    if (ev.kind === "case.critical") announce(ev);
    document.dispatchEvent(new CustomEvent("triage:case", { detail: ev }));
  });
  source.addEventListener("summary", function (e) {
    var n = JSON.parse(e.data).critical_due_15min;
    due.textContent = n + " critical " + (n === 1 ? "case" : "cases") + " due within 15 min";
    due.className = n ? "due-soon" : "";
  });
  source.addEventListener("open", function () { box.dataset.live = "connected"; });
  source.addEventListener("error", function () { box.dataset.live = "reconnecting"; });
})();
