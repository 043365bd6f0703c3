// Refreshes the experiment panel in place; the charts are SVG rendered by the server.
(function () {
  "use strict";
  var body = document.body;
  var key = body.getAttribute("data-key");
  var every = Number(body.getAttribute("data-refresh-s") || "10") * 1000;
  var stamp = document.getElementById("updated");

  function mark(text) {
    if (stamp) { stamp.textContent = text; }
  }

  function refresh() {
    if (!key) { return; }
    fetch("/dashboard/panel?key=" + encodeURIComponent(key), { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        document.getElementById("panel").innerHTML = html;
        mark("updated " + new Date().toLocaleTimeString());
      })
      .catch(function (err) { mark("refresh failed: " + err.message); });
  }

  mark("updated " + new Date().toLocaleTimeString());
  if (key) { window.setInterval(refresh, every); }
})();
