// One-key reading on the case page: c claim, a agree, o override (then, while its picker is
// open, 1-6 or arrows pick the reason), d finding, s save, n save and next (or, with nothing to
// save, the next case), Esc leaves a field. viewer.js owns the image's keys (1-4 presets, f fit,
// z 1:1, w/p/l/g/t tools, i, h, r); it ignores keys aimed at a form control, so a digit pressed
// on the focused reason picker picks a reason. Keys never act while the reader types in a field. The buttons and radios
// stay the real controls (the keys press them), so the form posts as it does by mouse, with
// its CSRF token, and viewer.js keeps the typed read in sessionStorage until it is saved.
(function () {
  "use strict";
  var form = document.getElementById("read-form");
  var decision = document.getElementById("decision");
  var picker = document.getElementById("reason-picker");
  var busy = false;

  // A read saved by "save and next" is gone from its own page: drop the draft kept for it.
  var saved = document.getElementById("saved");
  if (saved && /^[0-9a-f]{32}$/.test(saved.dataset.saved)) sessionStorage.removeItem("triage.draft./web/cases/" + saved.dataset.saved);

  function radio(name, value) { return form && form.querySelector('input[name="' + name + '"][value="' + value + '"]'); }
  function reasons() { return form ? Array.prototype.slice.call(form.querySelectorAll('input[name="override_reason"]')) : []; }
  function changed(el) { el.dispatchEvent(new Event("change", { bubbles: true })); }
  function showPicker() {
    if (!picker) return;
    var override = radio("agreement", "override");
    picker.hidden = !(override && override.checked);
    if (picker.hidden) reasons().forEach(function (r) { r.checked = false; });
  }
  function agree() {
    var yes = radio("agreement", "agree"), finding = document.getElementById("finding");
    if (!yes) return;
    // "I agree" must fit the AI's tier (the server refuses it otherwise): keep the reader's
    // finding when it fits, else take the one the tier implies.
    var fits = (form.dataset.agree || "").split(" ").filter(Boolean);
    if (fits.length && fits.indexOf(finding.value) < 0) { finding.value = fits[0]; changed(finding); }
    yes.checked = true; changed(yes); yes.focus();
  }
  function override(index) {
    var no = radio("agreement", "override"), all = reasons();
    if (!no) return;
    no.checked = true; changed(no);
    var pick = index === undefined ? (all.filter(function (r) { return r.checked; })[0] || all[0]) : all[index];
    if (!pick) return;
    if (index !== undefined) { pick.checked = true; changed(pick); }
    pick.focus();
  }
  function submit(buttonId) {
    var target = buttonId ? document.getElementById(buttonId) : null;
    var owner = target ? target.form : form;
    if (busy || !owner) return;
    if (!owner.checkValidity()) { owner.reportValidity(); return; }
    busy = true;  // one key press, one request: a second would find the read already saved
    owner.requestSubmit(target || undefined);
    setTimeout(function () { busy = false; }, 5000);  // the request failed and the page stayed
  }
  function typing(el) {
    if (!el || !el.closest) return false;
    if (el.isContentEditable || el.closest("textarea, select")) return true;
    var input = el.closest("input");
    return !!input && ["radio", "checkbox", "button", "submit", "reset"].indexOf(input.type) < 0;
  }

  if (form) {
    form.addEventListener("change", function (e) { if (e.target.name === "agreement") showPicker(); });
    showPicker();
  }
  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    if (typing(e.target)) {
      if (e.key === "Escape" && decision) { e.target.blur(); decision.focus(); e.preventDefault(); }
      return;
    }
    var claim = document.getElementById("claim");
    if (e.key === "c" && claim) claim.click();
    else if (e.key === "a" && form) agree();
    else if (e.key === "o" && form) override();
    else if (/^[1-9]$/.test(e.key) && picker && !picker.hidden && reasons().length >= Number(e.key)) override(Number(e.key) - 1);
    else if (e.key === "d" && form) document.getElementById("finding").focus();
    else if (e.key === "s" && form) submit(null);
    else if (e.key === "n" && (form || document.getElementById("next-form"))) submit(form ? "save-next" : "next-case");
    else return;
    e.preventDefault();
  });
})();
