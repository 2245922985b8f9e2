"""The report page's fixed parts: colours by state, its CSS, the hatch pattern and the
tooltip script.

Owns: how report.html looks and behaves in a browser, the same for every run: nothing here
depends on a run. Not here: the page's markup (chute.observe.report.html).
Limits: no URL anywhere (no font, no script, no image fetched): the page opens from a run
folder on a machine without a network.
"""

from __future__ import annotations

# Bar colours by state; tests look for the succeeded and failed ones in a screenshot.
COLOURS: dict[str, str] = {
    "succeeded": "#2e9d4a",
    "failed": "#d62d2d",
    "timed_out": "#f08c00",
    "cancelled": "#8a8f98",
    "skipped": "#d3d6db",
    "cached": "#12a3a3",
    "fallback": "#8e44ad",
    "running": "#2f6fdb",
    "pending": "#b8c4d6",
    "waiting": "#b8c4d6",
}

RUN_STATE_CLASS = {  # a run's state -> the colour class of its badge
    "queued": "pending",
    "running": "running",
    "stopped": "pending",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "interrupted": "timed_out",
}

# The fill of skipped bars (.s-skipped): stripes, so "never ran" differs from a grey state.
HATCH = (
    '<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
    '<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(45)"><rect width="6" height="6" fill="#eef0f2"/>'
    '<rect width="3" height="6" fill="#c9cdd3"/></pattern></defs></svg>'
)

CSS = """
body{margin:0;padding:16px 24px 40px;font:13px/1.4 system-ui,-apple-system,"Segoe UI",
 Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d2330;background:#fff}
h1{font-size:19px;margin:0 0 8px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
h2{font-size:15px;margin:22px 0 6px}
.mono,code,td.cores{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
nav a{margin-right:14px;color:#2f6fdb;text-decoration:none}
dl.facts{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:2px 12px;
 margin:0 0 6px;max-width:1200px}
dl.facts dt{color:#5b6472}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.badge{color:#fff;border-radius:10px;padding:1px 10px;font-size:13px;font-weight:600}
.badge.s-skipped,.badge.s-pending,.badge.s-waiting{color:#1d2330}
.error{background:#fdecec;border-left:4px solid #d62d2d;padding:6px 10px;margin:6px 0;
 white-space:pre-wrap;overflow-wrap:anywhere;max-width:1200px}
.critline{margin:6px 0}
.critline b{font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:6px 0;color:#3a4250}
.legend span{display:inline-flex;align-items:center;gap:5px}
.sw{display:inline-block;width:14px;height:10px;border-radius:2px}
.sw.critsw{background:#fff;outline:2px solid #111;outline-offset:-2px}
.scroll{overflow-x:auto}
svg.chart{display:block;font-size:12px}
svg.chart text{fill:#1d2330}
svg.chart .axis{fill:#5b6472;font-size:11px}
svg.chart .grid{stroke:#e3e6ea;stroke-width:1}
svg.chart .endline{stroke:#9aa2ad;stroke-dasharray:3 3}
svg.chart .row{fill:#fff}
svg.chart .row.alt{fill:#f6f7f9}
svg.chart .label.shard{fill:#5b6472}
svg.chart .label.crit{font-weight:700}
svg.chart .tail{fill:#5b6472;font-size:11px}
svg.chart .inbar{fill:#fff;font-size:11px;pointer-events:none}
svg.chart .seg{stroke:none}
svg.chart .seg:hover{opacity:.8}
svg.chart .seg.crit{stroke:#111;stroke-width:2}
svg.chart .envelope{opacity:.45}
svg.chart .reused{opacity:.35;stroke:#5b6472;stroke-dasharray:2 2}
table.summary{border-collapse:collapse;margin-top:4px}
table.summary th,table.summary td{padding:2px 12px 2px 0;text-align:left;vertical-align:top}
table.summary th{color:#5b6472;font-weight:600;border-bottom:1px solid #d9dde3}
table.summary td.num{text-align:right}
table.summary tr.shard td:first-child{padding-left:16px;color:#5b6472}
table.summary td.err{max-width:520px;overflow-wrap:anywhere}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px}
.empty{color:#5b6472;font-style:italic}
#tip{position:fixed;z-index:10;max-width:460px;background:#1d2330;color:#fff;
 padding:6px 9px;border-radius:4px;font:12px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;
 white-space:pre-wrap;overflow-wrap:anywhere;pointer-events:none;
 box-shadow:0 2px 8px rgba(0,0,0,.25)}
"""

JS = """
(function () {
  var body = document.body;
  window.addEventListener("error", function (ev) {
    body.setAttribute("data-error", String(ev.message));
  });
  var tip = document.getElementById("tip");
  var marked = document.querySelectorAll("[data-tip]");
  for (var i = 0; i < marked.length; i++) {
    var title = marked[i].querySelector("title");
    if (title) { title.parentNode.removeChild(title); }
  }
  function place(ev) {
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = ev.clientX - tip.offsetWidth - 10; }
    if (y + tip.offsetHeight > window.innerHeight) { y = ev.clientY - tip.offsetHeight - 10; }
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target && ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (!el) { tip.hidden = true; return; }
    tip.textContent = el.getAttribute("data-tip");
    tip.hidden = false;
    place(ev);
  });
  document.addEventListener("mousemove", function (ev) { if (!tip.hidden) { place(ev); } });
  body.setAttribute("data-ready", "1");
})();
"""


def state_css() -> str:
    """Each state's class: its fill (SVG bars) and background (legend swatches, dots)."""
    rules = [f".s-{k}{{fill:{v};background:{v}}}" for k, v in COLOURS.items()]
    rules.append(
        ".s-skipped{fill:url(#hatch);"
        "background:repeating-linear-gradient(45deg,#c9cdd3 0 3px,#eef0f2 3px 6px)}"
    )
    return "\n".join(rules)
