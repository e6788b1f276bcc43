"""Mutation testing of fmq.py and qgbs.py with mutmut 3, the fast tier (`pytest -m "not slow" -x -q`) as the test
command, in a work folder outside the repo (mutmut reads its config from a setup.cfg there; the repo keeps none).

  python tools/mutmut_run.py --sample 60 --seed 0     # a seeded random sample of the mutants (~10 min, 2 cores)
  python tools/mutmut_run.py --sample 40 --only "fmq.x_fmq_loss*" "qgbs.*"   # a sample of named functions
  python tools/mutmut_run.py --sample 30 --only method --seed 1   # a sample of the method's mutants only
  python tools/mutmut_run.py --full                   # every mutant (hours: see docs/testing.md)
  python tools/mutmut_run.py --counts                 # counts of the last runs in the work folder, method vs rest

The work folder (--work, default /tmp/fmq-mutmut) keeps mutmut's results between runs, so a later sample adds to
the earlier ones (a changed function is mutated and run again). `mutmut show NAME` / `mutmut results` inside it
show a mutant's diff and the survivors. One child process (--jobs N: N at once), each on OMP_NUM_THREADS=1.
"""
import argparse
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = "3.8"  # the mutmut release this setup is written for (its setup.cfg keys and mutant names)
SETUP_CFG = """[mutmut]
source_paths =
  fmq.py
  qgbs.py
pytest_add_cli_args =
  -m
  not slow
  -x
  -q
  -p
  no:cacheprovider
also_copy =
  tools
  pytest.ini
  README.md
  requirements.txt
process_isolation = forkserver
"""
# The method: networks and init, sampling, losses, update, TD target, acting, evaluation, the buffer, the
# loaders, the env table, and all of qgbs.py. The rest of fmq.py is plumbing (main's loop, validation, checkpoints,
# logs, videos, the compiled update, the RoboMimic env and its guard).
METHOD = ("qgbs.*", *(f"fmq.x_{f}__mutmut_*" for f in (
    "_ogb", "env_spec", "load_dataset", "reward_fn", "load_ogbench", "load_robomimic", "chunk_return", "time_features",
    "mlp", "q_agg", "critic_agg", "make_agent", "freeze_offline_copy", "flow", "one_step", "best_of_n",
    "select_action", "sampler_nfe", "act", "trust_region_velocity", "eulerian_target", "lagrangian_target",
    "progressive_target", "sample_r_t", "flow_map_loss", "fmq_loss", "mvp_target", "td_target", "critic_loss",
    "update", "evaluate")),
          *(f"fmq.xǁ{c}ǁ*" for c in ("ReplayBuffer", "FlowMapActor", "EnsembleLinear", "EnsembleLayerNorm",
                                      "Critics")))
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", -24: "timeout",
          24: "timeout", 152: "timeout", 255: "timeout", 34: "skipped", None: "not checked"}


def prepare(work):
    """Copies the sources and the tests to `work` and writes mutmut's setup.cfg there. mutmut 3 does not mutate a
    decorated function, so the copy of qgbs.py applies @torch.no_grad() to qgbs after its definition instead."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("fmq.py", "test_fmq.py", "pytest.ini", "README.md", "requirements.txt"):  # tests read the last two
        shutil.copy2(ROOT / name, work / name)
    src = (ROOT / "qgbs.py").read_text()
    patched = src.replace("@torch.no_grad()\ndef qgbs(", "def qgbs(") + "\n\nqgbs = torch.no_grad()(qgbs)\n"
    if patched.count("def qgbs(") != 1 or patched == src + "\n\nqgbs = torch.no_grad()(qgbs)\n":
        sys.exit("mutmut_run: qgbs.py no longer has `@torch.no_grad()\\ndef qgbs(`: update prepare()")
    if not (work / "qgbs.py").exists() or (work / "qgbs.py").read_text() != patched:
        (work / "qgbs.py").write_text(patched)
    shutil.copytree(ROOT / "tools", work / "tools", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (work / "setup.cfg").write_text(SETUP_CFG)


def generate(work):
    """Writes the mutants (mutmut's own generation step, without running tests) and returns their names."""
    code = ("import os; from mutmut.__main__ import set_mutant_under_test, copy_src_dir, copy_also_copy_files, "
            "setup_source_paths, create_mutants; set_mutant_under_test('mutant_generation'); "
            "os.makedirs('mutants', exist_ok=True); copy_src_dir(); copy_also_copy_files(); setup_source_paths(); "
            "create_mutants(1)")
    subprocess.run([sys.executable, "-c", code], cwd=work, check=True, stdout=subprocess.DEVNULL)
    return sorted(n for f in ("fmq.py", "qgbs.py") for n in meta(work, f))


def meta(work, name):
    path = work / "mutants" / f"{name}.meta"
    return json.loads(path.read_text())["exit_code_by_key"] if path.exists() else {}


def counts(work):
    """Status counts of every mutant mutmut has run in `work`, for the method and for the rest."""
    table = {"method": {}, "rest": {}}
    for name, code in (kv for f in ("fmq.py", "qgbs.py") for kv in meta(work, f).items()):
        part = "method" if any(fnmatch.fnmatchcase(name, p) for p in METHOD) else "rest"
        status = STATUS.get(code, "suspicious")
        table[part]["generated"] = table[part].get("generated", 0) + 1
        table[part][status] = table[part].get(status, 0) + 1
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/fmq-mutmut", help="work folder (kept: results accumulate)")
    p.add_argument("--sample", type=int, default=0, help="run this many mutants, drawn at random with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=[],
                   help="mutant name patterns to draw from, e.g. 'fmq.x_flow*'; 'method': the method's functions")
    p.add_argument("--names", nargs="*", default=[], help="run exactly these mutants (e.g. last run's survivors)")
    p.add_argument("--full", action="store_true", help="run every mutant")
    p.add_argument("--counts", action="store_true", help="only print the counts of the runs so far")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (one core each; 2 on a 2-core machine)")
    a = p.parse_args()
    work = Path(a.work)
    try:
        import mutmut
    except ImportError:
        sys.exit("mutmut_run: pip install 'mutmut>=3.8,<4' first")
    if not mutmut.__version__.startswith(MUTMUT):
        print(f"mutmut_run: written for mutmut {MUTMUT}.x, this is {mutmut.__version__}", file=sys.stderr)
    if not a.counts:
        prepare(work)
        names = generate(work)
        if a.only:
            pats = [q for pat in a.only for q in (METHOD if pat == "method" else (pat,))]
            names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
        if a.names:
            names = a.names
        elif not a.full:
            if not a.sample:
                sys.exit("mutmut_run: pass --sample N, --names, or --full")
            names = sorted(random.Random(a.seed).sample(names, min(a.sample, len(names))))
        print(f"mutmut_run: {len(names)} mutants in {work}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        mutmut_bin = Path(sys.executable).parent / "mutmut"
        cmd = [str(mutmut_bin), "run", "--max-children", str(a.jobs)] + ([] if a.full else names)
        subprocess.run(cmd, cwd=work, env=env)
        if not a.full:
            ran = {**meta(work, "fmq.py"), **meta(work, "qgbs.py")}
            survived = [n for n in names if ran.get(n) not in (1, 3)]
            if names and all(ran.get(n) is None for n in names):
                print(f"mutmut_run: no mutant ran: does the fast tier pass in {work / 'mutants'}? (cd there; "
                      f"pytest -m 'not slow' -x)", file=sys.stderr)
            print("mutmut_run: not killed in this run:", *(f"{n} ({STATUS.get(ran.get(n), 'suspicious')})"
                                                           for n in survived) or ["none"], sep="\n  ")
    print(json.dumps(counts(work), indent=1))


if __name__ == "__main__":
    main()
