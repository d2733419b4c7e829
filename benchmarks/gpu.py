"""The GPU checks of issue #17 in one prepared run: how close toydiff's fast paths come to the accelerator's ceiling.

  sampling   samples/s of `Run.sample` (ddim, NFE 1, 4, 10, 50 steps) at batch 2^16 .. 2^22, for the default
             network and a width-256, 4-block one, run eagerly, with CUDA graphs (the whole K-step loop
             captured once per batch shape), torch.compile, both, and graphs + bf16; each as a share of the
             ceiling, the same network's compiled single forward at that batch times NFE. Steady state: the
             time of R2 batches minus that of R1 (the first batch of a job runs eagerly and is captured).
             Beside each eager cell, the eager loop alone on one batch: Run.sample's own share shows.
  training   ms per training step of the default network at batch 256, 1024 and 4096, eager against the
             step captured in a CUDA graph (train.cuda_graphs), and how the two loss curves compare
  quality    `toydiff run` on the GPU (the default and the fast preset): seconds to the verdict, beside
             the CPU figure of docs/results/time_to_quality.json
  large      `toydiff sample --n 1e8 --out FILE.npy --device cuda` streamed: wall time, peak host memory of
             the process and peak device memory
  no_cuda    `--device cuda` where CUDA is absent: one line and exit code 2 (run on the CPU only)

Cells run in order of importance until --budget seconds are spent; a skipped cell says so. Prints JSON and a
markdown table, and writes docs/results/gpu.json and gpu.md (--smoke: tiny sizes on the CPU, into --out, so
CI keeps the script working; the numbers of a smoke run mean nothing).

    python benchmarks/gpu.py                      # on a GPU machine, about 8 minutes
    python benchmarks/gpu.py --smoke --out /tmp/g  # anywhere, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from report import machine, publish
from toydiff.core import config as C
from toydiff.api import run as run_experiment
from toydiff.core.runtime import NoiseStream
from toydiff.jobs.workflow import untrained_run

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"default": [], "width-256x4": ["model.width=256", "model.depth=4"]}
MODES = {  # name: Run.sample options
    "eager": dict(cuda_graphs="off"),
    "graphs": dict(cuda_graphs="on"),
    "compile": dict(cuda_graphs="off", compile=True),
    "compile+graphs": dict(cuda_graphs="on", compile=True),
    "graphs+bf16": dict(cuda_graphs="on", autocast="bf16"),
}
CUDA_ONLY = ("graphs", "compile+graphs", "graphs+bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _run(model: str, device: torch.device, extra: list[str] = ()):
    cfg = C.with_overrides(C.ExperimentConfig(), MODELS[model] + ["data.n=4096", f"train.device={device}", *extra])
    return untrained_run(cfg, device=device)


def ceiling_seconds(run, batch: int, compiled: bool, device: torch.device, repeats: int = 5) -> float:
    """One forward of the network at `batch` (compiled where asked): the time a sampler's step cannot beat."""
    net = run._compiled() if compiled else run.model  # the Run's own compiled network: sampling reuses it
    x = torch.randn(batch, run.dim, device=device)
    t = torch.full((1,), run.schedule.T // 2, device=device)  # one t for the batch, as the samplers call it
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            sync(device)
            start = time.perf_counter()
            net(x, t)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_seconds(run, batch: int, nfe: int, device: torch.device, repeats: int = 3) -> float:
    """The eager sampling loop alone on one batch (the plan's sampler on the denoiser, no NoiseStream setup, no
    copy to the host, no scaler): what Run.sample's own per-batch work adds shows against it."""
    plan = run.plan(run.settings(sampler="ddim", steps=nfe))
    denoiser = run.denoiser_for(None, 1.0)
    x = torch.randn(batch, run.dim, device=device)
    noise = NoiseStream(0, 0, batch, device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        plan.run(denoiser, x, noise=noise)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def sample_seconds(run, batch: int, nfe: int, options: dict, r1: int, r2: int) -> tuple[float, str]:
    """Seconds per batch in steady state: (time of r2 batches - time of r1 batches) / (r2 - r1)."""
    note = {}

    def job(batches: int) -> float:
        start = time.perf_counter()
        drawn = run.draw(batch * batches, seed=0, batch_size=batch, sampler="ddim", steps=nfe, **options)
        note["graphs"] = drawn.record.get("cuda_graphs", "")
        return time.perf_counter() - start
    job(1)  # compiles and warms up (a compiled network recompiles for each new batch shape)
    per_batch = (job(r2) - job(r1)) / (r2 - r1)
    return max(per_batch, 1e-9), note["graphs"]


def sampling_rows(device: torch.device, smoke: bool, budget: Budget) -> list[dict]:
    cuda = device.type == "cuda"
    batches = [2**8, 2**10] if smoke else [2**20, 2**16, 2**18, 2**22]  # the goal's batch first
    nfes = [1, 4] if smoke else [10, 1, 4, 50]
    r1, r2 = (1, 2) if smoke else (2, 5)
    rows = []
    runs = {model: _run(model, device) for model in MODELS}  # one Run each: its compiled network is reused
    for batch in batches:
        for model, run in runs.items():
            ceiling = None
            for nfe in nfes:
                for mode, options in MODES.items():
                    row = {"model": model, "batch": batch, "nfe": nfe, "mode": mode}
                    rows.append(row)
                    if mode in CUDA_ONLY and not cuda:
                        row["skipped"] = "needs CUDA"
                        continue
                    if "compile" in mode and (smoke or nfe == 50):
                        row["skipped"] = "smoke run" if smoke else "compile measured at NFE 1-10"
                        continue
                    if budget.left() < 0:
                        row["skipped"] = "over the time budget"
                        continue
                    if ceiling is None:
                        ceiling = ceiling_seconds(run, batch, compiled=cuda and not smoke, device=device)
                    seconds, note = sample_seconds(run, batch, nfe, options, r1, r2)
                    row.update(samples_per_s=batch / seconds, ms_per_batch=1e3 * seconds,
                               ceiling_ms=1e3 * ceiling * nfe, of_ceiling=ceiling * nfe / seconds, graphs=note)
                    if mode == "eager":  # how much of a batch is the loop itself, and how much Run.sample's own
                        row["loop_ms"] = 1e3 * loop_seconds(run, batch, nfe, device)
                    print(f"sampling {model} batch {batch} NFE {nfe} {mode}: {row['samples_per_s']:.3g}/s, "
                          f"{100 * row['of_ceiling']:.0f}% of the ceiling", file=sys.stderr, flush=True)
    return rows


def training_rows(device: torch.device, smoke: bool, budget: Budget) -> list[dict]:
    from toydiff import train_run

    steps = 40 if smoke else 1500
    rows = []
    for batch in ([64] if smoke else [1024, 256, 4096]):
        row = {"batch": batch, "steps": steps}
        rows.append(row)
        if budget.left() < 0:
            row["skipped"] = "over the time budget"
            continue
        curves = {}
        for mode in ("off", "on"):
            if mode == "on" and device.type != "cuda":
                row["graphs"] = "needs CUDA"
                continue
            cfg = C.with_overrides(C.ExperimentConfig(), [
                f"train.device={device}", f"train.batch_size={batch}", f"train.steps={steps}", "train.log_every=20",
                "train.checkpoint_every=0", f"train.cuda_graphs={mode}", "data.n=10000"])
            with tempfile.TemporaryDirectory() as tmp:
                trained = train_run(cfg, Path(tmp) / "run")
                info = json.loads((trained.path / "run.json").read_text())
                log = (trained.path / "train_log.csv").read_text().splitlines()[1:]
            curves[mode] = [float(line.split(",")[1]) for line in log]
            row[f"{'graphs' if mode == 'on' else 'eager'}_ms"] = 1e3 * info["train_seconds"] / steps
            if mode == "on":
                row["graphs"] = info.get("cuda_graphs", "")
        if len(curves) == 2:
            a, b = curves["off"], curves["on"]
            row["loss_curves"] = "bit-identical" if a == b else \
                f"max relative difference {max(abs(x - y) / abs(x) for x, y in zip(a, b)):.1e}"
            row["speedup"] = row["eager_ms"] / row["graphs_ms"]
        print(f"training batch {batch}: {row}", file=sys.stderr, flush=True)
    return rows


def quality_rows(device: torch.device, smoke: bool, budget: Budget, keep: Path) -> list[dict]:
    cpu = json.loads((ROOT / "docs/results/time_to_quality.json").read_text())
    cpu_default = next((r["hit"] for r in cpu["rows"] if r["setting"] == "toydiff default" and r.get("hit")), None)
    rows = []
    for preset in ("default",) if smoke else ("default", "fast"):
        row = {"preset": preset}
        rows.append(row)
        if budget.left() < 0:
            row["skipped"] = "over the time budget"
            continue
        extra = {"train": {"device": str(device), **({"steps": 60} if smoke else {})},
                 **({"sample": {"n": 500}, "eval": {"draws": 3}} if smoke else {})}
        start = time.perf_counter()
        exp = run_experiment(extra, keep / preset, preset=preset, figures=False, progress=False, quiet=True)
        row.update(seconds=time.perf_counter() - start, verdict=exp.verdict,
                   train_seconds=json.loads((exp.path / "run.json").read_text())["train_seconds"])
        if preset == "default" and cpu_default:
            row["cpu_train_seconds_to_verdict"] = cpu_default["train_s"]
        print(f"quality {preset}: {row}", file=sys.stderr, flush=True)
    return rows


LARGE_CHILD = """
import json, resource, sys, time, torch
from toydiff.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "device_peak_mb": peak / 2**20,
                  "host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def large_row(device: torch.device, smoke: bool, budget: Budget, run_dir: Path, tmp: Path) -> dict:
    n = 10**5 if smoke else 10**8
    row = {"n": n}
    if budget.left() < 0 or not (run_dir / "run.json").exists():
        row["skipped"] = "over the time budget" if budget.left() < 0 else "no trained run"
        return row
    out = tmp / "large.npy"
    args = [str(run_dir), "--n", str(n), "--out", str(out), "--device", str(device), "--batch-size",
            str(2**20 if not smoke else 2**14), "--sampler", "ddim", "--steps", "10", "--quiet"]
    done = subprocess.run([sys.executable, "-c", LARGE_CHILD, "sample", *args], capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-300:]}
    row.update(result, file_mb=out.stat().st_size / 2**20 if out.exists() else 0.0)
    if "seconds" in row:
        row["samples_per_s"] = n / row["seconds"]
    out.unlink(missing_ok=True)
    print(f"large: {row}", file=sys.stderr, flush=True)
    return row


def no_cuda_row(run_dir: Path) -> dict:
    """`--device cuda` on a machine without CUDA: the one-line error (only meaningful off a GPU machine)."""
    if torch.cuda.is_available() or not (run_dir / "run.json").exists():
        return {"skipped": "CUDA is present" if torch.cuda.is_available() else "no trained run"}
    done = subprocess.run([sys.executable, "-m", "toydiff", "sample", str(run_dir), "--n", "10", "--device", "cuda"],
                          capture_output=True, text=True)
    return {"code": done.returncode, "stderr": done.stderr.strip()}


def _num(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def _section(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, after a blank line."""
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def table(report: dict) -> str:
    lines = [f"Machine: {report['meta']['device']}; torch {report['meta']['torch']}."]
    lines += _section(
        ["sampling (ddim)", "model", "batch", "NFE", "mode", "samples/s", "ms/batch", "ceiling ms", "of ceiling",
         "eager loop alone ms"],
        [["", r["model"], f"2^{r['batch'].bit_length() - 1}", str(r["nfe"]), r["mode"],
          _num(r, "samples_per_s", ".3g"), _num(r, "ms_per_batch", ".2f"), _num(r, "ceiling_ms", ".2f"),
          f"{100 * r['of_ceiling']:.0f}%", _num(r, "loop_ms", ".2f")]
         for r in report["sampling"] if "skipped" not in r])
    lines += _section(
        ["training step (default model)", "batch", "eager ms", "graphs ms", "speed-up", "loss curves", "graphs"],
        [["", str(r["batch"]), _num(r, "eager_ms", ".3f"), _num(r, "graphs_ms", ".3f"), _num(r, "speedup", ".2f"),
          r.get("loss_curves", "-"), r.get("graphs", r.get("skipped", "-"))] for r in report["training"]])
    lines += _section(
        ["toydiff run", "preset", "seconds", "training s", "verdict", "CPU training s to the verdict"],
        [["", r["preset"], _num(r, "seconds", ".1f"), _num(r, "train_seconds", ".1f"),
          r.get("verdict", r.get("skipped", "-")), str(r.get("cpu_train_seconds_to_verdict", "-"))]
         for r in report["quality"]])
    g = report["large"]
    lines += _section(
        ["streamed sample to .npy", "n", "seconds", "samples/s", "host peak MB", "device peak MB", "file MB"],
        [["", f"{g['n']:.0e}", _num(g, "seconds", ".1f"), _num(g, "samples_per_s", ".3g"),
          _num(g, "host_peak_mb", ".0f"), _num(g, "device_peak_mb", ".0f"), _num(g, "file_mb", ".0f")]])
    skipped = sum("skipped" in r for r in report["sampling"])
    if skipped:
        lines += ["", f"{skipped} sampling cells skipped (CUDA-only modes off a GPU, compile at NFE 50, "
                      "or the budget)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on whatever device there is (CI)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the training and sampling cells "
                        "(default 300; the toydiff runs and the streamed job come after, about 3 minutes)")
    parser.add_argument("--out", default=None, help="folder for gpu.json and gpu.md (default: docs/results; "
                                                    "with --smoke, benchmarks/results)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device here; run it on a GPU machine, or with --smoke for the CPU check")
    torch._dynamo.config.cache_size_limit = 64  # one compiled network per model, recompiled per batch shape
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.set_num_threads(1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = {"meta": machine(device=name, smoke=args.smoke, budget_s=args.budget)}
    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["training"] = training_rows(device, args.smoke, budget)
        report["sampling"] = sampling_rows(device, args.smoke, budget)
        report["quality"] = quality_rows(device, args.smoke, Budget(max(budget.left(), 60)), tmp)
        report["large"] = large_row(device, args.smoke, Budget(max(budget.left(), 30)), tmp / "default", tmp)
        report["no_cuda"] = no_cuda_row(tmp / "default")
    out = args.out or ("benchmarks/results" if args.smoke else "docs/results")
    publish(out, "gpu", report, table(report))


if __name__ == "__main__":
    main()
