"""Speed of toydiff's training loop and sampler against their floors, side by side in one process.

  train_overhead   toydiff's `train` (batch draw, t and eps draws, loss, AdamW, LR schedule, gradient clip,
                   EMA, divergence tracking) per step, against the bare forward + backward + AdamW step of
                   the same model on a fixed batch, with toydiff's own (fused) AdamW: the floor for that
                   model and batch, so the difference is what the loop adds
  naive_loop       a seed-style loop as the guide writes it (fresh t and eps each step, MSE, torch's
                   default AdamW, nothing else), same model and batch
  threads          toydiff's loop at 1 and 2 torch threads, on an idle machine and beside one busy process
                   (a second job on the machine): why train.threads = auto is 1 on the CPU
  sampling         `Run.sample(n)` with S ancestral steps against S batched forward passes of the same n
                   (the floor; with t per row, and with one t for the batch as the samplers call it),
                   n = 1e3 .. 1e6 (1e7 with --big) in bounded-memory batches, and each call's peak memory
  scaling          per-step training cost against dataset rows (1e3 .. 1e7) and dimension (2 .. 64)
  compile          torch.compile against eager: a training step, and a sampling forward pass

Interleaved repeats, the median of each: ratios hold on a noisy machine. Prints JSON and a markdown table
and writes benchmarks/results/speed.json and speed.md.

    .venv/bin/python benchmarks/speed.py            # 3 to 14 minutes on 2 CPU cores (machines differ)
    .venv/bin/python benchmarks/speed.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from report import machine, publish
from toydiff.core import config as C
from toydiff import train_run
from toydiff.diffusion.losses import UniformTimesteps
from toydiff.methods.ddpm import Denoising
from toydiff.diffusion.models import build_model
from toydiff.diffusion.parameterization import Prediction, training_target
from toydiff.diffusion.schedules import NoiseSchedule
from toydiff.training.loop import make_optimizer, make_state, train


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_rows(steps: int, repeats: int, batch: int = 1024, dim: int = 2, rows: int = 10_000,
                  threads: int = 1) -> dict:
    """Seconds per step: toydiff's loop, the bare step on a fixed batch, and the guide-style loop."""
    torch.set_num_threads(threads)
    cfg = C.ExperimentConfig()
    tcfg = C.with_overrides(cfg, [f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=1000000",
                                  "train.checkpoint_every=0"]).train
    schedule = NoiseSchedule.from_config(cfg.schedule)
    x0 = torch.randn(rows, dim)
    model = build_model(cfg.model, dim, schedule.T)

    def toydiff_loop():
        state = make_state(model, tcfg, UniformTimesteps(schedule.T), torch.Generator().manual_seed(0))
        train(state, schedule, x0, tcfg, Denoising(Prediction.V))

    t_fixed = torch.randint(1, schedule.T + 1, (batch,))
    eps_fixed = torch.randn(batch, dim)
    xb = x0[torch.randint(0, rows, (batch,))]
    x_t = schedule.q_sample(xb, t_fixed, eps_fixed)
    target = training_target(Prediction.V, xb, eps_fixed, schedule.gather(schedule.alpha_bar, t_fixed, xb))
    bare_opt = make_optimizer(model, tcfg)  # the same (fused) AdamW as toydiff's: the floor measures the loop

    def bare_steps():
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x_t, t_fixed), target)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()

    sqrt_ab, sqrt_1m = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    naive_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def naive_loop():  # the guide's loop: a random batch, t, eps, x_t in closed form, MSE on the target, step
        for _ in range(steps):
            idx = torch.randint(0, rows, (batch,))
            x = x0[idx]
            t = torch.randint(1, schedule.T + 1, (batch,))
            eps = torch.randn_like(x)
            xt = sqrt_ab[t][:, None] * x + sqrt_1m[t][:, None] * eps
            loss = nn.functional.mse_loss(model(xt, t), sqrt_ab[t][:, None] * eps - sqrt_1m[t][:, None] * x)
            naive_opt.zero_grad()
            loss.backward()
            naive_opt.step()

    toydiff_loop(), bare_steps(), naive_loop()  # warm-up: first-call imports and allocations
    results = {"toydiff": [], "bare": [], "naive": []}
    for _ in range(repeats):  # interleaved, so drifts of the machine hit all three alike
        results["toydiff"].append(_median_time(toydiff_loop, 1) / steps)
        results["bare"].append(_median_time(bare_steps, 1) / steps)
        results["naive"].append(_median_time(naive_loop, 1) / steps)
    out = {k: statistics.median(v) for k, v in results.items()}
    return {"batch": batch, "dim": dim, "rows": rows, "threads": threads, "toydiff_ms": 1e3 * out["toydiff"],
            "bare_ms": 1e3 * out["bare"], "naive_ms": 1e3 * out["naive"],
            "overhead_vs_bare": out["toydiff"] / out["bare"] - 1, "vs_naive": out["toydiff"] / out["naive"]}


def thread_rows(steps: int, repeats: int) -> list[dict]:
    """ms per training step at 1 and 2 threads, batch 1024 and 4096, idle and beside a process that keeps one
    core busy (what a second job, a browser or a CI neighbour does to a 2-core machine)."""
    rows = []
    for load in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
        try:
            for batch in (1024, 4096):
                for threads in (1, 2):
                    r = training_rows(steps, repeats, batch=batch, threads=threads)
                    rows.append({"busy_process": load, "batch": batch, "threads": threads, "toydiff_ms": r["toydiff_ms"]})
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    torch.set_num_threads(1)
    return rows


def _peak_rss_mb(run_dir: Path, n: int, steps: int) -> float:
    """Peak resident memory (MB) of a fresh process that loads the run and draws n samples."""
    code = ("import resource, sys, torch; torch.set_num_threads(1); from toydiff import Run; "
            f"Run.load(sys.argv[1]).sample({n}, steps={steps}, sampler='ddpm'); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def sampling_rows(ns: list[int], steps: int, repeats: int) -> list[dict]:
    """Run.sample(n) with `steps` ancestral steps against `steps` forward passes over the same n points, with
    t per row (how a network is called in training: the issue's floor) and with one t for the batch (how
    toydiff's samplers call it: the time embedding computed once); plus the peak memory of the whole call."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.with_overrides(C.ExperimentConfig(), ["train.steps=1", "train.checkpoint_every=0"])
        run = train_run(cfg, Path(tmp) / "run")
        base_mb = _peak_rss_mb(run.path, 1, steps)
        rows = []
        for n in ns:
            batch = min(n, run.config.sample.batch_size)
            sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])  # the batches Run.sample draws
            xs = {b: torch.randn(b, run.dim) for b in set(sizes)}
            t_rows, t_one = {b: torch.full((b,), 500) for b in set(sizes)}, torch.full((1,), 500)

            @torch.no_grad()
            def floor(t_for):
                for b in sizes:
                    for _ in range(steps):
                        run.model(xs[b], t_for(b))

            def toydiff_sample():
                run.sample(n, steps=steps, sampler="ddpm")

            fns = {"rows": lambda: floor(t_rows.get), "one": lambda: floor(lambda b: t_one), "toydiff": toydiff_sample}
            reps = 1 if n >= 10**7 else repeats  # 1e7 samples: minutes per repeat
            for fn in fns.values():
                fn()
            times = {k: [] for k in fns}
            for _ in range(reps):  # interleaved
                for k, fn in fns.items():
                    times[k].append(_median_time(fn, 1))
            med = {k: statistics.median(v) for k, v in times.items()}
            peak = _peak_rss_mb(run.path, n, steps)
            rows.append({"n": n, "steps": steps, "batch": batch, "toydiff_s": med["toydiff"],
                         "floor_s": med["rows"], "floor_shared_t_s": med["one"],
                         "overhead_vs_floor": med["toydiff"] / med["rows"] - 1,
                         "overhead_vs_shared_t_floor": med["toydiff"] / med["one"] - 1,
                         "peak_mb": peak, "peak_over_base_mb": peak - base_mb,
                         "output_mb": n * run.dim * 8 / 2**20})
    return rows


def compile_rows(steps: int, repeats: int) -> list[dict]:
    """torch.compile (inductor) against eager on the default MLP: a training step at batch 1024 and a
    no-grad forward pass at the sampling batch (65536 rows, one t), with the time the first call took."""
    torch.set_num_threads(1)
    cfg = C.ExperimentConfig()
    rows = []
    for kind, batch in (("train step", 1024), ("sampling pass", cfg.sample.batch_size)):
        model = build_model(cfg.model, 2, cfg.schedule.T)
        x, y = torch.randn(batch, 2), torch.randn(batch, 2)
        t = torch.randint(1, cfg.schedule.T + 1, (batch,)) if kind == "train step" else torch.full((1,), 500)
        opt = make_optimizer(model, cfg.train)
        out = {}
        for mode, net in (("eager", model), ("compiled", torch.compile(model))):
            def once():
                if kind == "train step":
                    loss = nn.functional.mse_loss(net(x, t), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                else:
                    with torch.no_grad():
                        net(x, t)
            first = _median_time(once, 1)
            n = steps if kind == "train step" else max(3, steps // 20)
            per = statistics.median(_median_time(lambda: [once() for _ in range(n)], 1) / n for _ in range(repeats))
            out[mode] = (first, per)
        rows.append({"kind": kind, "batch": batch, "eager_ms": 1e3 * out["eager"][1],
                     "compiled_ms": 1e3 * out["compiled"][1], "compile_first_call_s": out["compiled"][0],
                     "speedup": out["eager"][1] / out["compiled"][1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and repeats: a smoke run")
    parser.add_argument("--big", action="store_true", help="also sample n = 1e7 (minutes)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speed.json and speed.md")
    args = parser.parse_args()
    steps, repeats = (20, 2) if args.quick else (200, 5)
    report = {"meta": machine(cpus=os.cpu_count())}
    report["train"] = [training_rows(steps, repeats, threads=1), training_rows(steps, repeats, threads=2)]
    report["threads"] = thread_rows(steps // 2, max(2, repeats // 2))
    report["scaling"] = [training_rows(steps // 2, max(2, repeats // 2), rows=r, dim=d)
                         for r, d in ([(10**3, 2), (10**5, 2), (10**7, 2), (10**4, 8), (10**4, 64)]
                                      if not args.quick else [(10**3, 2), (10**4, 64)])]
    ns = [10**3, 10**4] if args.quick else [10**3, 10**4, 10**5, 10**6] + ([10**7] if args.big else [])
    report["sampling"] = sampling_rows(ns, 10, 2 if args.quick else 3)
    report["compile"] = [] if args.quick else compile_rows(steps, 3)
    lines = ["| training (batch 1024) | rows | D | threads | toydiff ms/step | bare step ms | guide-style loop ms | "
             "overhead vs bare | toydiff / guide-style |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["train"] + report["scaling"]:
        lines.append(f"| | {r['rows']:.0e} | {r['dim']} | {r['threads']} | {r['toydiff_ms']:.2f} | {r['bare_ms']:.2f} | "
                     f"{r['naive_ms']:.2f} | {100 * r['overhead_vs_bare']:+.0f}% | {r['vs_naive']:.2f} |")
    lines += ["", "| threads (training step) | machine | batch | 1 thread ms | 2 threads ms | 2 threads / 1 |",
              "|---|---|---|---|---|---|"]
    for load in (False, True):
        for batch in (1024, 4096):
            one, two = (next(r["toydiff_ms"] for r in report["threads"] if r["busy_process"] == load
                             and r["batch"] == batch and r["threads"] == k) for k in (1, 2))
            lines.append(f"| | {'one busy process beside' if load else 'idle'} | {batch} | {one:.2f} | {two:.2f} | "
                         f"{two / one:.2f} |")
    lines += ["", "| sampling (ddpm, 10 steps) | n | batch | toydiff s | floor s: 10 passes, t per row | overhead | "
              "10 passes, one t | overhead | peak MB over a 1-sample call | output MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["sampling"]:
        lines.append(f"| | {r['n']:.0e} | {r['batch']} | {r['toydiff_s']:.3f} | {r['floor_s']:.3f} | "
                     f"{100 * r['overhead_vs_floor']:+.0f}% | {r['floor_shared_t_s']:.3f} | "
                     f"{100 * r['overhead_vs_shared_t_floor']:+.0f}% | {r['peak_over_base_mb']:.0f} | "
                     f"{r['output_mb']:.0f} |")
    if report["compile"]:
        lines += ["", "| torch.compile (CPU, 1 thread) | batch | eager ms | compiled ms | speed-up | first compiled call s |",
                  "|---|---|---|---|---|---|"]
        for r in report["compile"]:
            lines.append(f"| {r['kind']} | {r['batch']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['compile_first_call_s']:.1f} |")
    publish(args.out, "speed", report, "\n".join(lines))


if __name__ == "__main__":
    main()
