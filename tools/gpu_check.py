"""fmq.py on a GPU in one command: CUDA tests, the update's speed, and a real run killed and resumed.

Run it on your card before a long run with --compile --cudagraphs. It writes OUT/bench_gpu.json (the summary) and
OUT/gpu_check.log (every step's output); OUT is --out, else $OUT, else runs/gpu_check.

  python tools/gpu_check.py                           # on a CUDA machine, default sizes (4x512, batch 256, N 32)
  python tools/gpu_check.py --tiny --out /tmp/check   # any machine: the same steps at toy sizes (the tests run it)
  python tools/gpu_check.py --fetch-wheels .whl       # with internet: all a machine with only torch lacks
  python tools/gpu_check.py --wheels .whl             # ... installed from there first (no index), then the check

Steps (each with a time limit, its output in the log; a failed step is reported and the others still run):
  1. wheels  (--wheels DIR) pip installs DIR/*.whl into OUT/site, on the path of every later step;
  2. tests   the CUDA tests of test_fmq.py (they skip without CUDA) and the CPU-side tests of what CUDA changes;
  3. bench   tools/bench.py --quick, eager, and (CUDA) with --compile --cudagraphs;
  4. data    tools/make_dataset.py: a few scene episodes;
  5. run     fmq.py on them (offline, then online steps, evaluations; CUDA: --compile --cudagraphs), SIGKILLed once
             a checkpoint past the phase switch is saved, then resumed with --resume auto to the end: final.json
             written, eval.csv without a repeated step, the resumed rows of train.csv finite.
The summary names the device and gives the offline and online update (ms), the online step of the real loop
(bench.py's `online step, real loop` row: act, env step, store, update) and the real run's online steps per second.
"""
import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(nets=["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "16", "--best-of-n", "4"],
            bench=["--repeats", "3"], episodes=2, steps=40, run=["--time-dim", "8", "--eval-episodes", "2",
                                                                  "--eval-envs", "2", "--curriculum-start", "5",
                                                                  "--curriculum-end", "20", "--start-training", "5"])
FULL = dict(nets=[], bench=[], episodes=16, steps=3000, run=["--eval-episodes", "10", "--start-training", "500"])
# Every package fmq.py, test_fmq.py and tools/ import, but torch and NOT_FETCHED (the test suite checks this list
# against their imports), pinned as requirements.txt (gymnasium is not: pip picks it for ogbench). --fetch-wheels
# downloads them with their dependencies.
WHEELS = ["numpy==2.4.6", "scipy==1.17.1", "h5py==3.16.0", "tyro==1.0.17", "tqdm==4.70.1", "tensorboard==2.21.0",
          "ogbench==1.2.2", "mujoco==3.3.7", "dm_control==1.0.34", "gymnasium", "imageio==2.38.2",
          "pytest==9.2.0", "pandas==2.3.3", "rliable==1.2.0", "matplotlib==3.11.2", "huggingface_hub==2.4.0"]
NOT_FETCHED = {"torch": "the machine has it", "wandb": "fmq.py --track only", "robosuite": "the RoboMimic tasks only",
               "submitit": "tools/sweep.py --launcher slurm only",
               "mutmut": "tools/mutmut_run.py only"}  # imported, but not by any step of the check
SDIST_ONLY = ["rliable==1.2.0"]  # no wheel on PyPI: built here (pure Python), then found by the download
STRIP = ("dm_control/locomotion/", "dm_control/suite/")  # 47 of dm_control's 56 MB; ogbench uses only mjcf
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def fetch_wheels(folder, python_version):
    """pip download WHEELS and their dependencies (not torch) for CPython `python_version` on x86_64 Linux, then drop
    dm_control's unused assets."""
    pip, platforms = [sys.executable, "-m", "pip"], [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), *SDIST_ONLY], check=True)
    subprocess.run([*pip, "download", "-q", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platforms, "--find-links", str(folder), "-d", str(folder), *WHEELS],
                   check=True)
    pulled = [w.name for w in Path(folder).glob("*.whl") if w.name.split("-")[0].lower() in NOT_FETCHED]
    if pulled:  # a dependency of WHEELS: the check would install it over the machine's own
        raise SystemExit(f"gpu_check: error: {', '.join(pulled)} came as a dependency; remove it from {folder}")
    for whl in Path(folder).glob("dm_control-*.whl"):
        strip_wheel(whl, STRIP)
    print(f"{folder}: {sum(f.stat().st_size for f in Path(folder).glob('*.whl')) / 2**20:.0f} MB of wheels "
          f"for CPython {python_version}; on the machine with torch: python tools/gpu_check.py --wheels {folder}")


def strip_wheel(path, prefixes):
    """Rewrite a wheel without the files under `prefixes` (and their RECORD lines)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(prefixes):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True) if not line.decode().startswith(prefixes))
            dst.writestr(item, data)
    os.replace(tmp, path)


class Check:
    """Runs the steps, logs their output to OUT/gpu_check.log and keeps their status for the summary."""

    def __init__(self, out):
        self.out, self.steps, self.env = out, {}, dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = open(out / "gpu_check.log", "a")

    def run(self, name, cmd, limit_s, **kw):
        t0 = time.time()
        self.log.write(f"\n==== {name}: {' '.join(map(str, cmd))}\n")
        self.log.flush()
        try:
            rc = subprocess.run(list(map(str, cmd)), stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                timeout=limit_s, cwd=ROOT, **kw).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        self.steps[name] = dict(ok=rc == 0, rc=rc, seconds=round(time.time() - t0, 1))
        print(f"{name:<14} {'ok' if rc == 0 else f'FAILED ({rc})':<14} {time.time() - t0:7.1f} s", flush=True)
        return rc == 0


def killed_and_resumed(check, cmd, run_dir, kill_after_step, limit_s):
    """fmq.py until it saves a checkpoint past `kill_after_step`, SIGKILL, then `--resume auto` to the end."""
    t0 = time.time()
    check.log.write(f"\n==== run (until a checkpoint after step {kill_after_step}, then SIGKILL): {' '.join(cmd)}\n")
    check.log.flush()
    child = subprocess.Popen(cmd, stdout=check.log, stderr=subprocess.STDOUT, env=check.env, cwd=ROOT)
    past = lambda: [p for p in (run_dir / "checkpoints").glob("step_*.pt") if int(p.stem[5:]) > kill_after_step]
    while child.poll() is None and not past() and time.time() - t0 < limit_s:
        time.sleep(0.2)
    killed = child.poll() is None and bool(past())
    child.send_signal(signal.SIGKILL) if child.poll() is None else None
    child.wait()
    check.steps["run (killed)"] = dict(ok=killed, rc=child.returncode, seconds=round(time.time() - t0, 1))
    print(f"{'run (killed)':<14} {'ok' if killed else 'FAILED (no checkpoint to kill at)':<14} "
          f"{time.time() - t0:7.1f} s", flush=True)
    return killed and check.run("run (resumed)", [*cmd, "--resume", "auto"], max(limit_s - (time.time() - t0), 30))


def run_summary(run_dir, offline_steps):
    """What the real run left: no repeated eval step, finite losses, the online phase's steps per second."""
    evals = list(csv.DictReader(open(run_dir / "eval.csv")))
    train = list(csv.DictReader(open(run_dir / "train.csv")))
    online_sps = [float(r["sps"]) for r in train if int(r["step"]) > offline_steps + 1]
    steps = [(r["step"], r["sampler"]) for r in evals]
    return dict(final=json.loads((run_dir / "final.json").read_text()), eval_rows=len(evals),
                eval_steps_unique=len(set(steps)) == len(steps), train_rows=len(train),
                losses_finite=all(math.isfinite(float(r["critic/loss"])) for r in train),
                online_steps_per_s=online_sps[-1] if online_sps else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the log, the bench JSONs and the summary (default: "
                   "$OUT if set, else runs/gpu_check)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: seconds on a CPU (what the test suite runs)")
    p.add_argument("--wheels", default=None, help="pip install these wheels (no index) into OUT/site first")
    p.add_argument("--fetch-wheels", default=None, metavar="DIR", help="only download the wheels into DIR, and stop")
    p.add_argument("--python-version", default="%d.%d" % sys.version_info[:2],
                   help="--fetch-wheels: the Python of the machine that will run the check (default: %(default)s)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "run"], help="steps to leave out")
    a = p.parse_args(argv)
    if a.fetch_wheels:
        return fetch_wheels(Path(a.fetch_wheels), a.python_version)
    out = Path(a.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    size, check, t0 = TINY if a.tiny else FULL, Check(out), time.time()
    if a.wheels:
        site = out / "site"
        check.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--upgrade", "--target", site, *sorted(Path(a.wheels).resolve().glob("*.whl"))], 300)
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), check.env.get("PYTHONPATH")]))
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available(), torch.__version__, "
                            "torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"],
                           capture_output=True, text=True, env=check.env)
    cuda, torch_version, device = probe.stdout.split(" ", 2) if probe.returncode == 0 else ("False", "?", "?")
    cuda, device = cuda == "True", device.strip()
    print(f"gpu_check on {device} (torch {torch_version}), {'tiny' if a.tiny else 'default'} sizes -> {out}")
    py, summary = sys.executable, dict(device=device, cuda=cuda, torch=torch_version, tiny=a.tiny, steps=check.steps)

    if "tests" not in a.skip:  # CUDA tests, and the CPU-side checks of what CUDA, bf16 and graphs change
        check.run("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fmq.py", "-k",
                            "(cuda or amp_ or rng_states or off_the_data) and not gpu_check"], 240)
    if "bench" not in a.skip:
        for name, flags in [("bench eager", []), ("bench graphs", ["--compile", "--cudagraphs"])][:1 + cuda]:
            if check.run(name, [py, "tools/bench.py", "--quick", *size["nets"], *size["bench"],
                                "--out", out / f"{name.replace(' ', '_')}.json", *flags], 240):
                bench = json.loads((out / f"{name.replace(' ', '_')}.json").read_text())
                rows = {r["name"]: r["ms"] for r in bench["rows"]}
                summary[name] = {k: rows.get(k) for k in ("offline update", "online update", "env step",
                                                          "online step, real loop")}
    if "run" not in a.skip:
        data, runs, n = out / "data", out / "runs", size["steps"]
        if check.run("data", [py, "tools/make_dataset.py", "--env", "scene-play-v0", "--episodes", size["episodes"],
                              "--workers", 4, "--out", data], 120):
            cmd = [py, "fmq.py", "--env-id", "scene-t5", "--dataset-dir", data, "--runs-dir", runs, *size["nets"],
                   *size["run"], "--offline-steps", n, "--online-steps", n, "--eval-interval", n,
                   "--save-interval", n // 4, "--log-interval", n // 4, *(["--compile", "--cudagraphs"] * cuda)]
            run_dir = runs / "scene-t5__fmq__0"
            if killed_and_resumed(check, list(map(str, cmd)), run_dir, n + n // 4, 300):
                summary["run"] = run_summary(run_dir, n)
    summary["seconds"] = round(time.time() - t0, 1)
    summary["ok"] = all(s["ok"] for s in check.steps.values())
    text = json.dumps(summary, indent=2)
    (out / "bench_gpu.json").write_text(text)
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
