// rbit's live page: polls /jobs and each running job's log about every second.
// Everything that comes from a message or a build is inserted as text
// (textContent, text nodes), never as HTML.
"use strict";

(function () {
  const POLL_MS = 1000;
  const KEEP_CHARS = 64 * 1024;   // the live end of a log kept on the page
  const FIRST_BYTES = 16 * 1024;  // how much of a running job's log is fetched first
  const OUTCOMES = ["Done", "Failed", "Blocked", "Cancelled", "Waiting"];
  const views = new Map();        // job id -> the running job's box and log position

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const s = Math.floor(seconds);
    if (s < 60) return seconds.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function logUrl(id, offset) {
    return "/jobs/" + encodeURIComponent(String(id)) + "/log" +
      (offset === undefined ? "" : "?offset=" + encodeURIComponent(String(offset)));
  }

  function fact(name, value) {
    const span = el("span");
    span.append(el("b", name + " "), document.createTextNode(String(value ?? "")));
    return span;
  }

  function viewFor(job) {
    let view = views.get(job.id);
    if (!view) {
      const box = el("div", null, "job");
      box.dataset.job = String(job.id);
      const facts = el("div", null, "facts");
      const pre = el("pre");
      box.append(facts, pre);
      document.getElementById("running").append(box);
      view = { box: box, facts: facts, pre: pre, offset: undefined, decoder: new TextDecoder(), busy: false };
      views.set(job.id, view);
    }
    return view;
  }

  function renderRunning(jobs) {
    const seen = new Set();
    for (const job of jobs) {
      seen.add(job.id);
      const view = viewFor(job);
      view.facts.replaceChildren(
        fact("job", job.id), fact("package", job.package), fact("version", job.version),
        fact("queue", job.queue), fact("slot", job.slot), fact("elapsed", duration(job.elapsed)),
        fact("status", job.status || "starting"), fact("attempt", job.attempt));
      const link = el("a", "whole log");
      link.href = logUrl(job.id);
      view.facts.append(link);
    }
    for (const [id, view] of views) {
      if (!seen.has(id)) {
        view.box.remove();
        views.delete(id);
      }
    }
    document.getElementById("no-running").hidden = jobs.length > 0;
    document.getElementById("running-count").textContent = jobs.length ? "(" + jobs.length + ")" : "";
  }

  function renderFinished(jobs) {
    const rows = jobs.map(function (job) {
      const row = el("tr");
      row.dataset.job = String(job.id);
      const outcome = el("td", job.outcome);
      if (OUTCOMES.includes(job.outcome)) outcome.className = job.outcome;
      const link = el("a", "log");
      link.href = logUrl(job.id);
      const logCell = el("td");
      logCell.append(link);
      row.append(el("td", job.id), el("td", job.package), el("td", job.version), outcome,
        el("td", duration(job.duration)), el("td", new Date(job.ended * 1000).toLocaleTimeString()), logCell);
      return row;
    });
    document.querySelector("#finished tbody").replaceChildren(...rows);
    document.getElementById("finished").hidden = jobs.length === 0;
    document.getElementById("no-finished").hidden = jobs.length > 0;
  }

  function renderWorker(data) {
    document.getElementById("worker").textContent = data.worker;
    document.title = "rbit " + data.worker;
    const broker = document.getElementById("broker");
    const connected = data.broker === "connected";
    broker.textContent = (connected ? "connected to the broker at " + (data.broker_address || "?")
      : "not connected to the broker") +
      (data.queues && data.queues.length ? " · serving " + data.queues.join(", ") : "") +
      (data.stopping ? " · stopping" : "");
    broker.classList.toggle("down", !connected);
  }

  async function followLog(job) {
    const view = views.get(job.id);
    if (!view || view.busy) return;
    view.busy = true;
    try {
      let skipLine = false;
      if (view.offset === undefined || job.log_bytes - view.offset > 4 * FIRST_BYTES) {
        // First look, or far behind: show the end of the log, from a line start.
        const start = Math.max(0, job.log_bytes - FIRST_BYTES);
        skipLine = start > 0;
        if (view.offset !== undefined) view.pre.append(document.createTextNode("\n…\n"));
        view.offset = start;
        view.decoder = new TextDecoder();
      }
      const answer = await fetch(logUrl(job.id, view.offset), { cache: "no-store" });
      if (!answer.ok) return;
      const next = parseInt(answer.headers.get("X-Rbit-Log-Offset"), 10);
      let text = view.decoder.decode(await answer.arrayBuffer(), { stream: true });
      if (skipLine) {
        const newline = text.indexOf("\n");
        text = newline >= 0 ? text.slice(newline + 1) : "";
      }
      if (!Number.isNaN(next)) view.offset = next;
      if (text) {
        const pre = view.pre;
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(document.createTextNode(text));
        if (pre.textContent.length > KEEP_CHARS) pre.textContent = pre.textContent.slice(-KEEP_CHARS);
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
    } finally {
      view.busy = false;
    }
  }

  async function poll() {
    try {
      const answer = await fetch("/jobs", { cache: "no-store" });
      const data = await answer.json();
      renderWorker(data);
      renderRunning(data.running);
      renderFinished(data.finished);
      await Promise.all(data.running.map(followLog));
    } catch (error) {
      const broker = document.getElementById("broker");
      broker.textContent = "the worker does not answer (" + error + ")";
      broker.classList.add("down");
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
