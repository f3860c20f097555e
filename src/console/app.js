// koogate operator console: one page over the admin API (/v1/*).
//
// Rules kept throughout (checked by src/console.rs tests and tests/console.rs):
// - every value from KooGallery or the billing core reaches the DOM as text: el() makes
//   elements and text nodes only; nothing here parses HTML;
// - links are built from fixed "#/…" prefixes and encodeURIComponent, never from data alone;
// - the admin token lives in sessionStorage (this tab only), is sent as a bearer header on
//   /v1/* calls, and is dropped on logout or on any 401.

const TOKEN_KEY = "koogate.console.token";
const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

// ---- DOM helpers (text only) -------------------------------------------------------------

/** An element with attributes and children; strings and numbers become text nodes. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (name === "href") {
      node.setAttribute("href", safeHref(value));
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Only in-page routes are linked: anything else becomes a dead link. */
function safeHref(href) {
  return typeof href === "string" && href.startsWith("#/") ? href : "#/";
}

/** A route with path segments encoded and an optional query. */
function route(segments, query) {
  let href = "#/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const qs = q.toString();
  return qs ? href + "?" + qs : href;
}

/** A value as text: null and undefined as a dash, objects as JSON. */
function text(v) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** Long free text (errors, messages) in a table cell: wraps in a narrower column. */
function long(v) {
  return el("span", { class: "long" }, text(v));
}

/** A time: never broken across lines. */
function when(v) {
  return el("span", { class: "time" }, text(v));
}

function badge(status) {
  return el("span", { class: "badge badge-" + String(status || "unknown").replace(/[^a-z_]/g, "") }, text(status));
}

function json(v) {
  return el("pre", { class: "json" }, JSON.stringify(v, null, 2));
}

/** A definition list of the given keys of an object (all keys when none given). */
function fields(obj, keys) {
  const dl = el("dl", { class: "fields" });
  for (const key of keys || Object.keys(obj || {})) {
    const v = obj ? obj[key] : undefined;
    const value = v !== null && typeof v === "object" ? json(v) : text(v);
    append(dl, [el("dt", null, key), el("dd", { "data-key": key }, value)]);
  }
  return dl;
}

/** The keys of `obj`: those of `first` that it has, in that order, then the others. */
function ordered(obj, first) {
  const keys = Object.keys(obj || {});
  return first.filter((k) => keys.includes(k)).concat(keys.filter((k) => !first.includes(k)));
}

/**
 * A table: columns are [title, row => cell content]; rows scroll sideways on small screens.
 * `rowId` names each row (data-id) for tests and for row clicks.
 */
function table(columns, rows, opts) {
  const o = opts || {};
  const head = el("tr", null, columns.map(([title]) => el("th", { scope: "col" }, title)));
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr", { "data-id": o.rowId ? o.rowId(row) : null });
    for (const [, cell] of columns) tr.append(el("td", null, cell(row)));
    if (o.onRow) {
      tr.classList.add("clickable");
      tr.addEventListener("click", (e) => {
        if (!e.target.closest("a, button, input, label")) o.onRow(row);
      });
    }
    body.append(tr);
  }
  const t = el("table", { class: o.class || null }, el("thead", null, head), body);
  return el("div", { class: "table-wrap" }, rows.length ? t : el("p", { class: "empty" }, o.empty || "Nothing."));
}

function input(name, label, value, extra, wide) {
  const id = "f-" + name;
  return el(
    "div",
    { class: wide ? "field wide" : "field" },
    el("label", { for: id }, label),
    el("input", Object.assign({ id, name, value: value || "" }, extra || {})),
  );
}

/** A filter form whose submit moves to `page` with the form's values as the query. */
function searchForm(page, inputs, button, id) {
  const form = el("form", { class: "card search", id: id || page + "-form" }, inputs, el("button", { type: "submit" }, button));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const query = {};
    for (const [k, v] of new FormData(form).entries()) {
      const field = form.elements.namedItem(k);
      query[k] = field && field.type === "datetime-local" && v ? toRfc3339(v) : String(v).trim();
    }
    const target = route([page], query);
    if (location.hash === target) render();
    else location.hash = target;
  });
  return form;
}

/** A datetime-local value (the browser's time zone) as RFC 3339 UTC. */
function toRfc3339(local) {
  const d = new Date(local);
  return isNaN(d.getTime()) ? local : d.toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** RFC 3339 back to a datetime-local value, for refilling a form. */
function toLocalInput(rfc3339) {
  const d = new Date(rfc3339 || "");
  if (isNaN(d.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function message(kind, ...parts) {
  return el("p", { class: kind, role: kind === "error" ? "alert" : "status" }, parts);
}

function apiError(res, what) {
  const d = res.data || {};
  return message("error", `${what}: HTTP ${res.status}`, d.error ? ` ${d.error}` : "", d.message ? ` — ${d.message}` : "");
}

// ---- the API ------------------------------------------------------------------------------

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new Unauthorized();
  const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
    redirect: "error",
  });
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new Unauthorized();
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  return { status: res.status, ok: res.ok, data };
}

function v1(segments, query) {
  let path = "/v1/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const qs = q.toString();
  return qs ? path + "?" + qs : path;
}

// ---- pages --------------------------------------------------------------------------------

const EVENT_FILTERS = ["instance_id", "order_id", "customer_id", "status", "since", "until", "limit"];

function eventLink(id) {
  return el("a", { href: route(["events", id]), class: "mono" }, text(id));
}

/** `obj[key]` when it is an array, else an empty one (an answer missing a list shows as empty). */
function arrayOf(obj, key) {
  return obj && Array.isArray(obj[key]) ? obj[key] : [];
}

function instanceLink(id) {
  return id ? el("a", { href: route(["instances", id]), class: "mono" }, text(id)) : "—";
}

/** The columns of an event list (the id names the instance and the sequence number already). */
function eventColumns() {
  return [
    ["id", (e) => eventLink(e.id)],
    ["type", (e) => text(e.type)],
    ["status", (e) => badge(e.status)],
    ["order", (e) => text(e.order_id)],
    ["occurred", (e) => when(e.occurred_at)],
    ["attempts", (e) => text(e.attempts)],
    ["last error", (e) => long(e.last_error)],
    ["next / dead / delivered", (e) => when(e.next_attempt_at || e.dead_at || e.delivered_at)],
  ];
}

async function pageEvents(view, q) {
  const status = el(
    "select",
    { id: "f-status", name: "status" },
    ["", "pending", "dead", "delivered"].map((s) => el("option", { value: s, selected: q.get("status") === s }, s || "any")),
  );
  const form = searchForm(
    "events",
    [
      input("order_id", "Order id", q.get("order_id"), null, true),
      input("instance_id", "Instance id", q.get("instance_id"), null, true),
      input("customer_id", "Customer id", q.get("customer_id"), null, true),
      el("div", { class: "field" }, el("label", { for: "f-status" }, "Status"), status),
      input("since", "Since", toLocalInput(q.get("since")), { type: "datetime-local" }),
      input("until", "Until", toLocalInput(q.get("until")), { type: "datetime-local" }),
      input("limit", "Limit", q.get("limit") || "100", { type: "number", min: "1", max: "1000" }),
    ],
    "Search",
  );
  append(view, [el("h1", null, "Events"), form]);
  const query = {};
  for (const k of EVENT_FILTERS) query[k] = q.get(k);
  const res = await api("GET", v1(["events"], query));
  if (!res.ok) return view.append(apiError(res, "GET /v1/events"));
  let events = arrayOf(res.data, "events");
  // A gateway without the status filter answers every status: keep the one asked for.
  if (q.get("status")) events = events.filter((e) => e.status === q.get("status"));
  append(view, [
    el("p", { class: "count" }, `${events.length} event(s)`),
    table(eventColumns(), events, {
      class: "events",
      rowId: (e) => e.id,
      onRow: (e) => (location.hash = route(["events", e.id])),
      empty: "No event matches.",
    }),
  ]);
}

async function pageEvent(view, id) {
  append(view, [el("p", null, el("a", { href: route(["events"]) }, "← events")), el("h1", null, "Event ", el("span", { class: "mono" }, id))]);
  const res = await api("GET", v1(["events", id]));
  if (!res.ok) return view.append(apiError(res, "GET /v1/events/{id}"));
  const e = res.data || {};
  const actions = el("div", { class: "actions" });
  if (e.status === "dead") {
    const button = el("button", { type: "button", id: "redrive" }, "Redrive");
    button.addEventListener("click", async () => {
      button.disabled = true;
      const r = await api("POST", "/v1/dlq/redrive", { ids: [id] });
      if (!r.ok) {
        button.disabled = false;
        return flash(apiError(r, "redrive"));
      }
      flash(message("ok", "Redriven: back in the outbox."));
      refreshSoon(500);
    });
    actions.append(button);
  }
  if (e.status === "pending") {
    actions.append(message("note", "Not delivered yet: this page refreshes by itself."));
    refreshSoon(1500);
  }
  if (e.instance_id) actions.append(el("a", { class: "button-link", href: route(["events"], { instance_id: e.instance_id }) }, "events of this instance"));
  if (e.order_id) actions.append(el("a", { class: "button-link", href: route(["events"], { order_id: e.order_id }) }, "events of this order"));
  const shown = ["id", "type", "status", "instance_id", "seq", "order_id", "purchase_order_id", "occurred_at", "test", "redrive",
    "attempts", "last_error", "next_attempt_at", "dead_at", "delivered_at"].filter((k) => k in e);
  append(view, [actions, el("section", { class: "card" }, el("h2", null, "Facts"), fields(e, shown))]);
  const log = arrayOf(e, "attempt_log");
  append(view, [
    el("section", { class: "card" }, el("h2", null, "Attempts"),
      table(
        [
          ["at", (a) => when(a.at)],
          ["HTTP status", (a) => text(a.status)],
          ["duration (ms)", (a) => text(a.duration_ms)],
          ["response", (a) => (a.response ? el("pre", { class: "response" }, String(a.response)) : "—")],
          ["error", (a) => text(a.error)],
        ],
        log,
        { class: "attempts", empty: e.attempt_log ? "No attempt yet." : "This gateway keeps no attempt log for this event." },
      )),
    el("section", { class: "card" }, el("h2", null, "Event body"), e.event ? json(e.event) : el("p", { class: "empty" }, "Not kept."))
  ]);
}

/** "Redrive selected" and "Redrive all" buttons posting to a redrive route (`{"ids"}` or `{"all":true}`);
 *  `boxes` are the checkboxes whose values are the ids; the page refreshes after a redrive. */
function redriveButtons(path, boxes, idPrefix, noun) {
  const redrive = async (body) => {
    const r = await api("POST", path, body);
    const missing = r.ok && arrayOf(r.data, "missing").length ? `; missing: ${text(r.data.missing.length)}` : "";
    flash(r.ok ? message("ok", `Redriven: ${text((r.data.redriven || []).length)}${missing}.`) : apiError(r, "redrive"));
    if (r.ok) refreshSoon(800);
  };
  const selected = el("button", { type: "button", id: idPrefix + "-selected" }, "Redrive selected");
  selected.addEventListener("click", () => {
    const ids = boxes.filter((b) => b.checked).map((b) => b.value);
    if (ids.length) redrive({ ids });
    else flash(message("note", `Select ${noun} first.`));
  });
  const all = el("button", { type: "button", id: idPrefix + "-all", class: "secondary" }, "Redrive all");
  all.addEventListener("click", () => redrive({ all: true }));
  return [selected, all];
}

async function pageDead(view) {
  append(view, el("h1", null, "Dead letters"));
  const recover = el("form", { class: "card search", id: "recover-form" },
    input("since", "Recover every event that died since", "", { type: "datetime-local", required: true }, true),
    el("button", { type: "submit" }, "Recover since"));
  recover.addEventListener("submit", async (e) => {
    e.preventDefault();
    const since = toRfc3339(new FormData(recover).get("since"));
    const r = await api("POST", v1(["events", "recover"], { since }));
    flash(r.ok ? message("ok", `Recovered ${text(r.data && r.data.count)} event(s).`) : apiError(r, "recover"));
    if (r.ok) refreshSoon(800);
  });
  const res = await api("GET", "/v1/dlq");
  if (!res.ok) return append(view, [recover, apiError(res, "GET /v1/dlq")]);
  const dead = arrayOf(res.data, "dead_letters");
  const boxes = [];
  const selectAll = el("input", { type: "checkbox", id: "select-all", "aria-label": "select all" });
  selectAll.addEventListener("change", () => boxes.forEach((b) => (b.checked = selectAll.checked)));
  const [selected, all] = redriveButtons("/v1/dlq/redrive", boxes, "redrive", "dead letters");
  const columns = [
    [selectAll, (d) => {
      const box = el("input", { type: "checkbox", value: d.id, "aria-label": "select " + d.id });
      boxes.push(box);
      return box;
    }],
    ...eventColumns().filter(([t]) => t !== "status"),
  ];
  append(view, [
    recover,
    el("div", { class: "actions" }, selected, all),
    el("p", { class: "count" }, `${dead.length} dead letter(s)`),
    table(columns, dead, { class: "dead", rowId: (d) => d.id, empty: "No dead letter." }),
  ]);
}

async function pageOrders(view, q) {
  append(view, [
    el("h1", null, "Orders"),
    searchForm("orders", [input("order_id", "Order id", q.get("order_id"), { required: true }, true),
      input("customer_id", "Customer id", q.get("customer_id"), { required: true }, true)], "Look up"),
  ]);
  const order = q.get("order_id"), customer = q.get("customer_id");
  if (!order || !customer) return view.append(message("note", "An order is shown to its own customer only: give both ids."));
  const res = await api("GET", v1(["orders", order], { customer_id: customer }));
  if (!res.ok) return view.append(apiError(res, "GET /v1/orders/{order_id}"));
  const o = res.data || {};
  const redeemed = o.redeemed
    ? el("p", { class: "ok", id: "redemption" }, "Stored value redeemed at ", text(o.redeemed.redeemed_at), " by ", text(o.redeemed.redeemed_by))
    : el("p", { class: "note", id: "redemption" }, "Stored value not redeemed.");
  append(view, [
    el("section", { class: "card" }, el("h2", null, "Order ", el("span", { class: "mono" }, text(o.order_id))), redeemed,
      fields(o, ["order_id", "customer_id", "status", "instance_id", "sku_code", "cards", "total_cny"]),
      el("div", { class: "actions" }, el("a", { class: "button-link", href: route(["events"], { order_id: o.order_id }) }, "events of this order"))),
    el("section", { class: "card" }, el("h2", null, "Instances"),
      table([
        ["instance", (i) => instanceLink(i.instance_id)],
        ["order line", (i) => text(i.order_line_id)],
        ["status", (i) => badge(i.status)],
        ["SKU", (i) => text(i.sku_code)],
        ["product", (i) => text(i.product_id)],
        ["test", (i) => text(i.test)],
      ], arrayOf(o, "instances"), { empty: "No instance." })),
    el("section", { class: "card" }, el("h2", null, "Settlement"), json(o.settlement)),
  ]);
}

function instanceColumns() {
  return [
    ["instance", (i) => instanceLink(i.instance_id)],
    ["status", (i) => badge(i.status)],
    ["order", (i) => text(i.order_id)],
    ["SKU", (i) => text(i.sku_code)],
    ["product", (i) => text(i.product_id)],
    ["created", (i) => when(i.created_at)],
    ["expires", (i) => when(i.expire_time)],
    ["usage pushed", (i) => text(i.usage && i.usage.pushed)],
    ["usage unpushed", (i) => text(i.usage && i.usage.unpushed)],
    ["events", (i) => el("a", { href: route(["events"], { instance_id: i.instance_id }) }, "events")],
  ];
}

async function pageAccounts(view, q) {
  append(view, [
    el("h1", null, "Accounts"),
    searchForm("accounts", [input("customer_id", "Huawei Cloud account (customer id)", q.get("customer_id"), { required: true }, true),
      input("limit", "Per page", q.get("limit") || "20", { type: "number", min: "1", max: "100" })], "Look up"),
  ]);
  const customer = q.get("customer_id");
  if (!customer) return view.append(message("note", "Give an account id."));
  const offset = q.get("offset") || "0", limit = q.get("limit") || "20";
  const res = await api("GET", v1(["accounts", customer], { offset, limit }));
  const a = res.data || {};
  if (a.enrichment_note) view.append(message("note", a.enrichment_note));
  if (!res.ok) return view.append(apiError(res, "GET /v1/accounts/{customer_id}"));
  const instances = arrayOf(a, "instances");
  const pager = el("div", { class: "actions pager" });
  const prev = Math.max(0, Number(offset) - Number(limit));
  if (Number(offset) > 0) pager.append(el("a", { class: "button-link", id: "prev", href: route(["accounts"], { customer_id: customer, offset: prev, limit }) }, "← newer"));
  if (a.next_offset !== null && a.next_offset !== undefined) {
    pager.append(el("a", { class: "button-link", id: "next", href: route(["accounts"], { customer_id: customer, offset: a.next_offset, limit }) }, "older →"));
  }
  const first = Number(offset) + (instances.length ? 1 : 0);
  append(view, [
    el("p", { class: "count" }, `Account ${text(a.customer_id)}: instances ${first}–${Number(offset) + instances.length} of ${text(a.total)}`),
    table(instanceColumns(), instances, { class: "instances", rowId: (i) => i.instance_id, empty: "No instance." }),
    pager,
  ]);
}

async function pageInstance(view, id) {
  append(view, el("h1", null, "Instance ", el("span", { class: "mono" }, id)));
  const res = await api("GET", v1(["instances", id]));
  if (!res.ok) return view.append(apiError(res, "GET /v1/instances/{instance_id}"));
  const i = res.data || {};
  const account = i.account && i.account.customer_id;
  const links = el("div", { class: "actions" },
    el("a", { class: "button-link", href: route(["events"], { instance_id: id }) }, "events of this instance"),
    el("a", { class: "button-link", href: route(["usage"], { instance_id: id }) }, "usage of this instance"),
    account ? el("a", { class: "button-link", href: route(["accounts"], { customer_id: account }) }, "account " + account) : null);
  if (i.account_note) view.append(message("note", i.account_note));
  const facts = ordered(i, ["instance_id", "status", "order_id", "order_line_id", "product_id", "sku_code", "charging_mode",
    "period_type", "period_number", "quantity", "created_at", "updated_at", "expire_time", "released_at"])
    .filter((k) => !["order_lines", "event_ids", "usage", "account"].includes(k));
  append(view, [
    links,
    el("section", { class: "card" }, el("h2", null, "Facts"), fields(i, facts)),
    el("section", { class: "card" }, el("h2", null, "Account"), fields(i.account || {}, ["customer_id", "customer_name"])),
    el("section", { class: "card" }, el("h2", null, "Usage"), fields(i.usage || {}, ["pushed", "pushed_until", "unpushed"]),
      table([
        ["item (package instance)", (u) => text(u.related_instance_id)],
        ["pushed", (u) => text(u.pushed)],
        ["pushed until", (u) => text(u.pushed_until)],
        ["unpushed", (u) => text(u.unpushed)],
      ], (i.usage && i.usage.items) || [], { empty: "No usage per item." })),
    el("section", { class: "card" }, el("h2", null, "Order lines"),
      table([
        ["order", (l) => text(l.order_id)],
        ["line", (l) => text(l.order_line_id)],
        ["product", (l) => text(l.product_id)],
        ["instance", (l) => instanceLink(l.instance_id)],
      ], i.order_lines || [], { empty: "No order line." })),
    el("section", { class: "card" }, el("h2", null, "Events"),
      el("ul", { class: "ids" }, (i.event_ids || []).map((e) => el("li", null, eventLink(e))))),
  ]);
}

function usageColumns(boxes) {
  const cols = [
    ["metering_sn", (u) => el("a", { href: route(["usage"], { sn: u.metering_sn }), class: "mono" }, text(u.metering_sn))],
    ["instance", (u) => instanceLink(u.instance_id)],
    ["status", (u) => badge(u.status)],
    ["value", (u) => text(u.usage_value)],
    ["period", (u) => el("span", { class: "period" }, text(u.begin_time), " → ", text(u.end_time))],
    ["attempts", (u) => text(u.attempts)],
    ["code", (u) => text(u.code)],
    ["error / message", (u) => long(u.message || u.last_error)],
  ];
  if (boxes) {
    cols.unshift(["", (u) => {
      const box = el("input", { type: "checkbox", value: u.metering_sn, "aria-label": "select " + u.metering_sn });
      boxes.push(box);
      return box;
    }]);
  }
  return cols;
}

function gauge(label, value, id) {
  return el("div", { class: "gauge", id }, el("span", { class: "gauge-value" }, text(value)), el("span", { class: "gauge-label" }, label));
}

async function pageUsage(view, q) {
  append(view, el("h1", null, "Usage"));
  const [stats, dead] = await Promise.all([api("GET", "/v1/usage"), api("GET", "/v1/usage/dlq")]);
  if (stats.ok) {
    const s = stats.data || {};
    view.append(el("div", { class: "gauges" }, gauge("unpushed", s.unpushed, "g-unpushed"),
      gauge("oldest unpushed", s.oldest_unpushed_at, "g-oldest"), gauge("dead", s.dead, "g-dead")));
  } else view.append(apiError(stats, "GET /v1/usage"));

  append(view, [
    searchForm("usage", [input("instance_id", "Instance id", q.get("instance_id"), null, true)], "Usage of instance", "usage-instance-form"),
    searchForm("usage", [input("sn", "metering_sn", q.get("sn"), null, true)], "Find record", "usage-record-form"),
  ]);
  const sn = q.get("sn");
  if (sn) {
    const r = await api("GET", v1(["usage", "records", sn]));
    view.append(r.ok
      ? el("section", { class: "card", id: "usage-record" }, el("h2", null, "Record ", el("span", { class: "mono" }, sn)), fields(r.data, ordered(r.data, ["metering_sn", "status", "instance_id", "relate_pkg_instance", "usage_value",
        "begin_time", "end_time", "record_time", "accepted_at", "pushed_at", "dead_at", "attempts", "code", "message", "last_error"])))
      : apiError(r, "GET /v1/usage/records/{metering_sn}"));
  }
  const instance = q.get("instance_id");
  if (instance) {
    const r = await api("GET", v1(["usage", "instances", instance]));
    if (r.ok) {
      const u = r.data || {};
      const c = u.counts || {}, t = u.totals || {};
      view.append(el("section", { class: "card", id: "usage-instance" },
        el("h2", null, "Instance ", instanceLink(instance)),
        el("div", { class: "gauges" }, ["pending", "pushed", "held", "dead"].map((k) => gauge(k, c[k], "c-" + k)),
          gauge("accepted total", t.accepted, "t-accepted"), gauge("pushed total", t.pushed, "t-pushed")),
        table(usageColumns(null), arrayOf(u, "records"), { class: "usage", rowId: (x) => x.metering_sn, empty: "No usage record." })));
    } else view.append(apiError(r, "GET /v1/usage/instances/{instance_id}"));
  }

  const boxes = [];
  const [selected, all] = redriveButtons("/v1/usage/dlq/redrive", boxes, "usage-redrive", "records");
  const section = el("section", { class: "card" }, el("h2", null, "Dead usage records"));
  if (dead.ok) {
    const letters = arrayOf(dead.data, "dead_letters");
    append(section, [el("div", { class: "actions" }, selected, all),
      table(usageColumns(boxes), letters, { class: "usage-dead", rowId: (x) => x.metering_sn, empty: "No dead usage record." })]);
  } else section.append(apiError(dead, "GET /v1/usage/dlq"));
  view.append(section);
}

// ---- routing and session --------------------------------------------------------------------

const PAGES = {
  events: (view, rest, q) => (rest.length ? pageEvent(view, rest[0]) : pageEvents(view, q)),
  dead: (view) => pageDead(view),
  orders: (view, rest, q) => pageOrders(view, q),
  accounts: (view, rest, q) => pageAccounts(view, q),
  instances: (view, rest) => (rest.length ? pageInstance(view, rest[0]) : pageAccounts(view, new URLSearchParams())),
  usage: (view, rest, q) => pageUsage(view, q),
};

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?", 2);
  let segments;
  try {
    segments = path.split("/").filter((s) => s !== "").map(decodeURIComponent);
  } catch {
    segments = [];
  }
  return { page: segments[0] || "events", rest: segments.slice(1), q: new URLSearchParams(query || "") };
}

let generation = 0;
let rendered = "";

/** The outcome of an action, kept above the page until the operator moves to another page. */
function flash(node) {
  $("flash").replaceChildren(node);
}

function showLogin(why) {
  $("view").hidden = true;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("status").textContent = "";
  $("token").focus();
}

async function render() {
  const mine = ++generation;
  if (location.hash !== rendered) $("flash").replaceChildren();
  rendered = location.hash;
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin("");
  const { page, rest, q } = parseHash();
  const show = PAGES[page] ? page : "events";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === show || (show === "instances" && a.dataset.page === "accounts"));
  $("login").hidden = true;
  $("nav").hidden = false;
  $("logout").hidden = false;
  const view = el("section", { id: "view", "data-page": show, "data-hash": rendered, "data-generation": mine, "aria-busy": "true" });
  $("status").textContent = "Loading…";
  try {
    await PAGES[show](view, rest, q);
  } catch (e) {
    if (e instanceof Unauthorized) {
      if (mine === generation) showLogin("The token was refused or has expired: sign in again.");
      return;
    }
    view.append(message("error", "The console failed: ", String(e && e.message ? e.message : e)));
  }
  if (mine !== generation) return; // a later navigation won
  view.setAttribute("aria-busy", "false");
  $("status").textContent = "";
  $("view").replaceWith(view);
  document.title = "koogate · " + show;
}

/** Re-renders the page shown now in `ms`, unless the operator has moved on meanwhile: the page to
 *  refresh is fixed when the refresh is asked for, so a timer set on one page never re-renders the
 *  next one (it would wipe a form being filled in and the elements under the operator's pointer). */
function refreshSoon(ms) {
  // Every render and logout counts a generation, so an unchanged one means nothing was shown since;
  // the hash is checked too because a hashchange's render may not have begun yet.
  const page = location.hash;
  const asked = generation;
  setTimeout(() => {
    if (location.hash === page && generation === asked && sessionStorage.getItem(TOKEN_KEY)) render();
  }, ms);
}

async function login(e) {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  try {
    const res = await api("GET", "/v1/usage");
    if (res.status === 404 && res.data && res.data.error === "admin_api_off") {
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin(res.data.message || "The admin API is off.");
    }
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin("That token was refused.");
    sessionStorage.removeItem(TOKEN_KEY);
    return showLogin("The gateway did not answer: " + String(err && err.message ? err.message : err));
  }
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = route(["events"]);
  else render();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  generation++;
  $("view").replaceChildren();
  $("flash").replaceChildren();
  showLogin("Logged out.");
}

$("login").addEventListener("submit", login);
$("logout").addEventListener("click", logout);
window.addEventListener("hashchange", render);
render();
