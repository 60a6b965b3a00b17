"""The parts every report shares: one HTML page with inline CSS and JS, tables the page sorts,
filters and pages itself, charts as inline SVG, images as ``data:`` URIs, atomic writes.

Nothing is fetched when the page opens (no CDN, no fonts, no server): a report copied off a
cluster, mailed, or opened straight from S3 looks the same everywhere.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeGuard

from ..core import Location

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A table's rows per page in the browser: a few hundred DOM rows redraw instantly on a sort.
PAGE_SIZE = 100
# A string column with at most this many distinct values gets a select box instead of a text box.
SELECT_MAX = 12
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")

esc = html.escape


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def is_png(data: bytes | None) -> TypeGuard[bytes]:
    return data is not None and data[:8] == PNG_SIGNATURE


def img(png: bytes, alt: str, *, cls: str = "") -> str:
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{data_uri(png)}">'


def fmt(v: Any, digits: int = 3) -> str:
    """A cell as text: floats to ``digits`` decimals, missing values empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (datetime, date)):
        return v.isoformat(sep=" ", timespec="seconds") if isinstance(v, datetime) else v.isoformat()
    return str(v)


def _json_cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if isinstance(v, (datetime, date)):
        return fmt(v)
    if isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item"):  # numpy scalars
        return _json_cell(v.item())
    return str(v)


def _script_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>`` can end it early."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def data_table(
    table_id: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    types: Sequence[str] | None = None,
    filters: bool = True,
    page_size: int = PAGE_SIZE,
    caption: str = "",
) -> str:
    """A table the page renders from embedded JSON: click a header to sort (again to reverse),
    type in a column's box (``>0.9``, ``<=0.5`` on numbers) or pick from its select to filter.

    ``types``: per column ``num`` (floats, 3 decimals), ``int``, ``str``, or ``long`` (text that
    wraps, e.g. error messages); default: guessed.
    """
    rows = [[_json_cell(v) for v in r] for r in rows]
    if types is None:
        types = [_guess_type([r[i] for r in rows]) for i in range(len(columns))]
    spec = {
        "columns": list(columns),
        "types": list(types),
        "rows": rows,
        "pageSize": page_size,
        "filters": filters,
        "selectMax": SELECT_MAX,
    }
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return (
        f'{cap}<div class="bt-table" id="{esc(table_id)}" data-total="{len(rows)}">'
        f'<script type="application/json">{_script_json(spec)}</script></div>'
    )


def _guess_type(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "num"
    return "str"


def static_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "small") -> str:
    """A small fixed table (counts, metrics) written as plain HTML."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def facts_table(pairs: Iterable[Sequence[Any]]) -> str:
    """Name-value pairs (a run's or a search's summary)."""
    body = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


def confusion_table(cm: Sequence[Sequence[int]], names: Sequence[str], title: str) -> str:
    """A confusion matrix as an HTML table, cells shaded by their share of the row (the recall)."""
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = []
    for name, row in zip(names, cm):
        total = sum(row) or 1
        cells = "".join(
            f'<td style="background:rgba(31,119,180,{0.08 + 0.8 * v / total:.2f});'
            f'color:{"#fff" if v / total > 0.55 else "#111"}">{int(v)}</td>'
            for v in row
        )
        body.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return (
        f'<figure class="cm"><table class="confusion"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table><figcaption>{esc(title)}</figcaption></figure>"
    )


def _span(given: tuple[float, float] | None, values: Sequence[float]) -> tuple[float, float]:
    """An axis' range: the one given, else the values' (0..1 without any), never empty."""
    lo, hi = given or ((min(values), max(values)) if values else (0.0, 1.0))
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


@dataclass(frozen=True)
class _Plot:
    """A chart's plot area on the SVG (its left and top margins, its width and height in pixels)
    and the data range it shows: where a data point lands."""

    left: int
    top: int
    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.width

    def py(self, y: float) -> float:
        return self.top + self.height - (y - self.y0) / (self.y1 - self.y0) * self.height


def _svg_open(title: str, width: int, height: int, left: int, top: int, pw: int, ph: int) -> list[str]:
    """An SVG chart's opening: the element, its title above, the plot area's frame."""
    return [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="title">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]


def _axes(p: _Plot, *, xlabel: str, ylabel: str, height: int) -> list[str]:
    """A line chart's grid: five ticks on each axis with their values, and the axes' labels."""
    ml, mt, pw, ph = p.left, p.top, p.width, p.height
    out = []
    for k in range(5):
        gx, gy = p.x0 + (p.x1 - p.x0) * k / 4, p.y0 + (p.y1 - p.y0) * k / 4
        out.append(
            f'<line x1="{p.px(gx):.1f}" y1="{mt}" x2="{p.px(gx):.1f}" y2="{mt + ph}" class="grid"/>'
            f'<text x="{p.px(gx):.1f}" y="{mt + ph + 14}" text-anchor="middle">{_tick(gx)}</text>'
        )
        out.append(
            f'<line x1="{ml}" y1="{p.py(gy):.1f}" x2="{ml + pw}" y2="{p.py(gy):.1f}" class="grid"/>'
            f'<text x="{ml - 5}" y="{p.py(gy) + 4:.1f}" text-anchor="end">{_tick(gy)}</text>'
        )
    out.append(
        f'<text x="{ml + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>'
        f'<text x="12" y="{mt + ph / 2:.0f}" text-anchor="middle" transform="rotate(-90 12 {mt + ph / 2:.0f})">'
        f"{esc(ylabel)}</text>"
    )
    return out


def _lines(
    p: _Plot,
    series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
    points: Sequence[tuple[str, float, float]],
) -> tuple[list[str], list[str]]:
    """The data drawn on a line chart (a polyline with dots per series, a ringed dot per point)
    and their legend entries."""
    out, legend = [], []
    for i, (label, sx, sy) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(p.px(x), p.py(y)) for x, y in zip(sx, sy) if y is not None]
        if pts:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.2" fill="{colour}"/>' for a, b in pts)
        legend.append(f'<span><i style="background:{colour}"></i>{esc(label)}</span>')
    for label, x, y in points:
        out.append(
            f'<circle cx="{p.px(x):.1f}" cy="{p.py(y):.1f}" r="5" class="mark"><title>{esc(label)}</title></circle>'
        )
        legend.append(f'<span><i class="mark"></i>{esc(label)}</span>')
    return out, legend


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    points: Sequence[tuple[str, float, float]] = (),
    diagonal: bool = False,
    width: int = 440,
    height: int = 300,
) -> str:
    """An inline SVG line chart: ``series`` of (label, xs, ys) (None gaps skipped), ``points``
    of (label, x, y) marked with a dot; the legend below."""
    ml, mr, mt, mb = 52, 14, 28, 40
    xs = [x for _, sx, sy in series for x, y in zip(sx, sy) if y is not None] + [p[1] for p in points]
    ys = [y for _, _, sy in series for y in sy if y is not None] + [p[2] for p in points]
    plot = _Plot(ml, mt, width - ml - mr, height - mt - mb, *_span(xlim, xs), *_span(ylim, ys))
    out = _svg_open(title, width, height, ml, mt, plot.width, plot.height)
    out += _axes(plot, xlabel=xlabel, ylabel=ylabel, height=height)
    if diagonal:
        a0, b0, a1, b1 = plot.px(plot.x0), plot.py(plot.y0), plot.px(plot.x1), plot.py(plot.y1)
        out.append(f'<line x1="{a0:.1f}" y1="{b0:.1f}" x2="{a1:.1f}" y2="{b1:.1f}" class="diag"/>')
    drawn, legend = _lines(plot, series, points)
    out += drawn
    out.append("</svg>")
    return f'<figure class="chart">{"".join(out)}<figcaption class="legend">{"".join(legend)}</figcaption></figure>'


def bar_chart(
    bars: Sequence[tuple[str, Sequence[int]]],
    labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    width: int = 440,
    height: int = 240,
) -> str:
    """An inline SVG bar chart of counts (a histogram): ``bars`` of (series label, count per
    ``labels`` entry), series side by side within each label's slot; the legend below."""
    ml, mr, mt, mb = 44, 14, 28, 40
    pw, ph = width - ml - mr, height - mt - mb
    top = max([1] + [v for _, vs in bars for v in vs])
    slot = pw / max(1, len(labels))
    bw = slot * 0.8 / max(1, len(bars))
    out = _svg_open(title, width, height, ml, mt, pw, ph) + [
        f'<text x="{ml - 5}" y="{mt + 4}" text-anchor="end">{top}</text>',
        f'<text x="{ml - 5}" y="{mt + ph + 4}" text-anchor="end">0</text>',
        f'<text x="{ml + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>',
    ]
    legend = []
    for j, (series, values) in enumerate(bars):
        colour = PALETTE[j % len(PALETTE)]
        for i, v in enumerate(values):
            h = ph * v / top
            x = ml + slot * i + slot * 0.1 + bw * j
            out.append(
                f'<rect x="{x:.1f}" y="{mt + ph - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{esc(series)}: {esc(str(labels[i]))}: {int(v)}</title></rect>"
            )
        legend.append(f'<span><i style="background:{colour}"></i>{esc(series)}</span>')
    for i, lab in enumerate(labels):
        out.append(
            f'<text x="{ml + slot * (i + 0.5):.1f}" y="{mt + ph + 14}" text-anchor="middle">{esc(str(lab))}</text>'
        )
    out.append("</svg>")
    return f'<figure class="chart">{"".join(out)}<figcaption class="legend">{"".join(legend)}</figcaption></figure>'


def _tick(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def risk_coverage(bins: Sequence[dict]) -> tuple[list[float], list[float]]:
    """Coverage and risk (error rate of the rows kept) when rows below each bin's lower edge are
    set aside, from reliability bins (``lo``, ``n``, ``accuracy``, as ``metrics.json`` records
    them). The bins partition the rows by confidence, so every point is exact, not binned."""
    full = [b for b in bins if b.get("n")]
    total = sum(b["n"] for b in full)
    cov, risk, n, right = [], [], 0, 0.0
    for b in sorted(full, key=lambda b: -b["lo"]):
        n += b["n"]
        right += b["accuracy"] * b["n"]
        cov.append(n / total)
        risk.append(1.0 - right / n)
    return cov, risk


def page(title: str, body: str, *, subtitle: str = "") -> str:
    sub = f'<p class="sub">{subtitle}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>{esc(title)}</h1>{sub}</header><main>{body}</main>"
        f"<script>{JS}</script></body></html>"
    )


def section(title: str, body: str, *, anchor: str, note: str = "") -> str:
    n = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{n}{body}</section>'


def write_html(loc: Location, text: str) -> str:
    """Write a report so that a reader sees the old page or the new one whole: on disk a
    dot-named temporary file beside it, then a rename; on S3 one PUT (an object appears only
    complete, multipart uploads included). Returns the URI."""
    data = text.encode("utf-8")
    loc.write_atomic(data)  # the temporary file is dot-named: folder readers skip it
    logger.info("report: wrote %s (%.1f MB)", loc.uri, len(data) / 1e6)
    return loc.uri


CSS = """
:root{--fg:#1b1f24;--muted:#5b6570;--line:#d8dde3;--bg:#fff;--head:#f3f5f7;--accent:#1f5fa8;--warn:#b3261e;--ok:#1e7b34}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:14px 24px;border-bottom:1px solid var(--line);background:var(--head)}
h1{font-size:20px;margin:0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
main{padding:0 24px 40px;max-width:1500px}
.sub,.note,.caption{color:var(--muted);margin:4px 0 8px}
.notice{background:#fff6e0;border:1px solid #e8c66a;padding:6px 10px;border-radius:4px;margin:8px 0}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:var(--head);white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.small td{text-align:right}table.small td:first-child{text-align:left}
table.facts th{background:var(--head);font-weight:600;white-space:nowrap}table.facts td{overflow-wrap:anywhere}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.tables{display:flex;flex-wrap:wrap;gap:28px}
figure{margin:6px 0}figure img{max-width:100%;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:12px}
.confusion td{text-align:right;min-width:48px}
svg.chart{font-size:11px;fill:var(--fg)}svg .title{font-size:13px;font-weight:600}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#eee}svg .diag{stroke:#aaa;stroke-dasharray:4 3}
svg .mark{fill:none;stroke:#000;stroke-width:2}
.legend span{display:inline-block;margin-right:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.legend i.mark{border:2px solid #000;border-radius:50%;background:none}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px;background:#fff}
.card img{width:100%;image-rendering:auto;border-radius:3px;background:#000}
.card .path{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all;color:var(--muted)}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:0 8px;margin:4px 0;font-size:12px}.card dt{color:var(--muted)}
.card dd{margin:0}.card .pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(100px,1fr));gap:4px}
.tag{display:inline-block;border-radius:10px;padding:0 7px;font-size:12px;background:#eef;margin-right:4px}
.tag.flag{background:#fde7e5;color:var(--warn)}.tag.tumour{background:#fff0d6;color:#8a5300}.tag.ok{background:#e3f4e7;color:var(--ok)}
.bt-table{overflow-x:auto;margin:6px 0 14px}
.bt-table table{font-size:12.5px}
.bt-table th.sort{cursor:pointer;user-select:none}.bt-table th.sort:hover{background:#e6eaee}
.bt-table th .arrow{color:var(--accent);margin-left:3px}
.bt-table tr.filters th{background:#fafbfc;padding:2px 3px}
.bt-table input,.bt-table select{width:100%;min-width:60px;font-size:12px;padding:1px 3px}
.bt-table .pager{display:flex;gap:8px;align-items:center;margin:4px 0;color:var(--muted)}
.bt-table td{white-space:nowrap}.bt-table td.long{white-space:normal;min-width:220px;max-width:420px;overflow-wrap:anywhere}
nav.toc a{margin-right:14px}
"""

# Vanilla JS, no library: tables from their embedded JSON (sort, filter, page).
JS = r"""
(function(){
"use strict";
function text(v,t){if(v===null||v===undefined)return "";if(t==="num"&&typeof v==="number")return v.toFixed(3);return String(v);}
function isNum(t){return t==="num"||t==="int";}
function cmp(a,b,t){var an=a===null||a===undefined,bn=b===null||b===undefined;if(an||bn)return an===bn?0:(an?1:-1);
  if(isNum(t))return a-b;return String(a).localeCompare(String(b));}
function numTest(q){var m=/^\s*(<=|>=|<|>|=)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$/i.exec(q);if(!m)return null;var x=parseFloat(m[2]),op=m[1];
  return function(v){if(typeof v!=="number")return false;return op==="<"?v<x:op===">"?v>x:op==="<="?v<=x:op===">="?v>=x:v===x;};}
function build(root){
  var spec=JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  var cols=spec.columns,types=spec.types,rows=spec.rows,size=spec.pageSize||100;
  var state={sort:-1,dir:1,page:0,filters:cols.map(function(){return null;})};
  var table=document.createElement("table"),thead=document.createElement("thead"),tbody=document.createElement("tbody");
  var hr=document.createElement("tr"),fr=document.createElement("tr");fr.className="filters";
  cols.forEach(function(c,i){
    var th=document.createElement("th");th.className="sort";th.dataset.col=i;th.title="click to sort";
    th.appendChild(document.createTextNode(c));var ar=document.createElement("span");ar.className="arrow";th.appendChild(ar);
    th.addEventListener("click",function(){if(state.sort===i){state.dir=-state.dir;}else{state.sort=i;state.dir=1;}state.page=0;render();});
    hr.appendChild(th);
    var fh=document.createElement("th");
    if(spec.filters){
      var distinct={};rows.forEach(function(r){distinct[text(r[i],types[i])]=1;});var keys=Object.keys(distinct).sort();
      var el;
      if(!isNum(types[i])&&keys.length<=spec.selectMax&&rows.length>keys.length){
        el=document.createElement("select");var o=document.createElement("option");o.value="\u0000all";o.textContent="(all)";el.appendChild(o);
        keys.forEach(function(k){var o=document.createElement("option");o.value=k;o.textContent=k===""?"(empty)":k;el.appendChild(o);});
        el.addEventListener("change",function(){state.filters[i]=el.value==="\u0000all"?null:{exact:el.value};state.page=0;render();});
      }else{
        el=document.createElement("input");el.type="search";el.placeholder=isNum(types[i])?"filter, >0.5":"filter";
        el.addEventListener("input",function(){var q=el.value.trim();state.filters[i]=q?{q:q.toLowerCase(),num:isNum(types[i])?numTest(q):null}:null;state.page=0;render();});
      }
      el.setAttribute("aria-label","filter "+c);el.dataset.col=i;fh.appendChild(el);
    }
    fr.appendChild(fh);
  });
  thead.appendChild(hr);if(spec.filters)thead.appendChild(fr);table.appendChild(thead);table.appendChild(tbody);
  var pager=document.createElement("div");pager.className="pager";
  var info=document.createElement("span");info.className="count";
  var prev=document.createElement("button");prev.type="button";prev.textContent="\u2039 previous";
  var next=document.createElement("button");next.type="button";next.textContent="next \u203a";
  prev.addEventListener("click",function(){if(state.page>0){state.page--;render();}});
  next.addEventListener("click",function(){state.page++;render();});
  pager.appendChild(info);pager.appendChild(prev);pager.appendChild(next);
  root.appendChild(pager);root.appendChild(table);
  function keep(r){for(var i=0;i<cols.length;i++){var f=state.filters[i];if(!f)continue;var t=text(r[i],types[i]);
    if(f.exact!==undefined){if(t!==f.exact)return false;}else if(f.num){if(!f.num(r[i]))return false;}
    else if(t.toLowerCase().indexOf(f.q)<0)return false;}return true;}
  function render(){
    var view=rows.filter(keep);
    if(state.sort>=0){var s=state.sort,t=types[s],d=state.dir;
      view=view.map(function(r,k){return [r,k];});
      view.sort(function(a,b){var a0=a[0][s],b0=b[0][s],an=a0===null||a0===undefined,bn=b0===null||b0===undefined;
        if(an||bn)return an===bn?a[1]-b[1]:(an?1:-1);var c=cmp(a0,b0,t)*d;return c||a[1]-b[1];});
      view=view.map(function(p){return p[0];});}
    var pages=Math.max(1,Math.ceil(view.length/size));if(state.page>=pages)state.page=pages-1;
    var start=state.page*size,part=view.slice(start,start+size);
    tbody.textContent="";
    var frag=document.createDocumentFragment();
    part.forEach(function(r){var tr=document.createElement("tr");
      r.forEach(function(v,i){var td=document.createElement("td");td.textContent=text(v,types[i]);if(isNum(types[i]))td.className="num";else if(types[i]==="long")td.className="long";tr.appendChild(td);});
      frag.appendChild(tr);});
    tbody.appendChild(frag);
    hr.querySelectorAll("th").forEach(function(th,i){th.querySelector(".arrow").textContent=i===state.sort?(state.dir>0?"\u25b2":"\u25bc"):"";
      th.setAttribute("aria-sort",i===state.sort?(state.dir>0?"ascending":"descending"):"none");});
    root.dataset.matching=view.length;
    info.textContent=view.length?("rows "+(start+1)+"\u2013"+(start+part.length)+" of "+view.length+(view.length<rows.length?" matching ("+rows.length+" in all)":"")):("no rows match (of "+rows.length+")");
    prev.disabled=state.page===0;next.disabled=state.page>=pages-1;
    prev.hidden=next.hidden=pages<2;pager.hidden=!spec.filters&&rows.length<=size;
  }
  render();
}
document.querySelectorAll(".bt-table").forEach(build);
})();
"""
