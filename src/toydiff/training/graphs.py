"""CUDA graphs: a piece of GPU work recorded once and replayed with one launch (torch.cuda.CUDAGraph).

A toy model's training step or sampling loop on a GPU is bound by kernel launches, not arithmetic: on an
H200 a training step of a small MLP costs 3-4.6 ms eager whatever the batch (about 60 kernels, each paying
its launch), while its arithmetic takes microseconds. Recorded once and replayed, the same kernels run
back to back. Two users: toydiff.training.loop captures the whole step (batch and noise draws, forward,
backward, clipping, fused AdamW, EMA; train.cuda_graphs) and toydiff.runs.run a sampler's whole K-step loop
for each batch shape (sample.cuda_graphs).

What captured work must obey, and how the users meet it:
- no host synchronisation and no Python decision on device values inside (a capture that meets one fails,
  and the user runs eagerly instead);
- inputs and outputs are static tensors: new values are copied into the inputs before a replay;
- a Python number read during capture is frozen into the graph: the learning rate and the EMA weight live
  in device tensors that the host fills before each replay;
- random draws come from generators registered with the graph (`Graph`), which advance on every replay.

Trust, but verify: before a graph replaces eager work, both users replay it on inputs whose eager result
is known and compare (`same`). A graph that would compute anything else is never used: mode "auto" runs
eagerly and says why, "on" is a one-line error.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch

from ..core.config import CUDA_GRAPH_MODES, choose
from ..core.errors import ToydiffError, first_line
from ..core.runtime import NoiseStream


def wanted(mode: str, device: torch.device, setting: str, blocker: Optional[str] = None) -> bool:
    """Whether to capture: mode "off" never; "auto" on a CUDA device when `blocker` (why this work cannot be
    captured, or None) is None; "on" the same, and a one-line error where it cannot."""
    if choose(setting, mode, CUDA_GRAPH_MODES) == "off":
        return False
    why = blocker if device.type == "cuda" else f"CUDA graphs need a CUDA device, and this runs on {device}"
    if why and mode == "on":
        raise refused(setting, why)
    return why is None


def refused(setting: str, why: str) -> ToydiffError:
    """The one-line error of `setting` = on where a graph cannot be (or was not) used."""
    return ToydiffError(f"{setting} = on, but {why}; set {setting} = auto (or off)")


class Graph:
    """`fn()`'s GPU work captured on `stream` (warmed up there first by the caller: lazy initialisation such as
    cuBLAS handles cannot happen during capture), its generators registered so each replay draws fresh numbers.
    `replay()` runs the work again and returns fn's outputs (the same static tensors each time)."""

    def __init__(self, fn: Callable[[], object], stream: torch.cuda.Stream,
                 generators: Iterable[torch.Generator] = ()):
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:
            if g.device.type == "cuda":
                self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph, stream=stream):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


def side_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The stream a capture and its warm-up run on (torch records on a side stream), or None off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def on(stream: Optional[torch.cuda.Stream]):
    """A context running work on `stream` (nothing changes for None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def join(stream: Optional[torch.cuda.Stream]) -> None:
    """The current stream waits for `stream`'s work (after work done on a side stream)."""
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)


def same(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-7) -> str:
    """How two lists of tensors compare: "bit-identical", "within float tolerance" (rtol, atol; kernels that
    add in a different order, like atomics in an embedding's backward; NaN where both have NaN), or "" where
    they differ or their lengths or shapes disagree."""
    a, b = list(a), list(b)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return ""
    if all(torch.equal(x, y) for x, y in zip(a, b)):
        return "bit-identical"
    close = all(torch.allclose(x.float(), y.float(), rtol=rtol, atol=atol, equal_nan=True) for x, y in zip(a, b))
    return "within float tolerance" if close else ""


class _Fallback:
    """What Stepper and LoopGraphs do when a graph cannot be used: run eagerly and say why in `note`, or
    (strict, the setting "on") a one-line error."""

    setting: str
    strict: bool

    def _give_up(self, why: str) -> None:
        if self.strict:
            raise refused(self.setting, why)
        self.given_up, self.note = True, f"eager: {why}"


class Stepper(_Fallback):
    """Runs `work` (a step's device work, the same every call) once per call: eagerly for the first `warmup`
    calls, then as replays of its CUDA graph. The first `checks` replays are each checked: the step runs
    eagerly from a snapshot of `tensors()` (everything `work` changes) and `generators`, the snapshot is put
    back and the graph replayed, and both results must agree (`same`); otherwise the eager result is kept and
    the stepper runs eagerly from then on (strict: a one-line error). Two checks, not one: the second shows
    that replays draw fresh random numbers. `note` says how the steps ran."""

    def __init__(self, work: Callable[[], None], tensors: Callable[[], list[torch.Tensor]],
                 generators: list[torch.Generator], stream: Optional[torch.cuda.Stream], setting: str,
                 strict: bool = False, warmup: int = 2, checks: int = 2):
        self.work, self.tensors, self.generators, self.stream = work, tensors, generators, stream
        self.setting, self.strict, self.warmup, self.checks = setting, strict, warmup, checks
        self.graph: Optional[Graph] = None
        self.calls, self.verdict, self.note = 0, "", "eager: the graph was not captured yet (too few steps)"
        self.given_up = False

    def __call__(self) -> None:
        self.calls += 1
        if self.given_up or self.calls <= self.warmup:
            self.work()
            return
        if self.graph is None:
            try:
                self.graph = Graph(self.work, self.stream, self.generators)
            except RuntimeError as e:
                self._give_up(f"the step could not be captured ({first_line(e)})")
                self.work()
                return
        if self.checks:
            self._checked_replay()
        else:
            self.graph.replay()

    def _checked_replay(self) -> None:
        before = self._snapshot()
        self.work()
        eager = self._snapshot()
        self._restore(before)
        self.graph.replay()
        verdict = same(eager[0], self.tensors())
        if not verdict:
            self._restore(eager)
            self.graph = None  # its memory pool goes with it
            self._give_up("the replayed step computed other values than the eager step")
            return
        self.checks -= 1
        self.verdict = verdict if not self.verdict or verdict == self.verdict else "within float tolerance"
        self.note = f"captured in a CUDA graph ({self.verdict} to the eager step where checked)"

    def _snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [t.detach().clone() for t in self.tensors()], [g.get_state() for g in self.generators]

    def _restore(self, snapshot) -> None:
        tensors, states = snapshot
        with torch.no_grad():
            for t, saved in zip(self.tensors(), tensors):
                t.copy_(saved)
        for g, state in zip(self.generators, states):
            g.set_state(state)


class RecordingNoise(NoiseStream):
    """A NoiseStream's draws passed through and kept (kind, shape, dtype and values, in order): the eager run
    of a sampling loop that is about to be captured learns here which draws each replay needs."""

    def __init__(self, stream: NoiseStream):  # shares the stream's state; NoiseStream.__init__ is not rerun
        self.stream, self.draws = stream, []
        self.n, self.device = stream.n, stream.device

    def randn(self, shape, dtype=torch.float32):
        x = self.stream.randn(shape, dtype)
        self.draws.append(("randn", tuple(shape), dtype, x))
        return x

    def rand(self, n, dtype=torch.float64):
        x = self.stream.rand(n, dtype)
        self.draws.append(("rand", (n,), dtype, x))
        return x


class ReplayNoise(NoiseStream):
    """The noise of a captured sampling loop: static buffers, one per draw its eager run made (RecordingNoise),
    handed out in the same order during capture. Before each replay `fill` draws a batch's own noise from
    its NoiseStream into them, in that order, so a replayed batch sees exactly the noise an eager one would."""

    def __init__(self, draws: list):
        self.kinds = [(kind, shape, dtype) for kind, shape, dtype, _ in draws]
        self.buffers = [x.clone() for *_, x in draws]
        self.n, self.device = draws[0][3].shape[0] if draws else 0, draws[0][3].device if draws else None
        self._next_draw = 0

    def _take(self, kind, shape, dtype):
        i = self._next_draw % max(1, len(self.kinds))  # each run of the loop takes the draws from the first
        if i >= len(self.kinds) or self.kinds[i] != (kind, tuple(shape), dtype):
            raise RuntimeError("the sampling loop drew other noise while captured than when it ran eagerly")
        self._next_draw += 1
        return self.buffers[i]

    def randn(self, shape, dtype=torch.float32):
        return self._take("randn", shape, dtype)

    def rand(self, n, dtype=torch.float64):
        return self._take("rand", (n,), dtype)

    def fill(self, stream: NoiseStream) -> None:
        """This batch's noise from `stream` into the buffers, in the recorded order."""
        for (kind, shape, dtype), buffer in zip(self.kinds, self.buffers):
            buffer.copy_(stream.randn(shape, dtype) if kind == "randn" else stream.rand(shape[0], dtype))


class LoopGraphs(_Fallback):
    """A sampling job's CUDA graphs, one per batch shape (Run.sample). `run(loop, inputs, noise, capture)`
    returns loop(*inputs, noise), the batch's x_0 (`inputs`: x_T and the labels or None; `noise`: the batch's
    NoiseStream, drawn from in the same order whichever way the loop runs):
    - the first batch of a shape runs eagerly (its warm-up), recording the noise it draws; with `capture`
      the loop is then captured and replayed on the same inputs and noise, and the replay must agree with
      the eager result (`same`) before the graph is kept;
    - a later batch of a captured shape copies its inputs and noise into the graph's and replays it.
    A loop that cannot be captured or disagrees is run eagerly from then on (strict: a one-line error)."""

    def __init__(self, stream: Optional[torch.cuda.Stream], setting: str = "sample.cuda_graphs", strict: bool = False):
        self.stream, self.setting, self.strict = stream, setting, strict
        self.captured: dict[tuple, tuple[Graph, list, ReplayNoise]] = {}
        self.note = "eager: no batch shape came twice (set sample.cuda_graphs = on to capture anyway)"
        self.given_up = False

    def run(self, loop: Callable[..., torch.Tensor], inputs: list, noise: NoiseStream, capture: bool) -> torch.Tensor:
        key = tuple(None if x is None else (tuple(x.shape), x.dtype) for x in inputs)
        if key in self.captured:
            graph, static, replay_noise = self.captured[key]
            for buffer, x in zip(static, inputs):
                if buffer is not None:
                    buffer.copy_(x)
            replay_noise.fill(noise)
            return graph.replay()
        if self.given_up or not capture:
            return loop(*inputs, noise)
        recording = RecordingNoise(noise)
        out = loop(*inputs, recording)
        static = [None if x is None else x.clone() for x in inputs]
        replay_noise = ReplayNoise(recording.draws)
        try:
            graph = Graph(lambda: loop(*static, replay_noise), self.stream)
        except RuntimeError as e:
            self._give_up(f"the sampling loop could not be captured ({first_line(e)})")
            return out
        verdict = same([out], [graph.replay()])
        if not verdict:
            self._give_up("the replayed sampling loop computed other samples than the eager loop")
            return out
        self.captured[key] = (graph, static, replay_noise)
        self.note = f"captured in a CUDA graph per batch shape ({verdict} to the eager loop where checked)"
        return out
