"""report.html: the evaluation report as one self-contained page for choosing a threshold.

Choosing a threshold is the decision every user of an early-exit model makes;
a table and a static plot make them read numbers off a picture. This page
draws every model's accuracy-vs-MACs curve and gives each model a slider over
its swept thresholds: the slider moves a marker along the curve and shows the
accuracy, mean MACs, the reduction over the reference (the teacher's last
exit) and the exit histogram at that threshold. Thresholds chosen by
``erde calibrate`` (plain or guaranteed) for a model are marked when their
thresholds files sit beside its checkpoint. Where the run has a teacher and a KD student,
a table under the panels says what the entropy term changed against KD (report.md's
table, :mod:`erde.report.diagnostics`).

The data (from report.json, nothing else) and a small plain script are inline:
the file opens offline in any current browser and fetches nothing. Every
number shown is one of report.json's, only formatted.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erde import io
from erde.errors import ErdeError, ReportError
from erde.report.build import SCHEMA_VERSION, untrained_text
from erde.report.diagnostics import diagnostics_table
from erde.report.styles import curve_style, model_label

MAX_REPORT_BYTES = 64 << 20  # a report with hundreds of models x thresholds is a few MB
MAX_MARKS = 8  # thresholds files marked per model
COLOURS = {  # matplotlib's tab10 and black, as in tradeoff.png
    "black": "#000000",
    "tab:blue": "#1f77b4",
    "tab:orange": "#ff7f0e",
    "tab:red": "#d62728",
    "tab:green": "#2ca02c",
    "tab:purple": "#9467bd",
    "tab:brown": "#8c564b",
    "tab:pink": "#e377c2",
    "tab:olive": "#bcbd22",
    "tab:cyan": "#17becf",
}


# --------------------------------------------------------------------------- reading


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_report(report: Any, source: str = "report") -> None:
    """Refuse what the page cannot show: another schema, missing or non-numeric fields."""
    if not isinstance(report, dict):
        raise ReportError(f"{source} is not a report (a JSON object was expected)")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        found = "no schema_version" if version is None else f"schema_version {version!r}"
        raise ReportError(
            f"{source} has {found}; this erde renders schema_version {SCHEMA_VERSION} "
            "(re-run `erde evaluate` on the checkpoints to write a current report)"
        )
    models, ref = report.get("models"), report.get("reference")
    if not isinstance(models, dict) or not models:
        raise ReportError(f"{source} has no models")
    if not isinstance(ref, dict) or not (_number(ref.get("macs")) and _number(ref.get("accuracy"))):
        raise ReportError(f"{source} has no reference accuracy and MACs")
    for name, model in models.items():
        _check_model(source, name, model)


def _check_model(source: str, name: str, model: Any) -> None:
    """One model entry: per-exit lists and sweep points with numeric fields."""
    bad = f"{source}: model {name!r}"
    if not isinstance(model, dict):
        raise ReportError(f"{bad} is not an object")
    for key in ("macs_per_exit", "exit_accuracy"):
        values = model.get(key)
        if not isinstance(values, list) or not values or not all(map(_number, values)):
            raise ReportError(f"{bad} has no numeric {key}")
    ece = model.get("exit_ece")  # optional: reports written before it was measured have none
    if ece is not None and (
        not isinstance(ece, list)
        or len(ece) != len(model["exit_accuracy"])
        or not all(map(_number, ece))
    ):
        raise ReportError(f"{bad} has an exit_ece that is not one number per exit")
    sweep = model.get("sweep")
    if not isinstance(sweep, list):
        raise ReportError(f"{bad} has no sweep")
    for p in sweep:
        ok = (
            isinstance(p, dict)
            and isinstance(p.get("rule"), str)
            and all(_number(p.get(k)) for k in ("threshold", "accuracy", "mean_macs"))
            and isinstance(p.get("exit_fractions"), list)
            and all(map(_number, p["exit_fractions"]))
        )
        if not ok:
            raise ReportError(f"{bad} has a malformed sweep point: {str(p)[:80]}")


def load_report(path: str | Path) -> dict[str, Any]:
    """report.json read back (untrusted: size-capped, schema-checked)."""
    report = io.read_json(path, max_bytes=MAX_REPORT_BYTES, error=ReportError, what="a report")
    check_report(report, str(path))
    return report


# --------------------------------------------------------------------------- marks


def _mark(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """A calibrated operating point from a thresholds file: its label and its test outcome."""
    cal = data.get("calibration") or {}
    test = cal.get("test") or {}
    if not (_number(test.get("accuracy")) and _number(test.get("mean_macs"))):
        return None
    g = cal.get("guarantee")
    target = cal.get("target") or {}
    if isinstance(g, dict) and g.get("passed") and _number(g.get("epsilon")):
        label = (
            f"guaranteed: {g.get('risk')} ≤ {g['epsilon']:.3g} at confidence {g.get('confidence')}"
        )
        kind = "guaranteed"
    else:
        label = f"calibrated: {target.get('kind', '?')} {target.get('value', '?')}"
        kind = "calibrated"
    thresholds = [float(t) for t in data.get("thresholds", []) if _number(t)]
    return {
        "kind": kind,
        "label": label,
        "rule": data.get("rule"),
        "thresholds": thresholds,
        "accuracy": float(test["accuracy"]),
        "mean_macs": float(test["mean_macs"]),
    }


def threshold_marks(report: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Marks per model from ``*.thresholds.json`` beside its checkpoint, newer than it.

    Files that are unreadable, foreign, older than the checkpoint (stale) or
    without a test outcome are skipped; at most ``MAX_MARKS`` per model.
    """
    from erde.inference.policy import THRESHOLDS_FORMAT, THRESHOLDS_VERSION, read_marked_json

    marks: dict[str, list[dict[str, Any]]] = {}
    for name, model in report["models"].items():
        checkpoint = model.get("checkpoint")
        if not isinstance(checkpoint, str) or not Path(checkpoint).is_file():
            continue
        written = Path(checkpoint).stat().st_mtime_ns
        found = []
        for path in sorted(Path(checkpoint).parent.glob("*.thresholds.json"))[:MAX_MARKS]:
            try:
                data = read_marked_json(
                    path, THRESHOLDS_FORMAT, THRESHOLDS_VERSION, ReportError, "a thresholds file"
                )
            except ErdeError:
                continue
            source = (data.get("calibration") or {}).get("checkpoint")
            same = isinstance(source, str) and Path(source).resolve() == Path(checkpoint).resolve()
            if same and path.stat().st_mtime_ns >= written and (mark := _mark(data)):
                found.append(mark)
        if found:
            marks[name] = found
    return marks


# --------------------------------------------------------------------------- page


def page_data(
    report: Mapping[str, Any], marks: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
) -> dict[str, Any]:
    """What the page's script needs, taken from the report: one rule's sweep per model,
    points sorted by threshold."""
    ref = report["reference"]
    rule = ref.get("rule") or "entropy"
    models = []
    for index, (name, model) in enumerate(report["models"].items()):
        _, colour, _, _ = curve_style(name, index)
        points = sorted(
            (p for p in model["sweep"] if p["rule"] == rule), key=lambda p: p["threshold"]
        )
        red = model.get("mac_reduction") or {}
        models.append(
            {
                "name": name,
                "label": model_label(name),
                "colour": COLOURS.get(colour, colour),
                "macs_per_exit": model["macs_per_exit"],
                "exit_accuracy": model["exit_accuracy"],
                "exit_ece": model.get("exit_ece"),  # absent from reports written before it
                "threshold": [p["threshold"] for p in points],
                "accuracy": [p["accuracy"] for p in points],
                "mean_macs": [p["mean_macs"] for p in points],
                "exit_fractions": [p["exit_fractions"] for p in points],
                "start": red.get("threshold"),
                "marks": list((marks or {}).get(name, [])),
            }
        )
    dataset = report.get("dataset") or {}
    return {
        "title": f"Accuracy vs MACs{' on ' + dataset['name'] if dataset.get('name') else ''}",
        "rule": rule,
        "created": report.get("created"),
        "reference": {
            "model": ref["model"],
            "label": model_label(ref["model"]),
            "accuracy": ref["accuracy"],
            "macs": ref["macs"],
            # reports from before it was recorded have no "untrained"
            "warning": f"No MAC reduction: {untrained_text(ref)}."
            if ref.get("untrained")
            else None,
        },
        "models": models,
    }


def render_report_html(
    report: Mapping[str, Any], marks: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
) -> str:
    """The whole page as a string: style, data and script inline."""
    check_report(report)
    content = page_data(report, marks)
    data = json.dumps(content, default=io.json_default, allow_nan=False)
    data = data.replace("<", "\\u003c")  # no "</script>" can end the data block early
    parts = {
        "__TITLE__": html.escape(content["title"]),
        "__DATA__": data,
        "__SCRIPT__": _SCRIPT,
        "__DIAGNOSTICS__": diagnostics_html(report),
    }
    # one pass, so that no part's text (a model's name, say) is taken for another placeholder
    return re.sub("|".join(parts), lambda m: parts[m.group(0)], _PAGE)


def _with_code(text: str) -> str:
    """``text`` escaped, its `backticked` words as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def diagnostics_html(report: Mapping[str, Any]) -> str:
    """report.md's "what the entropy term changed" table as a static HTML section ("" where the
    run has none); every cell escaped."""
    table = diagnostics_table(report, model_label)
    if table is None:
        return ""
    text = _with_code(table.explanation)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    whole = "".join(f'<p class="whole-curve">{_with_code(line)}</p>' for line in table.whole_curve)
    return (
        f'<section id="diagnostics"><h2>{html.escape(table.title)}</h2>'
        f'<p class="note">{text}</p>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{whole}</section>"
    )


def write_report_html(
    out_dir: str | Path,
    report: Mapping[str, Any],
    marks: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> Path:
    """Write ``report.html`` into ``out_dir`` atomically; marks default to the thresholds files
    found beside the report's checkpoints."""
    page = render_report_html(report, threshold_marks(report) if marks is None else marks)
    path = Path(out_dir) / "report.html"
    io.atomic_write_text(path, page)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.3em; } .note { color: #666; }
svg text { font-size: 11px; fill: #333; }
.panel { border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; margin: .5em 0; }
.panel h2 { font-size: 1em; margin: 0 0 .3em; } .swatch { display: inline-block; width: 1em;
  height: .7em; margin-right: .4em; }
.panel input[type=range] { width: 100%; }
.readout { display: flex; flex-wrap: wrap; gap: 1.2em; } .readout b { font-variant-numeric: tabular-nums; }
.hist { display: flex; align-items: flex-end; gap: 3px; height: 48px; margin-top: .3em; }
.hist div { width: 32px; background: #999; position: relative; }
.hist span { position: absolute; bottom: -1.3em; font-size: 10px; left: 0; }
.marks { font-size: 12px; color: #444; }
#diagnostics table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
#diagnostics th, #diagnostics td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
#diagnostics th { background: #f6f6f6; font-weight: 600; } #diagnostics h2 { font-size: 1.1em; }
.exits { font-size: 12px; color: #555; margin-bottom: .3em; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<p class="note" id="subtitle"></p>
<svg id="plot" width="760" height="430" role="img" aria-label="accuracy versus mean MACs"></svg>
<div id="panels"></div>
__DIAGNOSTICS__
<script type="application/json" id="report-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const NS = "http://www.w3.org/2000/svg";
const W = 760, H = 430, L = 60, R = 20, T = 20, B = 45;
function count(v) {  // as report.md's fmt_count
  for (const [s, u] of [[1e9, "G"], [1e6, "M"], [1e3, "K"]]) if (Math.abs(v) >= s) return (v / s).toFixed(2) + u;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}
function pct(v) { return (100 * v).toFixed(2) + "%"; }
function el(tag, attrs, parent) {
  const e = tag.includes(":") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
const svg = document.getElementById("plot");
let xs = [], ys = [];
for (const m of D.models) { xs.push(...m.mean_macs, ...m.macs_per_exit); ys.push(...m.accuracy, ...m.exit_accuracy); }
const pos = xs.filter(v => v > 0);
const logX = pos.length > 0 && Math.max(...pos) >= 10 * Math.min(...pos);
const fx = v => logX ? Math.log10(Math.max(v, 1e-12)) : v;
let x0 = Math.min(...xs.map(fx)), x1 = Math.max(...xs.map(fx));
let y0 = Math.min(...ys) * 100, y1 = Math.max(...ys) * 100;
if (x1 === x0) { x0 -= 1; x1 += 1; } if (y1 === y0) { y0 -= 1; y1 += 1; }
{ const dx = 0.04 * (x1 - x0), dy = 0.04 * (y1 - y0); x0 -= dx; x1 += dx; y0 -= dy; y1 += dy; }
const px = v => L + (fx(v) - x0) / (x1 - x0) * (W - L - R);
const py = a => H - B - (100 * a - y0) / (y1 - y0) * (H - T - B);
function axes() {
  el("svg:line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#333"}, svg);
  el("svg:line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#333"}, svg);
  for (let i = 0; i <= 5; i++) {
    const a = (y0 + (y1 - y0) * i / 5) / 100, y = py(a);
    el("svg:line", {x1: L, y1: y, x2: W - R, y2: y, stroke: "#eee"}, svg);
    el("svg:text", {x: L - 6, y: y + 4, "text-anchor": "end"}, svg).textContent = (100 * a).toFixed(1);
    const f = x0 + (x1 - x0) * i / 5, v = logX ? Math.pow(10, f) : f, x = L + i / 5 * (W - L - R);
    el("svg:text", {x: x, y: H - B + 16, "text-anchor": "middle"}, svg).textContent = count(v);
  }
  el("svg:text", {x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle"}, svg).textContent =
    "Mean MACs per image" + (logX ? " (log scale)" : "");
  el("svg:text", {x: 14, y: (T + H - B) / 2, transform: `rotate(-90 14 ${(T + H - B) / 2})`,
    "text-anchor": "middle"}, svg).textContent = "Accuracy (%)";
}
axes();
const markers = [];
D.models.forEach((m, i) => {
  const order = m.mean_macs.map((_, k) => k).sort((a, b) => m.mean_macs[a] - m.mean_macs[b]);
  const pts = order.map(k => px(m.mean_macs[k]).toFixed(1) + "," + py(m.accuracy[k]).toFixed(1)).join(" ");
  el("svg:polyline", {points: pts, fill: "none", stroke: m.colour, "stroke-width": 1.5}, svg);
  for (const mk of m.marks) {
    const x = px(mk.mean_macs), y = py(mk.accuracy), s = 6;
    const shape = el("svg:polygon", {points: `${x},${y - s} ${x + s},${y} ${x},${y + s} ${x - s},${y}`,
      fill: mk.kind === "guaranteed" ? m.colour : "white", stroke: m.colour, "stroke-width": 1.5}, svg);
    el("svg:title", {}, shape).textContent = `${m.label}: ${mk.label}`;
  }
  markers.push(el("svg:circle", {r: 5, fill: m.colour, stroke: "white", "stroke-width": 1.5,
    id: `marker-${i}`, visibility: m.threshold.length ? "visible" : "hidden"}, svg));
});
document.getElementById("subtitle").textContent =
  `${D.rule} rule; reference: ${D.reference.label}, last exit, ${pct(D.reference.accuracy)} at ` +
  `${count(D.reference.macs)} MACs. Drag a slider to move its model's marker; ◆ marks thresholds ` +
  `chosen by erde calibrate (filled: guaranteed), at their test accuracy and MACs.` +
  (D.created ? ` Report created ${D.created}.` : "") +
  (D.reference.warning ? ` ${D.reference.warning}` : "");
function show(i, k) {
  const m = D.models[i];
  const macs = m.mean_macs[k], acc = m.accuracy[k];
  const set = (id, text, value) => { const e = document.getElementById(`${id}-${i}`);
    e.textContent = text; e.dataset.value = value; };
  set("theta", m.threshold[k].toPrecision(4), m.threshold[k]);
  set("acc", pct(acc), acc);
  set("macs", count(macs), macs);
  set("red", macs > 0 ? (D.reference.macs / macs).toFixed(2) + "×" : "—", macs > 0 ? D.reference.macs / macs : "");
  const bars = document.getElementById(`hist-${i}`).children;
  m.exit_fractions[k].forEach((f, e) => { bars[e].style.height = (44 * f + 1).toFixed(1) + "px";
    bars[e].title = `exit ${e}: ${(100 * f).toFixed(1)}%`; bars[e].dataset.value = f;
    bars[e].firstChild.textContent = (100 * f).toFixed(0) + "%"; });
  markers[i].setAttribute("cx", px(macs));
  markers[i].setAttribute("cy", py(acc));
}
const panels = document.getElementById("panels");
D.models.forEach((m, i) => {
  const p = el("div", {class: "panel", id: `panel-${i}`}, panels);
  const h = el("h2", {}, p);
  el("span", {class: "swatch", style: `background:${m.colour}`}, h);
  h.appendChild(document.createTextNode(`${m.label} (${m.name}) — full network ${count(m.macs_per_exit[m.macs_per_exit.length - 1])} MACs, last exit ${pct(m.exit_accuracy[m.exit_accuracy.length - 1])}`));
  const alone = el("div", {class: "exits", id: `exits-${i}`}, p);
  alone.textContent = `each exit alone: accuracy ${m.exit_accuracy.map(pct).join(" / ")}` +
    (m.exit_ece ? `; calibration error (ECE) ${m.exit_ece.map(pct).join(" / ")}` : "");
  if (!m.threshold.length) { el("p", {class: "note"}, p).textContent = `no ${D.rule} sweep for this model`; return; }
  const s = el("input", {type: "range", min: 0, max: m.threshold.length - 1, step: 1, id: `slider-${i}`,
    "aria-label": `${m.label} threshold`, list: `ticks-${i}`}, p);
  const ticks = el("datalist", {id: `ticks-${i}`}, p);
  const r = el("div", {class: "readout"}, p);
  for (const [id, label] of [["theta", "θ"], ["acc", "accuracy"], ["macs", "mean MACs"], ["red", `fewer MACs than ${D.reference.label}`]]) {
    const d = el("span", {}, r); d.appendChild(document.createTextNode(label + " "));
    el("b", {id: `${id}-${i}`}, d);
  }
  el("div", {class: "note"}, p).textContent = "share of images leaving at exit 0, 1, ...:";
  const hist = el("div", {class: "hist", id: `hist-${i}`, title: "share of images leaving at each exit"}, p);
  m.exit_fractions[0].forEach(() => el("span", {}, el("div", {}, hist)));
  el("div", {style: "height:1.2em"}, p);
  const notes = el("div", {class: "marks"}, p);
  for (const mk of m.marks) {
    let text = `◆ ${mk.label}: θ ${mk.thresholds.map(t => t.toPrecision(4)).join(", ")}, test accuracy ${pct(mk.accuracy)}, ${count(mk.mean_macs)} MACs`;
    const shared = mk.rule === D.rule && mk.thresholds.every(t => t === mk.thresholds[0]);
    if (shared && mk.thresholds.length) {
      let best = 0;
      m.threshold.forEach((t, k) => { if (Math.abs(t - mk.thresholds[0]) < Math.abs(m.threshold[best] - mk.thresholds[0])) best = k; });
      el("option", {value: best, label: mk.kind}, ticks);
      text += ` (tick on the slider at θ ${m.threshold[best].toPrecision(4)})`;
    }
    el("div", {}, notes).textContent = text;
  }
  let start = m.threshold.indexOf(m.start);
  s.value = start >= 0 ? start : 0;
  s.addEventListener("input", () => show(i, Number(s.value)));
  show(i, Number(s.value));
});
"""

__all__ = [
    "check_report",
    "diagnostics_html",
    "load_report",
    "page_data",
    "render_report_html",
    "threshold_marks",
    "write_report_html",
]
