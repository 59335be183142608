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

  // Flow control: ack each live frame once applied. A browser that falls behind stops
  // getting updates and, once it catches up, gets one fresh snapshot instead of the backlog.
  let applied = 0;
  document.addEventListener("htmx:wsOpen", function () { applied = 0; });
  document.addEventListener("htmx:wsAfterMessage", function (ev) {
    applied += 1;
    if (ev.detail && ev.detail.socketWrapper) {
      ev.detail.socketWrapper.send(JSON.stringify({ ack: applied }));
    }
  });

  // Dialogs without inline handlers (the Content-Security-Policy forbids them): a control
  // with data-opens-dialog shows #dialog once its request has loaded the dialog's body; one
  // with data-close-dialog closes its dialog.
  document.addEventListener("htmx:afterRequest", function (ev) {
    const elt = ev.detail && ev.detail.elt;
    if (elt && elt.hasAttribute("data-opens-dialog") && ev.detail.successful) {
      const dialog = document.getElementById("dialog");
      if (dialog && !dialog.open) dialog.showModal();
    }
  });
  document.addEventListener("click", function (ev) {
    const closer = ev.target.closest && ev.target.closest("[data-close-dialog]");
    if (closer) {
      const dialog = closer.closest("dialog");
      if (dialog) dialog.close();
    }
  });

  function setLive(text) {
    const el = document.getElementById("live-state");
    if (el) el.textContent = text;
  }
  document.addEventListener("htmx:wsOpen", function () { setLive("live updates: connected"); });
  document.addEventListener("htmx:wsClose", function (ev) {
    // 4401: signed out or deactivated elsewhere; reloading leads to the login form.
    if (ev.detail && ev.detail.event && ev.detail.event.code === 4401) {
      window.location.reload();
      return;
    }
    setLive("live updates: reconnecting…");
  });

  // Keyboard: "/" finds, j/k move between elections (attention list first), Enter opens the
  // focused one, [ and ] turn the page.
  function rows() { return Array.from(document.querySelectorAll("tr[data-election]")); }
  function move(delta) {
    const all = rows();
    if (!all.length) return;
    const current = document.querySelector("tr[data-election].current");
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
    } else if ((ev.key === "[" || ev.key === "]") && !typing) {
      const link = document.querySelector(ev.key === "]" ? "#pager a[rel=next]" : "#pager a[rel=prev]");
      if (link) { ev.preventDefault(); link.click(); }
    } else if (ev.key === "Escape" && typing) {
      ev.target.blur();
    }
  });
})();
