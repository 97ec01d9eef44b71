"""Two runs on one machine: wall time of a small real fit alone, then of two started at once, per thread setting.

Each setting is ``TORCHxPROCGEN`` (``--torch_threads`` x ``--data.env.num_threads``) or ``default`` (no flag: the
project's defaults), with optional suffixes: ``+passive`` (``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep instead
of spinning while they wait; the project's default since issue 19), ``+spin`` (``GOMP_SPINCOUNT=300000``, libgomp's
own default, i.e. every run before issue 19) and ``+runs2`` (``DRIML_RUNS_PER_MACHINE=2``). For each setting the
script runs, back to back: one fit alone, then two identical fits (different run directories) started together.
Every child runs at the same nice level, with OMP_NUM_THREADS, OMP_WAIT_POLICY, GOMP_SPINCOUNT and
DRIML_RUNS_PER_MACHINE unset unless the setting sets them. Each fit's wall time (start-up included) and its training
loop's updates/s (from the TensorBoard wall times of its first and last logged loss) are recorded. The ratio
pair/alone is what matters on a shared machine (the absolute numbers move with whatever else runs): 2.0 is what two
runs sharing the cores fairly cost; far above 2 is collapse.

    nice -n 5 python benchmarks/threads.py --out benchmarks/figures/threads   # 15-30 min on 2 cores

Writes ``OUT.json`` (every time measured) and ``OUT.png`` (alone vs pair per setting), prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "conf" / "quickstart.yaml"

SIZES = {  # overrides of conf/quickstart.yaml: 'tiny' is tests/conftest.py's tiny_args, 'quick' the quickstart's nets
    "tiny": {"--data.env.num_envs": "8", "--data.replay_size": "2048", "--data.batch_size": "16",
             "--data.replay_ratio": "2", "--data.learning_starts": "64", "--model.feature_dim": "64",
             "--model.rkhs_dim": "32", "--model.target_update_interval": "5"},
    "quick": {"--data.replay_size": "20000", "--data.learning_starts": "512"},
}  # fmt: skip


def fit_command(run_dir: Path, size: str, budget: int, setting: str) -> tuple[list[str], dict[str, str]]:
    """The fit's argv and environment for one thread setting."""
    args = {"--config": str(QUICKSTART), "--trainer.default_root_dir": str(run_dir),
            "--trainer.enable_model_summary": "false", "--trainer.enable_progress_bar": "false",
            "--data.env.game": "bigfish", "--data.env.num_levels": "20", "--data.total_env_steps": str(budget),
            "--data.updates_per_epoch": "50", "--data.eval_episodes": "2", "--trainer.log_every_n_steps": "5",
            **SIZES[size]}  # fmt: skip
    unset = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DRIML_RUNS_PER_MACHINE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    base, *flags = setting.split("+")
    if "passive" in flags:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if "spin" in flags:  # libgomp's own default when OMP_WAIT_POLICY is unset (what every run did before)
        env["GOMP_SPINCOUNT"] = "300000"
    if "runs2" in flags:
        env["DRIML_RUNS_PER_MACHINE"] = "2"
    if base != "default":
        torch_threads, procgen = base.split("x")
        args["--torch_threads"], args["--data.env.num_threads"] = torch_threads, procgen
    cmd = [sys.executable, "-m", "driml_pl", "fit", *[x for kv in args.items() for x in kv]]
    return cmd, env


def update_rate(run_dir: Path) -> float:
    """Updates per second of the training loop alone (no start-up): the wall times TensorBoard logged with the
    first and last ``train/loss`` points of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "version_0"))
    events.Reload()
    points = events.Scalars("train/loss")
    return (points[-1].step - points[0].step) / (points[-1].wall_time - points[0].wall_time)


def timed_fits(n: int, size: str, budget: int, setting: str, work: Path, nice: int) -> tuple[list[float], list[float]]:
    """Start ``n`` fits at once; the wall time of each in seconds and its training loop's updates/s (a failed fit
    raises with its stderr)."""
    procs, dirs = [], []
    for i in range(n):
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{setting}-{n}-{i}-"))
        cmd, env = fit_command(run_dir, size, budget, setting)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.nice(nice))  # fmt: skip
        procs.append((proc, start))
        dirs.append(run_dir)
    times = []
    try:
        for proc, start in procs:
            _, err = proc.communicate()
            times.append(time.perf_counter() - start)
            if proc.returncode:
                raise RuntimeError(f"fit ({setting}) exited {proc.returncode}: {err[-2000:]}")
    finally:  # interrupted (SIGTERM is turned into SystemExit in main) or failed: leave no fit running
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return times, [update_rate(d) for d in dirs]


def plot(results: list[dict], path: Path, title: str) -> None:
    """Two panels per setting: wall time of a fit and its training loop's updates/s, alone vs two at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in results]
    xs = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(1.6 * len(names) + 4, 3.8))
    for ax, key, label in ((axes[0], "_s", "wall time of a fit (s)"), (axes[1], "_updates_per_s", "updates/s")):
        alone = [r[f"alone{key}"] for r in results]
        pair = [sum(r[f"pair{key}"]) / len(r[f"pair{key}"]) for r in results]
        ax.bar([x - 0.2 for x in xs], alone, 0.4, label="one fit alone")
        ax.bar([x + 0.2 for x in xs], pair, 0.4, label="two fits at once (mean of the two)")
        for x, a, p in zip(xs, alone, pair, strict=True):
            ax.text(x + 0.2, p, f"x{p / a:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, names, fontsize=7, rotation=20)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="2x4,2x4+passive,default,1x1,1x2,2x2")
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--budget", type=int, default=2048, help="data.total_env_steps of each fit")
    p.add_argument("--nice", type=int, default=0, help="added to every child's nice level (all the same)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures" / "threads")
    p.add_argument("--replot", type=Path, nargs="+", help="only redraw OUT.png from these JSON files (appended)")
    args = p.parse_args()
    if args.replot:
        loaded = [json.loads(f.read_text()) for f in args.replot]
        rows = [r for data in loaded for r in data["results"]]
        meta = loaded[0]["meta"]
        plot(rows, args.out.with_suffix(".png"), f"{meta['size']} fit, {meta['budget']} env steps; {meta['machine']}")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    with tempfile.TemporaryDirectory(prefix="driml-threads-") as tmp:
        for setting in args.settings.split(","):
            load = os.getloadavg()[0]
            (alone,), (alone_rate,) = timed_fits(1, args.size, args.budget, setting, Path(tmp), args.nice)
            pair, pair_rate = timed_fits(2, args.size, args.budget, setting, Path(tmp), args.nice)
            row = {"setting": setting, "alone_s": alone, "pair_s": pair, "ratio": sum(pair) / 2 / alone,
                   "alone_updates_per_s": alone_rate, "pair_updates_per_s": pair_rate,
                   "rate_ratio": alone_rate / (sum(pair_rate) / 2),
                   "load_before": load, "load_after": os.getloadavg()[0]}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), Python {platform.python_version()}"
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
            "torch": torch.__version__, "size": args.size, "budget": args.budget, "argv": sys.argv[1:]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"), f"{args.size} fit, {args.budget} env steps; {machine}")
    print(f"\n{meta}\n")
    print(
        "| setting | alone: wall s (updates/s) | two at once: wall s (updates/s), each | wall ratio | rate ratio "
        "| load before |\n|---|---|---|---|---|---|"
    )
    for r in results:
        pair = " / ".join(f"{t:.1f} ({u:.1f})" for t, u in zip(r["pair_s"], r["pair_updates_per_s"], strict=True))
        print(
            f"| {r['setting']} | {r['alone_s']:.1f} ({r['alone_updates_per_s']:.1f}) | {pair} | {r['ratio']:.2f} "
            f"| {r['rate_ratio']:.2f} | {r['load_before']:.2f} |"
        )


if __name__ == "__main__":
    main()
