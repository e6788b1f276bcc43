"""Evaluate one saved FMQ checkpoint with each QGBS setting of the paper's efficiency table.

Rows (K, {B, M}): (0, {1, 32}) = best-of-32, (1, {4, 4}), (1, {2, 8}), (1, {1, 16}), (2, {4, 4}), (2, {4, 16}).
For each row: NFE = M (1 + K B), success rate over --episodes seeded episodes (same seeds for every row), and the
median latency of one action selection for one state.

  python tools/qgbs_sweep.py runs/scene-t5__fmq__0/checkpoints/step_002000000.pt --dataset-dir ~/.ogbench/data
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fmq  # noqa: E402
import qgbs  # noqa: E402

ROWS = [(0, 1, 32), (1, 4, 4), (1, 2, 8), (1, 1, 16), (2, 4, 4), (2, 4, 16)]  # (K, B, M)


def latency_ms(agent, obs, args, repeats=50):
    times = []
    for _ in range(repeats + 5):
        if obs.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            fmq.select_action(agent, obs, "qgbs", args)
        if obs.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[5:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by fmq.py (runs/<run>/checkpoints/step_*.pt)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per row")
    p.add_argument("--dataset-dir", default=None, help="needed for robomimic ids (the env is built from the file)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    args = dataclasses.replace(fmq.Args(**ckpt["args"]), eval_episodes=a.episodes, device=a.device)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    spec = fmq.env_spec(args.env_id)
    env_args = fmq.load_dataset(spec, a.dataset_dir)[1] if spec["suite"] == "robomimic" else None
    envs = [fmq.make_env(spec, env_args) for _ in range(min(args.eval_envs, a.episodes))]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    agent = fmq.make_agent(args, obs_dim, act_dim * args.horizon, device)
    fmq.load_checkpoint(a.checkpoint, args, agent)
    one_obs = torch.as_tensor(envs[0].reset(seed=0)[0][None], dtype=torch.float32, device=device)
    rows = []
    print(f"{args.env_id}, step {ckpt['step']}, {a.episodes} episodes on {device}")
    print(f"{'K':>2} {'B':>3} {'M':>3} {'NFE':>5} {'success':>8} {'latency ms':>11}")
    for K, B, M in ROWS:
        row_args = dataclasses.replace(args, sampler="qgbs", qgbs_k=K, qgbs_b=B, qgbs_m=M)
        success = fmq.evaluate(agent, envs, row_args, "qgbs")["success"]
        rows.append(dict(K=K, B=B, M=M, nfe=qgbs.nfe(M, K, B), success=success,
                         latency_ms=latency_ms(agent, one_obs, row_args)))
        print(f"{K:>2} {B:>3} {M:>3} {rows[-1]['nfe']:>5} {success:>8.2f} {rows[-1]['latency_ms']:>11.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(checkpoint=a.checkpoint, step=ckpt["step"], rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
