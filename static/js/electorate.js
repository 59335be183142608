// Client-side clocks and keyboard navigation. No polling: data arrives over the websocket.
(function () {
  "use strict";

  function human(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + "s";
    const m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function tick() {
    const now = Date.now();
    document.querySelectorAll("time[data-since]").forEach(function (el) {
      el.textContent = human((now - Date.parse(el.dataset.since)) / 1000);
    });
    document.querySelectorAll("time[data-until]").forEach(function (el) {
      const left = (Date.parse(el.dataset.until) - now) / 1000;
      el.textContent = left > 0 ? human(Math.ceil(left)) : "renewing";
    });
  }
  setInterval(tick, 1000);
  document.addEventListener("DOMContentLoaded", tick);
  document.addEventListener("htmx:oobAfterSwap", tick);
  document.addEventListener("htmx:wsAfterMessage", tick);

  function setLive(text) {
    const el = document.getElementById("live-state");
    if (el) el.textContent = text;
  }
  document.addEventListener("htmx:wsOpen", function () { setLive("live updates: connected"); });
  document.addEventListener("htmx:wsClose", function () { setLive("live updates: reconnecting…"); });

  // Keyboard: "/" finds, j/k move between elections, Enter opens the focused one.
  function rows() { return Array.from(document.querySelectorAll("#election-rows tr[data-election]")); }
  function move(delta) {
    const all = rows();
    if (!all.length) return;
    const current = document.querySelector("#election-rows tr.current");
    let index = current ? all.indexOf(current) + delta : 0;
    index = Math.max(0, Math.min(all.length - 1, index));
    if (current) current.classList.remove("current");
    all[index].classList.add("current");
    const link = all[index].querySelector(".name a");
    if (link) link.focus();
  }
  document.addEventListener("keydown", function (ev) {
    const typing = ev.target.matches("input, select, textarea");
    if (ev.key === "/" && !typing) {
      const q = document.getElementById("filter-q");
      if (q) { ev.preventDefault(); q.focus(); }
    } else if ((ev.key === "j" || ev.key === "k") && !typing && !ev.ctrlKey && !ev.metaKey) {
      ev.preventDefault();
      move(ev.key === "j" ? 1 : -1);
    } else if (ev.key === "Escape" && typing) {
      ev.target.blur();
    }
  });
})();
