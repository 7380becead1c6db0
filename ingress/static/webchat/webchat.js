// The web chat page: post the visitor's messages (one random id each, kept across retries so the ingress
// dedupes them), and poll the reply box for what the Agent answered. No framework, no inline script (CSP).
(function () {
  "use strict";
  var root = document.getElementById("chat");
  var base = root.dataset.base;
  var idleMs = Number(root.dataset.pollMs) || 1000;
  var log = document.getElementById("log");
  var statusLine = document.getElementById("status");
  var form = document.getElementById("composer");
  var input = document.getElementById("text");
  var shown = {};  // client message ids already on screen
  var seen = {};  // box cursors already handled: an entry is shown once, however the reads overlap
  var reading = false;  // one read of the box at a time
  var cursor = null;
  var waiting = 0;  // replies we expect soon: poll faster meanwhile (for 30 s at most: an Agent may stay silent)
  var waitingSince = 0;
  var timer = null;

  function newId() {
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return btoa(String.fromCharCode.apply(null, bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function render(role, text, id) {
    var li = document.createElement("li");
    if (role === "event") {
      li.className = "divider";
    } else {
      li.className = "msg " + role;
    }
    li.textContent = text;  // never HTML
    if (id) { shown[id] = true; li.dataset.id = id; }
    log.appendChild(li);
    log.scrollTop = log.scrollHeight;
    return li;
  }

  function say(text) { statusLine.textContent = text || ""; }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  // POST with retries on network errors and 5xx; the same id every time, so a retry is never a duplicate.
  async function post(body, li) {
    for (var attempt = 0; attempt < 7; attempt++) {
      try {
        var r = await fetch(base + "/messages", {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)
        });
        if (r.ok) {
          if (li) li.classList.remove("sending");
          say("");
          waiting += 1;
          waitingSince = Date.now();
          schedule(200);
          return true;
        }
        if (r.status === 429) {  // too fast: wait as told, then send the same message again
          var wait = Number(r.headers.get("Retry-After")) || 5;
          say("Too many messages: sending again in " + wait + " s…");
          await sleep(wait * 1000);
          continue;
        }
        if (r.status < 500) {
          var reason = "";
          try { reason = (await r.json()).error || ""; } catch (e) { /* not JSON */ }
          if (li) { li.classList.remove("sending"); li.classList.add("failed"); }
          say("Not sent: " + (reason || ("HTTP " + r.status)));
          return false;
        }
      } catch (e) { /* network error: retry */ }
      say("Connection problem, retrying…");
      await sleep(500 * Math.pow(2, attempt));
    }
    if (li) { li.classList.remove("sending"); li.classList.add("failed"); }
    say("Not sent: the server is unreachable.");
    return false;
  }

  function schedule(ms) {
    if (timer) clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function show(entries) {
    entries.forEach(function (e) {
      if (seen[e.cursor]) return;
      seen[e.cursor] = true;
      if (e.id && shown[e.id]) return;  // our own message, already on screen
      if (e.role === "agent" && waiting > 0) waiting -= 1;
      render(e.role === "event" ? "event" : e.role, e.role === "event" ? "New conversation" : e.text, e.id);
    });
  }

  async function fetchEntries() {
    var r = await fetch(base + "/replies" + (cursor ? "?after=" + encodeURIComponent(cursor) : ""),
                        {credentials: "same-origin", cache: "no-store"});
    if (r.status === 400) {
      say("This chat has expired: reload the page.");
      return null;
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    var doc = await r.json();
    cursor = doc.cursor || cursor;
    return doc.entries;
  }

  async function poll() {
    timer = null;
    if (reading) { schedule(100); return; }
    reading = true;
    try {
      var entries = await fetchEntries();
      if (entries === null) return;
      show(entries);
      if (entries.length >= 100) { schedule(0); return; }
    } catch (e) {
      /* retried on the next poll */
    } finally {
      reading = false;
    }
    if (waiting > 0 && Date.now() - waitingSince > 30000) waiting = 0;
    schedule(waiting > 0 ? 300 : (document.hidden ? idleMs * 5 : idleMs));
  }

  // First load: what the box still holds of the current conversation (from its last "new conversation").
  async function start() {
    var all = [];
    reading = true;
    try {
      for (;;) {
        var batch = await fetchEntries();
        if (batch === null) return;
        all = all.concat(batch);
        if (batch.length < 100) break;
      }
    } catch (e) {
      /* the poll below tries again */
    } finally {
      reading = false;
    }
    // A visitor's line is written to the box just after its publish, so a fast reply can be stored first:
    // show them in the order they happened.
    all.sort(function (a, b) { return a.at - b.at; });
    var lastNew = -1;
    all.forEach(function (e, i) { if (e.role === "event") lastNew = i; });
    show(all.slice(lastNew + 1));
    schedule(idleMs);
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = input.value.trim();
    if (!text) return;
    input.value = "";
    var id = newId();
    var li = render("user", text, id);
    li.classList.add("sending");
    post({id: id, text: text}, li);
  });

  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
  });

  document.getElementById("new").addEventListener("click", function () {
    var id = newId();
    log.replaceChildren();
    render("event", "New conversation", id);
    post({id: id, command: "new"}, null);
    input.focus();
  });

  document.addEventListener("visibilitychange", function () { if (!document.hidden) schedule(0); });

  start();
})();
