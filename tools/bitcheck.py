"""Digests of tiny deterministic fmq.py runs, to show that a change to fmq.py changes no number.

For each --online-target (fmq, mvp, flow-map) it runs 30 offline + 30 online steps of a 2x32 network on the CPU with
--deterministic (QGBS evaluated too), then hashes every checkpoint (each tensor, RNG state and buffer row; the args
and wall-clock time left out) and both CSVs (without their time and sps columns). Run it on two commits and compare:

  python tools/make_dataset.py --env scene-play-v0 --episodes 3 --out /tmp/ogb-small     # a small dataset
  python tools/bitcheck.py --dataset-dir /tmp/ogb-small --out before.json                # on the commit before
  python tools/bitcheck.py --dataset-dir /tmp/ogb-small --compare before.json            # after: exit 1 if any differs
"""
import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("--env-id scene-t5 --deterministic --device cpu --hidden-dim 32 --num-layers 2 --time-dim 8 --batch-size 16 "
         "--best-of-n 4 --offline-steps 30 --online-steps 30 --start-training 5 --curriculum-start 5 --curriculum-end "
         "20 --eval-interval 30 --eval-episodes 2 --eval-envs 2 --log-interval 10 --save-interval 10 "
         "--keep-checkpoints 10 --extra-samplers qgbs").split()


def digest(obj, h=None):
    """sha256 (16 hex digits) of a checkpoint's contents: tensors by their bytes, dicts in key order, without the
    run's `args` and wall-clock `time`."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str((obj.dtype, tuple(obj.shape))).encode() + obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k not in ("args", "time"):
                h.update(str(k).encode()), digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            digest(x, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()[:16]


def csv_digest(path):
    rows = [{k: v for k, v in r.items() if k not in ("time", "sps")} for r in csv.DictReader(open(path))]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def run_digests(dataset_dir, runs_dir):
    out = {}
    for target in ("fmq", "mvp", "flow-map"):
        cmd = [sys.executable, str(ROOT / "fmq.py"), *FLAGS, "--dataset-dir", dataset_dir, "--runs-dir", str(runs_dir),
               "--exp-name", target, "--online-target", target]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        run = Path(runs_dir) / f"scene-t5__{target}__0"
        for p in sorted((run / "checkpoints").glob("*.pt")):
            out[f"{target}/{p.name}"] = digest(torch.load(p, weights_only=False))
        for name in ("train.csv", "eval.csv"):
            out[f"{target}/{name}"] = csv_digest(run / name)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", required=True, help="an OGBench scene-play-v0 dataset (tools/make_dataset.py)")
    p.add_argument("--out", help="write the digests here (JSON)")
    p.add_argument("--compare", help="digests of another commit (JSON): exit 1 unless every one is the same")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run_digests(a.dataset_dir, tmp)
    if a.out:
        Path(a.out).write_text(json.dumps(got, indent=1))
    if not a.compare:
        print(json.dumps(got, indent=1))
        sys.exit(0)
    want = json.loads(Path(a.compare).read_text())
    differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    print(f"bitcheck: {len(want) - len(differ)} of {len(want)} digests identical" + "".join(
        f"\n  differs: {k}" for k in differ))
    sys.exit(1 if differ else 0)
