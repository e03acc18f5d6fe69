(() => {
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  let refreshed = 0;
  async function refresh() {
    try {
      const response = await fetch("FRAGMENT_PATH", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      live.innerHTML = await response.text();
      live.dataset.refreshed = String(++refreshed);
      document.body.classList.remove("stale");
      state.textContent = "live";
    } catch (error) {
      document.body.classList.add("stale");
      state.textContent = "not updating (" + error.message + "), retrying";
    }
  }
  // A hidden tab does not poll: no load on the database for a page nobody looks at.
  const loop = () => setTimeout(async () => {
    if (!document.hidden) await refresh();
    loop();
  }, INTERVAL_MS);
  loop();
})();
