// MQI Communicator dashboard: swap every [data-live] part for a fresh server-rendered copy.
// The server escapes everything it renders; this script only moves its HTML into place.
(function () {
  "use strict";
  var seconds = parseFloat(document.body.getAttribute("data-refresh")) || 2;
  var state = document.getElementById("live-state");
  var parts = Array.prototype.slice.call(document.querySelectorAll("[data-live]"));
  if (!parts.length) { return; }

  function stamp(text, failed) {
    if (!state) { return; }
    state.textContent = text;
    state.className = failed ? "live-state error" : "live-state";
  }

  function refresh(part) {
    return fetch(part.getAttribute("data-live"), {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) { part.innerHTML = html; });
  }

  function tick() {
    if (document.hidden) { return; }
    Promise.all(parts.map(refresh)).then(function () {
      stamp("live: updated every " + seconds + " s", false);
    }, function (error) {
      stamp("not updated (" + error.message + "); retrying", true);
    });
  }

  window.setInterval(tick, seconds * 1000);
  document.addEventListener("visibilitychange", tick);
}());
