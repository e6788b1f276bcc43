"""Paper table, IQM and figures from fmq.py runs ("Aligning Flow Map Policies with Optimal Q-Guidance", FMQ).

Reads {runs_dir}/*/config.json + eval.csv and prints
  * the success rate per task and method at each seed's final evaluation, mean ± std over seeds (Table 1),
  * IQM and mean over seeds x tasks with 95% stratified-bootstrap CIs (rliable),
  * the online convergence speedup of --ref-method over --baseline (Figure 3),
and writes learning_curves.png (Figure 2) and speedup.png (Figure 3) to --fig-dir (default: {runs_dir}/report).
A method is a run's exp_name; eval rows logged with a sampler other than the run's own
config sampler count as the method "{exp_name}/{sampler}".
A run folder {env_id}__{method}__{seed} is reported only if its config.json holds that cell's settings, as
tools/sweep.py checks them: the method's flags (sweep.METHODS) and the flags given after `--` (the ones the sweep
appended to every run; none for the paper's); of a method not in sweep.METHODS, the env, seed, step counts and the
`--` flags. Without `--`, the flags are those of the last sweep into --runs-dir ({runs_dir}/sweep.json). A folder
holding another run (e.g. a short check) is named, with the first differing setting, and left out.
The speedup leaves out a task whose baseline never reaches --min-baseline-success online: a target of a fraction
of a near-zero success is met by evaluation noise, and the ratio says nothing.

  python tools/report.py --runs-dir runs --out-json runs/report/results.json
  python tools/report.py --runs-dir runs-small -- --offline-steps 5000 --online-steps 10000   (as swept)
"""
import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from rliable import metrics  # numpy/scipy only; rliable.library is imported lazily in aggregate()
from scipy import stats

import sweep  # the cells' settings (METHODS, config_mismatch), next to this file

PAPER_ENV_IDS = ["can", "square", "cube-dbl-t3", "cube-dbl-t4", "cube-trl-t3", "cube-trl-t4",
                 "scene-t4", "scene-t5", "hmaze-med-t3", "hmaze-med-t4", "amaze-gnt-t4", "amaze-gnt-t5"]
COLUMNS = ["qc", "mvp", "mvp/qgbs", "fmq", "fmq/qgbs"]  # the paper's columns: QC, MVP, MVP + QGBS, FMQ, FMQ + QGBS
QS = (0.5, 0.75, 0.9, 1.0)  # speedup targets: xi = q * (best online mean success of the baseline)
STD_DDOF = 0  # table std over seeds: population std (np.std default)
MIN_BASELINE_SUCCESS = 0.1  # speedup: a task counts only if the baseline's best online mean success reaches this


def cell_mismatch(run_dir, cfg, flags=()):
    """sweep.config_mismatch of run_dir against its cell: env, method and seed from the folder's name."""
    parts = Path(run_dir).name.split("__")
    named = len(parts) == 3 and parts[2].isdigit()
    env_id, name, seed = parts if named else (cfg["env_id"], cfg["exp_name"], cfg["seed"])
    if name in sweep.METHODS:
        expected = sweep.cell_config(env_id, seed, name, [*shlex.split(sweep.METHODS[name]), *flags])
        return sweep.config_mismatch(run_dir, expected)
    given, default = sweep.fmq_args(flags), sweep.fmq_args([])  # another method: its own flags are not known here
    keys = ["env_id", "seed", "exp_name", "offline_steps", "online_steps"]
    keys += [k for k in given if given[k] != default[k] and k not in sweep.RUN_SETTINGS and k not in keys]
    return sweep.config_mismatch(run_dir, sweep.cell_config(env_id, seed, name, flags), keys)


def load_runs(runs_dir, flags=(), skipped=None):
    """All eval rows of the runs that hold their cell's settings (cell_mismatch; `flags`: the ones the sweep appended
    to every run) in one DataFrame, plus env_id, method, seed, offline_steps, finished, run. A run left out is printed
    as a warning, or appended to `skipped` as (run folder, why) when that list is given."""
    frames, left_out = [], []
    for csv in sorted(Path(runs_dir).glob("*/eval.csv")):
        if not (csv.parent / "config.json").exists():
            left_out.append((csv.parent, "it has no config.json"))
            continue
        cfg, df = json.loads((csv.parent / "config.json").read_text()), pd.read_csv(csv)
        why = cell_mismatch(csv.parent, cfg, flags)
        if why:
            left_out.append((csv.parent, f"it holds another run than its cell ({why})"))
            continue
        if df.empty:
            continue
        other = df["sampler"].astype(str) != str(cfg.get("sampler", df["sampler"].iloc[0]))
        df["method"] = np.where(other, cfg["exp_name"] + "/" + df["sampler"].astype(str), cfg["exp_name"])
        # a resumed run may log a step twice: keep the last row
        df = df.drop_duplicates(["method", "step"], keep="last").sort_values("step")
        frames.append(df.assign(env_id=cfg["env_id"], seed=int(cfg["seed"]), run=csv.parent.name,
                                offline_steps=int(cfg.get("offline_steps", 0)),
                                finished=(csv.parent / "final.json").exists()))
    if skipped is None:
        for folder, why in left_out:
            print(f"warning: {folder} not reported: {why}")
    else:
        skipped.extend(left_out)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def nothing_reported(runs_dir, methods, flags, skipped, present):
    """One line: why no eval row is left to report, and what to pass."""
    if present and methods and not set(methods) & present:
        return f"no runs of --methods {' '.join(methods)} under {runs_dir}; it holds {', '.join(sorted(present))}"
    if not skipped:
        return (f"no run folder with an eval.csv under {runs_dir}: run tools/sweep.py first, or pass --runs-dir "
                f"(the folder holding the run folders)")
    folder, why = skipped[0]
    return (f"none of the {len(skipped)} run folders under {runs_dir} is reported (e.g. {folder.name}: {why}); pass "
            f"the flags that tools/sweep.py got after `--` the same way, python tools/report.py --runs-dir {runs_dir} "
            f"-- FLAGS" + (f" (given: {shlex.join(flags)})" if flags else ""))


def shared_config(configs):
    """(settings equal in every run, {run: its other settings}), leaving out how each ran (sweep.RUN_SETTINGS)."""
    keys = sorted({k for c in configs.values() for k in c} - sweep.RUN_SETTINGS)
    same = {k: next(iter(configs.values())).get(k) for k in keys
            if len({json.dumps(c.get(k)) for c in configs.values()}) == 1}
    return same, {r: {k: c.get(k) for k in keys if k not in same} for r, c in configs.items()}


def scale_text(cfg):
    """A run's scale in a few words, from the settings every run shares (left out where they differ)."""
    parts = []
    if "offline_steps" in cfg and "online_steps" in cfg:
        parts.append(f"{cfg['offline_steps']:,} offline + {cfg['online_steps']:,} online steps")
    if "num_layers" in cfg and "hidden_dim" in cfg:
        parts.append(f"{cfg['num_layers']}x{cfg['hidden_dim']} nets")
    if "batch_size" in cfg:
        parts.append(f"batch {cfg['batch_size']}")
    if "eval_episodes" in cfg:
        parts.append(f"{cfg['eval_episodes']} episodes per evaluation")
    return ", ".join(parts)


def final_scores(df):
    """Success at the final (last-step) eval row of each (env_id, method, seed)."""
    last = df.sort_values("step").groupby(["env_id", "method", "seed"], sort=False).tail(1)
    if not last["finished"].all():
        print(f"warning: using the latest eval of unfinished run(s): {', '.join(sorted(last.run[~last.finished]))}")
    return last[["env_id", "method", "seed", "step", "success", "finished", "run"]].reset_index(drop=True)


def score_matrices(finals, methods):
    """{method: [num_seeds, num_tasks] final successes} over the tasks and seeds present for every method."""
    tasks = [t for t in task_order(finals) if all(((finals.env_id == t) & (finals.method == m)).any() for m in methods)]
    seeds = sorted(set.intersection(*[set(finals.seed[(finals.env_id == t) & (finals.method == m)])
                                      for t in tasks for m in methods])) if tasks else []
    have = set(zip(finals.method, finals.env_id, finals.seed))
    missing = [f"{m}/{t}/seed {s}" for m in methods for t in task_order(finals) for s in sorted(set(finals.seed))
               if (m, t, s) not in have]
    if missing:
        print(f"warning: missing runs {', '.join(missing)}; IQM/mean use the tasks and seeds present for all "
              f"methods: {len(tasks)} tasks, seeds {seeds}")
    pivot = finals.pivot_table(index="seed", columns=["method", "env_id"], values="success")
    return {m: pivot.loc[seeds, [(m, t) for t in tasks]].to_numpy() for m in methods} if tasks and seeds else {}


def _iqm_and_mean(x):
    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])


def aggregate(score_dict, reps=50000, seed=0):
    """{method: {iqm, iqm_ci, mean, mean_ci}} over seeds x tasks, 95% stratified bootstrap CIs (rliable)."""
    try:
        from rliable import library as rly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arch: random_state is deprecated
            point, ci = rly.get_interval_estimates(score_dict, _iqm_and_mean, reps=reps,
                                                   random_state=np.random.RandomState(seed))
    except Exception as e:  # rliable 1.2 needs arch<8, and arch 7 does not import with pandas>=3
        print(f"warning: rliable.library unusable ({type(e).__name__}: {e}); "
              "same stratified bootstrap done in numpy")
        rng, point, ci = np.random.default_rng(seed), {}, {}
        for m, x in score_dict.items():  # resample seeds within each task, independently per task
            boot = np.take_along_axis(x[None], rng.integers(x.shape[0], size=(reps, *x.shape)), axis=1)
            boot = np.stack([stats.trim_mean(boot.reshape(reps, -1), 0.25, axis=1), boot.mean(axis=(1, 2))], 1)
            point[m], ci[m] = _iqm_and_mean(x), np.percentile(boot, [2.5, 97.5], axis=0)
    return {m: {"iqm": float(point[m][0]), "iqm_ci": [float(v) for v in ci[m][:, 0]],
                "mean": float(point[m][1]), "mean_ci": [float(v) for v in ci[m][:, 1]]} for m in score_dict}


def task_order(df):
    """Paper order first, then any other env ids sorted."""
    present = set(df["env_id"])
    return [t for t in PAPER_ENV_IDS if t in present] + sorted(present - set(PAPER_ENV_IDS))


def mean_curves(df, x="step"):
    """Per (env_id, method, x): mean success over seeds, 95% t-interval (lo, hi) and seed count n."""
    g = df.groupby(["env_id", "method", x])["success"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    half = stats.t.ppf(0.975, np.maximum(out.n - 1, 1)) * out["std"].fillna(0) / np.sqrt(out.n)
    return out.assign(lo=out["mean"] - half, hi=out["mean"] + half)


def first_reach(x, y, target):
    """First x at which y >= target, nan if never."""
    hit = np.flatnonzero(np.asarray(y) >= target - 1e-9)
    return float(np.asarray(x)[hit[0]]) if hit.size else np.nan


def speedup(x_base, y_base, x_ref, y_ref, qs=QS, min_best=0.0):
    """For xi = q * max(y_base): (x where the baseline first reaches xi) / (x where ref first does).

    x are online env steps (> 0), y mean success curves; nan where ref never reaches xi, or where max(y_base) is 0 or
    below min_best (a target that low is met by evaluation noise).
    """
    best = np.max(y_base)
    if best <= 0 or best < min_best:
        return np.full(len(qs), np.nan)
    return np.array([first_reach(x_base, y_base, q * best) / first_reach(x_ref, y_ref, q * best) for q in qs])


def bootstrap_mean_ci(values, reps=10000, seed=0):
    """Mean of values and its 95% percentile bootstrap CI (resampling values, e.g. tasks)."""
    values = np.asarray(values, float)
    boot = np.random.default_rng(seed).choice(values, size=(reps, len(values))).mean(axis=1)
    return float(values.mean()), [float(v) for v in np.percentile(boot, [2.5, 97.5])]


def speedup_table(df, ref, base, qs=QS, min_best=0.0, left_out=None):
    """Per-task speedups [num_tasks, len(qs)] of ref over base from online mean curves (x = env_steps). A task whose
    baseline's best online mean success is below min_best is left out (dict `left_out`: task -> that best)."""
    curves = mean_curves(df[(df.phase == "online") & (df.env_steps > 0)], x="env_steps")
    rows = {}
    for task in task_order(df):
        c = {m: curves[(curves.env_id == task) & (curves.method == m)] for m in (ref, base)}
        if len(c[ref]) and len(c[base]):
            if c[base]["mean"].max() < min_best and left_out is not None:
                left_out[task] = float(c[base]["mean"].max())
                continue
            rows[task] = speedup(c[base].env_steps, c[base]["mean"], c[ref].env_steps, c[ref]["mean"], qs, min_best)
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(qs))


def plot_learning_curves(df, methods, path, note=""):
    """Mean success per evaluation over seeds, per task and method, with its 95% t-interval; `note` (seeds, scale)
    goes under the title."""
    import matplotlib.pyplot as plt
    tasks, curves = task_order(df), mean_curves(df)
    ncols = min(4, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4 * ncols, 6), 3 * nrows + 0.5), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for i, m in enumerate(methods):
            c = curves[(curves.env_id == task) & (curves.method == m)]
            ax.plot(c.step, c["mean"], color=f"C{i}", label=m)
            ax.fill_between(c.step, c.lo.clip(0, 1), c.hi.clip(0, 1), color=f"C{i}", alpha=0.2)
        boundary = df.offline_steps[df.env_id == task].median()
        ax.axvline(boundary, color="k", ls="--", lw=1)
        ax.text(0.02, 0.97, "offline", transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=8)
        ax.text(boundary, 0.97, " online", transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=8)
        ax.set(title=task, ylim=(-0.02, 1.08), xlabel="step (offline: updates; online: env steps)",
               ylabel="success rate")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.suptitle("Offline-to-online learning curves: success rate at each evaluation, mean over seeds (shaded: 95% "
                 "t-interval)" + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0),
               ncol=min(len(methods), 3 * ncols), frameon=False)  # below the axes, in rows that fit the width
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_speedup(agg, ref, base, path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"ξ = {q:g}·best" for q in agg]
    means = np.array([a["mean"] for a in agg.values()])
    err = np.abs(np.array([a["ci"] for a in agg.values()]).T - means)
    ax.bar(labels, means, yerr=err, capsize=5, color="C0", alpha=0.8)
    for i, a in enumerate(agg.values()):
        ax.text(i, a["ci"][1], f"{a['mean']:.2f}×\n({a['n']} tasks)", ha="center", va="bottom", fontsize=8)
    ax.axhline(1, color="k", ls="--", lw=1)
    top = max(a["ci"][1] for a in agg.values())
    ax.set(xlabel=f"success target (best = best online mean success of {base})", ylabel="speedup (online env steps)",
           title=f"Convergence speedup of {ref} over {base}, 95% CI", ylim=(0, max(1.5, top * 1.25)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)  # after a bare `--`: the flags the sweep appended
    command = shlex.join(["python", "tools/report.py", *argv])
    flags = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default="runs", help="folder holding the run folders (default: runs)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (exp names) to show, in order (default: all; the paper's columns first, in its order)")
    p.add_argument("--ref-method", default="fmq", help="method whose speedup is measured (default: fmq)")
    p.add_argument("--baseline", default="mvp", help="baseline of the speedup figure (default: mvp, as the paper)")
    p.add_argument("--min-baseline-success", type=float, default=MIN_BASELINE_SUCCESS,
                   help="speedup: leave out a task whose baseline's best online mean success is below this "
                        "(default: %(default)s)")
    p.add_argument("--reps", type=int, default=50000, help="bootstrap resamples (default: 50000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--fig-dir", default=None, help="where the PNG figures go (default: {runs_dir}/report)")
    p.add_argument("--out-json", default=None, help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    swept = json.loads((Path(args.runs_dir) / sweep.SWEEP_JSON).read_text()) \
        if (Path(args.runs_dir) / sweep.SWEEP_JSON).exists() else None
    if flags is None and swept:
        flags = swept["flags"]
        print(f"the sweep's flags, from {Path(args.runs_dir) / sweep.SWEEP_JSON}: {shlex.join(flags) or '(none)'}")
    flags = flags or []

    skipped = []
    df = load_runs(args.runs_dir, flags, skipped)
    present = set(df.get("method", []))
    methods = args.methods or [m for m in COLUMNS if m in present] + sorted(present - set(COLUMNS))
    df = df[df.method.isin(methods)] if len(df) else df
    if df.empty:
        print(f"report: error: {nothing_reported(args.runs_dir, args.methods, flags, skipped, present)}",
              file=sys.stderr)
        return 1
    for folder, why in skipped:
        print(f"warning: {folder} not reported: {why}")
    finals, tasks = final_scores(df), task_order(df)
    configs = {r: json.loads((Path(args.runs_dir) / r / "config.json").read_text()) for r in sorted(set(df.run))}
    same, own = shared_config(configs)
    seeds = {m: sorted(int(s) for s in set(df.seed[df.method == m])) for m in methods}
    out = {"report": {"command": command, "commit": sweep.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M %Z")},
           "sweep": swept, "flags": flags, "seeds": seeds, "config": same, "config_per_run": own,
           "std_ddof": STD_DDOF, "table": {}, "aggregate": {}, "speedup": {}, "speedup_left_out": {}}

    # Table 1: final success, mean ± std over seeds
    scores = score_matrices(finals, methods)
    out["aggregate"] = aggregate(scores, args.reps, args.seed) if scores else {}
    n_max = finals.groupby(["env_id", "method"]).size().max()
    print(f"\nSuccess rate at each seed's final eval: mean ± std over seeds (std ddof={STD_DDOF}; "
          f"{n_max} seeds unless marked n=)")
    cells = {}
    for t in tasks:
        for m in methods:
            s = finals.success[(finals.env_id == t) & (finals.method == m)].to_numpy()
            if len(s):
                out["table"].setdefault(t, {})[m] = {"mean": s.mean(), "std": s.std(ddof=STD_DDOF), "n": len(s)}
                cells[t, m] = f"{s.mean():.2f} ± {s.std(ddof=STD_DDOF):.2f}" + (f" (n={len(s)})" if len(s) < n_max else "")
    for name, key in (("IQM [95% CI]", "iqm"), ("mean [95% CI]", "mean")):
        for m, a in out["aggregate"].items():
            cells[name, m] = f"{a[key]:.2f} [{a[key + '_ci'][0]:.2f}, {a[key + '_ci'][1]:.2f}]"
    rows = tasks + (["IQM [95% CI]", "mean [95% CI]"] if scores else [])
    width = [max(len(r) for r in rows + ["task"])] + [max([len(m)] + [len(cells.get((r, m), "-")) for r in rows])
                                                      for m in methods]
    for r in [["task"] + methods] + [[r] + [cells.get((r, m), "-") for m in methods] for r in rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    if scores:
        shape = next(iter(scores.values())).shape
        print(f"(IQM/mean over {shape[0]} seeds x {shape[1]} tasks, {args.reps} stratified bootstrap resamples)")

    # Figure 3: convergence speedup of ref over baseline during the online phase
    ref, base, low = args.ref_method, args.baseline, out["speedup_left_out"]
    table = speedup_table(df, ref, base, QS, args.min_baseline_success, low) \
        if {ref, base} <= set(df.method) else pd.DataFrame()
    for task, best in low.items():
        print(f"\nspeedup: {task} left out: {base}'s best online mean success is {best:.2f}, below "
              f"--min-baseline-success {args.min_baseline_success:g} (targets that low are met by evaluation noise)")
    if table.empty:
        print(f"\nspeedup: skipped (needs online evals of both '{ref}' and '{base}' on a common task"
              + (f" where {base} reaches {args.min_baseline_success:g})" if low else ")"))
    else:
        print(f"\nSpeedup of {ref} over {base}: online env steps {base} needs to first reach xi / those {ref} needs,"
              f"\nxi = q * best online mean success of {base}; skipped (-) where {ref} never reaches xi "
              f"or {base} never succeeds")
        print("task".ljust(14) + "".join(f"q={q:g}".rjust(10) for q in QS))
        for task, row in table.iterrows():
            print(task.ljust(14) + "".join(("-" if np.isnan(v) else f"{v:.2f}").rjust(10) for v in row))
        for q in QS:
            vals = table[q].dropna()
            if len(vals):
                mean, ci = bootstrap_mean_ci(vals, seed=args.seed)
                out["speedup"][q] = {"mean": mean, "ci": ci, "n": len(vals), "per_task": vals.to_dict()}
                print(f"q={q:g}: mean speedup {mean:.2f}x [95% CI {ci[0]:.2f}, {ci[1]:.2f}] over {len(vals)} tasks")

    # figures
    import matplotlib
    matplotlib.use("Agg")
    fig_dir = Path(args.fig_dir or Path(args.runs_dir) / "report")
    fig_dir.mkdir(parents=True, exist_ok=True)
    seed_sets = {tuple(v) for v in seeds.values()}
    note = (f"seeds {', '.join(map(str, next(iter(seed_sets))))}" if len(seed_sets) == 1 else
            "seeds: " + "; ".join(f"{m} {', '.join(map(str, v))}" for m, v in seeds.items()))
    note = "; ".join(filter(None, [note, scale_text(same)]))
    plot_learning_curves(df, methods, fig_dir / "learning_curves.png", note)
    print(f"\nwrote {fig_dir / 'learning_curves.png'}")
    if out["speedup"]:
        plot_speedup(out["speedup"], ref, base, fig_dir / "speedup.png")
        print(f"wrote {fig_dir / 'speedup.png'}")
    else:
        print("speedup figure skipped: no speedup numbers")
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(out, indent=1, default=float))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
