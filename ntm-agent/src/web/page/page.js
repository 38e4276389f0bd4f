// ntm's live page: polls the agent's JSON API (`api/v1/...`, relative, so
// that the page works behind a reverse proxy's sub-path) once per refresh
// (a drain, at least a second) and draws what it gets.
//
// Host names come from the network (DNS answers, DHCP host names): they
// only ever reach the page as text (`textContent`, attributes set one by
// one, SVG built with createElementNS), never as markup, and the page's
// Content-Security-Policy forbids inline script besides.
'use strict';

const UNITS = ['B', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB'];

// Bytes in the decimal units people read (1 kB = 1000 B): three figures.
function formatBytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) return '–';
  let i = 0;
  while (n >= 1000 && i < UNITS.length - 1) {
    n /= 1000;
    i += 1;
  }
  if (i === 0) return Math.round(n) + ' B';
  let text = n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0);
  if (Number(text) >= 1000 && i < UNITS.length - 1) {
    n /= 1000;
    i += 1;
    text = n.toFixed(2);
  }
  return text + ' ' + UNITS[i];
}

function formatRate(bytesPerSecond) {
  return formatBytes(bytesPerSecond) + '/s';
}

function formatSeconds(s) {
  return s >= 60 && s % 60 === 0 ? s / 60 + ' min' : s + ' s';
}

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (className) e.className = className;
  return e;
}

// A cell with a byte figure: readable text, the exact count in its title
// (and in data-bytes, for scripts and tests).
function bytesCell(counted, rate) {
  const td = element('td', undefined, 'num');
  if (!counted) {
    td.textContent = '–';
    return td;
  }
  if (rate) {
    td.textContent = formatRate(counted.rate);
    td.dataset.rate = String(counted.rate);
  } else {
    td.textContent = formatBytes(counted.bytes);
    td.dataset.bytes = String(counted.bytes);
    td.title = counted.bytes.toLocaleString('en') + ' bytes, ' +
      counted.packets.toLocaleString('en') + ' packets';
  }
  return td;
}

function period(periods, name, way) {
  return periods && periods[name] ? periods[name][way] : undefined;
}

// A device's or an interface's figures, each of its two ways (`download`
// and `upload`, or `ingress` and `egress`): now, today, in the billing period,
// since the agent started.
function figureCells(row, first, second) {
  const cells = [bytesCell(row[first], true), bytesCell(row[second], true)];
  for (const name of ['day', 'month']) {
    cells.push(bytesCell(period(row.periods, name, first)), bytesCell(period(row.periods, name, second)));
  }
  cells.push(bytesCell(row[first]), bytesCell(row[second]));
  return cells;
}

// --- state -----------------------------------------------------------

const state = {
  device: null,
  refreshSeconds: 1,
  rateWindow: 10,
  throughput: [], // {t, down, up}: the last minutes, kept by the page
  lastGood: null,
  timer: null,
  historyLoaded: 0,
  generation: 0,
  deviceSteps: null, // the selected device's last history, for redrawing
  agentClockOffset: 0, // ms the agent's clock is ahead of this browser's
};
const THROUGHPUT_POINTS = 300;

function selectedFromHash() {
  const match = /^#device=(.*)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]) || null;
  } catch (_) {
    return null;
  }
}

function select(device) {
  state.device = device;
  state.historyLoaded = 0;
  state.deviceSteps = null;
  $('device-chart').replaceChildren();
  const hash = device ? '#device=' + encodeURIComponent(device) : '';
  if (location.hash !== hash) {
    history.replaceState(null, '', hash || location.pathname + location.search);
  }
  refreshNow();
}

// --- fetching --------------------------------------------------------

// The agent answered, but not with the document (a 4xx or 5xx).
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// No answer at all: the agent is down, the network is, or it took longer
// than the page waits.
class NoAnswer extends Error {}

// How long a request may take before the page gives up on it and asks
// again at the next refresh: without a bound, one request lost on the way
// would stop the page's refreshes for good.
function timeoutMs() {
  return Math.max(5, 5 * state.refreshSeconds) * 1000;
}

async function getJson(path) {
  let response;
  try {
    response = await fetch(path, {
      cache: 'no-store',
      credentials: 'same-origin',
      headers: { Accept: 'application/json' },
      signal: AbortSignal.timeout(timeoutMs()),
    });
  } catch (e) {
    throw new NoAnswer(e.message);
  }
  let doc = null;
  try {
    doc = await response.json();
  } catch (_) {
    // Not JSON: reported below by its status.
  }
  if (!response.ok) {
    throw new ApiError(response.status, (doc && doc.error) || response.statusText);
  }
  return doc;
}

function deviceQuery(limit) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (state.device) query.set('device', state.device);
  return query.toString();
}

async function refresh() {
  state.timer = null;
  if (document.hidden) return; // asked again when shown (visibilitychange)
  // A refresh started later (a device picked meanwhile) wins: an older
  // answer is not drawn over it.
  state.generation += 1;
  const generation = state.generation;
  try {
    const [status, devices, servers, services, interfaces, connections] = await Promise.all([
      getJson('api/v1/status'),
      getJson('api/v1/devices?limit=100'),
      getJson('api/v1/servers?' + deviceQuery(10)),
      getJson('api/v1/services?' + deviceQuery(10)),
      getJson('api/v1/interfaces'),
      getJson('api/v1/connections?limit=10'),
    ]);
    if (generation !== state.generation) return;
    state.refreshSeconds = status.refresh_seconds || 1;
    state.agentClockOffset = (status.now || 0) * 1000 - Date.now();
    state.rateWindow = status.rate_window_seconds || 10;
    showStatus(status);
    showThroughput(status);
    showDevices(devices);
    showTop('servers', servers.servers);
    showTop('services', services.services);
    showInterfaces(interfaces);
    showConnections(connections);
    showDevice(devices);
    state.lastGood = new Date();
    $('offline').hidden = true;
    $('problem').hidden = true;
    $('updated').textContent = 'updated ' + state.lastGood.toLocaleTimeString();
    document.body.dataset.updated = String(state.lastGood.getTime());
    if (state.device && Date.now() - state.historyLoaded > 60000) {
      state.historyLoaded = Date.now();
      loadDeviceHistory(state.device);
    }
  } catch (e) {
    if (generation !== state.generation) return;
    if (e instanceof ApiError && e.status === 404 && state.device) {
      // The selected device is gone (expired, or a stale link).
      select(null);
      return;
    }
    if (e instanceof NoAnswer) {
      showOffline();
    } else if (e instanceof ApiError) {
      // 429 (asked too often), 503 (the history cannot be read), ...
      showProblem('The agent answered ' + e.status + ': ' + e.message + '.');
    } else {
      // A fault of the page itself: in the console too, where a developer
      // (and the page test) looks.
      console.error(e);
      showProblem('The page failed to show the figures: ' + e.message + '.');
    }
  }
  schedule();
}

function schedule() {
  if (state.timer === null) {
    state.timer = setTimeout(refresh, Math.max(1, state.refreshSeconds) * 1000);
  }
}

function refreshNow() {
  if (state.timer !== null) {
    clearTimeout(state.timer);
    state.timer = null;
  }
  refresh();
}

function showProblem(text) {
  $('offline').hidden = true;
  $('problem').hidden = false;
  $('problem').textContent = text;
  const badge = $('health');
  badge.textContent = 'not up to date';
  badge.className = 'badge bad';
}

function showOffline() {
  $('problem').hidden = true;
  $('offline').hidden = false;
  $('offline-since').textContent = state.lastGood ? state.lastGood.toLocaleTimeString() : 'never';
  const badge = $('health');
  badge.textContent = 'no answer';
  badge.className = 'badge bad';
}

// --- sections --------------------------------------------------------

function showStatus(status) {
  const badge = $('health');
  const attached = status.interfaces.filter((i) => i.attached).length;
  badge.textContent = status.healthy ? 'counting' : 'not counting on every interface';
  badge.className = 'badge ' + (status.healthy ? 'ok' : 'bad');
  $('status-attached').textContent = attached + ' of ' + status.interfaces.length + ': ' +
    status.interfaces.map((i) => i.name + (i.attached ? '' : ' (not attached)')).join(', ');
  $('status-series').textContent = status.series.toLocaleString('en') + ' of ' +
    status.max_series.toLocaleString('en');
  $('status-folded').textContent = status.series_folded.toLocaleString('en') + ' label sets';
  const overflow = status.overflow;
  $('status-overflow').textContent = overflow.packets === 0 ? 'none' :
    overflow.packets.toLocaleString('en') + ' frames, ' + formatBytes(overflow.bytes) +
    ' (the flow table holds ' + status.flow_table_capacity.toLocaleString('en') + ' flows)';
  $('status-overflow').className = overflow.packets === 0 ? '' : 'bad-text';
  $('status-history').textContent = status.history_persistent ? 'on disk' :
    'in memory only: it will not survive a restart (see the log)';
  $('status-history').className = status.history_persistent ? '' : 'bad-text';
  $('status-started').textContent = new Date(status.started * 1000).toLocaleString();
  $('status-local').textContent = describeLocalNetworks(status);
  $('rate-window').textContent = formatSeconds(status.rate_window_seconds);
}

// The local networks and where each came from, in a line.
function describeLocalNetworks(status) {
  const nets = status.local_networks || [];
  const own = nets.filter((n) => n.origin !== 'private')
    .map((n) => n.network + (n.interface ? ' on ' + n.interface : ''));
  if (!status.local_networks_learnt) return own.join(', ') + ' (--local-net)';
  const text = own.length > 0 ? own.join(', ') : 'no address on the monitored interfaces yet';
  return text + ', and the private ranges (learnt from this host\'s addresses)';
}

function showThroughput(status) {
  const all = status.traffic;
  $('now-down').textContent = formatRate(all.download.rate);
  $('now-up').textContent = formatRate(all.upload.rate);
  const points = state.throughput;
  points.push({ t: Date.now(), down: all.download.rate, up: all.upload.rate });
  while (points.length > THROUGHPUT_POINTS) points.shift();
  const span = (points[points.length - 1].t - points[0].t) / 1000;
  $('now-chart-span').textContent = 'last ' + formatSeconds(Math.round(span)) + ' (since this page opened)';
  drawThroughput();
}

function drawThroughput() {
  drawLines($('now-chart'), state.throughput.map((p) => [p.down, p.up, p.t]));
}

// A table's rows, one per named item, in the items' order. A row whose
// item stays is updated in place, not rebuilt: its button keeps the
// keyboard focus, and a click never lands on a row being replaced.
// `cells(item, tr)` gives the row's cells; it may hand back cells the row
// already has.
function updateRows(body, items, cells) {
  const old = new Map();
  for (const tr of body.rows) old.set(tr.dataset.name, tr);
  items.forEach((item, i) => {
    let tr = old.get(item.name);
    old.delete(item.name);
    if (!tr) {
      tr = document.createElement('tr');
      tr.dataset.name = item.name;
    }
    const wanted = cells(item, tr);
    for (const td of Array.from(tr.cells)) {
      if (!wanted.includes(td)) td.remove();
    }
    wanted.forEach((td, j) => {
      if (tr.cells[j] !== td) tr.insertBefore(td, tr.cells[j] || null);
    });
    if (body.rows[i] !== tr) body.insertBefore(tr, body.rows[i] || null);
  });
  for (const gone of old.values()) gone.remove();
}

function showDevices(doc) {
  updateRows(document.querySelector('#devices tbody'), doc.devices, (device, tr) => {
    tr.className = (device.name === state.device ? 'selected' : '') + (device.groups ? ' groups' : '');
    let name = tr.cells[0];
    if (!name) {
      name = element('td');
      const button = element('button', device.name, 'link');
      button.type = 'button';
      button.addEventListener('click', () => select(device.name === state.device ? null : device.name));
      name.append(button, element('span', undefined, 'sub muted'));
    }
    const addresses = name.querySelector('span');
    addresses.textContent = device.addresses.join(', ');
    addresses.hidden = device.addresses.length === 0;
    return [name, ...figureCells(device, 'download', 'upload')];
  });
  $('devices-empty').hidden = doc.devices.length > 0;
}

function showTop(table, rows) {
  updateRows(document.querySelector('#' + table + ' tbody'), rows, (row) => [
    element('td', row.name === '' ? '(none)' : row.name),
    bytesCell(row.download, true),
    bytesCell(row.upload, true),
    bytesCell(row.download),
    bytesCell(row.upload),
  ]);
  for (const scope of document.querySelectorAll('.scope')) {
    scope.textContent = state.device ? 'of ' + state.device : 'of all devices';
  }
  // The multicast and broadcast row's "servers" are the groups it went to.
  $('servers-word').textContent = state.device === GROUPS ? 'Groups' : 'Top servers';
}

// A handshake's time: milliseconds, to two significant digits below 10 ms.
function formatLatency(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const ms = seconds * 1000;
  return (ms < 10 ? ms.toFixed(1) : Math.round(ms).toLocaleString('en')) + ' ms';
}

function showConnections(doc) {
  const cells = (row) => [
    element('td', row.name === '' ? '(none)' : row.name),
    element('td', row.handshakes.toLocaleString('en'), 'num'),
    element('td', formatLatency(row.median_seconds), 'num'),
    element('td', formatLatency(row.p90_seconds), 'num'),
    element('td', row.failed.refused.toLocaleString('en'), 'num'),
    element('td', row.failed.unanswered.toLocaleString('en'), 'num'),
    element('td', row.failed.reset.toLocaleString('en'), 'num'),
    element('td', row.failed.unreachable.toLocaleString('en'), 'num'),
  ];
  updateRows(document.querySelector('#connection-devices tbody'), doc.devices, cells);
  updateRows(document.querySelector('#connection-servers tbody'), doc.servers, cells);
  $('connections-window').textContent = formatSeconds(doc.window_seconds);
  $('connections-empty').hidden = doc.devices.length + doc.servers.length > 0;
}

function showInterfaces(doc) {
  updateRows(document.querySelector('#interfaces tbody'), doc.interfaces, (iface) => {
    const counting = iface.attached === true ? 'yes' : iface.attached === false ? 'not attached' : '–';
    return [
      element('td', iface.name),
      element('td', counting, iface.attached === false ? 'bad-text' : ''),
      ...figureCells(iface, 'ingress', 'egress'),
    ];
  });
}

// The devices' row of the traffic to no one host (the API's `groups`).
const GROUPS = 'multicast and broadcast';

// The rungs of the naming ladder, as the API names them.
const SOURCES = {
  static: 'a hosts or ethers file',
  container: 'its container',
  kubernetes: 'its pod or node',
  this_host: 'this host\'s name',
  dhcp: 'DHCP',
  dns_answer: 'a DNS answer',
  reverse_dns: 'reverse DNS',
  address: 'its address',
};

function showDevice(devices) {
  const section = $('device-section');
  if (!state.device) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  $('device-name').textContent = state.device;
  const device = devices.devices.find((d) => d.name === state.device);
  $('device-addresses').textContent = device ?
    device.addresses.join(', ') + (device.mac ? ' · ' + device.mac : '') +
      (device.name_source ? ' · named by ' + (SOURCES[device.name_source] || device.name_source) : '') : '';
}

async function loadDeviceHistory(device) {
  try {
    // The last 24 hours of the history, this one included, by the agent's
    // clock. (The history's hours are Unix hours: the local clock's hours
    // wherever the offset from UTC is whole hours.)
    const now = Math.floor((Date.now() + state.agentClockOffset) / 1000);
    const to = now - (now % 3600) + 3600;
    const query = new URLSearchParams({
      kind: 'devices', name: device, from: String(to - 86400), to: String(to), step: '3600',
    });
    const doc = await getJson('api/v1/history?' + query.toString());
    if (device !== state.device) return;
    // Every step of the range, the empty ones too (the history leaves
    // them out).
    const steps = [];
    for (let start = doc.from; start < doc.to; start += doc.step) {
      steps.push([0, 0, start]);
    }
    for (const p of doc.points) {
      const i = Math.floor((p.start - steps[0][2]) / doc.step);
      if (i >= 0 && i < steps.length) steps[i] = [p.download.bytes, p.upload.bytes, p.start];
    }
    state.deviceSteps = steps;
    drawBars($('device-chart'), steps);
  } catch (e) {
    if (!(e instanceof NoAnswer || e instanceof ApiError)) console.error(e);
    state.deviceSteps = null;
    $('device-chart').replaceChildren();
  }
}

// --- charts (SVG drawn here: no library) -------------------------------

const SVG = 'http://www.w3.org/2000/svg';
const HEIGHT = 120;
const TOP = 14; // room for the scale's label

// The chart's width in pixels, set as its viewBox so that its text is
// never stretched.
function sized(chart) {
  const width = Math.max(100, Math.round(chart.getBoundingClientRect().width) || 600);
  chart.setAttribute('viewBox', '0 0 ' + width + ' ' + HEIGHT);
  return width;
}

function svg(tag, attributes) {
  const e = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) e.setAttribute(name, String(value));
  return e;
}

function scaleLabel(max, unit) {
  const label = svg('text', { x: 4, y: 11, class: 'scale' });
  label.textContent = unit(max);
  return label;
}

// Two lines (download, upload) over the samples ([download, upload, time
// in ms]), placed by their time: a pause (the page hidden, the agent not
// answering) shows as the stretch it was.
function drawLines(chart, samples) {
  const WIDTH = sized(chart);
  const max = Math.max(1, ...samples.map((s) => Math.max(s[0], s[1])));
  const first = samples.length > 0 ? samples[0][2] : 0;
  const span = samples.length > 1 ? samples[samples.length - 1][2] - first : 0;
  const x = (i) => (span <= 0 ? WIDTH : ((samples[i][2] - first) / span) * WIDTH);
  const y = (v) => HEIGHT - (v / max) * (HEIGHT - TOP);
  const parts = [svg('line', { x1: 0, y1: TOP, x2: WIDTH, y2: TOP, class: 'grid' })];
  for (const [way, className] of [[0, 'down'], [1, 'up']]) {
    const points = samples.map((s, i) => x(i).toFixed(1) + ',' + y(s[way]).toFixed(1)).join(' ');
    parts.push(svg('polyline', { points, class: 'line ' + className }));
  }
  parts.push(scaleLabel(max, formatRate));
  chart.replaceChildren(...parts);
}

// Paired bars (download, upload) per step, each with its exact figures as
// a tooltip.
function drawBars(chart, steps) {
  const WIDTH = sized(chart);
  const max = Math.max(1, ...steps.map((s) => Math.max(s[0], s[1])));
  const slot = WIDTH / Math.max(1, steps.length);
  const bar = Math.max(1, slot / 2 - 1);
  const parts = [svg('line', { x1: 0, y1: TOP, x2: WIDTH, y2: TOP, class: 'grid' })];
  steps.forEach(([down, up, start], i) => {
    const group = svg('g', {});
    const title = svg('title', {});
    title.textContent = new Date(start * 1000).toLocaleString() + ': ' +
      formatBytes(down) + ' down, ' + formatBytes(up) + ' up';
    group.append(title);
    for (const [value, offset, className] of [[down, 0, 'down'], [up, bar, 'up']]) {
      const h = (value / max) * (HEIGHT - TOP);
      group.append(svg('rect', {
        x: (i * slot + offset).toFixed(1),
        y: (HEIGHT - h).toFixed(1),
        width: bar.toFixed(1),
        height: h.toFixed(1),
        class: 'bar ' + className,
        'data-bytes': value,
      }));
    }
    parts.push(group);
  });
  parts.push(scaleLabel(max, formatBytes));
  chart.replaceChildren(...parts);
}

// --- start -----------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('device-clear').addEventListener('click', () => select(null));
  window.addEventListener('hashchange', () => {
    const device = selectedFromHash();
    if (device !== state.device) select(device);
  });
  // Charts are drawn at their size in pixels: again when it changes (a
  // phone turned sideways).
  window.addEventListener('resize', () => {
    drawThroughput();
    if (state.deviceSteps) drawBars($('device-chart'), state.deviceSteps);
  });
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) refreshNow();
  });
  state.device = selectedFromHash();
  refresh();
});
