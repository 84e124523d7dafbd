"""The dashboard's pages: small HTML shells whose inline script polls the JSON
API (once a second, and not while the tab is hidden) and updates rows in place,
keyed by run, worker or server, so a page left open for hours holds only what it
shows.  Text goes in with ``textContent``, never as HTML.  The element ids and
classes are a contract (README, "Watching runs"; the browser tests use them)."""

from __future__ import annotations

import json

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
nav{background:#333;padding:.5em 1em}nav a{color:#eee;margin-right:1.5em;text-decoration:none}
nav a.here{color:#fff;font-weight:bold}main{padding:1em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd}
td.num,th.num{text-align:right}progress{width:12em;vertical-align:middle}
.state.complete,.state.up{color:#161}.state.failed,.state.lost,.state.cancelled,.state.aside{color:#a11}.state.stalled{color:#b60}
#status{color:#777;font-size:12px;margin-top:1em}pre.traceback{background:#f6f6f6;padding:.5em;overflow:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#666}
"""

# shared by every page: fetch JSON, poll, keep rows keyed, format numbers
COMMON_JS = r"""
const $ = (sel, root) => (root || document).querySelector(sel);
function status(text) { $('#status').textContent = text; }
async function getJSON(path) {
  const r = await fetch(ROOT + path, {credentials: 'same-origin', cache: 'no-store'});
  if (r.status === 404) return null;
  if (!r.ok) throw new Error(r.status + ' ' + ((await r.json().catch(() => ({}))).error || r.statusText));
  return r.json();
}
function every(ms, fn) {
  let timer = null;
  async function tick() {
    clearTimeout(timer);
    if (!document.hidden) {
      try { await fn(); status('updated ' + new Date().toLocaleTimeString()); }
      catch (e) { status('cannot update: ' + e.message); }
    }
    timer = setTimeout(tick, ms);
  }
  tick();
  return tick;
}
function syncRows(tbody, items, keyOf, make, update) {
  const old = new Map();
  for (const tr of tbody.children) old.set(tr.dataset.key, tr);
  const rows = items.map(item => {
    const key = keyOf(item);
    let tr = old.get(key);
    if (!tr) { tr = make(item); tr.dataset.key = key; }
    update(tr, item);
    return tr;
  });
  const same = rows.length === tbody.children.length && rows.every((tr, i) => tbody.children[i] === tr);
  if (!same) tbody.replaceChildren(...rows);
}
function cells(tr, names) {
  for (const name of names) { const td = document.createElement('td'); td.className = name; tr.appendChild(td); }
}
function set(root, sel, text) { const e = $(sel, root); if (e.textContent !== String(text)) e.textContent = text; }
function rate(r) { return r == null ? '' : r.toFixed(r < 10 ? 2 : 0) + '/s'; }
function duration(s) {
  if (s == null) return '';
  s = Math.round(s);
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
  return Math.floor(s / 3600) + 'h' + String(Math.floor(s % 3600 / 60)).padStart(2, '0') + 'm';
}
function clock(t) { return t ? new Date(t * 1000).toLocaleString() : ''; }
function bar(progress, run) { progress.max = Math.max(run.total, 1); progress.value = run.done; }
"""

RUNS_BODY = """
<h1>Runs</h1>
<p><input id="filter" type="search" placeholder="filter by name" autocomplete="off"></p>
<table id="runs"><thead><tr><th>name</th><th>generation</th><th>started</th><th>progress</th>
<th class="num">failed</th><th class="num">rate</th><th class="num">ETA</th><th>state</th></tr></thead>
<tbody></tbody></table>
"""

RUNS_JS = r"""
const filter = $('#filter');
filter.value = new URLSearchParams(location.search).get('name') || '';
const tbody = $('#runs tbody');
function makeRun(run) {
  const tr = document.createElement('tr');
  tr.className = 'run';
  tr.dataset.run = run.name;
  tr.innerHTML = '<td><a class="name"></a></td><td class="generation"></td><td class="started"></td>' +
    '<td><progress class="bar"></progress> <span class="progress-text"></span></td>' +
    '<td class="failed num"></td><td class="rate num"></td><td class="eta num"></td><td class="state"></td>';
  const a = $('a.name', tr);
  a.href = ROOT + '/runs/' + encodeURIComponent(run.name);
  a.textContent = run.name;
  return tr;
}
function updateRun(tr, run) {
  tr.dataset.generation = run.generation;
  set(tr, '.generation', run.generation);
  set(tr, '.started', clock(run.started_at));
  bar($('progress.bar', tr), run);
  set(tr, '.progress-text', run.progress);
  set(tr, '.failed', run.failed);
  set(tr, '.rate', rate(run.rate));
  set(tr, '.eta', run.complete ? '' : duration(run.eta));
  set(tr, '.state', run.state);
  $('.state', tr).className = 'state ' + run.state;
}
const refresh = every(1000, async () => {
  const runs = await getJSON('/api/runs?name=' + encodeURIComponent(filter.value));
  syncRows(tbody, runs || [], run => run.name + '/' + run.generation, makeRun, updateRun);
});
let typing = null;
filter.addEventListener('input', () => {
  clearTimeout(typing);
  typing = setTimeout(() => {
    const url = new URL(location.href);
    if (filter.value) url.searchParams.set('name', filter.value); else url.searchParams.delete('name');
    history.replaceState(null, '', url);
    refresh();
  }, 200);
});
"""

RUN_BODY = """
<h1>Run <span id="name"></span></h1>
<p><progress id="bar" max="1" value="0"></progress> <span id="progress-text"></span>
&nbsp; <b id="state"></b></p>
<dl><dt>generation</dt><dd id="generation"></dd><dt>started</dt><dd id="started"></dd>
<dt>done</dt><dd id="done"></dd><dt>total</dt><dd id="total"></dd><dt>failed</dt><dd id="failed"></dd>
<dt>delayed, not run yet</dt><dd id="delayed"></dd>
<dt>rate</dt><dd id="rate"></dd><dt>ETA</dt><dd id="eta"></dd><dt>value</dt><dd><code id="value"></code></dd></dl>
<p><button id="cancel" type="button">Cancel</button> <button id="forget" type="button">Forget</button>
<span id="action"></span></p>
<h2>Failures</h2>
<ul id="failures"></ul>
"""

RUN_JS = r"""
$('#name').textContent = NAME;
const api = '/api/runs/' + encodeURIComponent(NAME);
let seen = false, shownFailures = '';
function showFailures(failures) {
  const key = JSON.stringify(failures);
  if (key === shownFailures) return;
  shownFailures = key;
  $('#failures').replaceChildren(...failures.map(f => {
    const li = document.createElement('li');
    li.className = 'failure';
    li.innerHTML = '<code class="method"></code>(<code class="args"></code>): <b class="exc"></b>' +
      ' <small class="job"></small><pre class="traceback"></pre>';
    set(li, '.method', f.method);
    set(li, '.args', f.args);
    set(li, '.exc', f.exc_type + ': ' + f.message);
    set(li, '.job', f.job);
    set(li, 'pre.traceback', f.traceback || '');
    return li;
  }));
}
const refresh = every(1000, async () => {
  const run = await getJSON(api);
  if (run === null) {
    set(document, '#state', seen ? 'forgotten' : 'no such run');
    $('#cancel').disabled = $('#forget').disabled = true;
    return;
  }
  seen = true;
  bar($('#bar'), run);
  set(document, '#progress-text', run.progress);
  set(document, '#state', run.state);
  $('#state').className = 'state ' + run.state;
  for (const k of ['generation', 'done', 'total', 'failed', 'delayed']) set(document, '#' + k, run[k]);
  set(document, '#started', clock(run.started_at));
  set(document, '#rate', rate(run.rate));
  set(document, '#eta', run.complete ? '' : duration(run.eta));
  set(document, '#value', run.value == null ? '' : run.value);
  $('#cancel').disabled = run.complete || run.state === 'cancelled';
  $('#forget').disabled = false;
  showFailures(run.failures);
});
async function act(action) {
  const r = await fetch(ROOT + api + '/' + action,
                        {method: 'POST', credentials: 'same-origin', headers: {'X-PackMule': '1'}});
  const answer = await r.json().catch(() => ({}));
  $('#action').textContent = r.ok ? action + ' done' : action + ' refused: ' + (answer.error || r.status);
  await refresh();
}
$('#cancel').addEventListener('click', () => act('cancel'));
$('#forget').addEventListener('click', () => act('forget'));
"""

WORKERS_BODY = """
<h1>Workers</h1>
<table id="workers"><thead><tr><th>host</th><th class="num">pid</th><th>backend</th>
<th class="num">concurrency</th><th class="num">jobs run</th><th>running now</th><th class="num">memory</th>
<th>started</th><th>last seen</th></tr></thead><tbody></tbody></table>
"""

WORKERS_JS = r"""
const tbody = $('#workers tbody');
function makeWorker(w) {
  const tr = document.createElement('tr');
  tr.className = 'worker';
  tr.dataset.id = w.id;
  cells(tr, ['host', 'pid num', 'backend', 'concurrency num', 'jobs-run num', 'running', 'rss num', 'started',
             'last-seen']);
  return tr;
}
function updateWorker(tr, w) {
  set(tr, '.host', w.host);
  set(tr, '.pid', w.pid);
  set(tr, '.backend', w.backend);
  set(tr, '.concurrency', w.concurrency);
  set(tr, '.jobs-run', w.jobs_run);
  set(tr, '.running', w.running.length ? w.running.length + ': ' + w.running.join(', ') : '0');
  set(tr, '.rss', (w.rss / 1048576).toFixed(1) + ' MiB');
  set(tr, '.started', clock(w.started_at));
  set(tr, '.last-seen', duration(Math.max(0, Date.now() / 1000 - w.last_seen)) + ' ago');
}
every(1000, async () => {
  syncRows(tbody, (await getJSON('/api/workers')) || [], w => w.id, makeWorker, updateWorker);
});
"""

QUEUE_BODY = """
<h1>Queue</h1>
<table id="queue"><thead><tr><th>server</th><th class="num">ready</th><th class="num">running</th>
<th class="num">delayed</th><th class="num">buried</th><th class="num">workers</th></tr></thead>
<tbody></tbody></table>
<h2>Servers</h2>
<table id="servers"><thead><tr><th>service</th><th>server</th><th>state</th><th>set aside since</th>
<th>back since</th><th>role</th><th>problem</th></tr></thead><tbody></tbody></table>
"""

QUEUE_JS = r"""
const tbody = $('#queue tbody');
function makeServer(s) {
  const tr = document.createElement('tr');
  tr.className = 'server';
  tr.dataset.server = s.server;
  cells(tr, ['name', 'ready num', 'reserved num', 'delayed num', 'buried num', 'workers num']);
  $('.name', tr).textContent = s.server;
  return tr;
}
function updateServer(tr, s) {
  for (const k of ['ready', 'reserved', 'delayed', 'buried', 'workers']) set(tr, '.' + k, s[k]);
}
const states = $('#servers tbody');
function makeState(s) {
  const tr = document.createElement('tr');
  tr.className = 'server-state';
  tr.dataset.service = s.service;
  tr.dataset.server = s.server;
  cells(tr, ['service', 'name', 'state', 'since', 'back', 'role', 'problem']);
  $('.service', tr).textContent = s.service;
  $('.name', tr).textContent = s.server;
  return tr;
}
function ago(t) { return t == null ? '' : clock(t) + ' (' + duration(Math.max(0, Date.now() / 1000 - t)) + ' ago)'; }
function updateState(tr, s) {
  tr.dataset.state = s.state;
  set(tr, '.state', s.state);
  $('.state', tr).className = 'state ' + s.state;
  set(tr, '.since', s.state === 'up' ? '' : ago(s.since));
  set(tr, '.back', ago(s.back));
  set(tr, '.role', s.role);
  set(tr, '.problem', s.problem);
}
every(1000, async () => {
  // (each table is updated from what its own request answered: a queue no server answers
  // for must not keep the servers table, which says why, from updating)
  const [queue, servers] = await Promise.allSettled([getJSON('/api/queue'), getJSON('/api/servers')]);
  if (queue.status === 'fulfilled') {
    const byServer = queue.value || {};
    const rows = Object.keys(byServer).sort().map(server => Object.assign({server}, byServer[server]));
    syncRows(tbody, rows, s => s.server, makeServer, updateServer);
  }
  if (servers.status === 'fulfilled') {
    syncRows(states, servers.value || [], s => s.service + ' ' + s.server, makeState, updateState);
  }
  const failed = [queue, servers].find(answer => answer.status === 'rejected');
  if (failed) throw failed.reason;
});
"""

SCHEDULES_BODY = """
<h1>Schedules</h1>
<table id="schedules"><thead><tr><th>schedule</th><th>when</th><th>misfire</th><th>next fire</th>
<th>last tick</th><th>its run</th><th class="num">fired</th><th class="num">skipped</th><th class="num">late</th>
</tr></thead><tbody></tbody></table>
"""

SCHEDULES_JS = r"""
const tbody = $('#schedules tbody');
function makeSchedule(s) {
  const tr = document.createElement('tr');
  tr.className = 'schedule';
  tr.dataset.key = s.key;
  cells(tr, ['name', 'kind', 'misfire', 'next', 'last', 'run', 'fired num', 'skipped num', 'late num']);
  $('.name', tr).textContent = s.key;
  return tr;
}
function updateSchedule(tr, s) {
  for (const k of ['kind', 'misfire', 'next', 'fired', 'skipped', 'late']) set(tr, '.' + k, s[k]);
  set(tr, '.last', s.last_tick || '');
  const run = $('.run', tr);
  if (s.last_run && run.dataset.name !== s.last_run + s.state) {
    run.dataset.name = s.last_run + s.state;
    run.textContent = '';
    const a = document.createElement('a');
    a.href = ROOT + '/runs/' + encodeURIComponent(s.last_run);
    a.textContent = s.last_run;
    run.append(a, ' ' + s.state);
  } else if (!s.last_run) {
    set(tr, '.run', s.state);
  }
}
every(1000, async () => {
  syncRows(tbody, (await getJSON('/api/schedules')) || [], s => s.key, makeSchedule, updateSchedule);
});
"""

PAGES = {"runs": ("Runs", RUNS_BODY, RUNS_JS), "run": ("Run", RUN_BODY, RUN_JS),
         "workers": ("Workers", WORKERS_BODY, WORKERS_JS), "queue": ("Queue", QUEUE_BODY, QUEUE_JS),
         "schedules": ("Schedules", SCHEDULES_BODY, SCHEDULES_JS)}


def _js_string(value: str) -> str:
    """``value`` as a JavaScript string literal that is safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def render(page: str, root: str, name: str = "") -> str:
    """The HTML of ``page`` ('runs', 'run', 'workers', 'queue') mounted at ``root``."""
    title, body, script = PAGES[page]
    links = [("runs", "/", "Runs"), ("workers", "/workers", "Workers"), ("queue", "/queue", "Queue"),
             ("schedules", "/schedules", "Schedules")]
    nav = "".join(f'<a href="{_attr(root + path)}"{" class=here" if key == page else ""}>{label}</a>'
                  for key, path, label in links)
    heading = f"{title} {name}".strip()
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_attr(heading)} - packmule'
            f'</title><meta name="viewport" content="width=device-width"><style>{STYLE}</style></head>'
            f'<body><nav><b style="color:#fc6;margin-right:1.5em">packmule</b>{nav}</nav><main>{body}'
            f'<div id="status"></div></main><script>\n"use strict";\nconst ROOT = {_js_string(root)};\n'
            f'const NAME = {_js_string(name)};\n{COMMON_JS}{script}</script></body></html>')
