// The clinic's upload form: drop files or choose them; each is sent on its own (one
// XMLHttpRequest, the file as the body, the CSRF token in a header) with its own progress
// bar and result, then the case list is reloaded. No inline script: the CSP forbids it.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("upload-files");
  const zone = document.getElementById("drop-zone");
  const results = document.getElementById("upload-results");
  const token = document.querySelector("meta[name='csrf-token']").content;
  let queue = Promise.resolve();

  function row(file) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name;
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = 0;
    bar.setAttribute("aria-label", "Sending " + file.name);
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = "waiting";
    item.append(name, " ", bar, " ", state);
    results.append(item);
    return { item, bar, state };
  }

  function reason(xhr) {
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (ignored) {
      // not JSON: fall through to the status line
    }
    return "refused (" + xhr.status + ")";
  }

  function send(file, shown) {
    return new Promise(function (resolve) {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/web/clinic/upload");
      xhr.setRequestHeader("X-CSRF-Token", token);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      shown.state.textContent = "sending";
      xhr.upload.addEventListener("progress", function (event) {
        if (event.lengthComputable) shown.bar.value = Math.round((100 * event.loaded) / event.total);
      });
      xhr.addEventListener("load", function () {
        shown.bar.value = 100;
        if (xhr.status === 201 || xhr.status === 200) {
          const body = JSON.parse(xhr.responseText);
          shown.item.className = "accepted";
          shown.item.dataset.case = body.case_id;
          shown.state.textContent = xhr.status === 201 ? "accepted" : "accepted (sent before: the same case)";
          resolve(true);
        } else {
          shown.item.className = "refused";
          shown.state.textContent = "error: " + reason(xhr);
          resolve(false);
        }
      });
      xhr.addEventListener("error", function () {
        shown.item.className = "refused";
        shown.state.textContent = "error: the connection failed; try again";
        resolve(false);
      });
      xhr.send(file);
    });
  }

  function refresh() {
    return fetch("/web/clinic", { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) return;
        const fresh = new DOMParser().parseFromString(html, "text/html");
        for (const selector of ["#cases tbody", "#case_id"]) {
          const now = document.querySelector(selector);
          const next = fresh.querySelector(selector);
          if (now && next) now.replaceWith(document.importNode(next, true));
        }
      });
  }

  function take(files) {
    const list = Array.from(files);
    if (!list.length) return;
    const shown = list.map(row);
    queue = queue.then(function () {
      let chain = Promise.resolve(false);
      const sent = [];
      list.forEach(function (file, i) {
        chain = chain.then(function () { return send(file, shown[i]).then(function (ok) { sent.push(ok); }); });
      });
      return chain.then(function () { return sent.some(Boolean) ? refresh() : null; });
    });
  }

  input.addEventListener("change", function () {
    take(input.files);
    input.value = "";
  });
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  zone.addEventListener("dragover", function (event) {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    zone.classList.remove("over");
    take(event.dataTransfer.files);
  });
})();
