"""Launch a grid of fmq.py runs (env ids x seeds x methods), locally or on SLURM (submitit).

Reproduces the paper's experiment grid ("Aligning Flow Map Policies with Optimal Q-Guidance", FMQ).
Each run is `python fmq.py --env-id ENV --seed S --exp-name METHOD [method flags] [-- flags] --resume auto`
and lives in {runs_dir}/{ENV}__{METHOD}__{S}. Finished runs (final.json exists) are skipped and killed
runs resume from their last checkpoint, so re-running the same sweep command is always safe. A folder counts as the
cell's only if its config.json holds the cell's settings (env, seed, method flags, step counts: every fmq.py setting
but RUN_SETTINGS); one that holds another run (e.g. a short check under the same name) is named with the first
setting that differs, and is neither skipped as finished nor run.

The paper's columns are named methods (METHODS below: the one place that says which fmq.py flags each column
trains with); `--method NAME=FLAGS` adds any other. The "+ QGBS" columns need no runs of their own: the mvp and fmq
runs evaluate with QGBS too (--extra-samplers qgbs), and tools/report.py shows those rows as mvp/qgbs, fmq/qgbs.
Each launch writes {runs_dir}/sweep.json (the command, the flags after `--`, the methods, the commit and the date),
from which tools/report.py takes the flags.

  python tools/sweep.py --dry-run                       # the paper's grid: 12 tasks x 5 seeds x qc, mvp, fmq
  python tools/sweep.py --env-ids can square --seeds 0 1 --workers 2 --method fmq --method mvp
      --method fmq-eta05="--eta 0.5" -- --offline-steps 1000   (one command line)
  python tools/sweep.py --launcher slurm --slurm-partition gpu
"""
import argparse
import dataclasses
import functools
import json
import os
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

# name -> fmq.py flags. Sources: docs/fidelity.md, "The paper's table, column by column".
METHODS = {
    "qc": "--online-target flow-map --flow-map-loss none --euler-steps 10 --time-dim 0",  # QC (Li et al., 2025)
    "mvp": "--online-target mvp --extra-samplers qgbs",  # MVP (Zhan et al., 2026), and MVP + QGBS (mvp/qgbs)
    "fmq": "--extra-samplers qgbs",  # FMQ (Alg. 1), and FMQ + QGBS (fmq/qgbs)
    "flow-map": "--online-target flow-map",  # the official code without --fmq_online (not a column of the table)
}
PAPER_METHODS = ["qc", "mvp", "fmq"]
# fmq.py settings that say how a run was carried out, not what it computes: a cell's folder may differ in these.
RUN_SETTINGS = {"runs_dir", "resume", "device", "compile", "amp", "cudagraphs", "deterministic", "dataset_dir", "track",
                "wandb_project", "wandb_entity", "wandb_group", "log_interval", "eval_envs", "video_episodes",
                "video_frame_skip", "save_interval", "keep_checkpoints"}
PAPER_ENV_IDS = ["can", "square", "cube-dbl-t3", "cube-dbl-t4", "cube-trl-t3", "cube-trl-t4",
                 "scene-t4", "scene-t5", "hmaze-med-t3", "hmaze-med-t4", "amaze-gnt-t4", "amaze-gnt-t5"]
SWEEP_JSON = "sweep.json"  # {runs_dir}/sweep.json: what the last launch ran, for tools/report.py


def visible_gpus():
    """GPU ids usable by runs: CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists ([] if none)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU"))]


def parse_args(argv=None):
    """Parse the CLI; everything after a bare `--` is kept in args.extra and appended to every run
    (after the method's flags, so on a clash it wins: tyro keeps the last value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-ids", nargs="+", default=PAPER_ENV_IDS, help="env ids (default: the 12 paper tasks)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    p.add_argument("--method", action="append", dest="methods", metavar="NAME[=FLAGS]",
                   help=f"repeatable; a named method ({', '.join(METHODS)}) or NAME=FLAGS: the exp name and its "
                        f"fmq.py flags, e.g. fmq-eta05=\"--eta 0.5\" (default: {' '.join(PAPER_METHODS)})")
    p.add_argument("--runs-dir", default="runs", help="where run folders live, passed to fmq.py (default: runs)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local", help="where to run (default: local)")
    p.add_argument("--workers", type=int, default=None,
                   help="local parallel runs (default: #GPUs, else max(1, cpu_count // 2))")
    p.add_argument("--python", default=sys.executable, help="python interpreter for the runs (default: this one)")
    p.add_argument("--script", default=str(Path(__file__).resolve().parents[1] / "fmq.py"), help="training script (default: fmq.py next to tools/)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and skipped runs; run nothing")
    p.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the cluster default)")
    p.add_argument("--slurm-timeout-min", type=int, default=24 * 60, help="SLURM time limit per run in minutes (default: %(default)s)")
    p.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per SLURM job (default: %(default)s)")
    p.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per SLURM job (default: %(default)s)")
    p.add_argument("--slurm-mem-gb", type=int, default=64, help="memory per SLURM job in GB (default: %(default)s)")
    args = p.parse_args(argv)
    args.methods, args.extra = args.methods or PAPER_METHODS, extra
    unknown = [m for m in args.methods if "=" not in m and m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}: name one of {', '.join(METHODS)} or give NAME=FLAGS")
    return args


def build_runs(args):
    """[(run_name, cmd)] for every env x method x seed, in that order (finished runs included)."""
    runs = []
    for env_id in args.env_ids:
        for method in args.methods:
            name, _, flags = method.partition("=") if "=" in method else (method, "", METHODS[method])
            for seed in args.seeds:
                cmd = [args.python, args.script, "--env-id", env_id, "--seed", str(seed), "--exp-name", name,
                       "--runs-dir", str(args.runs_dir), *shlex.split(flags), *args.extra, "--resume", "auto"]
                runs.append((f"{env_id}__{name}__{seed}", cmd))
    return runs


@functools.lru_cache(maxsize=None)
def _parse(argv):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fmq
    import tyro
    return json.dumps(dataclasses.asdict(tyro.cli(fmq.Args, args=list(argv))))


def fmq_args(argv):
    """fmq.py's settings (config.json's dict) for the fmq.py command line argv, parsed as fmq.py parses it."""
    return json.loads(_parse(tuple(argv)))


def cell_config(env_id, seed, name, flags):
    """The config.json a run of the cell (env_id, seed, method `name` with its fmq.py flags) writes."""
    return dict(fmq_args(flags), env_id=env_id, seed=int(seed), exp_name=name)


def config_mismatch(run_dir, expected, keys=None):
    """None if run_dir's config.json holds the `expected` settings (`keys`, default all but RUN_SETTINGS), else the
    first setting that differs, in words. A setting an older config.json lacks counts as fmq.py's default."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return "it has no config.json"
    cfg, default = json.loads(path.read_text()), fmq_args([])
    for k in keys or [k for k in expected if k not in RUN_SETTINGS]:
        if cfg.get(k, default.get(k)) != expected[k]:
            return f"{k} is {cfg.get(k, default.get(k))!r}, the cell's {expected[k]!r}"
    return None


def git_commit(root=Path(__file__).resolve().parents[1]):
    """The repo's commit (short), '+changes' if fmq.py, qgbs.py or tools/ differ from it; None outside git."""
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "fmq.py", "qgbs.py", "tools"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_sweep_json(args, argv):
    """{runs_dir}/sweep.json: the command, the flags after `--`, each method's flags, env ids, seeds, commit, date."""
    methods = dict(m.partition("=")[::2] if "=" in m else (m, METHODS[m]) for m in args.methods)
    info = dict(command=shlex.join(["python", "tools/sweep.py", *argv]), flags=args.extra, methods=methods,
                env_ids=args.env_ids, seeds=args.seeds, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M %Z"))
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.runs_dir) / SWEEP_JSON).write_text(json.dumps(info, indent=1) + "\n")


def run_local(todo, runs_dir, workers, gpus):
    """Run each command as a subprocess, `workers` at a time, each pinned to one GPU if there are several."""
    free = queue.Queue()  # one slot per worker, each slot holding the GPU it uses (None: leave env alone)
    for i in range(workers):
        free.put(gpus[i % len(gpus)] if len(gpus) > 1 else None)

    def run_one(name, cmd):
        gpu, t0 = free.get(), time.time()
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}), OMP_NUM_THREADS="1")
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        try:
            with open(runs_dir / name / "stdout.log", "a") as log:
                return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode, time.time() - t0
        finally:
            free.put(gpu)

    failed = 0
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_one, name, cmd): name for name, cmd in todo}
        for fut in as_completed(futures):
            rc, secs = fut.result()
            failed += rc != 0
            status = "ok" if rc == 0 else f"failed rc={rc} (see {runs_dir / futures[fut] / 'stdout.log'})"
            print(f"[{status}] {futures[fut]} ({secs / 60:.1f} min)", flush=True)
    print(f"{len(todo) - failed}/{len(todo)} runs ok")
    return failed


def run_slurm(todo, args):
    """Submit one SLURM job per run (as a job array) with submitit; logs go to {runs_dir}/_slurm."""
    import submitit
    executor = submitit.AutoExecutor(folder=Path(args.runs_dir) / "_slurm")
    if executor.cluster != "slurm":
        print(f"warning: no SLURM found, submitit runs the jobs with its '{executor.cluster}' executor")
    executor.update_parameters(name="fmq", timeout_min=args.slurm_timeout_min, gpus_per_node=args.slurm_gpus,
                               cpus_per_task=args.slurm_cpus, mem_gb=args.slurm_mem_gb,
                               **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {}))
    with executor.batch():
        jobs = [executor.submit(submitit.helpers.CommandFunction(cmd, cwd=os.getcwd())) for _, cmd in todo]
    for (name, _), job in zip(todo, jobs):
        print(f"submitted {name}: job {job.job_id}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir)
    runs, other = build_runs(args), {}
    for name, cmd in runs:  # cmd[2:] is fmq.py's command line: --env-id E --seed S --exp-name N, then the flags
        if (runs_dir / name / "config.json").exists() or (runs_dir / name / "final.json").exists():
            why = config_mismatch(runs_dir / name, cell_config(cmd[3], cmd[5], cmd[7], cmd[8:]))
            other.update({name: why} if why else {})
    for name, why in other.items():
        print(f"# not this cell, left alone: {runs_dir / name} holds another run ({why}); move it away to run the cell")
    finished = [name for name, _ in runs if (runs_dir / name / "final.json").exists() and name not in other]
    todo = [(name, cmd) for name, cmd in runs if name not in finished and name not in other]
    for name in finished:
        print(f"# skip (finished): {name}")
    if args.dry_run:
        for _, cmd in todo:
            print(shlex.join(cmd))
        print(f"# {len(todo)} to run, {len(finished)} finished" + (f", {len(other)} held by others" if other else ""))
        return 0
    if not todo:
        print("all runs finished")
        return 0
    write_sweep_json(args, argv)
    if args.launcher == "slurm":
        run_slurm(todo, args)
        return 0
    gpus = visible_gpus()
    workers = args.workers or (len(gpus) or max(1, (os.cpu_count() or 2) // 2))
    print(f"running {len(todo)} runs locally, {workers} at a time" + (f" on GPUs {','.join(gpus)}" if gpus else ""))
    return 1 if run_local(todo, runs_dir, workers, gpus) else 0


if __name__ == "__main__":
    sys.exit(main())
