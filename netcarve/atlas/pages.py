"""The browsable atlas: ``index.html`` (a sortable, filterable table of every unit) and one
page per unit (circuit diagram, keep–preservation curve, criterion comparison, pictures,
class-wise CAR).

Offline by construction: no script, style sheet, font or image is fetched from anywhere; the
index embeds its thumbnails as ``data:`` URIs, unit pages show the unit's own files by
relative paths. Pages are rebuilt from the store at the end of every run (also an
interrupted one), so they always show exactly what the store holds.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from netcarve.atlas.store import AtlasStore
from netcarve.atlas.unit import unit_folder
from netcarve.diagram.html import script_json

__all__ = ["write_pages"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{width:40px;height:40px;image-rendering:pixelated}
img.pic{image-rendering:pixelated;border:1px solid #ccc}
.controls{margin:0.8em 0} .controls label{margin-right:1.2em}
.bad{color:#a00} .muted{color:#777}
iframe{width:100%;height:760px;border:1px solid #ccc}
"""

# The table is data (JSON in the page) plus this script: sort on a header click, filter on
# text (layer, unit, classes) and on r / keep bounds. No library, no network.
_INDEX_JS = """
const rows = JSON.parse(document.getElementById('atlas-data').textContent);
const cols = [
  ['layer','layer',false], ['unit','unit',true], ['keep','keep found',true],
  ['effective_keep','effective keep',true], ['kept_kernels','kernels kept',true],
  ['pearson','held-out r',true], ['reached','goal reached',false],
  ['car','CAR',true], ['most','most important classes',false],
  ['least','least important classes',false], ['thumb','feature',false]];
let sortKey = null, sortDir = 1;
const head = document.querySelector('#units thead tr');
for (const [key, label, num] of cols) {
  const th = document.createElement('th'); th.textContent = label; th.dataset.key = key;
  if (key !== 'thumb') th.addEventListener('click', () => {
    sortDir = (sortKey === key) ? -sortDir : 1; sortKey = key; draw(); });
  head.appendChild(th);
}
function fmt(v, key) {
  if (v === null || v === undefined) return '–';
  if (typeof v === 'number' && !Number.isInteger(v)) return v.toFixed(key === 'car' ? 4 : 3);
  return String(v);
}
function visible() {
  const text = document.getElementById('filter').value.trim().toLowerCase();
  const minR = parseFloat(document.getElementById('min-r').value);
  const maxKeep = parseFloat(document.getElementById('max-keep').value);
  return rows.filter(r => {
    if (text && !(r.layer + ':' + r.unit + ' ' + r.most + ' ' + r.least).toLowerCase()
        .includes(text)) return false;
    if (!isNaN(minR) && !(r.pearson !== null && r.pearson >= minR)) return false;
    if (!isNaN(maxKeep) && !(r.effective_keep <= maxKeep)) return false;
    return true;
  });
}
function draw() {
  let shown = visible();
  if (sortKey) shown = shown.slice().sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    if (x === y) return a.order - b.order;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sortDir;
  });
  document.querySelectorAll('#units th').forEach(th => {
    th.className = th.dataset.key === sortKey ? (sortDir > 0 ? 'asc' : 'desc') : ''; });
  const body = document.querySelector('#units tbody'); body.replaceChildren();
  for (const r of shown) {
    const tr = document.createElement('tr'); tr.dataset.unit = r.layer + ':' + r.unit;
    for (const [key, , num] of cols) {
      const td = document.createElement('td'); if (num) td.className = 'num';
      if (key === 'unit') {
        const a = document.createElement('a'); a.href = r.page; a.textContent = r.unit;
        td.appendChild(a);
      } else if (key === 'thumb') {
        if (r.thumb) { const img = document.createElement('img'); img.src = r.thumb;
          img.className = 'thumb'; img.alt = 'feature visualisation'; td.appendChild(img); }
      } else if (key === 'reached') {
        td.textContent = r.reached ? 'yes' : 'no'; if (!r.reached) td.className = 'bad';
      } else td.textContent = fmt(r[key], key);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  document.getElementById('count').textContent = shown.length + ' of ' + rows.length + ' units';
}
for (const id of ['filter', 'min-r', 'max-keep'])
  document.getElementById(id).addEventListener('input', draw);
draw();
"""


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"{body}{script}</body></html>\n")


def _thumb(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _curve_svg(row: dict[str, Any], width: int = 420, height: int = 240) -> str:
    """The keep search's sampled points: keep (log axis) against r, the goal as a line."""
    pts = [(p["keep"], p["pearson"]) for p in row["curve"] if p["pearson"] is not None]
    if not pts:
        return '<p class="muted">no finite preservation sampled</p>'
    left, right, top, bottom = 48, 12, 12, 36
    lo = math.log10(min(k for k, _ in pts))
    hi = max(math.log10(max(k for k, _ in pts)), lo + 1e-6)
    r_lo = min(0.0, min(r for _, r in pts), row["goal"])

    def x(k: float) -> float:
        return left + (math.log10(k) - lo) / (hi - lo) * (width - left - right)

    def y(r: float) -> float:
        return top + (1.0 - r) / (1.0 - r_lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="preservation against keep">',
             f'<line x1="{left}" y1="{y(row["goal"]):.1f}" x2="{width - right}" '
             f'y2="{y(row["goal"]):.1f}" stroke="#c33" stroke-dasharray="4 3"/>',
             f'<text x="{width - right}" y="{y(row["goal"]) - 4:.1f}" font-size="11" '
             f'text-anchor="end" fill="#c33">goal r = {row["goal"]:g}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" '
             f'y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>']
    for r in (r_lo, (r_lo + 1) / 2, 1.0):
        parts.append(f'<text x="{left - 4}" y="{y(r) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{r:.2f}</text>')
    for k in sorted({pts[0][0], pts[-1][0], row["keep"]}):
        parts.append(f'<text x="{x(k):.1f}" y="{height - bottom + 14}" font-size="11" '
                     f'text-anchor="middle">{k:.3g}</text>')
    parts.append(f'<text x="{(left + width) / 2:.1f}" y="{height - 4}" font-size="11" '
                 'text-anchor="middle">keep (log scale)</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(k):.1f},{y(r):.1f}"
                    for i, (k, r) in enumerate(sorted(pts)))
    parts.append(f'<path d="{path}" fill="none" stroke="#36c" stroke-width="1.5"/>')
    for k, r in pts:
        colour = "#c33" if math.isclose(k, row["keep"]) else "#36c"
        parts.append(f'<circle cx="{x(k):.1f}" cy="{y(r):.1f}" r="3.5" fill="{colour}">'
                     f"<title>keep {k:.4g}: r = {r:.3f}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _unit_page(row: dict[str, Any], cls: dict[str, Any] | None, meta: dict[str, Any],
               has_diagram: bool = True) -> str:
    target = row["target"]
    reached = ("reached" if row["reached"] else
               '<span class="bad">not reached even with every relevant kernel</span>')
    body = ['<p><a href="../../../index.html">← atlas</a></p>',
            f"<h1>{html.escape(target)}</h1>",
            f"<p>{html.escape(str(meta.get('model')))}: the smallest "
            f"{html.escape(row['criterion'])} circuit with "
            f"{html.escape(row['search_on'])} r ≥ {row['goal']:g}: {reached} at "
            f"keep {row['keep']:.4g} ({row['kept_kernels']:,} of {row['relevant_kernels']:,} "
            f"relevant kernels, effective keep {row['effective_keep']:.4g}); held-out r = "
            f"{_num(row['pearson'])}, scoring r = {_num(row['pearson_scoring'])}; "
            f"{row['evaluations']} keeps sampled.</p>",
            "<h2>Pictures</h2><p>feature visualisation "
            '<img class="pic" src="featureviz.png" alt="feature visualisation" height="96"> '
            'top held-out images (receptive fields) <img class="pic" src="examples.png" '
            'alt="top data-set examples" height="96"></p>',
            "<h2>Preservation against keep</h2>", _curve_svg(row)]
    comp: dict[str, dict[float, str]] = {}
    for c in row["comparison"]:
        comp.setdefault(c["criterion"], {})[c["keep"]] = _num(c["pearson"]) + (
            " (collapsed)" if c["collapsed"] else "")
    keeps = sorted({c["keep"] for c in row["comparison"]})
    body.append("<h2>Criteria compared</h2><p>held-out r of each criterion's circuit at the "
                "same keeps (multiples of the keep found)</p>")
    body.append(_table(["criterion", *[f"keep {k:.3g}" for k in keeps]],
                       [[name, *[v.get(k, "–") for k in keeps]] for name, v in comp.items()]))
    body.append("<h2>Kernels per layer</h2>")
    body.append(_table(["layer", "relevant", "kept"],
                       [[p["layer"], f"{p['relevant']:,}", f"{p['kept']:,}"]
                        for p in row["per_layer"]]))
    body.append("<h2>Classes (class-wise CAR of the layer)</h2>")
    if cls is None:
        body.append('<p class="muted">not computed for this layer (no labelled images)</p>')
    else:
        body.append(f"<p>removing the unit costs {cls['car']:+.4f} top-1 accuracy overall; "
                    f"most important for: {html.escape(', '.join(cls['most_important']))}; "
                    f"least: {html.escape(', '.join(cls['least_important']))}.</p>")
        names = meta.get("class_names") or [str(i) for i in range(len(cls["class_car"]))]
        body.append(_table(["class", "accuracy drop without the unit"],
                           [[n, f"{v:+.4f}"] for n, v in zip(names, cls["class_car"],
                                                             strict=False)]))
    if has_diagram:
        body.append('<h2>Circuit diagram</h2><p><a href="diagram.html">open the diagram on '
                    'its own page</a></p><iframe src="diagram.html" title="circuit diagram">'
                    '</iframe>')
    else:
        body.append('<h2>Circuit diagram</h2><p class="muted">not drawn (the atlas was made '
                    'with --no-diagrams): <code>netcarve diagram circuit.safetensors --out '
                    '.</code> draws it from this folder\'s circuit file.</p>')
    return _page(f"{target} — netcarve atlas", "".join(body))


def write_pages(store: AtlasStore) -> Path:
    """Write ``index.html`` and every unit's ``index.html`` from the store's contents.

    Args:
        store: the atlas.

    Returns:
        the path of ``index.html``.
    """
    meta = store.read_meta() or {}
    rows = store.rows()
    classes = store.classes()
    table = []
    for i, row in enumerate(rows):
        folder = unit_folder(row["layer"], row["unit"])
        cls = classes.get((row["layer"], row["unit"]))
        (store.root / folder).mkdir(parents=True, exist_ok=True)
        has_diagram = (store.root / folder / "diagram.html").exists()
        (store.root / folder / "index.html").write_text(
            _unit_page(row, cls, meta, has_diagram), encoding="utf-8")
        table.append({
            "order": i, "layer": row["layer"], "unit": row["unit"], "keep": row["keep"],
            "effective_keep": row["effective_keep"], "kept_kernels": row["kept_kernels"],
            "pearson": row["pearson"], "reached": row["reached"],
            "car": None if cls is None else cls["car"],
            "most": "" if cls is None else ", ".join(cls["most_important"]),
            "least": "" if cls is None else ", ".join(cls["least_important"]),
            "thumb": _thumb(store.root / folder / "featureviz.png"),
            "page": f"{folder}/index.html"})
    cfg = meta.get("config", {})
    layers = ", ".join(meta.get("layers", []))
    body = (f"<h1>Circuit atlas of {html.escape(str(meta.get('model', '?')))}</h1>"
            f"<p>Layers {html.escape(layers)}. Every unit's circuit is the smallest "
            f"{html.escape(str(cfg.get('criterion')))} circuit whose "
            f"{html.escape(str(cfg.get('search_on')))} preservation reaches Pearson r ≥ "
            f"{cfg.get('goal')}. Click a column to sort, a unit to open its page. Query the "
            f"store with <code>netcarve atlas-query {html.escape(str(store.root))} \"SELECT "
            f"… FROM units\"</code>.</p>"
            '<div class="controls"><label>filter <input id="filter" type="search" '
            'placeholder="layer, unit or class"></label><label>held-out r ≥ <input id="min-r" '
            'type="number" step="0.05" min="-1" max="1"></label><label>effective keep ≤ '
            '<input id="max-keep" type="number" step="0.05" min="0" max="1"></label>'
            '<span id="count"></span></div>'
            '<table id="units"><thead><tr></tr></thead><tbody></tbody></table>')
    script = (f'<script type="application/json" id="atlas-data">{script_json(table)}</script>'
              f"<script>{_INDEX_JS}</script>")
    path = store.root / "index.html"
    path.write_text(_page(f"netcarve atlas — {meta.get('model', '')}", body, script),
                    encoding="utf-8")
    return path
