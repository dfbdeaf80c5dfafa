// The Sophon console: a small single-page app over the admin API. It holds no powers of its
// own: every read and action is an admin API call with the signed-in token, and the role only
// decides which actions are offered (the API refuses the rest anyway). No external code: the
// DOM is built with `h` (never from HTML strings), and charts are drawn on a canvas.
'use strict';
(() => {
  const ROLES = ['viewer', 'publisher', 'approver', 'operator', 'admin'];
  const REFRESH_MS = 2000;
  const S = { token: sessionStorage.getItem('sophon.token') || '', me: null, timer: null };
  const main = document.getElementById('main');

  // --- helpers ---
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'value') el.value = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }
  const can = (role) => !!S.me && ROLES.indexOf(S.me.role) >= ROLES.indexOf(role);
  const fmtTime = (ms) => (ms ? new Date(ms).toLocaleString() : '-');
  const fmtNum = (x, digits = 1) => (x === null || x === undefined ? '-' : Number(x).toFixed(digits));
  const fmtUs = (us) => (us === null || us === undefined ? '-' : `${(us / 1000).toFixed(2)} ms`);
  const short = (hex) => (hex ? `${hex.slice(0, 12)}…` : '-');

  function toast(message, isError) {
    const t = document.getElementById('toast');
    t.textContent = message;
    t.className = isError ? 'error' : '';
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, isError ? 8000 : 4000);
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${S.token}` };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    let v = null;
    try { v = text ? JSON.parse(text) : null; } catch (_) { v = text; }
    if (!r.ok) {
      const e = new Error((v && v.error && v.error.message) || `HTTP ${r.status}`);
      e.status = r.status;
      throw e;
    }
    return v;
  }

  // An action button: runs `fn`, reports the outcome, then re-renders the page.
  function action(label, fn, cls) {
    return h('button', {
      class: cls || '',
      type: 'button',
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          await fn();
          toast(`${label}: done`);
          render();
        } catch (e) {
          toast(`${label}: ${e.message}`, true);
          ev.target.disabled = false;
        }
      },
    }, label);
  }

  function table(headers, rows, emptyText) {
    if (!rows.length) return h('p', { class: 'muted' }, emptyText || 'Nothing yet.');
    return h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
      h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => (c instanceof Node && c.tagName === 'TD' ? c : h('td', {}, c))))))));
  }

  function pill(text, kind) { return h('span', { class: `pill ${kind || ''}` }, text); }

  // --- charts: time series on a canvas ---
  // The leader samples every deployment every 5 s and keeps an hour (`/v1/.../series`).
  const ms = (us) => (us === null || us === undefined ? null : us / 1000);
  function seriesPoints(series) {
    return ((series && series.points) || []).map((p) => {
      const point = { t: p.t_ms, rate: p.rate, errors: p.errors, p50: ms(p.p50_us), p99: ms(p.p99_us) };
      for (const [node, rate] of Object.entries(p.nodes || {})) point[`node:${node}`] = rate;
      return point;
    });
  }
  const PALETTE = ['#2f6fde', '#1f8a4c', '#b7791f', '#8a3fd1', '#c93636', '#0f8b8d', '#6b7280'];

  function chart(title, points, lines, unit) {
    const canvas = h('canvas', { class: 'chart', 'data-points': points.length, 'aria-label': title });
    const legend = h('div', { class: 'legend' }, lines.map((l) => {
      const swatch = h('i');
      swatch.style.background = l.color;
      return h('span', {}, swatch, l.label);
    }));
    requestAnimationFrame(() => draw(canvas, points, lines, unit));
    return h('div', {}, h('h2', {}, title), canvas, legend);
  }

  function draw(canvas, points, lines, unit) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, hgt = canvas.clientHeight;
    canvas.width = w * ratio; canvas.height = hgt * ratio;
    const g = canvas.getContext('2d');
    g.scale(ratio, ratio);
    g.font = '11px system-ui, sans-serif';
    const pad = { l: 56, r: 10, t: 10, b: 22 };
    const values = [];
    for (const p of points) for (const l of lines) { const v = p[l.key]; if (v !== null && v !== undefined) values.push(v); }
    g.fillStyle = '#5b6470';
    if (points.length < 2 || !values.length) {
      g.fillText('waiting for reports…', pad.l, hgt / 2);
      return;
    }
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const max = Math.max(...values) * 1.1 || 1;
    const x = (t) => pad.l + ((t - t0) / Math.max(t1 - t0, 1)) * (w - pad.l - pad.r);
    const y = (v) => hgt - pad.b - (v / max) * (hgt - pad.t - pad.b);
    g.strokeStyle = '#d8dde3';
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
      g.fillText(`${v < 10 ? v.toFixed(2) : v.toFixed(0)} ${unit}`, 4, y(v) + 4);
    }
    g.fillText(new Date(t0).toLocaleTimeString(), pad.l, hgt - 6);
    const end = new Date(t1).toLocaleTimeString();
    g.fillText(end, w - pad.r - g.measureText(end).width, hgt - 6);
    for (const l of lines) {
      g.strokeStyle = l.color;
      g.lineWidth = 2;
      g.beginPath();
      let started = false;
      for (const p of points) {
        const v = p[l.key];
        if (v === null || v === undefined) { started = false; continue; }
        if (started) g.lineTo(x(p.t), y(v)); else { g.moveTo(x(p.t), y(v)); started = true; }
      }
      g.stroke();
    }
  }

  // --- sign-in ---
  function signin(message) {
    document.getElementById('nav').hidden = true;
    document.getElementById('who').textContent = '';
    const input = h('input', { type: 'password', id: 'token', autocomplete: 'off', placeholder: 'sph_…', required: true });
    const form = h('form', {
      class: 'signin',
      onsubmit: async (ev) => {
        ev.preventDefault();
        S.token = input.value.trim();
        try {
          S.me = await api('GET', '/v1/whoami');
          sessionStorage.setItem('sophon.token', S.token);
          render();
        } catch (e) {
          S.token = '';
          signin(`Sign-in refused: ${e.message}`);
        }
      },
    },
    h('h1', {}, 'Sign in to Sophon'),
    h('label', { for: 'token' }, 'API token'),
    input,
    h('button', { type: 'submit', id: 'signin' }, 'Sign in'),
    message ? h('p', { class: 'error', id: 'signin-error' }, message) : null,
    h('p', { class: 'muted' }, 'A token from `sophon token create` (or the admin token `coordinator init` printed). It stays in this tab only.'));
    main.replaceChildren(form);
    input.focus();
  }

  function signout() {
    S.token = ''; S.me = null;
    sessionStorage.removeItem('sophon.token');
    signin();
  }

  // --- pages ---
  async function overview() {
    const [status, members, deps] = await Promise.all([
      api('GET', '/v1/cluster/status'), api('GET', '/v1/cluster/members'), api('GET', '/v1/deployments')]);
    const [stats, series] = await Promise.all([
      Promise.all(deps.map((d) => api('GET', `/v1/deployments/${d.id}/stats`).catch(() => null))),
      api('GET', '/v1/cluster/series').catch(() => null)]);
    let rate = 0;
    for (const s of stats) if (s) rate += s.rate_per_s || 0;
    const points = seriesPoints(series);
    const up = members.nodes.filter((n) => n.health === 'up').length;
    const raft = status.raft || {};
    return [
      h('h1', {}, 'Overview'),
      h('div', { class: 'cards' },
        card('Leader', raft.leader ? `coordinator ${raft.leader}` : 'none', 'leader'),
        card('Term', raft.term),
        card('Coordinators', members.coordinators.length),
        card('Nodes up', `${up} / ${members.nodes.length}`, 'nodes-up'),
        card('Deployments', deps.length),
        card('Requests/s', fmtNum(rate), 'rate')),
      chart('Requests and errors, last hour', points,
        [{ key: 'rate', label: 'requests/s', color: '#2f6fde' }, { key: 'errors', label: 'errors/s', color: '#c93636' }], '/s'),
      h('h2', {}, 'Coordinators'),
      table(['id', 'role', 'mesh', 'admin API'], members.coordinators.map((c) => [
        c.id, c.leader ? pill('leader', 'ok') : (c.voter ? 'voter' : 'learner'), c.mesh_address, c.api_address])),
      h('h2', {}, 'Deployments'),
      deploymentsTable(deps, stats),
    ];
  }

  function card(label, value, id) {
    return h('div', { class: 'card', id: id ? `card-${id}` : null },
      h('div', { class: 'label' }, label), h('div', { class: 'value' }, value === undefined ? '-' : value));
  }

  function deploymentsTable(deps, stats) {
    return table(['id', 'model', 'environment', 'ready / wanted', 'state', 'requests/s', 'errors/s', 'p99'],
      deps.map((d, i) => {
        const s = stats ? stats[i] : null;
        const r = d.rollout || {};
        const ok = r.state === 'available';
        return [h('a', { href: `#/deployments/${d.id}` }, String(d.id)), `${d.model}@${d.version}`, d.environment,
          `${r.ready ?? 0} / ${d.replicas}`, pill(r.state || '-', ok ? 'ok' : 'warn'),
          s ? fmtNum(s.rate_per_s) : '-', s ? fmtNum(s.error_rate_per_s, 2) : '-', s ? fmtUs(s.total_us && s.total_us.p99) : '-'];
      }), 'No deployments.');
  }

  async function nodes() {
    const members = await api('GET', '/v1/cluster/members');
    return [
      h('h1', {}, 'Nodes'),
      table(['id', 'state', 'zone', 'CPU', 'memory', 'GPUs', 'backends', 'labels', 'load', 'replicas', ''],
        members.nodes.map((n) => {
          const inv = n.inventory || {};
          const load = n.load || {};
          const gpus = (inv.gpus || []).map((g) => `${g.name || 'gpu'} ${g.memory_mb ?? ''} MiB`).join(', ') || '-';
          const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ') || '-';
          const state = n.draining ? pill('draining', 'warn') : pill(n.health, n.health === 'up' ? 'ok' : 'bad');
          let act = null;
          if (can('operator')) {
            act = n.draining
              ? action('Resume', () => api('POST', `/v1/nodes/${encodeURIComponent(n.id)}/resume`), 'secondary')
              : action('Drain', () => api('POST', `/v1/nodes/${encodeURIComponent(n.id)}/drain`), 'secondary');
          }
          return [n.id, state, n.zone, `${inv.cpu_cores ?? '-'} cores`, `${inv.memory_mb ?? '-'} MiB`, gpus,
            (inv.backends || []).join(', '), labels, `${load.cpu_percent ?? 0} % CPU, ${load.inflight ?? 0} in flight`,
            (n.assigned || []).length, act];
        }), 'No node has joined.'),
    ];
  }

  async function shelf() {
    const models = await api('GET', '/v1/models');
    const rows = [];
    for (const m of models) {
      for (const v of Object.values(m.versions)) {
        const stages = Object.entries(v.stages || {}).map(([env, st]) => `${env}: ${typeof st === 'string' ? st : Object.keys(st)[0]}`);
        rows.push([m.name, v.version, h('code', { title: v.digest }, short(v.digest)), h('code', { title: v.publisher_key }, short(v.publisher_key)),
          v.created_by, v.on_shelf ? pill('on shelf', 'ok') : pill('off shelf'), v.deprecated ? pill('deprecated', 'warn') : '',
          stages.join(', ') || 'draft', (v.tags || []).join(', '), v.measured ? `${v.measured.memory_mb} MiB measured` : `${v.manifest.memory_mb} MiB (manifest)`,
          can('publisher') ? curation(m.name, v) : null]);
      }
    }
    return [
      h('h1', {}, 'Shelf'),
      can('publisher') ? uploadForm() : null,
      table(['model', 'version', 'digest', 'publisher', 'by', 'shelf', '', 'stages', 'tags', 'memory', ''], rows, 'The shelf is empty.'),
    ];
  }

  // A publisher's curation of one version: on or off the shelf, deprecate, tag.
  function curation(model, v) {
    const path = (act) => `/v1/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(v.version)}/${act}`;
    const tag = h('input', { placeholder: 'tag', size: 8, class: 'tag' });
    return h('td', {}, h('div', { class: 'actions' },
      v.on_shelf
        ? action('Take off shelf', () => api('POST', path('unshelve')), 'secondary')
        : action('Put on shelf', () => api('POST', path('shelve')), 'secondary'),
      v.deprecated ? null : action('Deprecate', () => api('POST', path('deprecate')), 'secondary'),
      tag, action('Tag', () => api('POST', path('tag'), { tag: tag.value.trim() }), 'secondary')));
  }

  function uploadForm() {
    const file = h('input', { type: 'file', id: 'bundle', accept: '.sbundle,.sophon,application/octet-stream' });
    const bar = h('progress', { id: 'upload-progress', max: 100, value: 0 });
    const note = h('span', { class: 'muted', id: 'upload-note' });
    const form = h('form', {
      class: 'inline',
      onsubmit: (ev) => {
        ev.preventDefault();
        const f = file.files[0];
        if (!f) return;
        // XMLHttpRequest, for the upload's progress events; the server verifies the bundle
        // (signature, digests, manifest) exactly as for `sophon model push`.
        const xhr = new XMLHttpRequest();
        xhr.open('POST', '/v1/bundles');
        xhr.setRequestHeader('Authorization', `Bearer ${S.token}`);
        xhr.setRequestHeader('Content-Type', 'application/octet-stream');
        xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
        xhr.onload = () => {
          let v = null;
          try { v = JSON.parse(xhr.responseText); } catch (_) { v = null; }
          if (xhr.status >= 200 && xhr.status < 300) {
            bar.value = 100;
            toast(`Pushed ${v.model}@${v.version} (${short(v.digest)})`);
            render();
          } else {
            note.textContent = (v && v.error && v.error.message) || `HTTP ${xhr.status}`;
            toast(`Upload refused: ${note.textContent}`, true);
          }
        };
        xhr.onerror = () => toast('Upload failed: the connection broke', true);
        xhr.send(f);
      },
    }, h('strong', {}, 'Upload a bundle'), file, h('button', { type: 'submit', id: 'upload' }, 'Upload'), bar, note);
    return form;
  }

  async function approvals() {
    const [list, models] = await Promise.all([api('GET', '/v1/approvals'), api('GET', '/v1/models')]);
    const mine = (r) => S.me && r.submitter === S.me.name;
    const rows = list.slice().reverse().map((r) => {
      const counted = (r.decisions || []).filter((d) => d.approve).length;
      const acts = [];
      if (r.status === 'open' && can('approver') && !mine(r)) {
        const comment = h('input', { placeholder: 'comment', class: 'comment', size: 16 });
        acts.push(comment,
          action('Approve', () => api('POST', `/v1/approvals/${r.id}/approve`, { comment: comment.value })),
          action('Reject', () => api('POST', `/v1/approvals/${r.id}/reject`, { comment: comment.value }), 'danger'));
      }
      if (r.status === 'open' && mine(r)) {
        acts.push(action('Withdraw', () => api('POST', `/v1/approvals/${r.id}/withdraw`), 'secondary'));
      }
      const kind = { approved: 'ok', rejected: 'bad', open: 'warn' }[r.status] || '';
      return [r.id, `${r.model}@${r.version}`, r.environment, r.submitter, pill(r.status, kind),
        `${counted} / ${r.required_approvals}`,
        h('td', { class: 'wrap' }, (r.decisions || []).map((d) => `${d.approver}: ${d.approve ? 'approved' : 'rejected'}${d.comment ? ` (${d.comment})` : ''}`).join('; ') || '-'),
        h('td', {}, h('div', { class: 'actions' }, acts))];
    });
    return [
      h('h1', {}, 'Approvals'),
      can('publisher') ? requestForm(models) : null,
      h('p', { class: 'muted' }, can('approver')
        ? 'Requests you submitted are not offered for your approval; the server refuses self-approval anyway.'
        : 'You can follow requests here; deciding needs an approver token.'),
      table(['id', 'version', 'environment', 'submitter', 'status', 'approvals', 'decisions', ''], rows, 'No approval requests.'),
    ];
  }

  function versionPicker(models) {
    const options = [];
    for (const m of models) for (const v of Object.keys(m.versions)) options.push(h('option', { value: `${m.name}@${v}` }, `${m.name}@${v}`));
    return h('select', { class: 'version' }, options);
  }

  function requestForm(models) {
    return versionForm(models, {
      title: 'Request approval', label: 'Request', button: 'request-approval', environment: 'production', refused: 'Request refused',
      send: async (body) => {
        const out = await api('POST', '/v1/approvals', body);
        return `Approval request ${out.created ? out.created.approval_request : ''} opened`;
      },
    });
  }

  // A form that picks a version from the shelf and an environment and sends them (`send` answers
  // the toast's text); `extra` are more fields, placed before the button.
  function versionForm(models, { title, label, button, environment, refused, extra = [], send }) {
    const pick = versionPicker(models);
    const env = h('input', { placeholder: 'environment', value: environment, size: 12, class: 'environment' });
    return h('form', {
      class: 'inline',
      onsubmit: async (ev) => {
        ev.preventDefault();
        const [model, version] = pick.value.split('@');
        try {
          toast(await send({ model, version, environment: env.value.trim() }));
          render();
        } catch (e) { toast(`${refused}: ${e.message}`, true); }
      },
    }, h('strong', {}, title), pick, env, ...extra, h('button', { type: 'submit', id: button }, label));
  }

  async function deployments() {
    const [deps, models] = await Promise.all([api('GET', '/v1/deployments'), api('GET', '/v1/models')]);
    const stats = await Promise.all(deps.map((d) => api('GET', `/v1/deployments/${d.id}/stats`).catch(() => null)));
    const out = [h('h1', {}, 'Deployments')];
    if (can('operator')) out.push(createForm(models));
    out.push(deploymentsTable(deps, stats));
    if (can('operator') && deps.length) {
      out.push(h('h2', {}, 'Scale or delete'));
      out.push(table(['id', 'model', 'replicas', ''], deps.map((d) => {
        const n = h('input', { type: 'number', min: 0, max: 1000, value: d.replicas, class: 'replicas' });
        return [d.id, `${d.model}@${d.version}`, h('td', {}, n),
          h('td', {}, h('div', { class: 'actions' },
            d.autoscale ? h('span', { class: 'muted' }, 'autoscaled') : action('Scale', () => api('POST', `/v1/deployments/${d.id}/scale`, { replicas: Number(n.value) }), 'secondary'),
            action('Delete', async () => {
              if (!confirm(`Delete deployment ${d.id} (${d.model}@${d.version})?`)) throw new Error('cancelled');
              await api('DELETE', `/v1/deployments/${d.id}`);
            }, 'danger')))];
      })));
    }
    return out;
  }

  function createForm(models) {
    const replicas = h('input', { type: 'number', min: 1, max: 1000, value: 1, class: 'replicas' });
    const hot = h('input', { type: 'checkbox', id: 'hot' });
    return versionForm(models, {
      title: 'Deploy', label: 'Deploy', button: 'deploy', environment: 'staging', refused: 'Deploy refused',
      extra: [replicas, h('label', {}, hot, ' hot')],
      send: async (body) => {
        const out = await api('POST', '/v1/deployments', { ...body, replicas: Number(replicas.value), hot: hot.checked });
        return `Deployment ${out.created ? out.created.deployment : ''} created`;
      },
    });
  }

  async function deployment(id) {
    const [shown, s, series] = await Promise.all([api('GET', `/v1/deployments/${id}`),
      api('GET', `/v1/deployments/${id}/stats`).catch(() => null),
      api('GET', `/v1/deployments/${id}/series`).catch(() => null)]);
    const d = shown.deployment;
    const placements = (shown.placements || []).map((p) => [p.replica, p.revision, p.node,
      pill(p.phase || (p.ready ? 'ready' : 'pending'), p.ready ? 'ok' : (p.phase === 'failed' ? 'bad' : 'warn')),
      h('td', { class: 'wrap' }, p.reason || '')]);
    const tot = (s && s.total_us) || {};
    const points = seriesPoints(series);
    const nodeNames = [...new Set(points.flatMap((p) => Object.keys(p).filter((k) => k.startsWith('node:'))))].sort();
    const perNode = nodeNames.map((k, i) => ({ key: k, label: k.slice(5), color: PALETTE[i % PALETTE.length] }));
    const r = d.rollout || {};
    const nodesRows = ((s && s.nodes) || []).map((n) => [n.node, fmtNum(n.rate_per_s), fmtNum(n.error_rate_per_s, 2),
      fmtUs(n.total_us && n.total_us.p50), fmtUs(n.total_us && n.total_us.p99), fmtUs(n.queue_us && n.queue_us.p99), fmtUs(n.compute_us && n.compute_us.p99)]);
    const revisions = ((s && s.revisions) || []).map((v) => [v.revision, v.version, v.weight === null || v.weight === undefined ? '-' : `${v.weight} %`,
      v.mirror ? 'mirror' : '', v.ready, fmtNum(v.rate_per_s), fmtUs(v.total_us && v.total_us.p99)]);
    const canary = d.update && d.update.canary;
    const models = can('operator') ? await api('GET', `/v1/models/${encodeURIComponent(d.model)}`).catch(() => null) : null;
    return [
      h('h1', { id: 'deployment-title' }, `Deployment ${d.id}: ${d.model}@${d.version} in ${d.environment}`),
      h('div', { class: 'cards' },
        card('Ready / wanted', `${r.ready ?? 0} / ${d.replicas}`, 'ready'),
        card('State', r.state),
        card('Requests/s', s ? fmtNum(s.rate_per_s) : '-', 'deployment-rate'),
        card('p99', s ? fmtUs(tot.p99) : '-'),
        card('Placement', d.hot ? 'hot' : 'cold'),
        card('Autoscale', d.autoscale ? `${d.autoscale.min_replicas}..${d.autoscale.max_replicas}` : 'off')),
      canary ? h('p', {}, pill('canary', 'warn'), ` revision ${d.update.revision} (${d.update.version}) at step ${canary.step + 1} of ${canary.spec.steps.length}`) : null,
      d.update && !canary ? h('p', {}, pill('rolling update', 'warn'), ` to revision ${d.update.revision} (${d.update.version})`) : null,
      can('operator') ? rollout(d, models) : null,
      h('div', { class: 'grid2' },
        chart('Requests and errors', points, [{ key: 'rate', label: 'requests/s', color: '#2f6fde' }, { key: 'errors', label: 'errors/s', color: '#c93636' }], '/s'),
        chart('Latency', points, [{ key: 'p50', label: 'p50', color: '#1f8a4c' }, { key: 'p99', label: 'p99', color: '#b7791f' }], 'ms')),
      chart('Requests per replica (node)', points, perNode, '/s'),
      h('h2', {}, 'Replicas'),
      table(['replica', 'revision', 'node', 'phase', 'reason'], placements, 'No replica is placed.'),
      h('h2', {}, 'Performance per node'),
      table(['node', 'requests/s', 'errors/s', 'p50', 'p99', 'queue p99', 'compute p99'], nodesRows, 'No reports yet.'),
      h('h2', {}, 'Revisions serving'),
      table(['revision', 'version', 'weight', '', 'ready', 'requests/s', 'p99'], revisions, 'None.'),
      h('h2', {}, 'History'),
      table(['revision', 'version', 'cause', 'by', 'at', 'status', 'reason'], (d.history || []).slice().reverse().map((x) => [
        x.revision, x.version, x.cause, x.created_by, fmtTime(x.created_at_ms), x.status, h('td', { class: 'wrap' }, x.reason || '')])),
    ];
  }

  // An operator's rollout controls: a rolling update or a canary to another version, and
  // promote or roll back what is running. The API applies the approval rules.
  function rollout(d, model) {
    const versions = Object.keys((model && model.versions) || {}).filter((v) => v !== d.version);
    const pick = h('select', { class: 'rollout-version' }, versions.map((v) => h('option', { value: v }, v)));
    const steps = h('input', { value: '10,50,100', size: 10, class: 'steps', title: 'canary steps, % of traffic' });
    const path = (a) => `/v1/deployments/${d.id}/${a}`;
    return h('div', { class: 'actions' },
      d.update ? null : [h('strong', {}, 'Roll out'), pick,
        action('Rolling update', () => api('POST', path('update'), { version: pick.value }), 'secondary'),
        steps,
        action('Canary', () => api('POST', path('canary'), {
          version: pick.value, steps: steps.value.split(',').map((x) => Number(x.trim())).filter((x) => x > 0),
        }), 'secondary')],
      d.update && d.update.canary ? action('Promote', () => api('POST', path('promote'))) : null,
      action(d.update ? 'Abandon (roll back)' : 'Roll back', () => api('POST', path('rollback')), 'danger'));
  }

  async function audit() {
    const head = await api('GET', '/v1/audit?from=0&limit=1');
    const from = Math.max(0, head.total - 500);
    const page = await api('GET', `/v1/audit?from=${from}&limit=500`);
    const filter = h('input', { id: 'audit-filter', placeholder: 'filter: actor, action, target or detail', size: 40 });
    const body = h('div');
    const show = () => {
      const q = filter.value.trim().toLowerCase();
      const rows = page.records.slice().reverse()
        .filter((r) => !q || [r.actor, r.action, r.target, r.detail, r.role].join(' ').toLowerCase().includes(q))
        .map((r) => [r.seq, fmtTime(r.at_ms), r.actor, r.role, r.action, h('td', { class: 'wrap' }, r.target), h('td', { class: 'wrap' }, r.detail)]);
      body.replaceChildren(table(['#', 'at', 'actor', 'role', 'action', 'target', 'detail'], rows, 'No record matches.'));
    };
    filter.addEventListener('input', show);
    show();
    return [h('h1', {}, 'Audit'), h('p', { class: 'muted' }, `The newest ${page.records.length} of ${head.total} records.`), filter, body];
  }

  const PAGES = { overview: [overview, true], nodes: [nodes, false], shelf: [shelf, false], approvals: [approvals, false],
    deployments: [deployments, false], audit: [audit, false] };

  async function render(refresh) {
    clearTimeout(S.timer);
    // Only the newest render shows its page and schedules the next refresh.
    const gen = (S.gen = (S.gen || 0) + 1);
    if (!S.token) return signin();
    if (!S.me) {
      try { S.me = await api('GET', '/v1/whoami'); } catch (e) { S.token = ''; return signin(e.status === 401 ? 'Your token is no longer valid.' : e.message); }
    }
    document.getElementById('nav').hidden = false;
    const who = document.getElementById('who');
    who.replaceChildren(`${S.me.name} (${S.me.role})`, h('button', { type: 'button', class: 'secondary', id: 'signout', onclick: signout }, 'Sign out'));
    const [name, arg] = (location.hash.replace(/^#\//, '') || 'overview').split('/');
    for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.getAttribute('href') === `#/${name}`);
    const active = document.activeElement;
    if (refresh === true && main.contains(active) && ['INPUT', 'SELECT', 'TEXTAREA'].includes(active.tagName)) {
      // Someone is typing or choosing on a live page: refresh later.
      S.timer = setTimeout(() => render(true), REFRESH_MS);
      return;
    }
    let page = PAGES[name] || PAGES.overview;
    let live = page[1];
    if (name === 'deployments' && arg) { page = [() => deployment(Number(arg)), true]; live = true; }
    try {
      const content = await page[0]();
      if (gen !== S.gen) return;
      main.replaceChildren(...[content].flat(Infinity).filter((x) => x));
      main.dataset.page = name;
    } catch (e) {
      if (e.status === 401) { S.token = ''; S.me = null; sessionStorage.removeItem('sophon.token'); return signin('Your token is no longer valid.'); }
      main.replaceChildren(h('p', { class: 'error' }, `Could not load this page: ${e.message}`));
    }
    if (live && gen === S.gen) S.timer = setTimeout(() => render(true), REFRESH_MS);
  }

  window.addEventListener('hashchange', () => render());
  render();
})();
