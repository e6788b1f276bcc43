"""Speed benchmark of fmq.py ("Aligning Flow Map Policies with Optimal Q-Guidance", FMQ).

On one device (CUDA when present, else CPU), with the real shapes of an env id and the paper's network sizes,
it reports the median over many timed repeats (after one warm-up phase) of
  * the offline update: critic TD with the best-of-N target + flow-map loss (diagonal + self-distillation),
  * the online update: critic TD + FMQ loss; the env's step time (random actions, a real env) and their sum
    (the one-step action, taken once per chunk of `horizon` env steps, is left out of that sum),
  * action selection for 1 and 50 states: one-step flow map, best-of-N, QGBS, and a 10-step Euler flow policy
    (the same FlowMapActor integrated on its diagonal u(a_t, t, t)) for comparison,
  * with --compile, the offline and online updates eager and compiled (fmq.make_update: the eager update under
    torch.compile) side by side, timed in alternating rounds so that a changing machine load hits both alike, their
    ratio, and each phase's compile time (its first compiled update; a warm on-disk inductor cache makes it shorter),
  * the offline update's achieved FLOP/s (FlopCounterMode, forward + backward) as a fraction of the device's
    measured matmul rate at the update's dominant shape [batch * N, hidden] x [hidden, hidden], same dtype.
Each update includes sampling its batch from a replay buffer of random data (as in fmq.main's loop).
One configuration per invocation: run it with and without --amp to compare.

  python tools/bench.py --quick                     # < 2 min on a 2-core CPU
  python tools/bench.py --amp --out bench_amp.json  # bf16 autocast; writes the table as JSON
  OMP_NUM_THREADS=1 python tools/bench.py --compile --hidden-dim 128 --num-layers 3 --batch-size 128 --best-of-n 8
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fmq  # noqa: E402

ROBOMIMIC_SHAPES = dict(can=(23, 7), square=(23, 7))  # obs_dim, act_dim (the env needs the dataset file)
FOOTER = ("compare only runs on one machine, in one window, at one precision (docs/speed.md: how to read these).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="scene-t5",
                   help="env id from fmq.ENVS or an OGBench singletask name (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda[:i]'")
    p.add_argument("--quick", action="store_true", help="5 warm-up + 10 timed updates (default: 20 + 100)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (Args.amp)")
    p.add_argument("--compile", action="store_true", help="also time the compiled update (Args.compile), side by side "
                   "with the eager one; the other rows stay eager")
    p.add_argument("--cudagraphs", action="store_true", help="replay each update as one CUDA graph (Args.cudagraphs)")
    p.add_argument("--hidden-dim", type=int, default=fmq.Args.hidden_dim, help="MLP width (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=fmq.Args.batch_size, help="batch size (default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=fmq.Args.num_layers, help="hidden layers (default: %(default)s)")
    p.add_argument("--best-of-n", type=int, default=fmq.Args.best_of_n, help="N of best-of-N (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed updates (default: 10 with --quick, else 100); "
                   "action selection gets 5x as many, up to 2 s (--quick) or 10 s per row")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup, repeats, max_s=float("inf")):
    """Median wall time of fn() in ms over `repeats` calls (fewer, but at least 5, once they took max_s seconds),
    synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 and sum(times) > max_s:
            break
    return 1e3 * statistics.median(times)


def interleaved_ms(fns, device, repeats, rounds=10):
    """Median ms per call of each fn in `fns` (name -> fn), timed in `rounds` alternating rounds of repeats // rounds
    calls each (a changing load on the machine hits them alike), synchronising the device around each call."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += [timed_s(fn, device) for _ in range(max(repeats // rounds, 1))]
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def timed_s(fn, device):
    """Seconds of one call of fn, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "cpu"


def synthetic_buffer(obs_dim, act_dim, horizon, device, rows=100_000, episode_len=1000, online=0):
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((rows + 1, obs_dim), dtype=np.float32)
    data = dict(observations=obs[:-1], next_observations=obs[1:],
                actions=rng.uniform(-1, 1, (rows, act_dim)).astype(np.float32),
                rewards=-(rng.random(rows) < 0.9).astype(np.float32), masks=np.ones(rows, np.float32),
                ends=(np.arange(rows) % episode_len == episode_len - 1).astype(np.float32))
    return fmq.ReplayBuffer(data, rows + online, horizon, device)


def env_step_ms(env, steps=300):
    """Median step time of the real env with random actions (resets are not timed); None without an env."""
    if env is None:
        return None
    env.action_space.seed(0)
    env.reset(seed=0)
    times = []
    for _ in range(steps):
        a = env.action_space.sample()
        t0 = time.perf_counter()
        _, _, term, trunc, _ = env.step(a)
        times.append(time.perf_counter() - t0)
        if term or trunc:
            env.reset()
    return 1e3 * statistics.median(times)


def online_loop_ms(agent, env, buffer, update, step, args, steps):
    """Median ms per online step of the real loop (an action chunk once per `horizon` steps, env step, store,
    update), with device work and env stepping overlapping as in fmq.main; `steps` timed after `steps` warm-up."""
    obs, queue, times = env.reset(seed=0)[0], [], []
    for _ in range(2 * steps):
        t0 = time.perf_counter()
        queue = queue or list(fmq.act(agent, obs[None], args.train_sampler, args)[0])
        action = queue.pop(0)
        next_obs, r, term, trunc, _ = env.step(action)
        buffer.add(obs, action, r, 1.0 - term, next_obs, term or trunc)
        obs, queue = (env.reset()[0], []) if term or trunc else (next_obs, queue)
        update(step)
        times.append(time.perf_counter() - t0)
    sync(buffer.device)
    return 1e3 * statistics.median(times[steps:])


def euler_flow(actor, obs, steps=10):
    """The same network as a flow policy (QC's sampler): `steps` Euler steps of u(a, t, t), `steps` NFE."""
    return fmq.flow(actor, obs, torch.randn(len(obs), actor.act_dim, device=obs.device), 0.0, steps).clamp(-1, 1)


def main(argv=None):
    cli = parse_args(argv)
    load_start = os.getloadavg()[0]  # other processes on the machine make every timing slower
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cli.device == "auto" else cli.device)
    warmup, repeats = (5, 10) if cli.quick else (20, 100)
    repeats = cli.repeats or repeats
    budget = 2.0 if cli.quick else 10.0  # seconds per action-selection row
    spec = fmq.env_spec(cli.env_id)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as fmq.main
    args = dataclasses.replace(fmq.Args(), env_id=cli.env_id, amp=cli.amp, cudagraphs=cli.cudagraphs,
                               hidden_dim=cli.hidden_dim, batch_size=cli.batch_size, num_layers=cli.num_layers,
                               best_of_n=cli.best_of_n)
    torch.manual_seed(0)
    env = None if spec["suite"] == "robomimic" else fmq.make_env(spec)
    if env is None:
        obs_dim, act_dim = ROBOMIMIC_SHAPES[spec["name"]]
    else:
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    buffer = synthetic_buffer(obs_dim, act_dim, args.horizon, device, online=4 * repeats + 100)
    agent = fmq.make_agent(args, obs_dim, act_dim * args.horizon, device)
    step = args.curriculum_end + 1  # past the curriculum: the full self-distillation loss
    update = fmq.make_update(agent, buffer, args)
    variants = dict(eager=(agent, update))  # name -> (agent, update): the compiled one on its own agent and buffer
    if cli.compile:
        args_c = dataclasses.replace(args, compile=True)
        agent_c = fmq.make_agent(args_c, obs_dim, act_dim * args.horizon, device)
        buffer_c = synthetic_buffer(obs_dim, act_dim, args.horizon, device)
        variants["compiled"] = (agent_c, fmq.make_update(agent_c, buffer_c, args_c))
    rows = []

    def row(name, ms, **extra):
        rows.append(dict(name=name, ms=ms, **extra))
        print(f"  {name:<28} {'n/a' if ms is None else f'{ms:10.3f}'} ms", file=sys.stderr, flush=True)

    print(f"fmq bench: {cli.env_id} (obs {obs_dim}, act {act_dim} x h{args.horizon}) on {device} "
          f"({device_name(device)}), {torch.get_num_threads()} threads, amp={args.amp}, compile={cli.compile}, "
          f"cudagraphs={args.cudagraphs}, {args.num_layers}x{args.hidden_dim}, batch {args.batch_size}, N={args.best_of_n}, "
          f"{warmup} warm-up + {repeats} timed updates, load average {load_start:.2f}", flush=True)
    # the ceiling: a matmul of the update's dominant shape (the best-of-N target), timed right before the update
    dtype = torch.bfloat16 if args.amp else torch.float32
    m, h = args.batch_size * args.best_of_n, args.hidden_dim
    x, w = torch.randn(m, h, device=device, dtype=dtype), torch.randn(h, h, device=device, dtype=dtype)
    matmul = median_ms(lambda: x @ w, device, warmup, 2 * repeats)
    ms = {}
    for phase in ("offline", "online"):
        if phase == "online":  # agent.u_off set: fmq.update now does the online update
            for a, _ in variants.values():
                fmq.freeze_offline_copy(a)
        first = {k: timed_s(lambda: u(step), device) for k, (_, u) in variants.items()}  # compiles
        for _ in range(warmup):
            for _, u in variants.values():
                u(step)
        ms[phase] = interleaved_ms({k: (lambda u=u: u(step)) for k, (_, u) in variants.items()}, device, repeats)
        row(f"{phase} update", ms[phase]["eager"])
        if cli.compile:
            row(f"{phase} update, compiled", ms[phase]["compiled"], ratio=ms[phase]["compiled"] / ms[phase]["eager"],
                compile_s=first["compiled"] - first["eager"])
        if phase == "offline":
            with FlopCounterMode(display=False) as counter:  # eager: the same math, counted op by op
                fmq.update(agent, buffer.sample(args.batch_size, args.discount), torch.tensor(step), args)
            flops = counter.get_total_flops()
    offline, online = ms["offline"]["eager"], ms["online"]["eager"]
    env_ms = env_step_ms(env)
    row("env step", env_ms)
    row("online step (update + env)", None if env_ms is None else online + env_ms)
    row("online step, real loop", None if env is None else online_loop_ms(agent, env, buffer, update, step, args, repeats))

    samplers = dict(onestep="one-step", **{"best-of-n": f"best-of-{args.best_of_n}"},
                    qgbs=f"qgbs M{args.qgbs_m} K{args.qgbs_k} B{args.qgbs_b}", euler="euler 10-step")
    for n_states in (1, 50):
        obs = torch.randn(n_states, obs_dim, device=device)
        for sampler, label in samplers.items():
            if sampler == "euler":
                act = lambda: euler_flow(agent.actor, obs)
            else:
                act = lambda: fmq.select_action(agent, obs, sampler, args)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                row(f"act {label} [{n_states}]", median_ms(act, device, warmup, 5 * repeats, max_s=budget))

    ceiling, achieved = 2 * m * h * h / matmul / 1e6, flops / offline / 1e6  # GFLOP/s
    row("offline update FLOP/s", offline, gflop=flops / 1e9, gflops=achieved, ceiling_gflops=ceiling,
        fraction=achieved / ceiling)

    print(f"\n{'':<30}{'median ms':>12}{'GFLOP/s':>12}{'ceiling':>12}{'fraction':>10}")
    for r in rows:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.3f}"
        flop = f"{r['gflops']:12.1f}{r['ceiling_gflops']:12.1f}{r['fraction']:10.3f}" if "gflops" in r else ""
        print(f"{r['name']:<30}{ms:>12}{flop}")
    print(f"({flops / 1e9:.2f} GFLOP per offline update; ceiling: {dtype} matmul [{m}, {h}] x [{h}, {h}], "
          f"{matmul:.3f} ms)")
    for r in rows:
        if "ratio" in r:
            print(f"{r['name']}: {r['ratio']:.2f} of eager; compiled in {r['compile_s']:.1f} s (its first update)")
    print(FOOTER)
    result = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), load_average=dict(start=load_start, end=os.getloadavg()[0]),
                  float32_matmul_precision=torch.get_float32_matmul_precision(),
                  settings=dict(vars(cli), warmup=warmup, repeats=repeats, obs_dim=obs_dim, act_dim=act_dim,
                                args=dataclasses.asdict(args)), rows=rows)
    if cli.out:
        Path(cli.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except fmq.FMQError as e:
        sys.exit(f"bench: error: {e}")
