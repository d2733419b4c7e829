"""One self-contained HTML page per run (`toydiff report RUN_DIR`; `toydiff run` writes it last): the verdict in
a sentence, the metrics beside their floors (flagged rows marked), the likelihoods, every figure and animation
inlined, the configuration and where the run came from.

    path = write_report("runs/demo")                    # runs/demo/report.html

Nothing on the page asks the network for anything (images are data: URIs, the style is inline, no script or
font is loaded) and nothing needs JavaScript; it reads on a phone and prints. Everything comes from the run
directory's own files, read through its RunDir.
"""

from __future__ import annotations

import base64
import html
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from ..core.files import atomic_write_text
from ..core.version import __version__
from ..evaluation.scores import efficacy_line
from ..runs.directory import RunDir

STYLE = """
body{font-family:Georgia,'Times New Roman',serif;max-width:62rem;margin:0 auto;padding:1rem;color:#1b1b1b;
line-height:1.45}
h1{font-size:1.5rem;margin:.2rem 0 .8rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}
.verdict{padding:.8rem 1rem;border-radius:.4rem;font-size:1.1rem;border:2px solid}
.indistinguishable{background:#e9f6ec;border-color:#2e7d32}.distinguishable{background:#fdecea;border-color:#c62828}
.inconclusive{background:#fff8e1;border-color:#b28704}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:.95rem}
th,td{padding:.25rem .6rem;text-align:right;border-bottom:1px solid #e3e3e3}th:first-child,td:first-child{text-align:left}
tr.flag td{background:#fdecea;font-weight:bold}figure{margin:1rem 0}img{max-width:100%;height:auto}
figcaption{font-size:.9rem;color:#555}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.85rem}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dt{color:#555}dd{margin:0}
@media print{body{max-width:none}figure,table{break-inside:avoid}}
"""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _num(v: Optional[float]) -> str:
    if v is None:
        return "missing"
    if not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _image(path: Path, alt: str) -> str:
    return _inline(path.read_bytes(), path.suffix.lstrip("."), alt)


def _inline(data: bytes, kind: str, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/{kind};base64,{encoded}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def _verdict(report: dict) -> str:
    return (f'<p class="verdict {report["verdict"].split(" ")[0]}"><strong>Verdict:</strong> '
            f"{html.escape(report['verdict'])}</p>")


def _facts(facts: dict) -> str:
    facts = {**facts, "reported by": f"toydiff {__version__}, torch {_version('torch')}, "
                                     f"Python {platform.python_version()}"}
    return "<h2>Provenance</h2><dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                                               for k, v in facts.items() if v is not None) + "</dl>"


def samples_page(title: str, report: dict, figure_png: bytes, facts: dict) -> str:
    """The page of samples toydiff did not make (`toydiff eval --samples FILE --report FILE.html`): the verdict,
    the metrics beside their floors, the samples over the data, where they came from."""
    parts = [f"<h1>{html.escape(title)}</h1>", _verdict(report), "<h2>Metrics</h2>", _metrics(report),
             "<h2>Figure</h2>", _inline(figure_png, "png", "the samples over the data"), _facts(facts)]
    return _page(title, parts)


def _metrics(report: dict) -> str:
    limit = report.get("z_limit")
    rows = ["<tr><th>metric</th><th>value</th><th>floor mean</th><th>floor std</th><th>z</th><th></th></tr>"]
    for name, r in report["metrics"].items():
        z = r.get("z")
        flagged = z is not None and limit is not None and z > limit
        rows.append(f'<tr{" class=flag" if flagged else ""} title="{html.escape(r.get("about", ""))}">'
                    f"<td>{html.escape(name)}</td><td>{_num(r['value'])}</td><td>{_num(r['floor_mean'])}</td>"
                    f"<td>{_num(r['floor_std'])}</td><td>{'' if z is None else _num(z)}</td>"
                    f"<td>{'flagged' if flagged else ''}</td></tr>")
    sampling = report.get("sampling") or {}
    nfe = (f"<p>{_num(report['nfe'])} network evaluations per sample ({html.escape(str(sampling.get('sampler')))}, "
           f"{sampling.get('steps')} steps, {html.escape(str(sampling.get('spacing')))} spacing).</p>"
           if report.get("nfe") is not None else "")
    limit_text = f" A row is flagged beyond z = {limit:.2f}." if limit is not None else ""
    if "efficacy" in report:
        nfe += f"<p>{html.escape(efficacy_line(report['efficacy']))}.</p>"
    return (f"<p>{report['n']} samples against as many fresh reference points; each metric beside its noise floor "
            f"(the same metric between two draws of the data), z in floor deviations, positive on the bad side."
            f"{limit_text}</p><div class=scroll><table>{''.join(rows)}</table></div>{nfe}")


def _likelihood(lik: dict) -> str:
    rows = ["<tr><th></th><th>nats / point</th><th>nats / dim</th><th>bits / dim</th><th>minus H</th></tr>"]
    names = {"elbo": "ELBO (NLL &le;)", "ode_nll": "ODE NLL", "entropy": "data entropy"}
    for key, label in names.items():
        v = lik["values"].get(key)
        if v is not None:
            rows.append(f"<tr><td>{label}</td><td>{_num(v['nats'])}</td><td>{_num(v['nats_per_dim'])}</td>"
                        f"<td>{_num(v['bits_per_dim'])}</td>"
                        f"<td>{'' if v.get('minus_entropy') is None else _num(v['minus_entropy'])}</td></tr>")
    return (f"<p>On {lik['n']} held-out points ({html.escape(str(lik.get('units', '')))}).</p>"
            f"<div class=scroll><table>{''.join(rows)}</table></div>")


def render(path: str | Path) -> str:
    """The report of the run directory at `path`, as one HTML string."""
    rd = RunDir(path)
    info = rd.read_manifest()
    cfg = rd.read_config()
    report = rd.read_metrics()
    name = rd.path.name
    parts = [f"<h1>toydiff run <code>{html.escape(name)}</code></h1>"]
    if report is None:
        parts.append(f'<p class="verdict inconclusive"><strong>Verdict:</strong> not evaluated yet: run '
                     f"<code>toydiff eval {html.escape(str(rd.path))}</code></p>")
    else:
        parts.append(_verdict(report))
    if report is not None:
        parts += ["<h2>Metrics</h2>", _metrics(report)]
        if report.get("likelihood"):
            parts += ["<h2>Likelihood</h2>", _likelihood(report["likelihood"])]
    pictures = sorted(rd.figures.glob("*.png")) + sorted(rd.figures.glob("*.gif")) if rd.figures.is_dir() else []
    if pictures:
        parts += ["<h2>Figures</h2>"] + [_image(p, p.stem.replace("_", " ")) for p in pictures]
    facts = {"data": info.get("source"), "dimensions": info.get("dim"), "training rows": info.get("n_train"),
             "parameters": info.get("parameters"), "seed": cfg.seed, "steps": info.get("steps"),
             "training seconds": info.get("train_seconds"), "device": info.get("device"),
             "threads": info.get("threads"), "created": info.get("created"),
             "teacher": info.get("teacher"), "distillation": info.get("method"),
             "made by": f"toydiff {info.get('toydiff_version', '?')}"}
    parts += [_facts(facts), "<h2>Configuration</h2>", f"<pre>{html.escape(cfg.to_toml())}</pre>"]
    return _page(f"toydiff: {name}", parts)


def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def study_page(name: str, header: list[str], rows: list[list[str]], figure: Optional[Path], seeds: int) -> str:
    """A study's page (study.html): its grid table (mean +- std over seeds per cell) and its plot, inlined."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    parts = [f"<h1>toydiff study <code>{html.escape(name)}</code></h1>",
             f"<p>{len(rows)} cells, {seeds} seed{'s' if seeds != 1 else ''} each: mean +- std over the seeds; z in "
             "noise-floor deviations; the last column counts the runs judged indistinguishable from data.</p>",
             f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"]
    if figure is not None and figure.is_file():
        parts.append(_image(figure, "the grid's metrics, cell by cell"))
    parts.append(f"<p>Made by toydiff {__version__}; every run's own directory is under runs/.</p>")
    return _page(f"toydiff study: {name}", parts)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report to `out` (default RUN_DIR/report.html, holding the run directory's lock),
    atomically; returns where."""
    rd = RunDir(path)
    if out is not None:
        atomic_write_text(Path(out), render(path))
        return Path(out)
    with rd.writing():
        atomic_write_text(rd.report, render(path))
    return rd.report
