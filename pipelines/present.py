"""What a person sees of a run in the Kubeflow UI: self-contained HTML and Markdown made from the files the
stages wrote (images are embedded, so a page needs nothing beside it)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

STYLE = ("<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:0.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
         ".pass{color:#17702b}.fail{color:#b00020;font-weight:bold}"
         "iframe{width:100%;height:70vh;border:1px solid #ccc}</style>")


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
            f"<body><h2>{html.escape(title)}</h2>{body}</body></html>")


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}' style='max-width:100%'>"


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def data_docs(validated: Path) -> str:
    """The great-expectations data docs of `tim validate`: a summary, then each suite's validation page."""
    result = json.loads((validated / "result.json").read_text())
    rows = [[v["table"], "passed" if v["success"] else "FAILED", len(v["results"]),
             sum(not r["success"] for r in v["results"])] for v in result["validations"]]
    parts = [f"<p>{'Every expectation passed.' if result['success'] else 'Some expectations FAILED.'} "
             "The whole data-docs site is in this task's <code>validated</code> artifact (docs/index.html).</p>",
             table(["suite", "result", "expectations", "failed"], rows)]
    for doc in sorted((validated / "docs" / "validations").rglob("*.html")):
        parts.append(f"<h3>{html.escape(doc.stem)}</h3><iframe srcdoc=\"{html.escape(doc.read_text(), quote=True)}\">"
                     "</iframe>")
    return page("Data validation (great-expectations)", "".join(parts))


def figures_table(summary: dict[str, dict[str, float]]) -> str:
    keys = ["fid", "kid", "precision", "recall", "accuracy", "sec_per_image"]
    rows = [[int(k.removeprefix("nfe_")), *[v[m] for m in keys]]
            for k, v in sorted(summary.items(), key=lambda kv: int(kv[0].removeprefix("nfe_")))]
    return table(["NFE", "FID", "KID", "precision", "recall", "accuracy", "s / image"], rows)


def evaluation(out: Path) -> str:
    """`tim evaluate`'s report: FID and accuracy per NFE at each guidance scale (and the raw weights), the floor,
    the monotonicity verdicts, the FID-vs-NFE plot and the samples."""
    result = json.loads((out / "metrics.json").read_text())
    verdict = {True: "yes", False: "NO", None: "unknown"}
    parts = [f"<p>objective {html.escape(str(result['objective']))}, {html.escape(result['mode'])} sampling, "
             f"{result['samples_per_set']} samples a set; floor (validation vs train) FID "
             f"{result['floor']['fid']:.4g}</p>"]
    scales = result.get("scales") or {f"{result['cfg_scale']:g}": {"ema": result["ema"],
                                                                    "monotone": result["monotone"]}}
    for key, figures in scales.items():
        parts += [f"<h3>EMA weights, guidance {html.escape(key)}</h3>",
                  f"<p>FID within its noise as NFE grows: <b>{verdict[figures['monotone']['verdict']]}</b></p>",
                  figures_table(figures["ema"])]
    if "raw" in result:
        parts += [f"<h3>raw weights, guidance {result['cfg_scale']:g}</h3>", figures_table(result["raw"])]
    parts += ["<h3>FID against NFE</h3>", image(out / "fid_vs_nfe.png", "FID against NFE"),
              "<h3>samples</h3>", image(out / "samples.png", "samples at each NFE")]
    return page("Evaluation", "".join(parts))


def grid(png: Path, title: str) -> str:
    return page(title, image(png, title))


def decision(d: dict[str, Any]) -> str:
    """The promotion decision with its reasons, as Markdown."""
    lines = [f"# {d['model']} version {d['challenger']['version']}: {d['verdict'].upper()}", ""]
    rule = d.get("rule", {})
    if rule:
        lines += [f"Gate: {rule['metric']} at NFE {rule['nfe']}, beat the champion by max({rule['min_improvement']}, "
                  f"{rule['min_rel_improvement']} x its figure); monotone required: {rule['require_monotone']}", ""]
    if d.get("checks"):
        lines += ["| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c['check']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |" for c in d["checks"]]
        lines.append("")
    champion = d.get("champion")
    lines.append(f"Champion before: {'version ' + champion['version'] if champion else 'none'}; "
                 f"aliases now: {d.get('aliases') or 'none'}")
    return "\n".join(lines) + "\n"
