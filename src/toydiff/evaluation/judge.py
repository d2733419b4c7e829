"""Judging samples: against a target's fresh draws or held-out rows (`evaluate`), and a run's own (`evaluate_run`:
its samples, each class of a conditional run, its likelihoods, written to metrics.json).

The floor of a metric at sample size n is its value between two samples of size n that come from the same
law: its mean and spread over `draws` pairs. For a dataset with a sampler they are two independent
reference draws; they depend only on the distribution, n and the frame, so they are cached. For a finite
reference (a file's held-out rows) they are the samples and the reference points shuffled together and
split in two, a permutation test: re-splits of the held-out rows alone would be too narrow a floor, since
they never hold a point beyond those rows, and called iid samples of real tables distinguishable up to
30% of the time (docs/evaluation.md). A metric's z-score is how many floor deviations the model's value
lies on the bad side of the floor's mean; the verdict calls a run indistinguishable from data when every
z is within `z_limit` (eval.z_max, widened for a floor estimated from eval.draws pairs) and the test had
the power to see a difference.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Callable, Optional

import numpy as np
import torch

from ..core.config import EvalConfig, ExperimentConfig
from ..core.errors import ToydiffError, first_line
from ..core.machine import usable_cores
from ..core.progress import Progress
from ..core.runtime import derive_seed, torch_generator
from ..diffusion.likelihood import elbo_nll, model_eps_fn, ode_nll
from ..runs.run import Run
from . import metrics as M
from .floorcache import cached_floors
from .reference import MIN_EVAL_N, Target, class_targets, target_for

MEMORIZED_SAMPLES = 20_000  # samples the memorization test compares with the reference rows (all of them, up to this)
from .scores import compute, flagged, floors, fresh_pairs, memorization_floor, report, shuffled_pairs


@contextmanager
def _all_cores():
    """Large pairwise-distance work uses every core (unlike the tiny networks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(samples: np.ndarray, target: Target, spec: EvalConfig, seed: int = 0,
             log: Callable[[str], None] = lambda s: None, progress: bool = False,
             training: Optional[np.ndarray] = None) -> dict:
    """Compare the first spec.n samples (data units) with spec.n fresh iid reference points, beside the floors."""
    try:
        samples = np.asarray(samples, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ToydiffError(f"the samples must be an (n, D) array of numbers ({first_line(e)})") from None
    if samples.ndim != 2 or len(samples) == 0:
        raise ToydiffError(f"there are no samples to evaluate (got an array of shape {samples.shape})")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples).all(1)).sum())
        raise ToydiffError(f"{bad} of {len(samples)} samples contain NaN or infinite values; the model diverged")
    reference_probe = target.draw(np.random.default_rng(0), 2)
    if samples.shape[1] != reference_probe.shape[1]:
        raise ToydiffError(f"the samples have {samples.shape[1]} columns but the data has {reference_probe.shape[1]}")
    if target.max_n is not None and spec.n > target.max_n:
        log(f"the reference has {target.max_n} held-out rows: evaluating at n = {target.max_n} "
            f"instead of eval.n = {spec.n}")
        spec = replace(spec, n=target.max_n)
    if len(samples) < spec.n:
        if len(samples) < MIN_EVAL_N:
            raise ToydiffError(f"{len(samples)} samples are too few to evaluate; draw at least {MIN_EVAL_N} "
                               f"(eval.n = {spec.n})")
        log(f"only {len(samples)} samples: evaluating at n = {len(samples)} instead of eval.n = {spec.n}")
        spec = replace(spec, n=len(samples))
    every, samples = samples[:MEMORIZED_SAMPLES], samples[:spec.n]
    with _all_cores():
        # one kernel for the floors and the comparison: fitted to a fixed draw of the reference at this n
        bandwidths = M.mmd_bandwidths(target.frame.transform(target.draw(np.random.default_rng(0xB4D), spec.n)))
        reference = target.draw(np.random.default_rng(derive_seed(seed, "eval-reference")), spec.n)
        values = compute(samples, reference, target.frame, spec, target.support_distance, target.noise, bandwidths)
        finite = target.max_n is not None
        pairs = shuffled_pairs(samples, reference) if finite else fresh_pairs(target.draw)

        def compute_floors():
            log(f"computing noise floors: {spec.draws} pairs of {spec.n} points, "
                + ("samples and held-out rows shuffled" if finite else "iid reference draws (cached afterwards)"))
            with Progress(spec.draws, "noise floors", "pair", enabled=progress) as bar:
                return floors(pairs, target.frame, spec, target.support_distance, target.noise,
                              progress=lambda i: bar.update(), bandwidths=bandwidths)
        if finite:  # the permutation floors depend on the samples: nothing to cache
            floor, cached = compute_floors(), False
        else:
            settings = {k: v for k, v in asdict(spec).items() if k not in ("z_max", "nll_n", "efficacy")}  # not what floors use
            floor, cached = cached_floors({**target.key, **settings, "frame": target.frame.to_dict()}, compute_floors,
                                          log)
        if training is not None:  # every sample against every reference row: its floor is exact (beta-binomial)
            rows = target.rows if finite else reference
            values["memorized"] = M.memorized_share(target.frame.transform(every), target.frame.transform(rows),
                                                    target.frame.transform(training))
            floor = {**floor, "memorized": memorization_floor(len(every), len(rows))}
    rep = report(values, floor, spec)
    rep["mmd_bandwidths"] = [float(f"{b:.4g}") for b in bandwidths]
    rep["frame"] = ("per-axis min-max of the held-out rows" if finite
                    else "per-axis min-max of 100,000 iid points of the data distribution")
    rep["floors"] = ("permutation: the samples and as many held-out rows, shuffled and split in two" if finite
                     else "two independent iid draws of the data")
    rep["reference"] = target.key
    rep["floors_cached"] = cached
    return rep


def likelihoods(run: Run, target: Target, n: int, log: Callable[[str], None] = lambda s: None,
                progress: bool = False) -> dict:
    """ELBO and probability-flow ODE NLL of n held-out iid points, per dimension, in data units and bits.

    Beside them the data's own entropy where its density is known (noisy moons, by quadrature),
    so NLL - H bounds the KL divergence from the data to the model.
    """
    cfg = run.config
    held_out = target.draw(np.random.default_rng(derive_seed(cfg.seed, "eval-nll")), n)
    x = torch.as_tensor(run.scaler.transform(held_out), dtype=torch.float32, device=run.device)
    # a conditional model's likelihood is that of its unconditional (null-label) branch; a model of pieces
    # (model.components) is the mixture sum_k share_k p(x | k), each piece's likelihood computed on its own
    # (the ELBO's mixture stays a bound: sum_k share_k e^-ELBO_k <= p(x))
    pieces = run.pieces
    branches = [(None, 0.0)] if pieces is None else [
        (torch.full((len(x),), k, dtype=torch.long, device=run.device), math.log(s))
        for k, s in enumerate(pieces.shares)]
    log(f"likelihoods of {n} held-out points: ELBO ({run.schedule.T} terms) and probability-flow ODE"
        + (f", for each of the {len(branches)} pieces" if pieces is not None else ""))
    d, shift = run.frame_dim, -run.scaler.log_abs_det  # nll_data = nll_scaled - log|det|
    elbos, odes = [], []
    for labels, log_share in branches:
        denoiser = run.denoiser_for(labels)
        eps_fn = model_eps_fn(denoiser)
        variance_fn = (lambda x_t, t, dn=denoiser: dn.output(x_t, t)[1]) if denoiser.learned_variance else None
        gen = torch_generator(cfg.seed, "eval-nll", run.device)
        with Progress(run.schedule.T, "ELBO", "term", enabled=progress) as bar:
            elbos.append(log_share - elbo_nll(eps_fn, run.schedule, x, generator=gen, variance_fn=variance_fn,
                                              on_step=bar.update))
        with Progress(None, "ODE likelihood", "evaluation", enabled=progress) as bar:
            odes.append(log_share - ode_nll(eps_fn, run.schedule, x, generator=gen, on_step=bar.update))
    elbo, ode = -torch.logsumexp(torch.stack(elbos), 0), -torch.logsumexp(torch.stack(odes), 0)
    out = {"n": n, "elbo": float(elbo.mean()) + shift, "ode_nll": float(ode.mean()) + shift}
    logp = None
    if target.log_density is not None:
        logp = target.log_density(target.draw(np.random.default_rng(derive_seed(cfg.seed, "eval-entropy")), 20_000))
    if logp is not None:
        out["entropy"], out["entropy_se"] = float(-logp.mean()), float(logp.std() / math.sqrt(len(logp)))
    rows = {}
    for name in ("elbo", "ode_nll", "entropy"):
        if name in out:
            rows[name] = {"nats": out[name], "nats_per_dim": out[name] / d, "bits_per_dim": out[name] / d / math.log(2)}
    if "entropy" in out:
        rows["ode_nll"]["minus_entropy"] = out["ode_nll"] - out["entropy"]
        rows["elbo"]["minus_entropy"] = out["elbo"] - out["entropy"]
    return {"n": n, "units": "data units, nats per point unless named", "values": rows,
            "entropy_se": out.get("entropy_se")}


def efficacy(run: Run, target: Target, log: Callable[[str], None]) -> dict:
    """Machine-learning efficacy of a conditional run on a labelled reference: as many samples as it has training
    rows, their classes drawn in the training proportions, teach a classifier that is tested on the reference's
    rows, beside one taught by the training rows (metrics.efficacy)."""
    n = len(run.data)
    log(f"machine-learning efficacy: trees trained on {n} samples and on the {n} training rows, tested on the "
        f"{len(target.labels)} held-out rows")
    drawn = run.draw(n, seed=derive_seed(run.config.seed, "efficacy"), label=-1)
    return M.efficacy(drawn.samples, drawn.labels, run.data, run.labels, target.rows, target.labels,
                      seed=run.config.seed % 2**32)


def per_class(run: Run, spec: EvalConfig, log: Callable[[str], None] = lambda s: None,
              targets: Optional[dict[int, Optional[Target]]] = None) -> dict:
    """Each class of a conditional run judged on its own: spec.n / K samples of class k (at least MIN_EVAL_N)
    against that class's reference, beside its own floors, and a class-accuracy check: a k-NN classifier
    fitted to the training rows names the class of the samples about as often as of real rows of the class
    (a two-proportion z beyond z_max is flagged). Classes with too few held-out rows are named, not judged.
    `targets`: the references class by class (default: the run's own held-out rows or its dataset's draws)."""
    from sklearn.neighbors import KNeighborsClassifier

    if targets is None:
        targets = class_targets(run.config, run.classes, run.holdout, run.holdout_labels, run.data, run.columns)
    frame = next((t.frame for t in targets.values() if t is not None), None)
    if frame is None:
        return {}
    clf = KNeighborsClassifier(15).fit(frame.transform(run.data), run.labels)
    out = {}
    for k, target in targets.items():
        name = run.class_names[k] if run.class_names else str(k)
        if target is None:
            out[name] = {"verdict": f"not judged: fewer than {MIN_EVAL_N} held-out rows of this class"}
            continue
        n = max(MIN_EVAL_N, min(spec.n // run.classes, target.max_n or spec.n))
        log(f"class {name}: {n} samples against its own reference")
        samples = run.sample(n, seed=derive_seed(run.config.seed, f"class-{k}"), label=k)
        rep = evaluate(samples, target, replace(spec, n=n), seed=run.config.seed, training=run.data[run.labels == k])
        reference = target.draw(np.random.default_rng(derive_seed(run.config.seed, f"class-ref-{k}")), rep["n"])
        acc = [float(np.mean(clf.predict(frame.transform(x[:rep["n"]])) == k)) for x in (samples, reference)]
        spread = math.sqrt(sum(a * (1 - a) for a in acc) / rep["n"]) or 1.0 / rep["n"]
        z_acc = (acc[1] - acc[0]) / spread
        flags, verdict_k = flagged(rep), rep["verdict"]
        if z_acc > spec.z_max:
            verdict_k = (f"distinguishable from data at n = {rep['n']}: the classifier names the class of "
                         f"{acc[0]:.0%} of the samples and {acc[1]:.0%} of the data (z = {z_acc:.1f})"
                         + (f"; also {', '.join(flags)}" if flags else ""))
            flags = flags + ["class_accuracy"]
        out[name] = {"n": rep["n"], "verdict": verdict_k, "flagged": flags,
                     "class_accuracy": {"samples": acc[0], "reference": acc[1], "z": z_acc},
                     "power": rep["power"], "metrics": {m: r["z"] for m, r in rep["metrics"].items()}}
    return out


def judge_samples(samples: np.ndarray, cfg: ExperimentConfig, log: Callable[[str], None] = lambda s: None,
                  progress: bool = False) -> tuple[dict, Target]:
    """Any generator's samples against the dataset of `cfg` (a zoo dataset: its [data] and [eval] sections),
    each metric beside its noise floor: (report, the target judged against)."""
    target = target_for(cfg)
    return evaluate(samples, target, cfg.eval, log=log, progress=progress), target


def evaluate_run(run: Run, samples: np.ndarray, log: Callable[[str], None] = lambda s: None,
                 spec: Optional[EvalConfig] = None, target: Optional[Target] = None, progress: bool = False,
                 sampling: Optional[dict] = None) -> dict:
    """Evaluate a run's samples (and likelihoods) against its data (or `target`); a conditional run's classes
    are also judged each on its own (per_class); write RUN_DIR/metrics.json. `sampling` (Drawn.record:
    sampler, steps, spacing, nfe), where known, is reported with them: `nfe` is the samples' network
    evaluations per sample."""
    spec = spec or run.config.eval
    given, target = target, target or target_for(run.config, run.holdout, run.data, run.columns, run.holdout_labels)
    rep = evaluate(samples, target, spec, seed=run.config.seed, log=log, progress=progress, training=run.data)
    if sampling is not None:
        rep["nfe"], rep["sampling"] = sampling.get("nfe"), sampling
    classes = None if given is None else given.classes  # a file given to judge the run: its own classes
    if run.classes and classes != {}:
        rep["per_class"] = per_class(run, spec, log, classes)
    if run.classes and target.labels is not None and len(np.unique(target.labels)) >= 2 and spec.efficacy:
        rep["efficacy"] = efficacy(run, target, log)
    if spec.nll_n > 0 and run.scaler.log_abs_det is None:
        log("likelihoods skipped: the map into the model's frame is not affine (the quantile scaler) or a column "
            "is binary or categorical, so a density in the model's frame says nothing exact in data units")
    elif spec.nll_n > 0:
        rep["likelihood"] = likelihoods(run, target, min(spec.nll_n, target.max_n or spec.nll_n), log, progress)
    run.dir.write_metrics(rep)
    return rep
