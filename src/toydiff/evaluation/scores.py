"""Every metric declared once, and how a value is read beside its noise floor: z-scores, power, the verdict.

The floor of a metric at sample size n is its value between two samples of size n that come from the same
law: its mean and spread over `draws` pairs (`floors`), two independent reference draws (`fresh_pairs`) or
the compared points shuffled and split in two (`shuffled_pairs`, a permutation test for a file's held-out
rows). A metric's z-score is how many floor deviations the model's value lies on the bad side of the floor's
mean; the verdict calls samples indistinguishable from data when every z is within `z_limit` and the test had
the power to see a difference. Pure: numbers in, numbers out (toydiff.evaluation.judge runs it on a run).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from ..core.config import EvalConfig
from ..data.scaler import Scaler
from . import metrics as M


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
    "gbt_auc": Metric(+1, None, "gradient-boosted-tree classifier two-sample AUC (0.5 = indistinguishable): sees "
                                "values a column never takes", lambda p: M.gbt_auc(p.xs, p.ys)),
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
    "memorized": Metric(+1, 0.0, "share of samples closer to a training row than 90% of fresh data is (about 0.1 "
                                 "expected; every sample drawn, against every reference row)",
                        fraction=True),  # needs the training rows: memorization_floor, M.memorized_share
}
FRACTIONS = tuple(name for name, m in METRICS.items() if m.fraction)
FLOOR_VERSION = 6  # bump when a metric's definition changes, so cached floors are recomputed (2: MMD bandwidths,
# 3: MMD^2 and energy as V-statistics, 4: the tree test, 5: its leaves on small tables, 6: off_data on the ring of
# Gaussians and the checkerboard)


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
    if "efficacy" in rep:
        lines.append(efficacy_line(rep["efficacy"]))
    return "\n".join(lines)


def efficacy_line(e: dict) -> str:
    """Machine-learning efficacy in one line (metrics.efficacy's record)."""
    return (f"efficacy: trees trained on {e['samples']} samples score {e['on_samples']:.3f} on the "
            f"{e['held_out_rows']} held-out rows, trained on the {e['training_rows']} training rows "
            f"{e['on_training_rows']:.3f} (gap {e['gap']:+.3f} +- {e['gap_std']:.3f})")


def memorization_warning(report: dict, n_train: int) -> Optional[str]:
    """A warning, with what to do, when the report flags the samples as copies of training rows."""
    row = report["metrics"].get("memorized")
    if not row or row["z"] is None or row["z"] <= report["z_limit"]:
        return None
    return (f"{row['value']:.0%} of the samples are closer to a training row than 90% of fresh data is (10% "
            f"expected): the model is memorizing its {n_train} training rows rather than learning their "
            "distribution; train fewer steps (train.steps), use a smaller network (model.width, model.depth) "
            "or give it more rows")


def memorization_floor(n: int, m: int) -> dict:
    """The floor of memorized_share for n samples against m reference rows: its exact mean and spread where
    samples and reference rows are exchangeable (metrics.memorized_null), not estimated from draws."""
    mean, std = M.memorized_null(n, m)
    return {"mean": mean, "std": std, "draws": 0}


def format_likelihoods(lik: dict) -> str:
    lines = [f"{'likelihood':<12}{'nats/point':>12}{'nats/dim':>10}{'bits/dim':>10}{'minus H':>10}"]
    for name, r in lik["values"].items():
        gap = f"{r['minus_entropy']:.3f}" if "minus_entropy" in r else ""
        label = {"elbo": "ELBO (NLL <=)", "ode_nll": "ODE NLL", "entropy": "data entropy"}[name]
        lines.append(f"{label:<12}{r['nats']:>12.3f}{r['nats_per_dim']:>10.3f}{r['bits_per_dim']:>10.3f}{gap:>10}")
    return "\n".join(lines)
