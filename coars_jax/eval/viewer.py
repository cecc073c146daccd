"""The trajectory and credit viewer: dialogues (episode records, `agents.trajectory.episode_record`) rendered as ONE
static HTML page that needs no server: a summary, filters (hit or miss, turn count, agent, iteration), and per
dialogue the history, the candidates with the target, the peer's and the final pick marked, then turn by turn each
agent's message, parsed action, score and reward, with the token credit A of Eq. 10 as a colour on every token
(its value on hover) where the records carry it (`training.credit_sample`).

Inputs (`load`): a JSONL file of episode records; a rollout record folder (`agents.record`, its episodes.jsonl); or a
training run folder, whose `trajectories/iteration_*.jsonl` samples show how the credit changes over training.
"""

from __future__ import annotations

import html
import json
import pathlib
from typing import Any, Iterable, Sequence

from coars_jax.agents.record import JSONL_FILE
from coars_jax.agents.trajectory import read_jsonl
from coars_jax.training.credit_sample import TRAJECTORY_DIR


def load(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Episode records from a JSONL file, a rollout record folder or a run folder (every trajectory sample, in
  iteration order); each gets 'source' (the file) and 'iteration' (None when the file has none)."""
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted((path / TRAJECTORY_DIR).glob('iteration_*.jsonl')) if (path / TRAJECTORY_DIR).is_dir() else []
    if not files and (path / JSONL_FILE).is_file():
      files = [path / JSONL_FILE]
    if not files:
      raise FileNotFoundError(
        f'{path} holds neither {TRAJECTORY_DIR}/iteration_*.jsonl (a training run) nor {JSONL_FILE} (a rollout record)'
      )
  elif path.is_file():
    files = [path]
  else:
    raise FileNotFoundError(f'{path} does not exist')
  records = []
  for file in files:
    for record in read_jsonl(file):
      if 'turns' not in record or 'candidate_titles' not in record:
        raise ValueError(f'{file}: a line without "turns" and "candidate_titles" is not an episode record')
      records.append({**record, 'source': str(file), 'iteration': record.get('iteration')})
  return records


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Counts for the page's header: dialogues, hit rate, mean turns, each agent's valid share, mean |A|."""
  messages = {agent: [turn[agent] for r in records for turn in r['turns']] for agent in ('recommender', 'user')}
  credits = [abs(a) for m in messages['recommender'] + messages['user'] for a in (m.get('credit') or [])]
  count = len(records)
  return {
    'dialogues': count,
    'hit_rate': sum(bool(r['final_hit']) for r in records) / count if count else 0.0,
    'mean_turns': sum(r['num_turns'] for r in records) / count if count else 0.0,
    'recommender_valid': _share(m.get('valid') for m in messages['recommender']),
    'user_valid': _share(m.get('valid') for m in messages['user']),
    'tokens_with_credit': len(credits),
    'mean_abs_credit': sum(credits) / len(credits) if credits else None,
    'iterations': sorted({r['iteration'] for r in records if r.get('iteration') is not None}),
  }


def _share(values: Iterable[Any]) -> float | None:
  values = [bool(v) for v in values if v is not None]
  return sum(values) / len(values) if values else None


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em;margin:0 0 .3em} .muted{color:#666} .summary span{margin-right:1.4em}
.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.filters label{margin-right:1em}
.dialogue{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.2em .8em}
.dialogue>summary{cursor:pointer;font-weight:600;padding:.4em 0}
.hit{color:#18794e} .miss{color:#b42318}
.cands li.target{font-weight:700} .tag{font-size:.8em;border-radius:3px;padding:0 .35em;margin-left:.4em;
  background:#eef} .tag.t{background:#d3f9d8} .tag.p{background:#fff3bf} .tag.f{background:#e5dbff}
table.turns{border-collapse:collapse;width:100%} table.turns td,table.turns th{border-top:1px solid #eee;
  padding:.35em;vertical-align:top;text-align:left} .msg{white-space:pre-wrap;font-family:ui-monospace,monospace;
  font-size:12.5px} .tok{border-radius:2px} .legend span{display:inline-block;width:2.2em;text-align:center;
  font-size:.8em}
.cols{display:flex;gap:2em} .cols>div{flex:1} ol{margin:.2em 0;padding-left:1.6em}
"""

_SCRIPT = r"""
const data = JSON.parse(document.getElementById('data').textContent);
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const fmt = (v, d=3) => (v === null || v === undefined) ? '–' : Number(v).toFixed(d);
function colour(a) {
  const x = Math.max(-1, Math.min(1, a / data.clip));
  return x >= 0 ? `rgba(40,160,60,${(0.85*x).toFixed(3)})` : `rgba(220,50,47,${(-0.85*x).toFixed(3)})`;
}
function message(m) {
  if (m.tokens && m.credit) {
    return m.tokens.map((t, i) => `<span class="tok" style="background:${colour(m.credit[i])}" ` +
      `title="A = ${fmt(m.credit[i], 4)}">${esc(t)}</span>`).join('');
  }
  if (m.tokens) return m.tokens.map(t => `<span class="tok" title="no credit">${esc(t)}</span>`).join('');
  return esc(m.text);
}
function dialogue(r, n) {
  const pick = r.final_item;
  const cands = r.candidate_titles.map((t, i) => {
    const id = r.candidates[i], tags = [];
    if (id === r.target) tags.push('<span class="tag t">target</span>');
    if (id === r.peer_item) tags.push('<span class="tag p">SASRec</span>');
    if (id === pick) tags.push('<span class="tag f">final pick</span>');
    return `<li class="${id === r.target ? 'target' : ''}">${esc(t)}${tags.join('')}</li>`;
  }).join('');
  const hist = r.history_titles.slice(-12).map(t => `<li>${esc(t)}</li>`).join('');
  const earlier = r.history_titles.length > 12 ?
    `<p class="muted">… ${r.history_titles.length - 12} earlier</p>` : '';
  const rows = r.turns.map(t => {
    const rec = t.recommender, user = t.user;
    return `<tr class="agent-recommender"><th>t=${t.t} recommender</th><td><div class="msg">${message(rec)}</div>` +
      `<div class="muted">item: ${esc(rec.title ?? '(none)')}${t.hit ? ' <b class="hit">= target</b>' : ''} · ` +
      `valid ${rec.valid} · R = ${fmt(rec.reward)}</div></td></tr>` +
      `<tr class="agent-user"><th>t=${t.t} user</th><td><div class="msg">${message(user)}</div>` +
      `<div class="muted">action: <b>${esc(user.action ?? '(invalid)')}</b> · score ${fmt(user.score, 2)} · ` +
      `q = ${fmt(t.peer_similarity, 2)} · valid ${user.valid} · R = ${fmt(user.reward)}</div></td></tr>`;
  }).join('');
  const outcome = r.final_hit ? '<span class="hit">HIT</span>' : '<span class="miss">MISS</span>';
  const it = r.iteration === null || r.iteration === undefined ? '' : ` · iteration ${r.iteration}`;
  return `<details class="dialogue" open data-hit="${r.final_hit ? 1 : 0}" data-turns="${r.num_turns}" ` +
    `data-iteration="${r.iteration ?? ''}"><summary>#${n + 1} ${outcome} · ${r.split} window ${r.window_index} · ` +
    `user ${r.user} · ${r.num_turns} turn(s)${it} · target: ${esc(r.target_title)}</summary>` +
    `<div class="cols"><div><b>History</b> (oldest first)${earlier}<ol>${hist}</ol></div>` +
    `<div><b>Candidates</b><ol>${cands}</ol></div></div><table class="turns">${rows}</table></details>`;
}
document.getElementById('dialogues').innerHTML = data.records.map(dialogue).join('');
const turns = [...new Set(data.records.map(r => r.num_turns))].sort((a, b) => a - b);
const iterations = [...new Set(data.records.map(r => r.iteration).filter(i => i !== null && i !== undefined))]
  .sort((a, b) => a - b);
document.getElementById('turns').innerHTML = '<option value="">any</option>' +
  turns.map(t => `<option value="${t}">${t}</option>`).join('');
document.getElementById('iteration').innerHTML = '<option value="">any</option>' +
  iterations.map(t => `<option value="${t}">${t}</option>`).join('');
function apply() {
  const outcome = document.getElementById('outcome').value, t = document.getElementById('turns').value;
  const it = document.getElementById('iteration').value;
  let shown = 0;
  for (const d of document.querySelectorAll('.dialogue')) {
    const ok = (!outcome || d.dataset.hit === outcome) && (!t || d.dataset.turns === t) &&
      (!it || d.dataset.iteration === it);
    d.style.display = ok ? '' : 'none';
    shown += ok;
  }
  for (const agent of ['recommender', 'user']) {
    const on = document.getElementById('show-' + agent).checked;
    for (const row of document.querySelectorAll('.agent-' + agent)) row.style.display = on ? '' : 'none';
  }
  document.getElementById('shown').textContent = `Showing ${shown} of ${data.records.length} dialogues`;
}
for (const id of ['outcome', 'turns', 'iteration', 'show-recommender', 'show-user'])
  document.getElementById(id).addEventListener('change', apply);
apply();
"""


def render_html(records: Sequence[dict[str, Any]], *, title: str = 'CoARS dialogues', clip: float = 1.0) -> str:
  """The page: the records as JSON inside it, drawn by its own script (no network, no server)."""
  stats = summary(records)

  def pct(value):
    return '–' if value is None else f'{100 * value:.1f}%'

  credit = (
    'no token credit in these records'
    if stats['mean_abs_credit'] is None
    else f'{stats["tokens_with_credit"]} tokens with credit, mean |A| {stats["mean_abs_credit"]:.3f}'
  )
  iterations = stats['iterations']
  legend = ''.join(
    f'<span style="background:{_legend_colour(v)}">{v:+.1f}</span>' for v in (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
  )
  payload = json.dumps({'records': list(records), 'clip': clip}, ensure_ascii=False).replace('</', '<\\/')
  sources = sorted({r.get('source', '') for r in records})
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="summary"><span><b>{stats['dialogues']}</b> dialogues</span>
<span>Hit rate <b>{pct(stats['hit_rate'])}</b></span>
<span>Mean turns <b>{stats['mean_turns']:.2f}</b></span>
<span>Recommender valid <b>{pct(stats['recommender_valid'])}</b></span>
<span>User valid <b>{pct(stats['user_valid'])}</b></span><span>{credit}</span>
<span>Iterations: {', '.join(map(str, iterations)) or '–'}</span></div>
<p class="muted">Sources: {html.escape(', '.join(sources))}. Token colour: the credit A of Eq. 10 (teacher minus student
log-probability, clipped to ±{clip:g}); green where the hindsight teacher prefers the token, red where it does not.
Hover a token for its value. <span class="legend">{legend}</span></p>
<div class="filters"><label>Outcome <select id="outcome"><option value="">any</option><option value="1">hit</option>
<option value="0">miss</option></select></label><label>Turns <select id="turns"></select></label>
<label>Iteration <select id="iteration"></select></label>
<label><input type="checkbox" id="show-recommender" checked> recommender</label>
<label><input type="checkbox" id="show-user" checked> user</label> <span id="shown" class="muted"></span></div>
<div id="dialogues"></div>
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _legend_colour(value: float) -> str:
  return f'rgba(40,160,60,{0.85 * value:.3f})' if value >= 0 else f'rgba(220,50,47,{-0.85 * value:.3f})'
