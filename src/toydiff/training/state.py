"""The whole state of a training run, as it goes from step to step and as a checkpoint holds it.

    tensors, meta = state.tensors()                  # safetensors' two halves, nothing pickled
    fresh.restore(tensors, meta, steps=cfg.steps)    # every piece checked against what `fresh` expects

A state trains the run's own network ("model": its weights, AdamW, learning-rate schedule and EMA) and, for
a method that trains more than one (a critic beside the model), each of the method's other networks with its
own AdamW and schedule (`others`, by name). The run's own network is saved under the keys it always had
(model/, ema/, optim/, param_groups, scheduler), so a one-network checkpoint is what it was; another network
NAME under nets/NAME/ (nets/NAME/model/, nets/NAME/optim/, nets/NAME/param_groups, nets/NAME/scheduler).

A damaged or crafted checkpoint is a one-line ToydiffError, never a TypeError, a resume from step -5 or a
run marked trained that was not. What belongs to where the run happens rather than to its state (an
optimizer group's kernel and CUDA-graph switches, a capturable optimizer's learning rate held in a device
tensor) is saved plainly and taken from the fresh state on restore, so a run resumes on another device or
with or without CUDA graphs. The loop that advances the state is toydiff.training.loop's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..core.errors import ToydiffError
from ..core.schema import Fields, check_schema, parse_json
from ..diffusion.losses import ImportanceTimesteps, UniformTimesteps

# an optimizer group's switches that belong to where it runs (CUDA graphs, the device's AdamW kernel), not to the
# training state: a checkpoint restores everything else
RUNTIME_KEYS = ("capturable", "fused", "foreach", "differentiable")


@dataclass
class Network:
    """One of a method's further networks (a critic): its module, AdamW and learning-rate schedule; no EMA."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass
class TrainState:
    """Everything a training run carries from step to step, so it can be saved and resumed exactly:
    the model and its optimizer, learning-rate schedule and EMA, the importance sampler, the random
    generator, the step, the log rows and the loss accumulated since the last row."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[nn.Module]  # toydiff.training.loop.EMA, or None when train.ema_decay = 0
    timesteps: UniformTimesteps
    generator: torch.Generator
    step: int = 0
    rows: list[dict] = field(default_factory=list)
    running: float = 0.0  # loss summed over the steps since the last log row
    since: int = 0  # steps since the last log row
    seconds: float = 0.0  # training time before this session (resumed runs)
    graphs: str = ""  # how the last session's steps ran on CUDA (captured in a graph, or eager and why)
    others: dict[str, Network] = field(default_factory=dict)  # the method's further networks, by name
    stopped_early: bool = False  # the loop stopped on its validation loss (toydiff.training.loop.early_stop)
    best: Optional[dict[str, torch.Tensor]] = None  # the sampling weights at the lowest validation loss so far
    use_ema: bool = True  # samples are drawn with the EMA's weights where there is one (sample.use_ema)

    @property
    def sampling_module(self) -> nn.Module:
        """The weights samples are drawn with: the EMA's where there is one (and sample.use_ema), else the model's."""
        return self.ema.module if self.ema is not None and self.use_ema else self.model

    def keep_best(self) -> None:
        self.best = {k: v.detach().clone() for k, v in self.sampling_module.state_dict().items()}

    def restore_best(self) -> None:
        """The sampling weights back to the best validation row's (early stopping's choice)."""
        if self.best is not None:
            self.sampling_module.load_state_dict(self.best)

    def networks(self) -> dict[str, Network]:
        """Every network the state trains, by name: "model" (the run's own) first, then the method's others."""
        return {"model": Network(self.model, self.optimizer, self.scheduler), **self.others}

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state as named CPU tensors and string metadata (safetensors' two halves; nothing pickled)."""
        t: dict[str, torch.Tensor] = {}
        meta = {"step": str(self.step), "rows": json.dumps(self.rows), "running": repr(self.running),
                "since": str(self.since), "seconds": repr(self.seconds)}
        for name, net in self.networks().items():
            prefix = _prefix(name)
            t.update({f"{prefix}model/{k}": v for k, v in net.module.state_dict().items()})
            optim = net.optimizer.state_dict()
            for i, slots in optim["state"].items():
                t.update({f"{prefix}optim/{i}/{k}": torch.as_tensor(v) for k, v in slots.items()})
            sched = {k: v for k, v in net.scheduler.state_dict().items() if k != "lr_lambdas"}
            groups = [{**g, "capturable": False} for g in optim["param_groups"]]
            meta.update({f"{prefix}param_groups": json.dumps(_plain(groups)),
                         f"{prefix}scheduler": json.dumps(_plain(sched))})
        if self.ema is not None:
            t.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        if self.best is not None:
            t.update({f"best/{k}": v for k, v in self.best.items()})
        t["rng"] = self.generator.get_state()
        if isinstance(self.timesteps, ImportanceTimesteps):
            t["timesteps/second_moment"], t["timesteps/seen"] = self.timesteps.second_moment, self.timesteps.seen
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}, meta

    def restore(self, t: dict[str, torch.Tensor], meta: dict[str, str], steps: int) -> None:
        """Load what `tensors` saved into this freshly built state (same config, networks and device), after
        checking every piece against what this state expects (`steps`: the run's train.steps): a damaged or
        crafted checkpoint is a one-line ToydiffError, never a TypeError, a resume from step -5 or a run
        marked trained that was not. Nothing is loaded until every piece has passed."""
        where = "the checkpoint"
        rows = _json_meta(meta, "rows", where)
        step, since = _int_meta(meta, "step", where), _int_meta(meta, "since", where)
        running, seconds = _float_meta(meta, "running", where), _float_meta(meta, "seconds", where)
        _check(0 <= step <= steps, f"{where} is at step {step}, outside 0..{steps} (train.steps)")
        _check(0 <= since <= step and seconds >= 0, f"{where} has an impossible log position or time")
        check_schema(rows, [Fields({"step": int, "loss": float, "lr": float, "seconds": float, "val_loss": float},
                                   required=("step", "loss", "lr", "seconds"))], f"{where}'s loss log")
        _check(all(0 < r["step"] <= step for r in rows) and all(a["step"] < b["step"] for a, b in zip(rows, rows[1:])),
               f"{where}'s loss log has steps out of order or beyond step {step}")
        saved = {k.split("/")[1] for k in list(t) + list(meta) if k.startswith("nets/") and k.count("/") >= 2}
        _check(saved <= set(self.others), f"{where} holds networks this run's method does not train: "
                                          f"{', '.join(sorted(saved - set(self.others)))}")
        loads = [_checked_network(name, net, t, meta, step, where) for name, net in self.networks().items()]
        _check("rng" in t and t["rng"].dtype == torch.uint8 and t["rng"].shape == self.generator.get_state().shape,
               f"{where}'s random generator state is missing or damaged")
        if isinstance(self.timesteps, ImportanceTimesteps):
            shape = self.timesteps.second_moment.shape
            _check(all(t.get(f"timesteps/{k}", torch.empty(0)).shape == shape for k in ("second_moment", "seen")),
                   f"{where}'s importance-sampling state does not fit schedule.T")
        best = {k[5:]: v for k, v in t.items() if k.startswith("best/")} or None
        own = self.sampling_module.state_dict()
        _check(best is None or (set(best) == set(own) and all(best[k].shape == own[k].shape for k in own)),
               f"{where}'s best weights do not fit the network")
        for load in loads:
            load()
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema/")})
        self.generator.set_state(t["rng"])
        if isinstance(self.timesteps, ImportanceTimesteps):
            device = self.timesteps.second_moment.device
            self.timesteps.second_moment = t["timesteps/second_moment"].to(device)
            self.timesteps.seen = t["timesteps/seen"].to(device)
        self.step, self.rows, self.best = step, rows, best
        self.running, self.since, self.seconds = running, since, seconds


def _prefix(name: str) -> str:
    """Where a network's entries live in a checkpoint: the run's own at the top, the others under nets/NAME/."""
    return "" if name == "model" else f"nets/{name}/"


def _checked_network(name: str, net: Network, t: dict[str, torch.Tensor], meta: dict[str, str], step: int,
                     where: str) -> Callable[[], None]:
    """Check network `name`'s saved entries against `net` (freshly built); return what loads them."""
    prefix, what = _prefix(name), where if name == "model" else f"{where}'s {name} network"
    _check(name == "model" or any(k.startswith(prefix) for k in t), f"{where} has no state for the {name} network "
                                                                    "this run's method trains")
    fresh = {"param_groups": _plain(net.optimizer.state_dict()["param_groups"])}
    groups = _json_meta(meta, f"{prefix}param_groups", what)
    sched = _json_meta(meta, f"{prefix}scheduler", what)
    _same_shape(groups, fresh["param_groups"], f"{what}'s optimizer groups")
    _check(all(g["params"] == f["params"] for g, f in zip(groups, fresh["param_groups"])),
           f"{what}'s optimizer groups name other parameters than the network's")
    fresh_sched = _plain({k: v for k, v in net.scheduler.state_dict().items() if k != "lr_lambdas"})
    _same_shape(sched, fresh_sched, f"{what}'s learning-rate schedule")
    _check(sched["last_epoch"] == step, f"{what}'s learning-rate schedule is at step {sched['last_epoch']}, "
                                        f"its training state at {step}")
    params = dict(enumerate(p for g in net.optimizer.param_groups for p in g["params"]))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    optim = f"{prefix}optim/"
    for k, v in t.items():
        if k.startswith(optim):
            parts = k[len(optim):].split("/", 1)
            i = int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else -1
            _check(i in params and parts[-1] in ("step", "exp_avg", "exp_avg_sq"),
                   f"{where} holds an unknown optimizer entry '{k}'")
            want = () if parts[1] == "step" else tuple(params[i].shape)
            _check(tuple(v.shape) == want and v.dtype.is_floating_point,
                   f"{where}'s optimizer entry '{k}' has shape {tuple(v.shape)} {v.dtype}, the network needs "
                   f"{want} floating point")
            slots.setdefault(i, {})[parts[1]] = v
    _check(all(set(v) == {"step", "exp_avg", "exp_avg_sq"} for v in slots.values())
           and set(slots) in (set(), set(params)), f"{what}'s optimizer state is incomplete")
    weights = {k[len(prefix) + 6:]: v for k, v in t.items() if k.startswith(f"{prefix}model/")}
    groups = [{**g, **{k: f[k] for k in RUNTIME_KEYS if k in f}} for g, f in zip(groups, fresh["param_groups"])]

    def load() -> None:
        net.module.load_state_dict(weights)
        net.optimizer.load_state_dict({"state": slots, "param_groups": groups})
        net.scheduler.load_state_dict({**sched, "lr_lambdas": [None]})
    return load


def step_tensors(state: TrainState) -> list[torch.Tensor]:
    """Every tensor of `state` a training step writes: the model's, the optimizer's slots, the EMA's and the
    importance sampler's (what toydiff.training.graphs.Stepper snapshots to check a captured step)."""
    tensors = []
    for net in state.networks().values():
        tensors += list(net.module.parameters()) + list(net.module.buffers())
        tensors += [v for slots in net.optimizer.state.values() for v in slots.values() if torch.is_tensor(v)]
    if state.ema is not None:
        tensors += state.ema.tensors
    if isinstance(state.timesteps, ImportanceTimesteps):
        tensors += [state.timesteps.second_moment, state.timesteps.seen]
    return tensors


def _plain(value):
    """`value` ready for JSON: 0-d tensors (a capturable optimizer's learning rates) as numbers, all the way down."""
    if torch.is_tensor(value):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ToydiffError(f"{message}; the run directory is damaged")


def _json_meta(meta: dict[str, str], key: str, where: str):
    _check(key in meta, f"{where} has no '{key}' entry")
    return parse_json(meta[key], f"{where}'s '{key}' entry")


def _int_meta(meta: dict[str, str], key: str, where: str) -> int:
    raw = meta.get(key, "")
    _check(raw.isdigit() and len(raw) < 19, f"{where}'s '{key}' is {raw!r}, not a count")
    return int(raw)


def _float_meta(meta: dict[str, str], key: str, where: str) -> float:
    try:
        value = float(meta.get(key, ""))
    except ValueError:
        value = math.nan
    _check(math.isfinite(value), f"{where}'s '{key}' is {meta.get(key)!r}, not a finite number")
    return value


def _same_shape(saved, fresh, what: str) -> None:
    """`saved` (JSON read back) has the structure of `fresh` (what this toydiff builds): the same keys, list
    lengths and JSON types all the way down (a bool where a bool is, a number where a number is)."""
    def kind(v):
        return "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else type(v).__name__

    if isinstance(fresh, dict):
        _check(isinstance(saved, dict) and set(saved) == set(fresh), f"{what} do not have this toydiff's fields")
        for k in fresh:
            _same_shape(saved[k], fresh[k], what)
    elif isinstance(fresh, (list, tuple)):
        _check(isinstance(saved, list) and len(saved) == len(fresh), f"{what} do not have this toydiff's shape")
        for a, b in zip(saved, fresh):
            _same_shape(a, b, what)
    elif fresh is None:  # an optional switch (foreach, fused): null or true/false
        _check(saved is None or isinstance(saved, bool), f"{what} hold {saved!r} where null or true/false belongs")
    else:
        _check(kind(saved) == kind(fresh) and (not isinstance(saved, float) or math.isfinite(saved)),
               f"{what} hold {saved!r} where a {kind(fresh)} belongs")
