"""Does drawing the support's piece first cut the bridge? (issue #29, item 1)

Each cell trains one run with toydiff's defaults on a zoo dataset, with model.components = 1 (today's
default: one piece) or 0 (the pieces found in the training rows), and judges 5 draws of 5000 samples
(sampling seeds 100..104), each like benchmarks/fewstep.py does: every metric against its floor at n = 5000,
fresh iid data as the reference. A cell runs in its own process (`--cell`), so cells can share the machine;
`--set KEY=VALUE` (repeated) adds settings to a cell's run, recorded in its rows (issue #29 compared
train.timestep_sampling=uniform and log-normal with it; the rows measured before log-normal became the default
carry train.timestep_sampling=uniform); `--summarize` publishes the collected lines as a table.

    for s in 0 1 2; do for c in 1 0; do python benchmarks/components.py --cell $c $s moons >> cells.jsonl; done; done
    python benchmarks/components.py --summarize cells.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from fewstep import judge
from report import machine, publish
import toydiff
from toydiff.core import config as C
from toydiff.core.config import EvalConfig
from toydiff.evaluation.reference import target_for

DRAWS = 5


def cell(components: int, seed: int, name: str, preset: str = "default", overrides: tuple[str, ...] = ()) -> None:
    torch.set_num_threads(1)
    spec = EvalConfig(n=5000, nll_n=0)
    target = target_for(C.from_dict({"data": {"name": name}}))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sections = {"data": {"name": name}, "model": {"components": components}}
        for entry in overrides:  # section.key=value, the value as TOML reads it (a bare word: a string)
            key, value = entry.split("=", 1)
            section, field = key.split(".")
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                pass
            sections.setdefault(section, {})[field] = value
        exp = toydiff.run(out=f"{tmp}/r", preset=preset, figures=False, evaluate=False, quiet=True, seed=seed,
                          **sections)
        seconds = time.perf_counter() - start
        for s in range(DRAWS):
            j = judge(exp.run.draw(5000, seed=100 + s).samples, target, spec)
            print(json.dumps({"data": name, "preset": preset, "components": components, "seed": seed, "draw": s,
                              **({"set": list(overrides)} if overrides else {}),
                              "train_s": round(seconds, 1), "verdict": j["verdict"], "worst": j["worst"],
                              "max_z": round(j["max_z"], 2), "off_data": j["off_data"]}), flush=True)


def summarize(path: Path, out: str) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| dataset | model.components | training seeds | draws indistinguishable | off-support share "
             "(mean) | flagged by |", "|---|---|---|---|---|---|"]
    for name, preset, more in dict.fromkeys((r["data"], r.get("preset", "default"), tuple(r.get("set", ())))
                                            for r in rows):
        for comp in (1, 0):
            mine = [r for r in rows if r["data"] == name and r.get("preset", "default") == preset
                    and tuple(r.get("set", ())) == more and r["components"] == comp]
            if not mine:
                continue
            ok = sum(r["verdict"] == "indistinguishable" for r in mine)
            off = [r["off_data"] for r in mine if r["off_data"] is not None]
            flags = sorted({r["worst"] for r in mine if r["verdict"] != "indistinguishable"})
            label = (name if preset == "default" else f"{name}, --preset {preset}") + "".join(
                f", {o}" for o in more)
            lines.append(f"| {label} | {comp} | {len({r['seed'] for r in mine})} | {ok} of {len(mine)} | "
                         f"{sum(off) / len(off):.5f} |" if off else f"| {label} | {comp} | "
                         f"{len({r['seed'] for r in mine})} | {ok} of {len(mine)} | - |")
            lines[-1] += f" {', '.join(flags) or '-'} |"
    publish(out, "components", {"meta": machine(draws=DRAWS, n=5000), "rows": rows}, "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", nargs=3, metavar=("COMPONENTS", "SEED", "DATASET"))
    p.add_argument("--preset", default="default", help="with --cell: the preset it trains (fast: a 4-step student)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --cell: a further setting of the run (recorded in each row)")
    p.add_argument("--summarize", type=Path, metavar="CELLS.jsonl")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    if args.cell:
        cell(int(args.cell[0]), int(args.cell[1]), args.cell[2], args.preset, tuple(args.set))
    elif args.summarize:
        summarize(args.summarize, args.out)
    else:
        p.error("give --cell or --summarize")


if __name__ == "__main__":
    main()
