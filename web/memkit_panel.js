// MemKit cache panel: a sidebar tab that shows what the MemKit cache holds and drives it.
//
// Plain ES module, no build step. ComfyUI serves this folder (WEB_DIRECTORY) under
// /extensions/<package>/ and imports every .js file in it. The panel shows GET /memkit/status (the
// cache, its preload, the step cache's latest run), follows the "memkit.status" messages the server
// sends over ComfyUI's websocket when the cache or a step cache run changes (nodes/status_push.py),
// and calls MemKit's routes: /memkit/preload, /memkit/evict,
// /memkit/clear, /memkit/pin. A route that refuses, and a preload entry that fails, are shown
// with the frontend's toast.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "memkit-cache";
const EVENT = "memkit.status";
const STYLE_ID = "memkit-panel-style";

// The order rows take when a cache key has several records (a failed preload, then a load that
// succeeded): the first state found wins.
const STATE_ORDER = ["ready", "stale", "loading", "releasing", "evicted-held", "failed"];

let status = null; // the latest /memkit/status payload
let mounted = null; // the tab's element while the tab is open
const busy = new Set(); // actions waiting for their route
let failedBefore = new Set(); // cache keys that were failed in the last status (a toast per new failure)

function toast(severity, summary, detail) {
  const manager = app.extensionManager?.toast;
  if (manager) {
    manager.add({ severity, summary, detail, life: severity === "error" ? 10000 : 4000 });
  } else {
    console.warn(`[memkit] ${summary}: ${detail}`);
  }
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GB`;
  if (bytes > 0 && bytes < 2 ** 20) return `${(bytes / 2 ** 10).toFixed(0)} KB`; // a step cache's diffs on small latents
  return `${(bytes / 2 ** 20).toFixed(1)} MB`;
}

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// --- routes -------------------------------------------------------------------------------

async function call(action, path, body) {
  busy.add(action);
  render();
  try {
    const response = await api.fetchApi(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body ?? {}),
    });
    let answer = null;
    try {
      answer = await response.json();
    } catch {
      answer = null;
    }
    if (!response.ok) {
      toast("error", `MemKit: ${action} failed`, answer?.error ?? `${path} answered ${response.status}`);
      return null;
    }
    return answer;
  } catch (error) {
    toast("error", `MemKit: ${action} failed`, String(error));
    return null;
  } finally {
    busy.delete(action);
    await refresh();
  }
}

async function refresh() {
  try {
    const response = await api.fetchApi("/memkit/status", { cache: "no-store" });
    if (response.ok) update(await response.json());
  } catch (error) {
    console.warn("[memkit] could not read /memkit/status", error);
  }
}

const preloadAll = () => call("preload all", "/memkit/preload", {});
const preloadOne = (key) => call(`preload ${key}`, "/memkit/preload", { cache_keys: [key] });
const evict = (key) => call(`evict ${key}`, "/memkit/evict", { name: key });
const pin = (key, pinned) => call(`${pinned ? "pin" : "unpin"} ${key}`, "/memkit/pin", { name: key, pinned });
const clear = (includePinned) =>
  call(includePinned ? "clear all" : "clear unpinned", "/memkit/clear", { include_pinned: includePinned });

// --- state --------------------------------------------------------------------------------

function update(next) {
  if (status !== null && next.time !== undefined && next.time < status.time) return; // an older answer
  status = next;
  // A toast when an entry becomes failed: on the first status, and again after a retry fails.
  const failed = (next.entries ?? []).filter((entry) => entry.state === "failed");
  for (const entry of failed) {
    if (!failedBefore.has(entry.cache_key)) {
      toast("error", `MemKit: preloading ${entry.cache_key} failed`, entry.error);
    }
  }
  failedBefore = new Set(failed.map((entry) => entry.cache_key));
  render();
}

/** One row per cache key: the configured entries in config order, then models loaded since. */
function rows(payload) {
  const byKey = new Map();
  for (const entry of payload.configured ?? []) {
    byKey.set(entry.cache_key, { cache_key: entry.cache_key, kind: entry.kind, files: entry.files,
      configured: true, pinned: entry.pinned, state: "not loaded" });
  }
  const records = [...(payload.entries ?? [])].sort(
    (a, b) => STATE_ORDER.indexOf(a.state) - STATE_ORDER.indexOf(b.state));
  const taken = new Set();
  for (const record of records) {
    if (taken.has(record.cache_key)) continue;
    taken.add(record.cache_key);
    const row = byKey.get(record.cache_key) ?? { configured: false };
    byKey.set(record.cache_key, { ...row, ...record, files: record.files ?? row.files,
      pinned: record.pinned ?? (record.state === "ready" ? false : row.pinned) });
  }
  return [...byKey.values()];
}

// --- view ---------------------------------------------------------------------------------

function bar(testid, value, max) {
  const fraction = max ? Math.min(1, value / max) : 0;
  return h("div", { class: "memkit-bar", "data-testid": testid },
    h("div", { class: "memkit-bar-fill", style: `width: ${(fraction * 100).toFixed(1)}%` }));
}

function totalsView(totals) {
  const budget = totals.budget_bytes;
  return h("section", { class: "memkit-section", "data-testid": "memkit-totals" },
    h("div", { class: "memkit-line" },
      h("span", { text: "RAM" }),
      h("span", { "data-testid": "memkit-ram-text",
        text: `${formatBytes(totals.ram_bytes)}${budget ? ` of ${formatBytes(budget)} budget` : ""}` })),
    bar("memkit-ram-bar", totals.ram_bytes + (totals.reserved_bytes ?? 0), budget),
    totals.over_budget_bytes ? h("div", { class: "memkit-error", "data-testid": "memkit-over-budget",
      text: `the cache holds ${formatBytes(totals.over_budget_bytes)} over its budget (pinned entries, or one `
        + "larger than the budget)" }) : null,
    h("div", { class: "memkit-line memkit-dim" },
      h("span", { text: `${totals.entries} cached · VRAM ${formatBytes(totals.vram_bytes)}` }),
      h("span", { text: [
        totals.reserved_bytes ? `${formatBytes(totals.reserved_bytes)} loading` : null,
        totals.mapped_bytes ? `${formatBytes(totals.mapped_bytes)} mapped from files` : null,
        totals.shared_bytes ? `${formatBytes(totals.shared_bytes)} shared weights` : null,
        totals.evicted_held_ram_bytes ? `${formatBytes(totals.evicted_held_ram_bytes)} held by evicted` : null,
        `loads ${totals.loads} · evictions ${totals.evictions}`,
      ].filter(Boolean).join(" · ") })));
}

function preloadView(preload) {
  const running = ["reading", "queued", "loading"].includes(preload.phase);
  const text = preload.total || running
    ? `${preload.phase} ${preload.done} / ${preload.total}${preload.failed ? ` · ${preload.failed} failed` : ""}`
    : preload.phase;
  return h("section", { class: "memkit-section", "data-testid": "memkit-preload" },
    h("div", { class: "memkit-line" },
      h("span", { text: `Preload (${preload.mode})` }),
      h("span", { "data-testid": "memkit-preload-text", "data-phase": preload.phase, "data-done": preload.done,
        "data-total": preload.total, text })),
    bar("memkit-preload-bar", preload.done, preload.total),
    preload.warmup_error ? h("div", { class: "memkit-error", text: `warm-up: ${preload.warmup_error}` }) : null,
    h("div", { class: "memkit-actions" },
      button("Preload all", "memkit-preload-all", preloadAll, running || busy.has("preload all"),
        "Load every enabled preload_config.json entry now"),
      button("Clear unpinned", "memkit-clear-unpinned", () => clear(false), busy.has("clear unpinned"),
        "Evict every entry that is not pinned"),
      button("Clear all", "memkit-clear-all", () => clear(true), busy.has("clear all"),
        "Evict every entry, pinned ones too")));
}

// The step cache's latest run (the one in progress, else the last finished): steps skipped, the
// estimated speed-up, and the bytes it holds now and held at most per device (0 now once it ended).
function stepCacheView(stepCache) {
  if (!stepCache || (!stepCache.runs?.length && !stepCache.error)) return null;
  const runs = stepCache.runs ?? [];
  const last = runs[runs.length - 1];
  const held = Object.entries(stepCache.held_bytes ?? {})
    .map(([device, bytes]) => `${formatBytes(bytes)} on ${device}`).join(", ");
  return h("section", { class: "memkit-section", "data-testid": "memkit-step-cache" },
    h("div", { class: "memkit-line" },
      h("span", { text: "Step cache" }),
      last ? h("span", { "data-testid": "memkit-step-cache-text", "data-state": last.state,
        "data-skipped": last.steps_skipped, "data-total": last.steps_total,
        text: `${last.state} · skipped ${last.steps_skipped} / ${last.steps_total} · `
          + `~${Number(last.estimated_speedup ?? 1).toFixed(2)}×` }) : null),
    last ? h("div", { class: "memkit-dim", text: `run ${last.run} · ${last.model} · ${last.settings?.mode ?? ""}`
      + `${last.level ? ` at ${last.level}` : ""}` }) : null,
    ...Object.entries(last?.devices ?? {}).map(([tier, use]) =>
      h("div", { class: "memkit-line memkit-dim", "data-testid": "memkit-step-cache-device", "data-tier": tier },
        h("span", { text: `${tier} (${use.device})` }),
        h("span", { text: `${formatBytes(use.bytes)} now · ${formatBytes(use.peak_bytes)} peak` }))),
    stepCache.running ? h("div", { class: "memkit-dim", text: `${stepCache.running} running · holding ${held}` }) : null,
    stepCache.error ? h("div", { class: "memkit-error", text: `step cache: ${stepCache.error}` }) : null);
}

function button(label, testid, onclick, disabled, title) {
  return h("button", { class: "memkit-button", type: "button", "data-testid": testid, title, disabled,
    onclick }, label);
}

function rowView(row) {
  const key = row.cache_key;
  const ready = row.state === "ready" || row.state === "stale"; // a stale copy is cached and served
  const files = (row.files ?? []).map((f) => f.split(/[\\/]/).pop()).join(", ");
  const actions = [];
  if (row.configured && !["ready", "loading"].includes(row.state)) { // a stale one may be loaded again
    actions.push(button("Preload", "memkit-preload-one", () => preloadOne(key), busy.has(`preload ${key}`),
      `Load ${key} now`));
  }
  if (ready) {
    actions.push(button(row.pinned ? "Unpin" : "Pin", "memkit-pin", () => pin(key, !row.pinned),
      busy.has(`pin ${key}`) || busy.has(`unpin ${key}`),
      row.pinned ? "Let the RAM budget and /free evict it" : "Keep it through the RAM budget and /free"));
    actions.push(button("Evict", "memkit-evict", () => evict(key), busy.has(`evict ${key}`),
      `Drop ${key} from the cache`));
  }
  const sizes = row.ram_bytes !== undefined
    ? `${formatBytes(row.ram_bytes)} RAM${row.shared_bytes ? ` · ${formatBytes(row.shared_bytes)} shared` : ""}`
      + `${row.vram_bytes ? ` · ${formatBytes(row.vram_bytes)} VRAM` : ""}` : "";
  const sharing = row.sharing ? sharingText(row.sharing) : "";
  const usage = ready ? `${row.device} · hits ${row.hits} · uses ${row.uses} · loaded in ${row.load_seconds} s` : "";
  return h("li", { class: `memkit-entry memkit-state-${row.state.replace(/\s/g, "-")}`, "data-testid": "memkit-entry",
    "data-cache-key": key, "data-state": row.state, "data-pinned": row.pinned ? "true" : "false" },
    h("div", { class: "memkit-line" },
      h("span", { class: "memkit-key", text: key, title: row.key ?? key }),
      h("span", { class: "memkit-badge", "data-testid": "memkit-entry-state",
        text: row.state + (ready && row.pinned ? " · pinned" : "") + (row.over_budget ? " · over budget" : "") })),
    h("div", { class: "memkit-line memkit-dim" },
      h("span", { text: [row.kind, files].filter(Boolean).join(" · ") }), h("span", { text: sizes })),
    usage ? h("div", { class: "memkit-dim", text: usage }) : null,
    sharing ? h("div", { class: "memkit-dim", "data-testid": "memkit-entry-sharing", text: sharing }) : null,
    row.uncloned?.length ? h("div", { class: "memkit-dim", text: `not cloned: ${row.uncloned.join(", ")}` }) : null,
    row.error ? h("div", { class: "memkit-error", "data-testid": "memkit-entry-error", text: row.error }) : null,
    actions.length ? h("div", { class: "memkit-actions" }, actions) : null);
}

// How an entry holds its weights when the shared weight store is on (see /memkit/status `sharing`).
function sharingText(sharing) {
  const processes = sharing.processes ? ` · mapped by ${sharing.processes} process${sharing.processes > 1 ? "es" : ""}` : "";
  if (sharing.state === "mapped") return `shared weights: mapped from the store${processes}`;
  if (sharing.state === "mapped-after-load") return `shared weights: loaded, then mapped from the store${processes}`;
  if (sharing.state === "written") return `shared weights: written to the store${processes}`;
  return `weights ${sharing.state === "lost" ? "partly private" : "private"}: ${sharing.reason ?? ""}`;
}

function render() {
  if (!mounted) return;
  const view = status === null
    ? [h("p", { class: "memkit-dim", text: "Reading /memkit/status…" })]
    : [
        totalsView(status.totals),
        preloadView(status.preload),
        h("ul", { class: "memkit-entries", "data-testid": "memkit-entries" }, rows(status).map(rowView)),
        stepCacheView(status.step_cache),
        ...(status.config?.problems ?? []).map((p) => h("div", { class: "memkit-error", text: p })),
        h("p", { class: "memkit-dim", text: status.config?.path ? `config: ${status.config.path}` : "no config" }),
      ];
  mounted.replaceChildren(h("div", { class: "memkit-panel", "data-testid": "memkit-panel" },
    h("h3", { class: "memkit-title", text: "MemKit cache" }), ...view));
}

function addStyle() {
  if (document.getElementById(STYLE_ID)) return;
  document.head.append(h("style", { id: STYLE_ID, text: `
.memkit-panel { padding: 0.5rem 0.75rem; font-size: 0.85rem; display: flex; flex-direction: column; gap: 0.6rem;
  height: 100%; overflow-y: auto; box-sizing: border-box; }
.memkit-title { margin: 0; font-size: 1rem; }
.memkit-section { display: flex; flex-direction: column; gap: 0.3rem; }
.memkit-line { display: flex; justify-content: space-between; gap: 0.5rem; flex-wrap: wrap; }
.memkit-dim { opacity: 0.7; font-size: 0.78rem; margin: 0; }
.memkit-error { color: var(--p-red-400, #f87171); font-size: 0.78rem; white-space: pre-wrap; word-break: break-word; }
.memkit-bar { height: 6px; border-radius: 3px; background: var(--p-surface-700, #444); overflow: hidden; }
.memkit-bar-fill { height: 100%; background: var(--p-primary-color, #3b82f6); transition: width 0.2s; }
.memkit-actions { display: flex; gap: 0.35rem; flex-wrap: wrap; }
.memkit-button { font: inherit; font-size: 0.78rem; padding: 0.15rem 0.5rem; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--p-surface-500, #777); background: var(--p-surface-800, #2a2a2a); color: inherit; }
.memkit-button:disabled { opacity: 0.5; cursor: default; }
.memkit-entries { list-style: none; margin: 0; padding: 0; display: flex; flex-direction: column; gap: 0.4rem; }
.memkit-entry { border: 1px solid var(--p-surface-700, #444); border-radius: 6px; padding: 0.35rem 0.5rem;
  display: flex; flex-direction: column; gap: 0.2rem; }
.memkit-key { font-weight: 600; word-break: break-all; }
.memkit-badge { font-size: 0.72rem; padding: 0 0.4rem; border-radius: 8px; background: var(--p-surface-700, #444); }
.memkit-state-ready .memkit-badge { background: #166534; }
.memkit-state-failed .memkit-badge { background: #991b1b; }
.memkit-state-stale .memkit-badge { background: #92400e; }
.memkit-state-loading .memkit-badge { background: #1e40af; }
` }));
}

app.registerExtension({
  name: "memkit.cachePanel",
  async setup() {
    addStyle();
    api.addEventListener(EVENT, (event) => update(event.detail));
    api.addEventListener("reconnected", () => refresh());
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-database",
      title: "MemKit",
      tooltip: "MemKit model cache",
      type: "custom",
      render: (element) => {
        mounted = element;
        render();
        refresh();
      },
      destroy: () => {
        mounted = null;
      },
    });
    await refresh();
  },
});
