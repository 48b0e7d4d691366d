// credbroker console: the live events view, the console's only script (served from the binary;
// the Content-Security-Policy allows scripts from the console's own origin only, never inline).
(function () {
  "use strict";
  var body = document.getElementById("events-body");
  var status = document.getElementById("events-status");
  if (!body || !status || !window.EventSource) {
    return;
  }
  var source = new EventSource("/console/events/stream");
  source.onopen = function () {
    status.textContent = "Live: new events appear at the top.";
  };
  source.onerror = function () {
    status.textContent = "Disconnected; retrying. If this persists, sign in again.";
  };
  source.onmessage = function (message) {
    var e = JSON.parse(message.data);
    var row = document.createElement("tr");
    [e.at, e.type, e.system_id, e.health, e.detail].forEach(function (value) {
      var cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
  };
})();
