// Sorts the runs table by a column: click a header, or open index.html#sort=KEY (#sort=-KEY descending).
(function () {
  "use strict";
  var table = document.getElementById("runs");
  if (!table) { return; }
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function cellValue(row, i) {
    var cell = row.cells[i];
    return cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
  }
  function sortBy(key, descending) {
    var i = headers.findIndex(function (h) { return h.getAttribute("data-key") === key; });
    if (i < 0) { return; }
    var numeric = headers[i].getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, i), y = cellValue(b, i);
      var order = numeric ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    headers[i].setAttribute("aria-sort", descending ? "descending" : "ascending");
    table.setAttribute("data-sorted-by", (descending ? "-" : "") + key);
  }
  headers.forEach(function (h) {
    var button = h.querySelector("button");
    if (!button) { return; }
    button.addEventListener("click", function () {
      var descending = h.getAttribute("aria-sort") === "ascending";
      location.hash = "sort=" + (descending ? "-" : "") + h.getAttribute("data-key");
    });
  });
  function sortFromHash() {
    var match = /sort=(-?)([a-z_]+)/.exec(location.hash);
    if (match) { sortBy(match[2], match[1] === "-"); }
  }
  window.addEventListener("hashchange", sortFromHash);
  sortFromHash();
})();
