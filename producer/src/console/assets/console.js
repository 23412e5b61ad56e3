// warren console: the only script. No framework, no network but our own.
// - [data-refresh]: reload the element's HTML from its URL every
//   data-every seconds (the overview), without reloading the page.
// - textarea[data-json]: check the JSON as it is typed; the form cannot be
//   sent while it does not parse (the server checks again).
// - input[data-select-all]: tick every checkbox named by its value.
"use strict";

function refresh(el) {
  var every = Math.max(2, parseInt(el.dataset.every || "5", 10)) * 1000;
  var busy = false;
  setInterval(function () {
    if (busy || document.hidden) return;
    busy = true;
    fetch(el.dataset.refresh, { credentials: "same-origin", redirect: "follow" })
      .then(function (r) {
        // A session that expired answers with the sign-in page.
        if (r.redirected || r.status === 401) { window.location = "/ui/login"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null && html !== undefined) el.innerHTML = html; })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { busy = false; });
  }, every);
}

function checkJson(area) {
  var out = area.form ? area.form.querySelector(".json-error") : null;
  var msg = "";
  if (area.value.trim() !== "") {
    try { JSON.parse(area.value); } catch (e) { msg = "Not valid JSON: " + e.message; }
  }
  area.setCustomValidity(msg);
  area.classList.toggle("invalid", msg !== "");
  if (out) out.textContent = msg;
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-refresh]").forEach(refresh);
  document.querySelectorAll("textarea[data-json]").forEach(function (a) {
    a.addEventListener("input", function () { checkJson(a); });
    checkJson(a);
  });
  document.querySelectorAll("input[data-select-all]").forEach(function (box) {
    box.addEventListener("change", function () {
      document.querySelectorAll("input[type=checkbox][name='" + box.dataset.selectAll + "']")
        .forEach(function (c) { c.checked = box.checked; });
    });
  });
});
