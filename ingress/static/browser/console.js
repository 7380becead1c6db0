// The console's live parts: each element with data-live is fetched again every 2 s and replaced when it changed,
// so new messages, deliveries and the waiting queue show without a reload (forms sit outside these parts).
"use strict";
for (const part of document.querySelectorAll("[data-live]")) {
  let shown = null;
  setInterval(async () => {
    try {
      const answer = await fetch(part.dataset.live, {credentials: "same-origin", cache: "no-store"});
      if (!answer.ok) return;
      const html = await answer.text();
      if (html !== shown) {
        part.innerHTML = html;
        shown = html;
      }
    } catch (e) { /* offline for a moment: the next tick tries again */ }
  }, 2000);
}
