// The vmrecover web console: one page, routes after '#', every figure from /api/v1 with the session's
// cookie.  Nothing is written as HTML from data: every element is built with h() and text nodes, so a
// VM, file or job name cannot become markup.  Mutations carry the session's CSRF token.
"use strict";

const API = "/api/v1";
const state = { me: null, timers: [], streams: [] };

// ------------------------------------------------------------------------------------------ helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  return s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
}

function duration(run) {
  if (!run || !run.started) return null;
  const end = run.ended ? new Date(run.ended) : new Date();
  return (end - new Date(run.started)) / 1000;
}

function enc(s) { return encodeURIComponent(s); }
function isAdmin() { return state.me && state.me.role === "admin"; }

function toast(text, bad) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

class ApiError extends Error {
  constructor(status, doc) {
    super((doc && doc.message) || "HTTP " + status);
    this.status = status;
    this.hint = doc && doc.hint;
  }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET" && state.me && state.me.csrf) headers["X-CSRF-Token"] = state.me.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin", cache: "no-store",
  });
  let doc = null;
  try { doc = await r.json(); } catch (e) { doc = null; }
  if (r.status === 401 && path !== "/console/login") { signedOut(); throw new ApiError(401, doc); }
  if (!r.ok) throw new ApiError(r.status, doc);
  return doc;
}

function failed(err) {
  toast(err.message + (err.hint ? " — " + err.hint : ""), true);
}

function view(title, ...children) {
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", {}, title), ...children.filter((c) => c !== null && c !== undefined && c !== false));
  return main;
}

function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function badge(text, kind) { return h("span", { class: "badge " + (kind || text) }, text); }

function verdictBadge(check) {
  if (!check) return badge("not checked", "none");
  return badge(check.ok ? "boots" : "failed: " + check.verdict, check.ok ? "succeeded" : "failed");
}

function button(text, onclick, attrs) {
  return h("button", Object.assign({ type: "button", onclick }, attrs || {}), text);
}

function adminOnly(el) { return isAdmin() ? el : null; }

function stopStreams() {
  for (const t of state.timers) clearInterval(t);
  for (const s of state.streams) s.close();
  state.timers = [];
  state.streams = [];
}

// ------------------------------------------------------------------------------------------ sign-in
function signedOut() {
  state.me = null;
  stopStreams();
  document.getElementById("top").hidden = true;
  if (!location.hash.startsWith("#/sign-in")) {
    const back = location.hash && location.hash !== "#/" ? location.hash : "";
    history.replaceState(null, "", "#/sign-in" + (back ? "?next=" + enc(back) : ""));
  }
  showSignIn();
}

function showSignIn() {
  const msg = h("p", { class: "error", id: "sign-in-error", role: "alert" });
  const user = h("input", { name: "user", id: "user", autocomplete: "username", required: true });
  const password = h("input", { name: "password", id: "password", type: "password",
    autocomplete: "current-password", required: true });
  const token = h("input", { name: "token", id: "token", type: "password", autocomplete: "off" });
  async function submit(ev) {
    ev.preventDefault();
    msg.textContent = "";
    const body = token.value ? { token: token.value } : { user: user.value, password: password.value };
    try {
      state.me = await api("POST", "/console/login", body);
      const next = new URLSearchParams(location.hash.split("?")[1] || "").get("next");
      location.hash = next && next.startsWith("#/") ? next : "#/dashboard";
      await route();
    } catch (err) {
      msg.textContent = err.message + (err.status === 429 && err.hint ? " (" + err.hint + ")" : "");
    }
  }
  view("Sign in",
    h("form", { id: "sign-in", class: "card narrow", onsubmit: submit },
      h("label", { for: "user" }, "User"), user,
      h("label", { for: "password" }, "Password"), password,
      h("p", { class: "muted" }, "or"),
      h("label", { for: "token" }, "API token (instead of a user)"), token,
      h("button", { type: "submit", id: "sign-in-button" }, "Sign in"), msg));
  user.required = password.required = true;
  token.addEventListener("input", () => { user.required = password.required = !token.value; });
}

async function signOut() {
  try { await api("POST", "/console/logout"); } catch (e) { /* already out */ }
  signedOut();
}

// ------------------------------------------------------------------------------------------ dashboard
function growthChart(growth) {
  const W = 640, H = 180, pad = 36;
  if (!growth.length) return h("p", { class: "muted" }, "No restore points yet.");
  const max = Math.max(...growth.map((g) => g.virtual_bytes), 1);
  const x = (i) => pad + (growth.length === 1 ? (W - 2 * pad) / 2 : (i * (W - 2 * pad)) / (growth.length - 1));
  const y = (v) => H - pad + 10 - (v / max) * (H - pad - 10);
  const line = (key) => growth.map((g, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(g[key]).toFixed(1)).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const last = growth[growth.length - 1];
  const ratio = last.stored_bytes ? (last.virtual_bytes / last.stored_bytes).toFixed(1) : "–";
  svg.setAttribute("aria-label", `protected ${bytes(last.virtual_bytes)}, stored ${bytes(last.stored_bytes)}, ${ratio}x`);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text) el.textContent = text;
    svg.append(el);
  };
  add("line", { x1: pad, y1: H - pad + 10, x2: W - pad, y2: H - pad + 10, class: "axis" });
  add("path", { d: line("virtual_bytes"), class: "virtual" });
  add("path", { d: line("stored_bytes"), class: "stored" });
  if (growth.length <= 60) {  // the days themselves, so that one day alone shows too
    growth.forEach((g, i) => {
      add("circle", { cx: x(i).toFixed(1), cy: y(g.virtual_bytes).toFixed(1), r: 3, class: "virtual" });
      add("circle", { cx: x(i).toFixed(1), cy: y(g.stored_bytes).toFixed(1), r: 3, class: "stored" });
    });
  }
  add("text", { x: pad, y: 14, class: "legend virtual" }, "protected (disks of the points kept): " + bytes(last.virtual_bytes));
  add("text", { x: pad, y: 30, class: "legend stored" }, "stored after deduplication and compression: " + bytes(last.stored_bytes) + " (" + ratio + "x)");
  add("text", { x: pad, y: H - 4, class: "legend" }, growth[0].day);
  add("text", { x: W - pad, y: H - 4, class: "legend end" }, last.day);
  return svg;
}

function runFigures(run) {
  const vms = (run && run.stats && run.stats.vms) || [];
  const sum = (k) => vms.reduce((a, v) => a + (v[k] || 0), 0);
  return { read: sum("bytes_read"), stored: sum("stored_bytes") };
}

async function showDashboard() {
  const d = await api("GET", "/dashboard");
  const jobs = d.jobs.slice().sort((a, b) => {
    const fa = a.last_run && a.last_run.state === "failed" ? 0 : 1;
    const fb = b.last_run && b.last_run.state === "failed" ? 0 : 1;
    return fa - fb || a.name.localeCompare(b.name);
  });
  const fs = d.repository.filesystem;
  const chunks = d.repository.chunks || {};
  const checked = d.vms.filter((v) => v.boot_check);
  view("Dashboard",
    h("section", { class: "cards" },
      h("div", { class: "card stat" }, h("b", {}, d.vms.length), " VMs"),
      h("div", { class: "card stat" }, h("b", {}, d.points), " restore points"),
      h("div", { class: "card stat" }, h("b", {}, d.sessions.length), " recovery sessions"),
      h("div", { class: "card stat" }, h("b", {}, bytes(chunks.bytes)), " in chunks, ",
        h("b", {}, bytes(fs.available)), " free of ", bytes(fs.size))),
    h("h2", {}, "Jobs"),
    table(["job", "kind", "state", "last run", "duration", "read", "stored", "next run"],
      jobs.map((j) => {
        const r = j.last_run;
        const f = runFigures(r);
        return h("tr", { class: r && r.state === "failed" ? "failed" : "", dataset: { job: j.name } },
          h("td", {}, h("a", { href: "#/jobs/" + enc(j.name) }, j.name)), h("td", {}, j.kind),
          h("td", {}, badge(j.state)),
          h("td", {}, r ? [badge(r.state), " ", when(r.started)] : "never"),
          h("td", {}, seconds(duration(r))), h("td", {}, r ? bytes(f.read) : "–"),
          h("td", {}, r ? bytes(f.stored) : "–"), h("td", {}, when(j.next_run)));
      }), { id: "dashboard-jobs" }),
    h("h2", {}, "Repository over time"),
    h("div", { class: "card" }, growthChart(d.growth)),
    h("h2", {}, "Boot health checks"),
    checked.length
      ? table(["VM", "newest point", "check"], checked.map((v) =>
        h("tr", {}, h("td", {}, h("a", { href: "#/vms/" + enc(v.name) }, v.name)),
          h("td", {}, when(v.latest_created)), h("td", {}, verdictBadge(v.boot_check)))))
      : h("p", { class: "muted" }, "No newest point has been boot-checked yet."));
}

// ------------------------------------------------------------------------------------------ VMs
async function showVms() {
  const d = await api("GET", "/dashboard");
  view("VMs",
    table(["VM", "points", "newest", "kind", "size", "boot check"], d.vms.map((v) =>
      h("tr", {},
        h("td", {}, h("a", { href: "#/vms/" + enc(v.name) }, v.name)), h("td", {}, v.points),
        h("td", {}, when(v.latest_created)), h("td", {}, v.latest_kind), h("td", {}, bytes(v.latest_size)),
        h("td", {}, verdictBadge(v.boot_check)))), { id: "vms" }));
}

function timeline(points, select) {
  if (!points.length) return null;
  const t0 = new Date(points[0].created).getTime();
  const t1 = new Date(points[points.length - 1].created).getTime();
  const span = Math.max(t1 - t0, 1);
  return h("div", { class: "timeline", role: "list" }, points.map((p) => {
    const left = points.length === 1 ? 50 : ((new Date(p.created).getTime() - t0) / span) * 96 + 2;
    const bc = p.boot_check;
    const cls = "dot " + p.kind + (bc ? (bc.ok ? " boots" : " fails") : "");
    return h("button", { type: "button", class: cls, style: null, role: "listitem", title: when(p.created) + " " + p.kind,
      dataset: { left: left.toFixed(2), point: p.id }, onclick: () => select(p.id) });
  }));
}

function verifyBadge(p, v) {
  if (!v || new Date(p.created) > new Date(v.started)) return badge("not verified yet", "none");
  return v.damaged_points.includes(p.id) ? badge("damaged", "failed") : badge("intact", "succeeded");
}

async function showVm(vm) {
  const [d, v] = await Promise.all([api("GET", "/vms/" + enc(vm) + "/points"), api("GET", "/verify/latest")]);
  const points = d.points;
  const detail = h("section", { id: "point-detail" });
  const rows = points.slice().reverse().map((p) => {
    const size = p.disks.reduce((a, x) => a + x.size, 0);
    const bc = p.boot_check;
    return h("tr", { id: "point-" + p.id },
      h("td", {}, h("a", { href: "#", onclick: (e) => { e.preventDefault(); select(p.id); } }, when(p.created))),
      h("td", {}, p.kind), h("td", {}, bytes(size)), h("td", {}, bytes(p.stats.stored_bytes || 0)),
      h("td", {}, verifyBadge(p, v)), h("td", {}, verdictBadge(bc)),
      h("td", {}, h("a", { href: "#/files/" + enc(vm) + "/" + enc(p.id) + "?path=/" }, "files")));
  });
  async function select(id) {
    const p = points.find((x) => x.id === id);
    for (const r of document.querySelectorAll("tr.selected")) r.classList.remove("selected");
    const row = document.getElementById("point-" + id);
    if (row) row.classList.add("selected");
    const checks = await api("GET", `/vms/${enc(vm)}/points/${enc(id)}/boot-checks`);
    const c = checks.checks[0];
    const shot = c && c.screenshot_bytes
      ? h("img", { class: "screenshot", id: "boot-screenshot", alt: "the screen at the boot check's verdict",
        src: `${API}/vms/${enc(vm)}/points/${enc(id)}/boot-checks/${c.id}/screenshot` })
      : null;
    const expect = h("input", { id: "boot-expect", size: 28,
      placeholder: "booted when the serial console shows (default: a login prompt)" });
    const run = adminOnly(button("Run a boot check", async (ev) => {
      ev.target.disabled = true;
      ev.target.textContent = "Booting the point in an isolated session…";
      const body = { timeout: 300 };
      if (expect.value) body.expect = expect.value;
      try {
        const r = await api("POST", `/vms/${enc(vm)}/points/${enc(id)}/boot-checks`, body);
        toast(r.ok ? "It boots: " + r.detail : "It does not boot: " + r.detail, !r.ok);
      } catch (err) { failed(err); }
      await showVm(vm);
      await select(id);
    }, { id: "boot-check-button" }));
    const recover = adminOnly(button("Recover (instant)", () => {
      location.hash = "#/sessions?vm=" + enc(vm) + "&point=" + enc(id);
    }, { id: "recover-button" }));
    detail.replaceChildren(...[
      h("h2", {}, "Point ", h("code", {}, p.id), " — ", when(p.created)),
      h("p", {}, p.kind, ", ", p.disks.map((x) => x.name + " " + bytes(x.size)).join(", ")),
      h("p", {}, "Boot health check: ", verdictBadge(c), c ? [" ", c.detail, " (", seconds(c.seconds), ", ", when(c.checked), ")"] : null),
      shot, h("div", { class: "actions" }, adminOnly(expect), run, recover,
        h("a", { class: "button", href: "#/files/" + enc(vm) + "/" + enc(id) + "?path=/" }, "Restore files")),
    ].filter(Boolean));
  }
  const tl = timeline(points, select);
  const vnote = v ? `Verify: run #${v.run} of job ${v.job}, ${when(v.ended)}: ${v.ok ? "every chunk intact" : v.damaged_points.length + " point(s) damaged"}.`
    : "No verify job has run yet: the points' chunks are checked by a job of kind verify.";
  view(vm, tl, h("p", { class: "muted", id: "verify-note" }, vnote),
    table(["created", "kind", "size", "stored", "verify", "boot check", ""], rows, { id: "points" }), detail);
  if (tl) for (const dot of tl.children) dot.style.left = dot.dataset.left + "%";
  if (points.length) await select(points[points.length - 1].id);
}

// ------------------------------------------------------------------------------------------ files
function modeString(octal, kind) {
  const mode = parseInt(octal, 8);
  const t = { dir: "d", symlink: "l", file: "-" }[kind] || "?";
  let s = "";
  for (let i = 8; i >= 0; i--) s += (mode >> i) & 1 ? "rwx"[(8 - i) % 3] : "-";
  return t + s;
}

async function showFiles(vm, point, params) {
  const path = params.get("path") || "/";
  const base = `/vms/${enc(vm)}/points/${enc(point)}/files`;
  const parts = path.split("/").filter(Boolean);
  const crumbs = [h("a", { href: `#/files/${enc(vm)}/${enc(point)}?path=/` }, "/")];
  parts.forEach((part, i) => {
    const p = "/" + parts.slice(0, i + 1).join("/");
    crumbs.push(h("a", { href: `#/files/${enc(vm)}/${enc(point)}?path=${enc(p)}` }, part), "/");
  });
  const status = h("p", { class: "muted", id: "files-status" }, "Opening the point's disks (the first time takes a while)…");
  view(vm + " — files", h("nav", { class: "crumbs", id: "crumbs" }, crumbs), status);
  const started = performance.now();
  const [d, hvs] = await Promise.all([api("GET", `${base}?path=${enc(path)}`), api("GET", "/hypervisors")]);
  const vmware = hvs.filter((hv) => hv.scheme === "vmware");
  const download = (p, fmt) => `${API}${base}/content?path=${enc(p)}${fmt ? "&format=" + fmt : ""}`;
  const baseName = (p) => p.replace(/\/+$/, "").split("/").pop();
  for (const e of d.entries) e.name = baseName(e.path);
  const entries = d.entries.slice().sort((a, b) =>
    (a.kind === "dir" ? 0 : 1) - (b.kind === "dir" ? 0 : 1) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  function row(e) {
    const full = (d.path === "/" ? "" : d.path) + "/" + e.name;
    const name = e.kind === "dir"
      ? h("a", { href: `#/files/${enc(vm)}/${enc(point)}?path=${enc(full)}` }, e.name + "/")
      : e.name;
    const get = e.kind === "dir"
      ? [h("a", { href: download(full, "tar"), download: "" }, "tar"), " ", h("a", { href: download(full, "zip"), download: "" }, "zip")]
      : e.kind === "file" ? h("a", { href: download(full), download: e.name, class: "download" }, "download") : null;
    const hist = e.kind === "file" ? h("a", { href: `#/history/${enc(vm)}?path=${enc(full)}` }, "history") : null;
    const into = e.kind !== "symlink" && vmware.length && isAdmin()
      ? h("a", { href: "#", class: "into-vm", onclick: (ev) => { ev.preventDefault(); intoVm(vm, point, full, vmware); } }, "into a VM…") : null;
    return h("tr", { dataset: { name: e.name } }, h("td", { title: e.name }, name), h("td", {}, e.kind === "file" ? bytes(e.size) : ""),
      h("td", { class: "mono" }, modeString(e.mode, e.kind)), h("td", { class: "mono" }, e.uid + ":" + e.gid),
      h("td", {}, when(e.mtime)), h("td", {}, e.kind === "symlink" ? "→ " + e.target : [get, " ", hist, " ", into]));
  }
  const tbl = table(["name", "size", "mode", "owner", "modified", ""], [], { id: "entries", class: "fixed" });
  const rows = windowed(tbl, entries, row);
  const filter = h("input", { type: "search", id: "entries-filter", placeholder: `filter these ${entries.length} names` });
  filter.addEventListener("input", () => {
    const q = filter.value.toLowerCase();
    rows.show(q ? entries.filter((e) => e.name.toLowerCase().includes(q)) : entries);
  });
  const search = h("input", { type: "search", id: "find-pattern", placeholder: "find a file by name in every point (*.conf)" });
  const searchForm = h("form", { class: "inline", onsubmit: (ev) => {
    ev.preventDefault();
    if (search.value) location.hash = `#/find/${enc(vm)}?pattern=${enc(search.value)}`;
  } }, search, h("button", { type: "submit" }, "Find"));
  status.textContent = `${d.count} entries in ${d.path}, listed in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  document.getElementById("main").append(
    h("p", { class: "actions" }, "This folder: ", h("a", { href: download(d.path, "tar"), download: "" }, "download as tar"), " ",
      h("a", { href: download(d.path, "zip"), download: "" }, "as zip")),
    searchForm, filter, rows.scroller);
  rows.show(entries);
}

// A table of many rows (a folder of 100,000 entries) in a scrolling box: only the rows in sight (and a
// margin) are in the page, between two spacer rows as tall as the rest; rows have one fixed height.
const ROW_PX = 31;
function windowed(tbl, all, makeRow) {
  const scroller = h("div", { class: "scroller", id: tbl.id + "-scroll" }, tbl);
  const body = tbl.tBodies[0];
  const columns = tbl.tHead.rows[0].cells.length;
  let items = all, painted = "", rowPx = ROW_PX;
  const spacer = (n) => {
    const tr = h("tr", { class: "spacer", "aria-hidden": "true" }, h("td", { colspan: columns }));
    tr.style.height = n * rowPx + "px";
    return tr;
  };
  function paint() {
    const height = scroller.clientHeight || window.innerHeight;
    const first = Math.max(0, Math.floor(scroller.scrollTop / rowPx) - 30);
    const last = Math.min(items.length, Math.ceil((scroller.scrollTop + height) / rowPx) + 30);
    if (painted === first + ":" + last) return;
    painted = first + ":" + last;
    const out = [];
    if (first > 0) out.push(spacer(first));
    for (let i = first; i < last; i++) out.push(makeRow(items[i]));
    if (last < items.length) out.push(spacer(items.length - last));
    body.replaceChildren(...out);
    const one = body.querySelector("tr:not(.spacer)");
    if (one && one.offsetHeight && one.offsetHeight !== rowPx) { rowPx = one.offsetHeight; painted = ""; paint(); }
  }
  let queued = false;
  scroller.addEventListener("scroll", () => {
    if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; paint(); }); }
  });
  return { scroller, show(list) { items = list; painted = ""; scroller.scrollTop = 0; paint(); } };
}

function intoVm(vm, point, path, hypervisors) {
  const target = h("select", { name: "hypervisor" }, hypervisors.map((hv) => h("option", { value: hv.name }, hv.name)));
  const guest = h("input", { name: "vm", required: true, placeholder: "the running VM's name" });
  const user = h("input", { name: "user", required: true, autocomplete: "off" });
  const password = h("input", { name: "password", type: "password", required: true, autocomplete: "off" });
  const dir = h("input", { name: "dir", placeholder: "(default: where it was)" });
  const overwrite = h("input", { type: "checkbox", name: "overwrite" });
  const dlg = h("dialog", { class: "card", id: "into-vm" });
  dlg.append(h("form", { class: "form-grid", onsubmit: async (ev) => {
    ev.preventDefault();
    const body = { paths: [path], into: `vmware://${target.value}/${guest.value}`, guest_user: user.value,
      guest_password: password.value, overwrite: overwrite.checked };
    if (dir.value) body.guest_dir = dir.value;
    try {
      const r = await api("POST", `/vms/${enc(vm)}/points/${enc(point)}/files/into-vm`, body);
      dlg.close();
      toast(`Restored into ${guest.value}: ${JSON.stringify(r.items || r).slice(0, 200)}`);
    } catch (err) { failed(err); }
    password.value = "";
  } }, h("h2", {}, "Restore " + path + " into a running VM (VMware Tools)"), h("span"),
  h("label", {}, "hypervisor"), target, h("label", {}, "VM"), guest, h("label", {}, "guest user"), user,
  h("label", {}, "guest password"), password, h("label", {}, "into the guest folder"), dir,
  h("label", {}, "overwrite"), overwrite, h("button", { type: "submit" }, "Restore"), button("Cancel", () => dlg.close())));
  dlg.addEventListener("close", () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
}

async function showFind(vm, params) {
  const pattern = params.get("pattern") || "";
  view(`${vm} — find “${pattern}”`, h("p", { class: "muted", id: "find-status" }, "Searching every point (one appliance per point)…"));
  const d = await api("GET", `/vms/${enc(vm)}/files/find?pattern=${enc(pattern)}`);
  document.getElementById("find-status").textContent = `${d.matches} matches in ${d.points} points`;
  document.getElementById("main").append(table(["point", "path", ""], d.entries.map((e) =>
    h("tr", {}, h("td", {}, when(e.created)), h("td", { class: "mono" }, e.path),
      h("td", {}, h("a", { href: `#/history/${enc(vm)}?path=${enc(e.path)}` }, "history"), " ",
        h("a", { href: `${API}/vms/${enc(vm)}/points/${enc(e.point)}/files/content?path=${enc(e.path)}`, download: "" }, "download")))),
  { id: "found" }));
}

async function showHistory(vm, params) {
  const path = params.get("path") || "/";
  view(`${vm} — history of ${path}`, h("p", { class: "muted", id: "history-status" }, "Looking at every point…"));
  const d = await api("GET", `/vms/${enc(vm)}/files/history?path=${enc(path)}`);
  document.getElementById("history-status").textContent = `${d.points.length} points`;
  document.getElementById("main").append(table(["point", "change", "size", "modified", "sha256", ""], d.points.map((p) =>
    h("tr", { class: p.change.startsWith("changed") || p.change === "added" ? "changed" : "" },
      h("td", {}, when(p.created)), h("td", {}, p.change), h("td", {}, p.size === undefined ? "" : bytes(p.size)),
      h("td", {}, p.mtime ? when(p.mtime) : ""),
      h("td", { class: "mono" }, p.sha256 ? p.sha256.slice(0, 16) + "…" : ""),
      h("td", {}, p.kind === "file" ? h("a", { href: `${API}/vms/${enc(vm)}/points/${enc(p.point)}/files/content?path=${enc(path)}`, download: "" }, "download") : ""))),
  { id: "history" }));
}

// ------------------------------------------------------------------------------------------ recover
async function showSessions(params, note) {
  const [sessions, d, hvs] = await Promise.all([api("GET", "/sessions"), api("GET", "/dashboard"), api("GET", "/hypervisors")]);
  const rows = sessions.map((s) => {
    const pub = s.published || {};
    const qemu = pub.platform === "qemu";
    const consoleLink = qemu
      ? h("a", { href: `${API}/sessions/${enc(s.name)}/console`, target: "_blank", rel: "noopener" }, "serial console") : null;
    const shot = qemu ? h("img", { class: "thumb", alt: "the session's screen", dataset: { screen: s.name } }) : null;
    if (shot) {
      const refresh = () => { shot.src = `${API}/sessions/${enc(s.name)}/screenshot?t=${Date.now()}`; };
      shot.addEventListener("error", () => { shot.hidden = true; });
      shot.addEventListener("load", () => { shot.hidden = false; });
      refresh();
      state.timers.push(setInterval(refresh, 5000));
    }
    return h("tr", { dataset: { session: s.name } },
      h("td", {}, s.name, shot), h("td", {}, s.vm), h("td", {}, when(s.created)),
      h("td", {}, pub.platform || "datastores"), h("td", {}, bytes(Object.values(s.written || {}).reduce((a, x) => a + x, 0))),
      h("td", {}, consoleLink, " ",
        adminOnly(button("Migrate…", () => migrate(s))),
        adminOnly(button("Stop", async (ev) => {
          ev.target.disabled = true;
          try { await api("DELETE", "/sessions/" + enc(s.name)); toast("Session " + s.name + " stopped"); } catch (err) { failed(err); }
          stopStreams();
          await showSessions(new URLSearchParams());
        }, { class: "danger", dataset: { stop: s.name } }))));
  });
  const vmSel = h("select", { id: "recover-vm", name: "vm" }, d.vms.map((v) => h("option", { value: v.name, selected: v.name === params.get("vm") }, v.name)));
  const point = h("input", { id: "recover-point", name: "point", value: params.get("point") || "latest" });
  const name = h("input", { id: "recover-name", name: "name", placeholder: "(default: VM-xxxxxx)" });
  const where = h("select", { id: "recover-where" },
    h("option", { value: "datastores" }, "publish on the datastores (NFS, FUSE) for a hypervisor"),
    h("option", { value: "qemu" }, "run here under qemu (isolated, no network)"),
    hvs.map((hv) => h("option", { value: `${hv.scheme}://${hv.name}` },
      `run on ${hv.platform} ${hv.name} (${hv.host}), from the appliance's NFS export`)));
  const powerOn = h("input", { id: "recover-power-on", type: "checkbox", checked: true });
  const progress = h("p", { id: "recover-progress", class: "muted" }, note || "");
  async function start(ev) {
    ev.preventDefault();
    const body = { vm: vmSel.value, point: point.value || "latest" };
    if (name.value) body.name = name.value;
    if (where.value === "qemu") body.run = "qemu";
    else if (where.value !== "datastores") { body.to = where.value; body.power_on = powerOn.checked; }
    const t0 = performance.now();
    const tick = () => {
      const t = ((performance.now() - t0) / 1000).toFixed(0);
      progress.textContent = `Starting the session: opening the point, publishing its disks${body.to ? ", registering the VM on " + body.to : ""}… ${t} s`;
    };
    tick();
    const ticking = setInterval(tick, 500);
    state.timers.push(ticking);
    try {
      const s = await api("POST", "/sessions", body);
      clearInterval(ticking);
      const up = `Session ${s.name} is up in ${((performance.now() - t0) / 1000).toFixed(1)} s.`;
      stopStreams();
      await showSessions(new URLSearchParams(), up);
    } catch (err) { clearInterval(ticking); progress.textContent = ""; failed(err); }
  }
  view("Recover",
    isAdmin() ? h("form", { id: "recover-form", class: "card", onsubmit: start },
      h("label", {}, "VM ", vmSel), h("label", {}, " point ", point), h("label", {}, " name ", name),
      h("label", {}, " where ", where), hvs.length ? h("label", {}, " power on ", powerOn) : null,
      h("button", { type: "submit", id: "recover-start" }, "Start instant recovery"), progress) : null,
    h("h2", {}, "Running sessions"),
    sessions.length ? table(["session", "VM", "started", "runs on", "written", ""], rows, { id: "sessions" })
      : h("p", { class: "muted", id: "no-sessions" }, "No recovery session runs."));
}

function migrate(s) {
  const to = h("input", { name: "to", placeholder: "/srv/restored/" + s.name + ".qcow2", required: true });
  const fmt = h("select", { name: "format" }, ["qcow2", "raw", "vmdk", "vhdx"].map((f) => h("option", { value: f }, f)));
  const dlg = h("dialog", { class: "card" }, h("form", { method: "dialog", onsubmit: async (ev) => {
    ev.preventDefault();
    dlg.close();
    try {
      const r = await api("POST", `/sessions/${enc(s.name)}/migrate`, { to: to.value, format: fmt.value });
      toast("Migrated: " + JSON.stringify(r.written || r).slice(0, 200));
    } catch (err) { failed(err); }
  } }, h("h2", {}, "Migrate " + s.name), h("label", {}, "write the disk to ", to), h("label", {}, " as ", fmt),
  h("button", { type: "submit" }, "Migrate"), button("Cancel", () => dlg.close())));
  document.body.append(dlg);
  dlg.showModal();
}

// ------------------------------------------------------------------------------------------ jobs
const list = (text) => text.split(",").map((x) => x.trim()).filter(Boolean);

async function showJobForm(name) {
  const d = name ? await api("GET", `/jobs/${enc(name)}/definition`) : { job: { kind: "backup", schedule: "0 2 * * *", enabled: true }, managed: true };
  const j = d.job;
  const field = (id, label, value, attrs) => {
    const input = h("input", Object.assign({ id: "job-" + id, name: id, value: value ?? "" }, attrs || {}));
    return [h("label", { for: "job-" + id }, label), input];
  };
  const kind = h("select", { id: "job-kind", name: "kind" }, ["backup", "gc", "verify", "boot-check"].map((k) =>
    h("option", { value: k, selected: k === j.kind }, k)));
  const enabled = h("input", { id: "job-enabled", type: "checkbox", checked: j.enabled !== false });
  const full = h("input", { id: "job-full", type: "checkbox", checked: !!j.full });
  const r = j.retention || {};
  const msg = h("p", { class: "error", id: "job-error", role: "alert" });
  const form = h("form", { id: "job-form", class: "card form-grid", onsubmit: async (ev) => {
    ev.preventDefault();
    const val = (id) => document.getElementById("job-" + id).value.trim();
    const body = { kind: kind.value, schedule: val("schedule"), enabled: enabled.checked, full: full.checked };
    const opt = { hypervisor: val("hypervisor"), vm: val("vm"), expect: val("expect"), boot_timeout: val("boot_timeout"),
      bandwidth: val("bandwidth") };
    for (const [k, v] of Object.entries(opt)) if (v) body[k] = v;
    if (val("vms")) body.vms = list(val("vms"));
    if (val("images")) body.images = list(val("images"));
    const ret = {};
    for (const k of ["keep_last", "daily", "weekly", "monthly"]) if (val(k)) ret[k] = Number(val(k));
    if (Object.keys(ret).length) body.retention = ret;
    const jobName = name || val("name");
    try {
      await api("PUT", "/jobs/" + enc(jobName), body);
      toast(`Job ${jobName} saved`);
      location.hash = "#/jobs/" + enc(jobName);
    } catch (err) { msg.textContent = err.message + (err.hint ? " — " + err.hint : ""); }
  } },
  name ? null : field("name", "Name", "", { required: true }),
  h("label", { for: "job-kind" }, "Kind"), kind,
  field("schedule", "Schedule (cron: minute hour day month weekday)", j.schedule, { required: true }),
  h("label", { for: "job-enabled" }, "Enabled"), enabled,
  field("hypervisor", "Hypervisor (a backup of its VMs)", j.hypervisor),
  field("vms", "VMs (comma-separated; names, folder:PATH, tag:TAG)", (j.vms || []).join(", ")),
  field("images", "Or disk images on the appliance (comma-separated paths)", (j.images || []).join(", ")),
  field("vm", "VM name for the images", j.vm),
  h("label", { for: "job-full" }, "Always full"), full,
  field("bandwidth", "Bandwidth (bytes/s, e.g. 100M)", j.bandwidth),
  field("keep_last", "Keep the last", r.keep_last || "", { type: "number", min: 0 }),
  field("daily", "Keep daily", r.daily || "", { type: "number", min: 0 }),
  field("weekly", "Keep weekly", r.weekly || "", { type: "number", min: 0 }),
  field("monthly", "Keep monthly", r.monthly || "", { type: "number", min: 0 }),
  field("boot_timeout", "Boot-check time-out", j.boot_timeout),
  field("expect", "Boot-check: booted when the serial console shows (regex)", j.expect),
  h("span"), h("button", { type: "submit", id: "job-save" }, name ? "Save" : "Create"), h("span"), msg);
  view(name ? "Edit job " + name : "New job", d.managed ? form
    : h("p", { class: "muted" }, "This job is defined in the configuration file: edit it there, then reload the service."));
}

async function showJobs(name) {
  const jobs = await api("GET", "/jobs");
  const runs = await api("GET", name ? `/jobs/${enc(name)}/history?limit=50` : "/runs?limit=50");
  const one = name ? jobs.find((j) => j.name === name) : null;
  view(name ? "Job " + name : "Jobs",
    adminOnly(h("p", { class: "actions" },
      name ? null : h("a", { class: "button", href: "#/job-edit", id: "job-new" }, "New job"),
      one && one.managed ? h("a", { class: "button", href: "#/job-edit/" + enc(name), id: "job-edit" }, "Edit") : null,
      one && one.managed ? button("Delete", async () => {
        if (!confirm(`Delete job ${name}? Its history stays.`)) return;
        try { await api("DELETE", "/jobs/" + enc(name)); toast(`Job ${name} deleted`); location.hash = "#/jobs"; } catch (err) { failed(err); }
      }, { class: "danger", id: "job-delete" }) : null)),
    table(["job", "kind", "schedule", "state", "next run", ""], jobs.filter((j) => !name || j.name === name).map((j) =>
      h("tr", { dataset: { job: j.name } }, h("td", {}, h("a", { href: "#/jobs/" + enc(j.name) }, j.name)), h("td", {}, j.kind),
        h("td", { class: "mono" }, j.schedule), h("td", {}, badge(j.enabled ? j.state : "disabled")), h("td", {}, when(j.next_run)),
        h("td", {}, adminOnly(button("Run now", async () => {
          try {
            const r = await api("POST", `/jobs/${enc(j.name)}/run`);
            location.hash = "#/runs/" + r.run;
          } catch (err) { failed(err); }
        }, { dataset: { run: j.name } }))))), { id: "jobs" }),
    h("h2", {}, "History"),
    table(["run", "job", "state", "started", "duration", "read", "stored", "error"], runs.map((r) => {
      const f = runFigures(r);
      return h("tr", {}, h("td", {}, h("a", { href: "#/runs/" + r.id }, "#" + r.id)), h("td", {}, r.job), h("td", {}, badge(r.state)),
        h("td", {}, when(r.started)), h("td", {}, seconds(duration(r))), h("td", {}, bytes(f.read)), h("td", {}, bytes(f.stored)),
        h("td", {}, r.error || ""));
    }), { id: "runs" }));
}

async function showRun(id) {
  const stateEl = h("span", { id: "run-state" });
  const bar = h("progress", { id: "run-progress", max: 1, value: 0 });
  const figures = h("p", { id: "run-figures" });
  const log = h("pre", { id: "run-log", class: "log" });
  view("Run #" + id, h("p", {}, "State: ", stateEl, " ", bar), figures, h("h2", {}, "Log"), log);
  function show(r) {
    stateEl.replaceChildren(badge(r.state));
    const p = r.progress;
    if (p && p.total) { bar.max = p.total; bar.value = p.done; bar.title = `${bytes(p.done)} of ${bytes(p.total)}`; }
    if (["succeeded", "failed", "interrupted"].includes(r.state)) { bar.max = 1; bar.value = r.state === "succeeded" ? 1 : 0; }
    const f = runFigures(r);
    figures.textContent = `job ${r.job}, started ${when(r.started)}, ${seconds(duration(r))}, read ${bytes(f.read)}, stored ${bytes(f.stored)}` + (r.error ? " — " + r.error : "");
    if (r.log) log.textContent = r.log.map((l) => `${l.ts} ${l.level} ${l.msg}`).join("\n");
  }
  show(await api("GET", "/runs/" + id));
  const es = new EventSource(`${API}/runs/${id}/events`);
  state.streams.push(es);
  es.addEventListener("run", (ev) => show(JSON.parse(ev.data)));
  es.addEventListener("end", async () => {
    es.close();
    try { show(await api("GET", "/runs/" + id)); } catch (err) { failed(err); }
  });
}

// ------------------------------------------------------------------------------------------ router
async function route() {
  stopStreams();
  if (!state.me) {
    try { state.me = await api("GET", "/console/session"); } catch (err) { if (err.status !== 401) failed(err); return; }
  }
  const top = document.getElementById("top");
  top.hidden = false;
  document.getElementById("who").textContent = `${state.me.name} (${state.me.role})`;
  document.body.classList.toggle("read-only", !isAdmin());
  const [path, query] = (location.hash.slice(1) || "/dashboard").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("current", a.dataset.nav === parts[0]);
  try {
    switch (parts[0]) {
      case "vms": return parts[1] ? await showVm(parts[1]) : await showVms();
      case "files": return await showFiles(parts[1], parts[2], params);
      case "find": return await showFind(parts[1], params);
      case "history": return await showHistory(parts[1], params);
      case "sessions": return await showSessions(params);
      case "jobs": return await showJobs(parts[1]);
      case "job-edit": return await showJobForm(parts[1]);
      case "runs": return await showRun(Number(parts[1]));
      default: return await showDashboard();
    }
  } catch (err) {
    if (err.status !== 401) { view("Error", h("p", { class: "error", id: "page-error" }, err.message), err.hint ? h("p", {}, err.hint) : null); }
  }
}

window.addEventListener("hashchange", () => { if (!location.hash.startsWith("#/sign-in")) route(); });
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", signOut);
  route();
});
