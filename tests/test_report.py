"""report.html: one self-contained page per run, checked by parsing it (no network reference of any kind, every
image inlined and decodable, the verdict and the metrics table as metrics.json has them)."""

import base64
import contextlib
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

import toydiff
from toydiff.cli import main
from toydiff.core.errors import ToydiffError

QUICK = ["--set", "train.steps=60", "--set", "train.batch_size=128", "--set", "data.n=500", "--set", "schedule.T=16",
         "--set", "eval.n=300", "--set", "eval.draws=3", "--set", "eval.nll_n=50", "--set", "sample.n=300"]


class Page(HTMLParser):
    """What a browser would fetch or show: every src / href and url(...), the images, table rows, text."""

    def __init__(self):
        super().__init__()
        self.refs, self.images, self.rows, self.text, self.scripts = [], [], [], [], 0
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "img":
            self.images.append(a["src"])
        if tag == "script" or tag == "link":
            self.scripts += 1
        if tag == "tr":
            self._row = {"class": a.get("class"), "cells": []}

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row["cells"].append(data.strip())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, unchanged):
    """A short evaluated `toydiff run`, and what it printed."""
    out = tmp_path_factory.mktemp("report") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "--quiet", "--out", str(out)] + QUICK) == 0
    return unchanged(out), printed.getvalue()


def test_toydiff_run_writes_a_self_contained_report_and_names_it_last(evaluated):
    from PIL import Image

    evaluated, printed = evaluated
    assert printed.strip().splitlines()[-1] == f"report: {evaluated / 'report.html'}"
    text = (evaluated / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert page.scripts == 0 and "url(" not in text and "@import" not in text
    assert all(ref.startswith("data:image/") for ref in page.refs), [r[:40] for r in page.refs]
    figures = sorted(p.name for p in (evaluated / "figures").iterdir())
    assert len(page.images) == len(figures) >= 6  # the guide's five and the loss curve
    for src in page.images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    report = json.loads((evaluated / "metrics.json").read_text())
    assert report["verdict"] in "".join(page.text)
    metric_rows = {r["cells"][0]: r for r in page.rows if r["cells"] and r["cells"][0] in report["metrics"]}
    assert set(metric_rows) == set(report["metrics"])
    for name, m in report["metrics"].items():  # flagged exactly where z passes the limit metrics.json names
        flagged = m["z"] is not None and m["z"] > report["z_limit"]
        assert (metric_rows[name]["class"] == "flag") == flagged and ("flagged" in metric_rows[name]["cells"]) == flagged
    assert "ODE NLL" in text and "[train]" in text and "Provenance" in text


def test_a_report_can_be_rewritten_elsewhere_and_an_animation_joins_it(evaluated, tmp_path, capsys):
    evaluated = shutil.copytree(evaluated[0], tmp_path / "run")  # the animation joins the copy's figures
    assert main(["animate", str(evaluated), "--frames", "3", "--n", "50", "--quiet"]) == 0
    out = tmp_path / "r.html"
    assert main(["report", str(evaluated), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {out}")
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    assert sum(src.startswith("data:image/gif;base64,") for src in page.images) == 1


@pytest.mark.parametrize("make, args, message", [
    ("none", [], "does not exist"),
    ("train", [], "has no samples to report on"),
    ("none", ["--out", "r.txt"], "--out must end in .html"),
    ("train+sample", ["--out", "/proc/r.html"], "cannot write '/proc/r.html'"),  # a folder nobody can write to
])
def test_bad_report_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, args, message):
    run = tmp_path / "run"
    if make.startswith("train"):
        assert main(["train", "--quiet", "--out", str(run), "--set", "train.steps=2", "--set", "schedule.T=4"]) == 0
    if make == "train+sample":
        assert main(["sample", str(run), "--n", "20"]) == 0
    before = sorted(p.name for p in run.iterdir()) if run.exists() else None
    assert main(["report", str(run)] + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert (sorted(p.name for p in run.iterdir()) if run.exists() else None) == before


def _browser():
    """A headless chromium under chromedriver (Debian's, as `make browser` installs them) that can reach no
    network: a dead proxy, no name resolution, and the DevTools network emulation set offline."""
    import os
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("TOYDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail("TOYDIFF_REQUIRE_BROWSER=1 but chromium or chromedriver is missing; run `make browser`")
        pytest.skip("no chromium and chromedriver here (`make browser` installs them on Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1600",
                "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    return browser


def test_the_report_opens_in_a_headless_browser_with_the_network_off(evaluated, tmp_path):
    """Every image decoded (naturalWidth > 0), the verdict and the metrics table in the DOM, no request but the
    page itself and its data: URIs, no failed request, no console error; a screenshot kept beside the test."""
    run_dir = evaluated[0]
    browser = _browser()
    try:
        browser.get((run_dir / "report.html").as_uri())
        widths = browser.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        page = Page()
        page.feed((run_dir / "report.html").read_text(encoding="utf-8"))
        assert len(widths) == len(page.images) >= 6 and min(widths) > 0, widths
        report = json.loads((run_dir / "metrics.json").read_text())
        assert report["verdict"] in browser.find_element("css selector", ".verdict").text
        cells = browser.execute_script("return Array.from(document.querySelectorAll('td:first-child'))"
                                       ".map(c => c.textContent)")
        assert set(report["metrics"]) <= set(cells)
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
        events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
        assert all(u.startswith("data:") or u == (run_dir / "report.html").as_uri() for u in urls), urls
        assert not [e for e in events if e["method"] == "Network.loadingFailed"]
        assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    finally:
        browser.quit()


def test_any_generator_s_samples_are_judged_as_a_run_s_are(evaluated, capsys):
    """`toydiff eval --samples FILE --dataset NAME`: a file of samples (here the run's own, written out) against the
    named dataset's fresh draws and floors gives the run's own metrics (the memorization metric aside: a file has
    no training rows)."""
    run_dir = evaluated[0]
    assert main(["eval", "--samples", str(run_dir / "samples.csv"), "--dataset", "moons", "--set", "eval.n=300",
                 "--set", "eval.draws=3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run_dir / "metrics.json").read_text())
    table = {line.split()[0]: line.split()[1] for line in printed.splitlines()[2:] if line and line[0].isalpha()}
    for name in ("knn_auc", "mmd2", "w2", "precision", "off_data"):
        assert float(table[name]) == pytest.approx(report["metrics"][name]["value"], rel=1e-3, abs=1e-6), name
    assert table["memorized"] == "missing"


def test_judged_samples_get_a_self_contained_page(evaluated, tmp_path, capsys):
    from PIL import Image

    page_path = tmp_path / "judged.html"
    assert main(["eval", "--samples", str(evaluated[0] / "samples.npy"), "--set", "eval.n=300", "--set",
                 "eval.draws=3", "--quiet", "--report", str(page_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {page_path}")
    text = page_path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert page.scripts == 0 and all(ref.startswith("data:image/") for ref in page.refs) and len(page.images) == 1
    with Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))) as im:
        assert im.size[0] > 100
    assert "Verdict:" in text and "knn_auc" in text and "samples.npy" in text
    assert main(["eval", "--samples", str(evaluated[0] / "samples.npy"), "--report", str(tmp_path / "x.txt")]) == 2
    assert "--report must end in .html" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--samples", "S", "RUN"], "drop RUN_DIR"),
    (["--samples", "S", "--set", "train.steps=3"], "only [data] and [eval] settings"),
    (["--samples", "S", "--dataset", "gmm", "--set", "data.dim=3"], "the samples have 2 columns but the data has 3"),
    (["--samples", "missing.csv"], "does not exist"),
    (["--dataset", "moons"], "go with --samples"),
    ([], "name the run to judge"),
])
def test_bad_samples_judging_input_is_one_line(evaluated, capsys, args, message):
    samples = str(evaluated[0] / "samples.csv")
    argv = ["eval"] + [samples if a == "S" else str(evaluated[0]) if a == "RUN" else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_python_api_judges_samples_as_the_command_does(evaluated, tmp_path):
    """toydiff.evaluate_samples is what `toydiff eval --samples` runs: an array gives the same metrics as its file,
    and the API refuses what the command refuses, in one line."""
    x = np.load(evaluated[0] / "samples.npy")
    settings = ["eval.n=300", "eval.draws=3"]
    from_array = toydiff.evaluate_samples(x, "moons", settings=settings, quiet=True)
    from_file = toydiff.evaluate_samples(evaluated[0] / "samples.npy", settings=settings, quiet=True,
                                         report=tmp_path / "p.html")
    for name in ("knn_auc", "mmd2", "w2", "off_data"):
        assert from_array["metrics"][name]["value"] == from_file["metrics"][name]["value"], name
    assert from_array["n"] == 300 and (tmp_path / "p.html").read_text(encoding="utf-8").count("Verdict:") == 1
    for kwargs, message in [({"settings": ["train.steps=3"]}, r"only \[data\] and \[eval\] settings"),
                            ({"settings": "eval.n=3"}, "a list of section.key=value strings"),
                            ({"dataset": "moon"}, "did you mean 'moons'"),
                            ({"report": tmp_path / "p.txt"}, "an .html page"),
                            ({"samples": np.array([["a", "b"]] * 30, dtype=object)}, "an \\(n, D\\) array of numbers")]:
        with pytest.raises(ToydiffError, match=message):
            toydiff.evaluate_samples(**{"samples": x, **kwargs})
    assert not (tmp_path / "p.txt").exists()
