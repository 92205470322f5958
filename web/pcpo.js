// comfyui-pcpo page extension (plain ES module, loaded by the ComfyUI frontend from WEB_DIRECTORY):
//  * the rating panel of the PCPO Human Rating node (best/worst or 1-5 scores, keyboard shortcuts,
//    countdown, skip, cancel), talking to the pack's /pcpo/ratings/* routes;
//  * the latest stats and a running mean on the PCPO LoRA Update node (under human ratings the rated
//    groups and the model or held-out reward instead), the press's progress (iteration k of N, time
//    per iteration, ETA) and, after Cancel, where the press stopped; the written path on the
//    PCPO Export LoRA node, the rating summary on the Human Rating node (the stock frontend does
//    not draw a node's ui.text);
//  * the seeds of a PCPO node added to the graph start at "fixed" (the frontend sets the control
//    after generate of every seed to "randomize"; a run's seed cannot change, and the held-out noise
//    must not). A node loaded from a workflow keeps the control value stored in the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TEXT_NODES = new Set(["PCPOLoRAUpdate", "PCPOExportLoRA", "PCPOHumanRating"]);
const POLL_MS = 2000;

// ------------------------------------------------------------------ text on nodes

function nodeText(node) {
  if (node.__pcpoText) return node.__pcpoText;
  const el = document.createElement("div");
  el.className = "pcpo-node-text";
  el.dataset.nodeId = String(node.id);
  Object.assign(el.style, {
    whiteSpace: "pre-wrap", font: "11px monospace", color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)", padding: "4px", borderRadius: "4px",
    overflow: "auto", boxSizing: "border-box", width: "100%", height: "100%", wordBreak: "break-all",
  });
  el.textContent = "";
  const widget = node.addDOMWidget("pcpo_status", "pcpo_text", el, { serialize: false, hideOnZoom: false });
  widget.serializeValue = () => undefined;
  widget.computeSize = (w) => [w, 96];
  node.__pcpoText = el;
  return el;
}

// what the Update node's stats line means, for the node text and its hover tooltip
const STATS_LEGEND =
  "what the numbers mean: clip = share of image steps the update held back at clip_range (stays near 1: " +
  "raise clip_range) · kl = how far this update moved the LoRA (above 0.1: lower the learning rate) · " +
  "grad = size of the update before grad_clip · zero-std groups = prompts whose images all got the same " +
  "reward, which teach the LoRA nothing (many: a larger group_size or a reward that tells them apart)";

function showOnNode(node, message) {
  if (!message) return;
  const lines = [];
  const stats = message.pcpo_stats && message.pcpo_stats[0];
  if (stats) {
    // human ratings: their reward mean is 0 by construction; the server says what shows progress
    lines.push(`iteration ${stats.iteration}/${stats.target_iteration}: ` + (stats.signal ? stats.signal :
               `reward ${fmt(stats.reward_mean)} (running mean ${fmt(stats.running_mean)} over ${stats.running_count})`));
    if (stats.progress) lines.push(stats.progress.text);
    node.__pcpoCancelText = stats.progress ? stats.progress.cancel_text : null;
  }
  for (const t of message.text || []) lines.push(String(t));
  const el = nodeText(node);
  if (node.type === "PCPOLoRAUpdate" && lines.some((l) => l.includes("zero-std groups"))) {
    lines.push(STATS_LEGEND);
    el.title = STATS_LEGEND;
  }
  node.__pcpoLines = lines;
  el.textContent = lines.join("\n");
  node.setDirtyCanvas?.(true, true);
}

// a Cancel during a press of Run: the line the server wrote for it goes on top of the node's text
// and stays there until the node runs again
function showStopped(node, text) {
  if (!node || node.type !== "PCPOLoRAUpdate" || !text) return;
  const el = nodeText(node);
  el.textContent = [text, ...(node.__pcpoLines || [])].join("\n");
  el.dataset.stopped = "1";
  node.setDirtyCanvas?.(true, true);
}

function onInterrupted() {
  for (const n of (app.graph && app.graph._nodes) || []) {
    if (n.type === "PCPOLoRAUpdate" && n.__pcpoCancelText) showStopped(n, n.__pcpoCancelText);
  }
}

function onLoopStopped(detail) {
  if (!detail || typeof detail.text !== "string" || !app.graph) return;
  const id = String(detail.node);
  const node = app.graph.getNodeById(id) || app.graph.getNodeById(Number(id));
  showStopped(node, detail.text);
}

// the status line of every Human Rating node in the graph while a rating is pending
function nodeStatus(text) {
  for (const n of (app.graph && app.graph._nodes) || []) {
    if (n.type === "PCPOHumanRating") { nodeText(n).textContent = text; n.setDirtyCanvas?.(true, true); }
  }
}

function fmt(x) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(4) : "-";
}

// ------------------------------------------------------------------ seeds

function fixSeeds(node) {
  if (!String(node.comfyClass || node.type || "").startsWith("PCPO")) return;
  const seeds = (node.widgets || []).filter((w) => w.name === "seed" || w.name === "noise_seed");
  const controls = new Set(seeds.flatMap((w) => w.linkedWidgets || []));
  for (const w of node.widgets || []) if (w.name === "control_after_generate") controls.add(w);
  for (const c of controls) if ((c.options?.values || []).includes("fixed")) c.value = "fixed";
}

// ------------------------------------------------------------------ the rating panel

// the key hint for a group of n images: the digit keys pick images 1..min(n, 9)
function keyHelp(mode, n) {
  const k = Math.min(n, 9);
  const keys = k > 1 ? `1-${k}` : "1";
  const rest = n > 9 ? ` (images 10-${n}: click)` : "";
  return mode === "score"
    ? "Keys: 1-5 score the highlighted image and move on · arrows move · Enter next group · S skip · Backspace back"
    : `Click = best, Shift+click or right-click = worst · keys ${keys} best, Shift+${keys} worst${rest} · ` +
      "Enter next group · S skip · Backspace back";
}

// the page's own controls the panel must leave visible: the Run/Cancel bar (docked in the top menu
// or floating) and the top menu bar
const TOOLBARS = ".actionbar, .comfyui-menu, .comfy-menu, .comfyui-body-top";
const MARGIN = 8;

function toolbarRects() {
  const out = [];
  for (const e of document.querySelectorAll(TOOLBARS)) {
    if (e.offsetParent === null && getComputedStyle(e).position !== "fixed") continue;
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && r.bottom > 0 && r.top < window.innerHeight) out.push(r);
  }
  return out;
}

function intersects(a, b) {
  return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
}

// put the panel at the right, below every toolbar it would cover (or left of a toolbar floating low)
function placePanel(el) {
  const width = Math.min(560, window.innerWidth - 2 * MARGIN);
  const bars = toolbarRects();
  const left = window.innerWidth - 16 - width;
  let top = 60;
  for (let i = 0; i < 8; i++) {
    const box = { left, right: left + width, top, bottom: top + Math.min(el.offsetHeight || 400, window.innerHeight) };
    const hit = bars.filter((r) => intersects(r, box));
    if (!hit.length) break;
    top = Math.max(...hit.map((r) => r.bottom)) + MARGIN;
  }
  Object.assign(el.style, { top: `${Math.round(top)}px`, right: "16px", width: `${width}px`,
                            maxHeight: `${Math.max(200, window.innerHeight - top - 16)}px` });
}

const panel = {
  req: null, group: 0, ratings: {}, cursor: 0, el: null, timer: null, busy: false,

  open(req) {
    if (this.req && this.req.request_id === req.request_id) return;
    this.req = req; this.group = 0; this.ratings = {}; this.cursor = 0; this.busy = false;
    this.deadline = Date.now() + 1000 * (req.seconds_left ?? req.timeout_s);
    this.build();
    this.render();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), 500);
  },

  close(requestId, why) {
    if (!this.req || (requestId && this.req.request_id !== requestId)) return;
    this.req = null;
    nodeStatus(why || "rating closed");
    clearInterval(this.timer);
    if (this.el) this.el.remove();
    this.el = null;
  },

  build() {
    if (this.el) this.el.remove();
    const el = document.createElement("div");
    el.id = "pcpo-rating-panel";
    el.setAttribute("role", "dialog");
    el.setAttribute("aria-label", "PCPO rating");
    Object.assign(el.style, {
      position: "fixed", top: "60px", right: "16px", zIndex: 10000, width: "560px", maxHeight: "85vh",
      overflow: "auto", background: "#1e1e24", color: "#eee", border: "1px solid #556",
      borderRadius: "8px", padding: "12px", font: "13px sans-serif", boxShadow: "0 6px 24px #0008",
    });
    el.innerHTML = `
      <div style="display:flex;justify-content:space-between;align-items:center">
        <b class="pcpo-title"></b><span class="pcpo-countdown" style="font-variant-numeric:tabular-nums"></span>
      </div>
      <div class="pcpo-group-label" style="margin-top:6px;color:#aab"></div>
      <div class="pcpo-prompt" style="margin:4px 0 8px;font-size:15px"></div>
      <div class="pcpo-grid" style="display:grid;grid-template-columns:repeat(4,1fr);gap:8px"></div>
      <div class="pcpo-help" style="margin-top:8px;color:#99a;font-size:11px"></div>
      <div style="display:flex;gap:6px;margin-top:10px;flex-wrap:wrap">
        <button class="pcpo-back">&larr; Back</button>
        <button class="pcpo-skip">Skip group (S)</button>
        <button class="pcpo-next">Next (Enter)</button>
        <button class="pcpo-submit">Submit</button>
        <span style="flex:1"></span>
        <button class="pcpo-cancel" style="color:#f88">Cancel run</button>
      </div>
      <div class="pcpo-status" style="margin-top:6px;color:#fc6;min-height:1em"></div>`;
    for (const b of el.querySelectorAll("button")) {
      Object.assign(b.style, { background: "#334", color: "#eee", border: "1px solid #556", borderRadius: "4px",
                               padding: "4px 10px", cursor: "pointer" });
    }
    el.querySelector(".pcpo-back").onclick = () => this.move(-1);
    el.querySelector(".pcpo-skip").onclick = () => this.skip();
    el.querySelector(".pcpo-next").onclick = () => this.next();
    el.querySelector(".pcpo-submit").onclick = () => this.submit();
    el.querySelector(".pcpo-cancel").onclick = () => this.cancel();
    document.body.appendChild(el);
    this.el = el;
    placePanel(el);
  },

  current() { return this.req.groups[this.group]; },

  rating(g) {
    if (!this.ratings[g.group]) this.ratings[g.group] = this.req.mode === "score" ? { scores: {} } : {};
    return this.ratings[g.group];
  },

  complete(g) {
    const r = this.ratings[g.group];
    if (!r) return false;
    if (this.req.mode === "score") return g.images.every((id) => r.scores[id] >= 1);
    return !!(r.best && r.worst && r.best !== r.worst);
  },

  render() {
    if (!this.el || !this.req) return;
    const req = this.req, g = this.current(), r = this.ratings[g.group] || {};
    const n = req.groups.length;
    this.el.querySelector(".pcpo-title").textContent = `Rate: ${req.run}, iteration ${req.iteration + 1}`;
    const extra = req.total_groups > n ? ` (the other ${req.total_groups - n} by the model reward)` : "";
    const done = req.groups.filter((x) => this.complete(x)).length;
    this.el.querySelector(".pcpo-group-label").textContent = `Group ${this.group + 1} of ${n}${extra} · ${done} rated`;
    this.el.querySelector(".pcpo-prompt").textContent = g.prompt || "(no prompt text)";
    this.el.querySelector(".pcpo-help").textContent = keyHelp(req.mode, g.images.length);
    const grid = this.el.querySelector(".pcpo-grid");
    grid.innerHTML = "";
    g.images.forEach((id, i) => {
      const cell = document.createElement("div");
      cell.className = "pcpo-img";
      cell.dataset.imageId = id;
      cell.dataset.index = String(i);
      let border = "#445", badge = "";
      if (req.mode === "score") {
        if (i === this.cursor) border = "#8af";
        if (r.scores && r.scores[id]) badge = `score ${r.scores[id]}`;
      } else if (r.best === id) { border = "#3c6"; badge = "BEST"; }
      else if (r.worst === id) { border = "#e44"; badge = "WORST"; }
      Object.assign(cell.style, { border: `3px solid ${border}`, borderRadius: "6px", padding: "2px",
                                  cursor: "pointer", position: "relative", textAlign: "center" });
      const img = document.createElement("img");
      img.src = api.apiURL(`/pcpo/ratings/image/${req.request_id}/${id}`);
      img.alt = `image ${i + 1}`;
      img.draggable = false;
      Object.assign(img.style, { width: "100%", imageRendering: "pixelated", display: "block" });
      const label = document.createElement("div");
      label.className = "pcpo-badge";
      label.style.fontSize = "11px";
      label.textContent = `${i + 1}${badge ? " · " + badge : ""}`;
      cell.append(img, label);
      if (req.mode === "score") {
        const row = document.createElement("div");
        for (let s = 1; s <= 5; s++) {
          const b = document.createElement("button");
          b.className = "pcpo-score";
          b.dataset.score = String(s);
          b.textContent = String(s);
          const on = r.scores && r.scores[id] === s;
          Object.assign(b.style, { width: "18%", padding: "0", fontSize: "11px", background: on ? "#8af" : "#334",
                                   color: "#eee", border: "1px solid #556" });
          b.onclick = (e) => { e.stopPropagation(); this.cursor = i; this.score(s); };
          row.appendChild(b);
        }
        cell.appendChild(row);
        cell.onclick = () => { this.cursor = i; this.render(); };
      } else {
        cell.onclick = (e) => this.pick(i, e.shiftKey ? "worst" : "best");
        cell.oncontextmenu = (e) => { e.preventDefault(); this.pick(i, "worst"); };
      }
      grid.appendChild(cell);
    });
    const last = this.group === n - 1;
    this.el.querySelector(".pcpo-next").textContent = last ? "Submit (Enter)" : "Next (Enter)";
    this.el.querySelector(".pcpo-submit").textContent = `Submit ${done} rated group${done === 1 ? "" : "s"}`;
    this.tick();
  },

  tick() {
    if (!this.el || !this.req) return;
    const s = Math.max(0, Math.round((this.deadline - Date.now()) / 1000));
    const left = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")} left`;
    this.el.querySelector(".pcpo-countdown").textContent = left;
    placePanel(this.el);  // the Run bar can be moved, the window resized
    const done = this.req.groups.filter((x) => this.complete(x)).length;
    nodeStatus(`waiting for your rating (panel at the top right): ${done} of ${this.req.groups.length} ` +
               `group(s) rated, ${left}`);
  },

  status(text) { if (this.el) this.el.querySelector(".pcpo-status").textContent = text; },

  pick(i, which) {
    const g = this.current(), r = this.rating(g), id = g.images[i];
    if (id === undefined) return;
    const other = which === "best" ? "worst" : "best";
    if (r[other] === id) delete r[other];
    r[which] = id;
    this.status("");
    this.render();
  },

  score(s) {
    const g = this.current(), r = this.rating(g), id = g.images[this.cursor];
    if (id === undefined) return;
    r.scores[id] = s;
    if (this.cursor < g.images.length - 1) this.cursor += 1;
    this.render();
  },

  move(d) {
    const n = this.req.groups.length;
    this.group = Math.min(n - 1, Math.max(0, this.group + d));
    this.cursor = 0;
    this.render();
  },

  skip() {
    delete this.ratings[this.current().group];
    if (this.group === this.req.groups.length - 1) return this.submit();
    this.move(1);
  },

  next() {
    const g = this.current();
    if (this.ratings[g.group] && !this.complete(g)) {
      this.status(this.req.mode === "score" ? "Score every image, or skip the group (S)."
                                           : "Pick a best and a worst image, or skip the group (S).");
      return;
    }
    if (this.group === this.req.groups.length - 1) return this.submit();
    this.move(1);
  },

  async post(path, body) {
    const res = await api.fetchApi(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(body) });
    let data = null;
    try { data = await res.json(); } catch (e) { /* empty */ }
    return { ok: res.ok, status: res.status, data };
  },

  async submit() {
    if (!this.req || this.busy) return;
    const ratings = {};
    for (const g of this.req.groups) if (this.complete(g)) ratings[String(g.group)] = this.ratings[g.group];
    this.busy = true;
    const id = this.req.request_id;
    const res = await this.post("/pcpo/ratings/submit", { request_id: id, ratings });
    this.busy = false;
    if (res.ok) { window.__pcpoLastSubmit = { request_id: id, ratings }; this.close(id, "rating sent; training"); }
    else this.status(`Not accepted (${res.status}): ${res.data && res.data.error}`);
  },

  async cancel() {
    if (!this.req) return;
    const id = this.req.request_id;
    const res = await this.post("/pcpo/ratings/cancel", { request_id: id });
    if (res.ok || res.status === 404) this.close(id, "rating cancelled: the run stops");
    else this.status(`Cancel failed (${res.status})`);
  },

  onKey(e) {
    if (!this.req || !this.el) return;
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
    const digit = /^Digit([1-9])$/.exec(e.code) || /^Numpad([1-9])$/.exec(e.code);
    let handled = true;
    if (digit) {
      const k = Number(digit[1]);
      if (this.req.mode === "score") { if (k <= 5) this.score(k); else handled = false; }
      else if (k <= this.current().images.length) this.pick(k - 1, e.shiftKey ? "worst" : "best");
      else handled = false;
    } else if (e.key === "Enter") this.next();
    else if (e.key === "s" || e.key === "S") this.skip();
    else if (e.key === "Backspace") this.move(-1);
    else if (e.key === "ArrowRight" && this.req.mode === "score") { this.cursor = Math.min(this.current().images.length - 1, this.cursor + 1); this.render(); }
    else if (e.key === "ArrowLeft" && this.req.mode === "score") { this.cursor = Math.max(0, this.cursor - 1); this.render(); }
    else handled = false;
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  },
};

async function poll() {
  try {
    const res = await api.fetchApi("/pcpo/ratings/pending", { cache: "no-store" });
    if (!res.ok) return;
    const { pending } = await res.json();
    if (pending.length) panel.open(pending[0]);
    else if (panel.req) panel.close();
  } catch (e) { /* server restarting */ }
}

app.registerExtension({
  name: "pcpo.ui",
  async setup() {
    api.addEventListener("pcpo.rating_request", (e) => panel.open(e.detail));
    api.addEventListener("pcpo.rating_done", (e) => panel.close(e.detail && e.detail.request_id));
    api.addEventListener("pcpo.loop_stopped", (e) => { try { onLoopStopped(e.detail); } catch (err) { console.error("pcpo", err); } });
    api.addEventListener("execution_interrupted", () => { try { onInterrupted(); } catch (err) { console.error("pcpo", err); } });
    document.addEventListener("keydown", (e) => panel.onKey(e), true);
    setInterval(poll, POLL_MS);
    poll();
    window.__pcpoPanel = panel;
  },
  nodeCreated(node) {
    // runs in the node's constructor: a workflow being loaded then writes its stored values over this
    try { fixSeeds(node); } catch (e) { console.error("pcpo: seed control", e); }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted ? onExecuted.apply(this, arguments) : undefined;
      try { showOnNode(this, message); } catch (e) { console.error("pcpo: node text", e); }
      return r;
    };
  },
});
