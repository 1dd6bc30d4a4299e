// Live refresh: every 5 s, re-fetch this page and swap the sections marked data-live.
// The pages work without it.
(function () {
  var live = document.querySelectorAll("[data-live]");
  if (!live.length) return;
  setInterval(function () {
    fetch(location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        live.forEach(function (el) {
          var fresh = el.id && doc.getElementById(el.id);
          if (fresh) el.innerHTML = fresh.innerHTML;
        });
      })
      .catch(function () {});
  }, 5000);
})();
