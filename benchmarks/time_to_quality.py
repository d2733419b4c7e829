"""Wall-clock training time on one CPU thread until samples of Two Moons are indistinguishable from data.

Four settings, each trained once on the default data (iid moons, noise 0.05, 10,000 points unless the
setting says otherwise) and judged at regular checkpoints by the evaluation's verdict (every metric
within 3 floor deviations at n = 5000, toydiff.evaluation). A checkpoint counts as indistinguishable when
the verdict holds for at least 2 of 3 sampling seeds (seed 1 first; 2 and 3 drawn only when 1 passes):
one seed alone passes or fails by a sample or two between the arcs.

  toydiff default      the built-in default: cosine T = 1000, residual MLP with x-Fourier features, v
                       prediction, EMA, batch 1024, 6000 steps, sampled with DPM-Solver++(3M) SDE in 50
                       Karras steps
  toydiff conditional  the same with the moons' labels (model.conditional = true), w = 1
  guide                the guide's setting: its NoisePredictor, polynomial T = 10, AdamW 1e-2, full batch,
                       on 1000 points (its own n), ancestral sampling
  tiny-diffusion-like  T = 50 linear betas, eps prediction, sinusoidal-embedding MLP (128 wide, 3 blocks),
                       Adam 1e-3, batch 32, no EMA, ancestral sampling

Training time excludes the evaluations (sampling and metrics are timed apart). Prints JSON and a table;
writes benchmarks/results/time_to_quality.json and .md.

    .venv/bin/python benchmarks/time_to_quality.py          # about 8 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from report import machine, publish
from toydiff.core import config as C
from toydiff.evaluation.judge import evaluate
from toydiff.evaluation.scores import flagged
from toydiff.evaluation.reference import target_for
from toydiff.core.runtime import torch_generator
from toydiff.training.loop import make_state, train
from toydiff.jobs.workflow import untrained_run

SETTINGS = {
    "toydiff default": ([], 250),
    "toydiff conditional": (["model.conditional=true"], 250),
    "guide": (["--preset guide", "data.name=moons", "data.noise=-1.0"], 250),
    "tiny-diffusion-like": (["schedule.name=linear", "schedule.T=50", "model.prediction=eps", "model.width=128",
                             "model.depth=3", "train.batch_size=32", "train.lr=1e-3", "train.ema_decay=0.0",
                             "train.warmup_steps=0", "train.lr_schedule=constant", "train.steps=50000"], 2500),
}


def measure(name: str, overrides: list[str], every: int, budget_s: float) -> dict:
    torch.set_num_threads(1)
    preset = "guide" if "--preset guide" in overrides else "default"
    cfg = C.with_overrides(C.preset(preset), [o for o in overrides if not o.startswith("--")] +
                           [f"train.checkpoint_every={every}", "train.log_every=1000000"])
    run = untrained_run(cfg, device=torch.device("cpu"))
    state = make_state(run.model, cfg.train, run.method.timesteps(cfg), torch_generator(cfg.seed, "train"))
    target = target_for(cfg)
    spec = C.EvalConfig(nll_n=0)
    x0 = torch.as_tensor(run.scaler.transform(run.data), dtype=torch.float32)
    y = torch.as_tensor(run.labels) if run.classes else None
    history, clock = [], {"eval": 0.0, "start": time.perf_counter(), "hit": None}

    class Stop(Exception):
        pass

    def judge(st):
        start = time.perf_counter()
        trained = start - clock["start"] - clock["eval"]
        sampling_model = st.ema.module if st.ema is not None else st.model
        now = dataclasses.replace(run, model=sampling_model.eval())
        t0 = time.perf_counter()
        samples = now.sample(spec.n, seed=1)
        sample_s = time.perf_counter() - t0
        rep = evaluate(samples, target, spec)
        flags = flagged(rep)
        passes = 0 if flags else 1 + sum(not flagged(evaluate(now.sample(spec.n, seed=s), target, spec))
                                         for s in (2, 3))
        history.append({"step": st.step, "train_s": round(trained, 2), "sample_s": round(sample_s, 2),
                        "auc": rep["metrics"]["knn_auc"]["value"], "flagged": flags, "seeds_passing": passes})
        st.model.train()
        clock["eval"] += time.perf_counter() - start
        if passes >= 2 and clock["hit"] is None:
            clock["hit"] = history[-1]
        if passes >= 2 or trained > budget_s:
            raise Stop

    try:
        train(state, run.schedule, x0, cfg.train, run.method.objective(run), labels=y,
              on_checkpoint=judge)
        judge(state)
    except Stop:
        pass
    best = min(history, key=lambda h: len(h["flagged"]))
    return {"setting": name, "hit": clock["hit"], "last": history[-1], "fewest_flags": best, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per setting at most")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = [measure(name, overrides, every, args.budget) for name, (overrides, every) in SETTINGS.items()]
    lines = ["| setting | indistinguishable after (training s, step) | fewest flags: step, training s, AUC, flagged |",
             "|---|---|---|"]
    for r in rows:
        hit = f"{r['hit']['train_s']} s, step {r['hit']['step']} ({r['hit']['seeds_passing']} of 3 seeds)" if r["hit"] else \
            f"not within {r['last']['train_s']} s ({r['last']['step']} steps)"
        b = r["fewest_flags"]
        lines.append(f"| {r['setting']} | {hit} | {b['step']}, {b['train_s']} s, {b['auc']:.3f}, "
                     f"{', '.join(b['flagged']) or 'none'} |")
    publish(args.out, "time_to_quality", {"meta": machine(threads=1, budget_s=args.budget), "rows": rows},
            "\n".join(lines))


if __name__ == "__main__":
    main()
