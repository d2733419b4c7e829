"""Evaluate samples against a fresh iid reference, each metric beside its finite-sample noise floor.

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

import functools
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import metrics as M
from .config import EvalConfig, ExperimentConfig
from .errors import ToydiffError, first_line, os_error
from .likelihood import elbo_nll, model_eps_fn, ode_nll
from .progress import Progress
from .reference import MIN_EVAL_N, Target, class_targets, target_for
from .runs import Run
from .runtime import cache_dir, derive_seed, torch_generator, usable_cores
from .scaler import Scaler
from .storage import Fields, MapOf, atomic_write_text, read_json


class Pair:
    """The samples x and the reference y (both (n, D), data units), their images xs, ys in the reference's frame,
    and what the metrics share: the settings, the MMD kernel, the data's support and a PRDC computed once."""

    def __init__(self, x: np.ndarray, y: np.ndarray, scaler: Scaler, spec: EvalConfig,
                 bandwidths: Optional[tuple[float, ...]], support_distance: Optional[Callable[[np.ndarray], np.ndarray]],
                 noise: float):
        self.x, self.y, self.xs, self.ys = x, y, scaler.transform(x), scaler.transform(y)
        self.spec, self.bandwidths, self.support_distance, self.noise = spec, bandwidths, support_distance, noise
        self.w = min(spec.w2_n, len(x), len(y))  # exact W2 on the first w points

    @functools.cached_property
    def prdc(self) -> dict[str, float]:
        return M.prdc(self.xs, self.ys, k=self.spec.k)

    def off_data(self) -> Optional[float]:
        if self.support_distance is None:
            return None
        return M.off_data_fraction(self.support_distance(self.x), max(4 * self.noise, 0.02))


@dataclass(frozen=True)
class Metric:
    """direction: +1 when larger is worse, -1 when larger is better. bound: the value two identical samples
    give, which no pair passes on its good side (None: none, as for the classifier's AUC); the floor's law
    is read as a gamma law anchored there (z_scores). about: what it is, for the table and metrics.json.
    value: the metric of a Pair (None where it is not computable), or None for one computed with more than
    the pair (memorized: the training rows). fraction: a share of n points, whose resolution is 1 / n."""
    direction: int
    bound: Optional[float]
    about: str
    value: Optional[Callable[[Pair], Optional[float]]] = None
    fraction: bool = False


# Every metric, declared once, in the order of the tables.
METRICS: dict[str, Metric] = {
    "mmd2": Metric(+1, 0.0, "MMD^2 (V-statistic), RBF kernels from the reference's nearest-neighbour scale to its "
                            "median distance", lambda p: M.mmd2(p.xs, p.ys, p.bandwidths)),
    "knn_auc": Metric(+1, None, "k-NN classifier two-sample AUC (0.5 = indistinguishable)",
                      lambda p: M.knn_auc(p.xs, p.ys)),
    "energy": Metric(+1, 0.0, "energy distance (V-statistic), scaled frame", lambda p: M.energy_distance(p.xs, p.ys)),
    "energy_data": Metric(+1, 0.0, "energy distance (V-statistic), data units", lambda p: M.energy_distance(p.x, p.y)),
    "w2": Metric(+1, 0.0, "exact 2-Wasserstein on the first w2_n points, scaled frame",
                 lambda p: M.w2_exact(p.xs[:p.w], p.ys[:p.w])),
    "w2_data": Metric(+1, 0.0, "exact 2-Wasserstein on the first w2_n points, data units",
                      lambda p: M.w2_exact(p.x[:p.w], p.y[:p.w])),
    "sliced_w2": Metric(+1, 0.0, "sliced 2-Wasserstein, scaled frame", lambda p: M.sliced_w2(p.xs, p.ys)),
    "sliced_w2_data": Metric(+1, 0.0, "sliced 2-Wasserstein, data units", lambda p: M.sliced_w2(p.x, p.y)),
    "precision": Metric(-1, 1.0, "share of samples inside the data's k-NN balls", lambda p: p.prdc["precision"],
                        fraction=True),
    "recall": Metric(-1, 1.0, "share of data inside the samples' k-NN balls", lambda p: p.prdc["recall"],
                     fraction=True),
    "density": Metric(-1, None, "k-NN density (Naeem et al. 2020)", lambda p: p.prdc["density"]),
    "coverage": Metric(-1, 1.0, "share of data balls that hold a sample", lambda p: p.prdc["coverage"],
                       fraction=True),
    "off_data": Metric(+1, 0.0, "share of samples farther than 4 noise std (at least 0.02) from the data's support",
                       Pair.off_data, fraction=True),
    "memorized": Metric(+1, 0.0, "share of samples closer to a training row than 90% of fresh data is (0.1 expected)",
                        fraction=True),  # needs the training rows: memorization_floor, M.memorized_share
}
FRACTIONS = tuple(name for name, m in METRICS.items() if m.fraction)
FLOOR_VERSION = 3  # bump when a metric's definition changes, so cached floors are recomputed (2: MMD bandwidths,
# 3: MMD^2 and energy as V-statistics)


def compute(samples: np.ndarray, reference: np.ndarray, scaler: Scaler, spec: EvalConfig,
            support_distance: Optional[Callable[[np.ndarray], np.ndarray]] = None,
            noise: float = 0.0, bandwidths: Optional[tuple[float, ...]] = None) -> dict[str, Optional[float]]:
    """Every metric of METRICS computable from the pair, for samples vs reference (both (n, D), data units).
    None = not computable."""
    x, y = M.check_pair(samples, reference, max(10, spec.k + 1))
    pair = Pair(x, y, scaler, spec, bandwidths, support_distance, noise)
    return {name: m.value(pair) for name, m in METRICS.items() if m.value is not None}


def floors(draw_pair: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]], scaler: Scaler,
           spec: EvalConfig, support_distance=None, noise: float = 0.0,
           progress: Callable[[int], None] = lambda i: None, bandwidths: Optional[tuple[float, ...]] = None):
    """Mean and std of each metric over spec.draws pairs `draw_pair(rng, spec.n)` of data-like points: two
    independent reference draws (fresh_pairs) or two halves of the compared points shuffled (shuffled_pairs)."""
    rng = np.random.default_rng(0xF1001)  # fixed: a floor depends on the data, not on a run's seed
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for i in range(spec.draws):
        for name, v in compute(*draw_pair(rng, spec.n), scaler, spec, support_distance, noise, bandwidths).items():
            if v is not None:
                values[name].append(v)
        progress(i + 1)
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                   "draws": len(v)} for name, v in values.items() if v}


def fresh_pairs(draw: Callable[[np.random.Generator, int], np.ndarray]):
    """Two independent draws of a reference sampler: the metric between two samples of the data itself."""
    return lambda rng, n: (draw(rng, n), draw(rng, n))


def shuffled_pairs(samples: np.ndarray, reference: np.ndarray):
    """The samples and the reference points pooled and split at random into two halves: a permutation test
    (exact whenever samples and reference are exchangeable, whatever the size of the pool). Used for a
    finite reference, whose own re-splits would miss how far a fresh sample strays beyond its rows."""
    pool = np.concatenate([samples, reference])

    def draw_pair(rng: np.random.Generator, n: int):
        order = rng.permutation(len(pool))
        return pool[order[:n]], pool[order[n:2 * n]]
    return draw_pair


def z_scores(values: dict[str, Optional[float]], floor: dict, n: int) -> dict[str, Optional[float]]:
    """Floor deviations on the bad side of the floor's mean (negative: better than two draws of the data).

    A metric with a bound (Metric.bound: MMD^2, energy, W2, the shares) measures a discrepancy
    d = direction * (value - bound) >= 0 whose law between two samples of one distribution is skewed to the
    bad side: a degenerate V-statistic such as MMD^2 or the energy distance is a weighted sum of
    chi-squares, which Gretton et al. (2009) approximate by a gamma law with its mean and variance. Its z
    is the normal deviation of the same tail, z = Phi^-1(G(d)), G the gamma law of the floor's mean and
    variance of d; read as a normal law instead, these metrics fired up to 16 times the tail z_max names
    (benchmarks/null_tails.py). Where the floor lies within one deviation of the bound (gamma shape below
    1: a law piled at the bound, a poor model of a few rare points) and for metrics without one (the
    AUC, density), z is the plain distance from the floor's mean in deviations.

    A share of n points cannot resolve less than 1 / n, so that is the smallest deviation used for
    them (a noise-free floor of exactly 0 then counts each offending sample as one deviation).
    """
    from scipy import stats

    out: dict[str, Optional[float]] = {}
    for name, v in values.items():
        f = floor.get(name)
        if v is None or f is None:
            out[name] = None
            continue
        metric = METRICS[name]
        sd = max(f["std"], 1.0 / n if name in FRACTIONS else 1e-12)
        z = metric.direction * (v - f["mean"]) / sd
        if metric.bound is not None:
            d, mean = metric.direction * (v - metric.bound), metric.direction * (f["mean"] - metric.bound)
            shape = (mean / sd) ** 2
            if mean > 0 and shape >= 1:
                tail = float(stats.norm.isf(stats.gamma.sf(d, shape, scale=sd**2 / mean)))
                z = tail if math.isfinite(tail) else z  # beyond float range either way: the plain z says how far
        out[name] = float(z)
    return out


def z_limit(z_max: float, draws: int) -> float:
    """The z beyond which a metric is flagged: z_max read as the normal tail it names (z_max = 3: 0.13%),
    for a floor whose mean and spread are estimates from `draws` pairs. A new value's distance from them,
    in estimated deviations, follows Student's t with draws - 1 degrees of freedom, widened by
    sqrt(1 + 1 / draws) (the prediction interval): 3.53 for z_max = 3 and 20 pairs, 3.24 for 40, tending
    to z_max. Flagging at z_max itself would triple a normal metric's false alarms at 20 pairs (0.43%)."""
    from scipy import stats

    return float(stats.t.ppf(stats.norm.cdf(z_max), draws - 1) * math.sqrt(1 + 1 / draws))


def flagged(report: dict) -> list[str]:
    """The metrics of an `evaluate` report outside their noise floors (z > z_limit), in the report's order."""
    return [name for name, row in report["metrics"].items() if row["z"] is not None and row["z"] > report["z_limit"]]


POWER_Z = 0.8416  # the standard normal's 80th percentile: detection at 80% power sits this far beyond the limit
INCONCLUSIVE_AUC = 0.1  # a test that could miss a classifier AUC shift this large cannot call samples alike


def power(floor: dict, n: int, limit: float) -> Optional[dict]:
    """The smallest differences the test sees with 80% power at this n, from the floors' own spread (a
    simulation on the reference itself): a shift of (limit + 0.84) floor deviations, for the classifier's
    AUC and for MMD^2, and whether the AUC shift is small enough (INCONCLUSIVE_AUC) for a verdict of "alike".
    The AUC floor's spread shrinks like 1 / sqrt(n), which gives the n that would be conclusive."""
    auc = floor.get("knn_auc")
    if not auc or not auc["std"] > 0:
        return None
    shift = (limit + POWER_Z) * auc["std"]
    mmd = floor.get("mmd2")
    return {"auc_shift": shift, "mmd2_shift": (limit + POWER_Z) * mmd["std"] if mmd else None,
            "conclusive": shift <= INCONCLUSIVE_AUC,
            "n_for_conclusive": int(math.ceil(n * (shift / INCONCLUSIVE_AUC) ** 2))}


def verdict(z: dict[str, Optional[float]], n: int, limit: float, sees: Optional[dict] = None) -> str:
    """One sentence: "distinguishable" names the metrics beyond `limit` floor deviations (z_limit; a difference
    found is a finding at any n); with none, "indistinguishable" when the test had the power to see an AUC
    shift of INCONCLUSIVE_AUC (`sees`, from power()), else "inconclusive", with the n that would decide."""
    flagged = sorted(((name, s) for name, s in z.items() if s is not None and s > limit), key=lambda p: -p[1])
    if flagged:
        listed = ", ".join(f"{name} z = {s:.1f}" for name, s in flagged[:4])
        more = f" and {len(flagged) - 4} more" if len(flagged) > 4 else ""
        return f"distinguishable from data at n = {n}: {listed}{more}"
    if sees is not None and not sees["conclusive"]:
        return (f"inconclusive at n = {n}: every metric is within {limit:.2f} floor deviations, but at this n a "
                f"classifier AUC up to {0.5 + sees['auc_shift']:.2f} could go unseen (80% power); about n = "
                f"{sees['n_for_conclusive']} samples and as many reference points would decide")
    seen = f"; an AUC of {0.5 + sees['auc_shift']:.3f} or more would be seen, 80% power" if sees else ""
    return f"indistinguishable from data at n = {n} (every metric within {limit:.2f} floor deviations{seen})"


def floor_cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "floors" / f"{digest}.json"


FLOOR_SCHEMA = MapOf(Fields({"mean": float, "std": float, "draws": int}, required=("mean", "std", "draws")))


def _floor_digest(key: dict, floors_: dict) -> str:
    return hashlib.sha256(json.dumps([key, floors_], sort_keys=True).encode()).hexdigest()


def cached_floors(key: dict, compute_floors: Callable[[], dict], log: Callable[[str], None] = lambda s: None
                  ) -> tuple[dict, bool]:
    """Floors from the cache when `key` (everything they depend on) was seen before; else computed and stored.

    A cache entry is used only when it is whole: the same key, floors of the schema every metric's floor has
    (finite mean, std >= 0, draws) for known metrics only, and a SHA-256 over key and floors that matches; any
    other entry (damaged, edited, a wrong type inside) is recomputed and replaced, so a tampered cache never
    changes a verdict. Entries are written atomically: two evaluations at once each write a whole file."""
    key = {**key, "floor_version": FLOOR_VERSION}
    path = floor_cache_path(key)
    if path.exists():
        try:
            stored = read_json(path, "noise-floor cache entry", Fields({"key": dict, "floors": FLOOR_SCHEMA,
                                                                         "sha256": str}))
            floors_ = stored["floors"]
            if (stored.get("key") == key and stored.get("sha256") == _floor_digest(key, floors_)
                    and set(floors_) <= set(METRICS) and all(f["std"] >= 0 and f["draws"] >= 2
                                                             for f in floors_.values())):
                return floors_, True
            log(f"the cached noise floors in '{path}' do not match what they vouch for; computing them again")
        except (ToydiffError, KeyError, TypeError) as e:
            log(f"the cached noise floors are damaged ({e}); computing them again")
    result = compute_floors()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "floors": result, "sha256": _floor_digest(key, result)}))
    except (OSError, ToydiffError) as e:  # a cache: the evaluation goes on, and only says so
        why = e if isinstance(e, ToydiffError) else os_error(e, doing="write")
        log(f"warning: the noise floors were not cached ({first_line(why)}); they will be computed again next "
            "time (TOYDIFF_CACHE moves the cache)")
    return result, False


def report(values: dict, floor: dict, spec: EvalConfig) -> dict:
    z = z_scores(values, floor, spec.n)
    rows = {}
    for name in METRICS:
        f = floor.get(name)
        v = values.get(name)
        # a ratio only means something where the floor is clearly above zero (W2, sliced W2, AUC)
        ratio = (v / f["mean"]) if (v is not None and f and f["mean"] > 2 * f["std"] > 0
                                    and METRICS[name].direction > 0) else None
        rows[name] = {"value": v, "floor_mean": f["mean"] if f else None, "floor_std": f["std"] if f else None,
                      "ratio": ratio, "z": z.get(name), "about": METRICS[name].about}
    limit = z_limit(spec.z_max, spec.draws)
    sees = power(floor, spec.n, limit)
    return {"n": spec.n, "spec": asdict(spec), "z_limit": limit, "metrics": rows, "power": sees,
            "verdict": verdict(z, spec.n, limit, sees)}


def format_table(rep: dict) -> str:
    def num(v):
        if v is None:
            return "missing"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    lines = [f"{'metric':<15}{'value':>11}{'floor mean':>13}{'floor std':>11}{'ratio':>8}{'z':>8}"]
    for name, r in rep["metrics"].items():
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        z = "" if r["z"] is None else (f"{r['z']:.1f}" if math.isfinite(r["z"]) else "inf")
        lines.append(f"{name:<15}{num(r['value']):>11}{num(r['floor_mean']):>13}{num(r['floor_std']):>11}"
                     f"{ratio:>8}{z:>8}")
    lines.append(f"verdict: {rep['verdict']}")
    if rep.get("nfe") is not None:
        how = rep.get("sampling") or {}
        lines.append(f"nfe: {rep['nfe']:g} network evaluations per sample ({how.get('sampler')}, "
                     f"{how.get('steps')} steps, {how.get('spacing')} spacing)")
    for name, row in rep.get("per_class", {}).items():
        lines.append(f"  class {name}: {row['verdict']}")
    return "\n".join(lines)


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
    samples = samples[:spec.n]
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
            settings = {k: v for k, v in asdict(spec).items() if k not in ("z_max", "nll_n")}  # not what floors use
            floor, cached = cached_floors({**target.key, **settings, "frame": target.frame.to_dict()}, compute_floors,
                                          log)
        if training is not None:  # its floor depends on the training rows, so it is not cached; it costs seconds
            train = target.frame.transform(training)
            floor = {**floor, "memorized": memorization_floor(pairs, target.frame, spec, train)}
            values["memorized"] = M.memorized_share(target.frame.transform(samples), target.frame.transform(reference),
                                                    train)
    rep = report(values, floor, spec)
    rep["mmd_bandwidths"] = [float(f"{b:.4g}") for b in bandwidths]
    rep["frame"] = ("per-axis min-max of the held-out rows" if finite
                    else "per-axis min-max of 100,000 iid points of the data distribution")
    rep["floors"] = ("permutation: the samples and as many held-out rows, shuffled and split in two" if finite
                     else "two independent iid draws of the data")
    rep["reference"] = target.key
    rep["floors_cached"] = cached
    return rep


def memorization_warning(report: dict, n_train: int) -> Optional[str]:
    """A warning, with what to do, when the report flags the samples as copies of training rows."""
    row = report["metrics"].get("memorized")
    if not row or row["z"] is None or row["z"] <= report["z_limit"]:
        return None
    return (f"{row['value']:.0%} of the samples are closer to a training row than 90% of fresh data is (10% "
            f"expected): the model is memorizing its {n_train} training rows rather than learning their "
            "distribution; train fewer steps (train.steps), use a smaller network (model.width, model.depth) "
            "or give it more rows")


def memorization_floor(draw_pair, frame: Scaler, spec: EvalConfig, training: np.ndarray) -> dict:
    """memorized_share between the pairs of data-like points the other floors use (`floors`), against the
    run's training rows (`training`, in the frame): mean and spread over spec.draws pairs (about 0.1 and
    its sampling noise)."""
    rng, values = np.random.default_rng(0xD0C), []
    for _ in range(spec.draws):
        a, b = draw_pair(rng, spec.n)
        values.append(M.memorized_share(frame.transform(a), frame.transform(b), training))
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "draws": len(values)}


def likelihoods(run: Run, target: Target, n: int, log: Callable[[str], None] = lambda s: None,
                progress: bool = False) -> dict:
    """ELBO and probability-flow ODE NLL of n held-out iid points, per dimension, in data units and bits.

    Beside them the data's own entropy where its density is known (noisy moons, by quadrature),
    so NLL - H bounds the KL divergence from the data to the model.
    """
    cfg = run.config
    held_out = target.draw(np.random.default_rng(derive_seed(cfg.seed, "eval-nll")), n)
    x = torch.as_tensor(run.scaler.transform(held_out), dtype=torch.float32, device=run.device)
    denoiser = run.denoiser  # a conditional model's likelihood is that of its unconditional (null-label) branch
    eps_fn = model_eps_fn(denoiser)
    variance_fn = (lambda x_t, t: denoiser.output(x_t, t)[1]) if denoiser.learned_variance else None
    gen = torch_generator(cfg.seed, "eval-nll", run.device)
    log(f"likelihoods of {n} held-out points: ELBO ({run.schedule.T} terms) and probability-flow ODE")
    d, shift = run.dim, -run.scaler.log_abs_det  # nll_data = nll_scaled - log|det|
    with Progress(run.schedule.T, "ELBO", "term", enabled=progress) as bar:
        elbo = elbo_nll(eps_fn, run.schedule, x, generator=gen, variance_fn=variance_fn, on_step=bar.update)
    with Progress(None, "ODE likelihood", "evaluation", enabled=progress) as bar:
        ode = ode_nll(eps_fn, run.schedule, x, generator=gen, on_step=bar.update)
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


def format_likelihoods(lik: dict) -> str:
    lines = [f"{'likelihood':<12}{'nats/point':>12}{'nats/dim':>10}{'bits/dim':>10}{'minus H':>10}"]
    for name, r in lik["values"].items():
        gap = f"{r['minus_entropy']:.3f}" if "minus_entropy" in r else ""
        label = {"elbo": "ELBO (NLL <=)", "ode_nll": "ODE NLL", "entropy": "data entropy"}[name]
        lines.append(f"{label:<12}{r['nats']:>12.3f}{r['nats_per_dim']:>10.3f}{r['bits_per_dim']:>10.3f}{gap:>10}")
    return "\n".join(lines)


def per_class(run: Run, spec: EvalConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Each class of a conditional run judged on its own: spec.n / K samples of class k (at least MIN_EVAL_N)
    against that class's reference, beside its own floors, and a class-accuracy check: a k-NN classifier
    fitted to the training rows names the class of the samples about as often as of real rows of the class
    (a two-proportion z beyond z_max is flagged). Classes with too few held-out rows are named, not judged."""
    from sklearn.neighbors import KNeighborsClassifier

    targets = class_targets(run.config, run.classes, run.holdout, run.holdout_labels, run.data)
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
    target = target or target_for(run.config, run.holdout, run.data)
    rep = evaluate(samples, target, spec, seed=run.config.seed, log=log, progress=progress, training=run.data)
    if sampling is not None:
        rep["nfe"], rep["sampling"] = sampling.get("nfe"), sampling
    if run.classes:
        rep["per_class"] = per_class(run, spec, log)
    if spec.nll_n > 0 and run.scaler.log_abs_det is None:
        log(f"likelihoods skipped: the {run.scaler.kind} scaler is not affine, so a density in the model's frame "
            "says nothing exact in data units (a column's spikes have none)")
    elif spec.nll_n > 0:
        rep["likelihood"] = likelihoods(run, target, min(spec.nll_n, target.max_n or spec.nll_n), log, progress)
    run.dir.write_metrics(rep)
    return rep
