// apsched-mongo dashboard: show times in the viewer's zone, refresh <main> in place,
// confirm destructive actions. No dependencies, no inline script (the CSP forbids it).
"use strict";
(function () {
  const refreshMs = parseInt(document.body.dataset.refresh || "2000", 10);
  const timeFormat = new Intl.DateTimeFormat(undefined, {
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  const fullFormat = new Intl.DateTimeFormat(undefined, {
    dateStyle: "full", timeStyle: "long",
  });

  // Today's times as a time of day, others with their date; the full date in the tooltip
  function absolute(date) {
    return date.toDateString() === new Date().toDateString()
      ? timeFormat.format(date) : dateTimeFormat.format(date);
  }
  let loadedAt = Date.now();

  function relative(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    let text;
    if (s < 1) return "now";
    if (s < 90) text = s + " s";
    else if (s < 5400) text = Math.round(s / 60) + " min";
    else if (s < 172800) text = Math.round(s / 3600) + " h";
    else text = Math.round(s / 86400) + " d";
    return ms > 0 ? "in " + text : text + " ago";
  }

  // Relative times are measured against the *server's* clock (data-now), so a viewer
  // whose clock is off still sees the right "in 3 s".
  function localize(root) {
    const clock = root.querySelector("[data-now]");
    const serverNow = clock ? Date.parse(clock.dataset.now) : NaN;
    const now = isNaN(serverNow) ? Date.now() : serverNow + (Date.now() - loadedAt);
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      const at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) return;
      el.title = fullFormat.format(new Date(at));
      el.textContent = absolute(new Date(at));
      if (el.hasAttribute("data-relative")) {
        const rel = document.createElement("span");
        rel.className = "rel";
        rel.textContent = " (" + relative(at - now) + ")";
        el.appendChild(rel);
      }
    });
  }

  function bindConfirms(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  let pointerDown = false;
  document.addEventListener("pointerdown", function () { pointerDown = true; });
  document.addEventListener("pointerup", function () { pointerDown = false; });

  // Not while the page is hidden, a button is pressed or something in <main> has focus:
  // a swap must not eat a click or a keystroke.
  function busy(main) {
    return document.hidden || pointerDown || (main && main.contains(document.activeElement)
      && document.activeElement !== main);
  }

  async function refresh() {
    const main = document.getElementById("live");
    const banner = document.getElementById("stale");
    if (busy(main)) {
      window.setTimeout(refresh, refreshMs);
      return;
    }
    try {
      const response = await fetch(window.location.href, {
        credentials: "same-origin", cache: "no-store", headers: { "X-Dashboard-Refresh": "1" },
      });
      const html = await response.text();
      const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
      if (fresh && main) {
        loadedAt = Date.now();
        const copy = document.importNode(fresh, true);
        main.replaceWith(copy);
        localize(copy);
        bindConfirms(copy);
        document.body.dataset.status = String(response.status);
      }
      if (banner) banner.hidden = true;
    } catch (error) {
      if (banner) banner.hidden = false;
    }
    window.setTimeout(refresh, refreshMs);
  }

  document.addEventListener("DOMContentLoaded", function () {
    const zone = document.getElementById("zone");
    if (zone) zone.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone;
    localize(document);
    bindConfirms(document);
    // A notice is said once: drop it from the address so refreshes don't repeat it
    const url = new URL(window.location.href);
    if (url.searchParams.has("notice")) {
      url.searchParams.delete("notice");
      window.history.replaceState(null, "", url.pathname + url.search);
    }
    if (refreshMs > 0) window.setTimeout(refresh, refreshMs);
  });
})();
