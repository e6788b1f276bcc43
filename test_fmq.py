"""Tests for fmq.py, qgbs.py and tools/. `pytest -m "not slow"`: the fast tier (known answers, main on a tiny env);
`pytest`: everything, with the end-to-end tier marked slow (real envs, subprocesses, training); their times are in
docs/testing.md. CUDA tests skip without a GPU."""
import dataclasses
import inspect
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / "tools"
os.environ["OMP_NUM_THREADS"] = "1"  # one CPU thread, here and in the fmq.py subprocesses: tests share a loaded CPU
torch.set_num_threads(1)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))
import fmq  # noqa: E402
import import_official  # noqa: E402
import make_dataset  # noqa: E402
import qgbs  # noqa: E402


# ---------------------------------------------------------------- fixtures: the data and envs the tests make
# What `main` does around the updates (warm-up, the reward it stores, truncation, the phase switch, success counting,
# evaluation seeds across waves, resume) is checked on an env whose every answer is known, with small nets.
TINY_LIMIT = 12  # the tiny env's time limit


class TinyEnv:
    """gymnasium's API with known answers. Observation (3,): [t / 12, k / 12, mean of the last action]; action (2,)
    in [-1, 1]. An episode reset with seed s succeeds at step k = 3 + s % 5 (terminated, info success), except when
    s % 4 == 3: it never succeeds and is truncated at step 12. The env's reward at step t is -min(2, k - t) (-2 all
    along an episode that fails). Every action taken is kept in `actions`; a step after the end raises."""

    def __init__(self):
        import gymnasium
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.spec = SimpleNamespace(max_episode_steps=TINY_LIMIT)
        self.actions, self.t = [], None

    def obs(self, last=0.0):
        return np.float32([self.t / TINY_LIMIT, min(self.k, TINY_LIMIT) / TINY_LIMIT, last])

    def reset(self, seed=None):
        self.t, self.k = 0, np.inf if seed % 4 == 3 else 3 + seed % 5
        return self.obs(), {}

    def step(self, action):
        if self.t is None:
            raise RuntimeError("TinyEnv: step after the episode ended (reset first)")
        self.actions.append(np.array(action))
        self.t += 1
        success = self.t == self.k
        ob, reward, trunc = self.obs(float(np.mean(action))), -float(min(2, self.k - self.t)), self.t >= TINY_LIMIT
        if success or trunc:
            self.t = None
        return ob, reward, success, trunc and not success, {"success": success}


def tiny_dataset(n=60):
    """Synthetic offline data for the tiny env: trajectories of 10 steps that succeed at their last step (reward
    -2, ..., -1, 0; mask 0 at the success), random observations and actions (seeded)."""
    rng = np.random.default_rng(0)
    t = np.arange(n) % 10
    rewards = -np.minimum(2, 9 - t).astype(np.float32)
    obs = rng.uniform(-1, 1, (n + 1, 3)).astype(np.float32)
    return dict(observations=obs[:-1], actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32), rewards=rewards,
                masks=(rewards != 0).astype(np.float32), next_observations=obs[1:], ends=(t == 9).astype(np.float32))


@pytest.fixture
def tiny_env(monkeypatch):
    """main on TinyEnv and tiny_dataset (env id 'tiny'); call it with the ENVS reward transform to use."""
    def use(reward=None):
        monkeypatch.setattr(fmq, "env_spec", lambda env_id: dict(suite="tiny", name="tiny", reward=reward))
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None: TinyEnv())
    monkeypatch.setattr(fmq, "load_dataset", lambda spec, dataset_dir: (tiny_dataset(), None))
    use()
    return use


RM_TASKS = {"can": ("PickPlaceCan", "Can"), "square": ("NutAssemblySquare", "SquareNut")}
# robosuite 1.4.1's OSC_POSE config, as robomimic 0.3's (v141) files carry it: no body_parts
OSC_POSE_141 = dict(type="OSC_POSE", input_max=1, input_min=-1, output_max=[0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
                    output_min=[-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], kp=150, damping=1, impedance_mode="fixed",
                    kp_limits=[0, 300], damping_limits=[0, 10], position_limits=None, orientation_limits=None,
                    uncouple_pos_ori=True, control_delta=True, interpolation=None, ramp_ratio=0.2)


def rm_observe(ob, obj):
    """robomimic's EnvRobosuite.get_observation (low-dim keys), plus `object` as robosuite 1.4.1 ordered it: 1.4.1
    registered the object sensors as pos, quat, to-eef pos, to-eef quat; 1.5 moved the to-eef pair first."""
    o = {k: np.array(v) for k, v in ob.items() if k.startswith("robot0_") and not k.endswith("proprio-state")}
    o["object"] = np.array(ob["object-state"])
    o["object141"] = np.concatenate([ob[f"{obj}_{k}"] for k in ("pos", "quat", "to_robot0_eef_pos",
                                                                  "to_robot0_eef_quat")])
    return o


def rm_demo(env, task, obj, rng, solved, steps):
    """States and actions of one demo: smoothed random actions; a solved demo gets its object set into the goal
    (in the sim) 8 steps before the end and lifts the gripper away, so the file has rewarded rows."""
    states, actions, a = [], [], np.zeros(7)
    for t in range(steps):
        if solved and t == steps - 8:
            adr = env.sim.model.get_joint_qpos_addr(f"{obj}_joint0")[0]
            goal = (env.target_bin_placements[env.object_to_id["can"]] + [0, 0, 0.05] if task == "can"
                    else [*env.sim.data.body_xpos[env.peg1_body_id][:2], 0.84])  # in the bin / round the peg
            env.sim.data.qpos[adr:adr + 3] = goal
            env.sim.data.qvel[:] = 0
            env.sim.forward()
        a = 0.7 * a + 0.3 * rng.uniform(-1, 1, 7)
        if solved and t >= steps - 8:
            a[:3] = [0, 0, 1]
        states.append(env.sim.get_state().flatten())
        actions.append(a.copy())
        env.step(a)
    return np.array(states), np.array(actions)


def rm_extract(env, obj, states, actions):
    """robomimic's dataset_states_to_obs: obs of each restored state in turn, the last next_obs from a step; the reward
    and success after each step (done_mode 2: done at success or at the end)."""
    env.sim.set_state_from_flattened(states[0])
    env.sim.forward()
    seq, rewards, dones = [rm_observe(env._get_observations(force_update=True), obj)], [], []
    for t in range(1, len(states) + 1):
        if t < len(states):
            env.sim.set_state_from_flattened(states[t])
            env.sim.forward()
            seq.append(rm_observe(env._get_observations(force_update=True), obj))
        else:
            seq.append(rm_observe(env.step(actions[-1])[0], obj))
        rewards.append(env.reward())
        dones.append(int(bool(env._check_success()) or t == len(states)))
    return dict(states=states, actions=actions, rewards=np.array(rewards), dones=np.array(dones),
                obs={k: np.array([o[k] for o in seq]) for k in seq[0]})


def rm_write(path, env_args, demos, object_key):
    """robomimic's hdf5 schema: data attrs total, env_args; data/demo_i/{actions, rewards, dones, states, obs/<key>,
    next_obs/<key>}; mask/train, mask/valid."""
    import h5py
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs.update(total=sum(len(d["actions"]) for d in demos), env_args=json.dumps(env_args))
        for i, demo in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = len(demo["actions"])
            for k in ("actions", "rewards", "dones", "states"):
                g[k] = demo[k]
            for k, v in demo["obs"].items():
                if k not in ("object", "object141") or k == object_key:
                    key = "object" if k == object_key else k
                    g[f"obs/{key}"], g[f"next_obs/{key}"] = v[:-1], v[1:]
        f["mask/train"] = [f"demo_{i}".encode() for i in range(len(demos) - 1)]
        f["mask/valid"] = [f"demo_{len(demos) - 1}".encode()]


@pytest.fixture(scope="session")
def rm_data(tmp_path_factory):
    """RoboMimic v1.5 files recorded here with the pinned robosuite, as robomimic records them (4 demos x 48 steps per
    task, demo 0 ends solved): root v15/{can,square}/mh/low_dim_v15.hdf5; v141/ holds the same demos as robosuite
    1.4.1 stored them (its `object` order and controller config), which robosuite 1.5 must refuse."""
    import robosuite
    root = tmp_path_factory.mktemp("robomimic")
    kwargs = dict(has_renderer=False, has_offscreen_renderer=False, ignore_done=True, use_object_obs=True,
                  use_camera_obs=False, camera_depths=False, control_freq=20, reward_shaping=False, robots=["Panda"],
                  controller_configs=robosuite.load_composite_controller_config(robot="Panda"))
    for task, (env_name, obj) in RM_TASKS.items():
        env, rng, demos = robosuite.make(env_name, **kwargs), np.random.default_rng(0), []
        for i in range(4):
            np.random.seed(i)  # robosuite 1.5.1 places objects with numpy's global RNG
            env.reset()
            demos.append(rm_extract(env, obj, *rm_demo(env, task, obj, rng, solved=i == 0, steps=48)))
        for version, cc, key in ((robosuite.__version__, kwargs["controller_configs"], "object"),
                                 ("1.4.1", OSC_POSE_141, "object141")):
            env_args = dict(env_name=env_name, env_version=version, type=1,
                            env_kwargs=dict(kwargs, controller_configs=cc))
            rm_write(root / ("v15" if key == "object" else "v141") / task / "mh" / "low_dim_v15.hdf5", env_args,
                     demos, key)
    return root / "v15", root / "v141"


# The OGBench tests use no downloaded files: these fixtures make a few short episodes through the real envs, write them
# in OGBench's format (<dataset>.npz, <dataset>-val.npz) and fmq loads them through ogbench's own loader, exactly as it
# would load downloaded files. Manipulation data come from tools/make_dataset.py's oracles (so subtasks get solved);
# maze data from random actions, with the qpos/qvel the loader relabels singletask rewards from.
MADE = {"scene-play-v0": 40, "cube-double-play-v0": 37, "cube-triple-play-v0": 46,  # dataset: observation size
        "antmaze-giant-navigate-v0": 29, "humanoidmaze-medium-navigate-v0": 69}
EPISODES, EPISODE_STEPS = 3, 200  # training episodes (+ 1 validation episode) of 200 steps


def random_episodes(name, episodes, steps, seed=0):
    """Random-action episodes in the env ogbench builds for `name`, as make_dataset's episode dicts."""
    import ogbench
    env = ogbench.make_env_and_datasets(name, env_only=True)
    env.action_space.seed(seed)
    np.random.seed(seed)  # the maze env draws its task from numpy's global RNG
    out = []
    for i in range(episodes):
        ob, _ = env.reset(seed=seed + i)
        rows = []
        for t in range(steps):
            action = env.action_space.sample()
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated or t == steps - 1
            rows.append(dict(observations=ob, actions=action, terminals=done, qpos=info["prev_qpos"],
                             qvel=info["prev_qvel"]))
            ob = next_ob
            if done:
                break
        out.append(make_dataset.cast({k: np.stack([r[k] for r in rows]) for k in rows[0]}))
    return out


@pytest.fixture(scope="session")
def ogbench_data(tmp_path_factory):
    """make(*datasets) writes each dataset once per session into one folder and returns the folder (--dataset-dir)."""
    root = tmp_path_factory.mktemp("ogbench")

    def make(*names):
        for name in names:
            if (root / f"{name}.npz").exists():
                continue
            if "maze" in name:
                episodes = random_episodes(name, EPISODES + 1, EPISODE_STEPS)
                make_dataset.save(root / f"{name}.npz", episodes[:EPISODES])
                make_dataset.save(root / f"{name}-val.npz", episodes[EPISODES:])
            else:
                make_dataset.make_dataset(name, root, EPISODES, EPISODE_STEPS, progress=False)
        return str(root)
    return make


@pytest.fixture
def ogb(ogbench_data):
    """The folder holding scene-play-v0, the dataset of the default env id scene-t5."""
    return ogbench_data("scene-play-v0")


# ---------------------------------------------------------------- helpers of several sections
def tiny_args(tmp_path, dataset_dir, **kw):
    """A run small enough for CPU tests: narrow nets, few steps, 2 eval episodes."""
    base = dict(env_id="scene-t5", dataset_dir=str(dataset_dir), runs_dir=str(tmp_path / "runs"), hidden_dim=32,
                num_layers=2, time_dim=8, batch_size=16, best_of_n=4, offline_steps=20, online_steps=20,
                eval_interval=20, eval_episodes=2, eval_envs=2, log_interval=10, save_interval=10, curriculum_start=5,
                curriculum_end=15, device="cpu", deterministic=True, start_training=1)
    return fmq.Args(**{**base, **kw})


def read_csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def circular_buffer(n=12, cap=16, h=3):
    """Offline rows 0..n-1 in trajectories of 4 steps (observation = running row number), capacity `cap`."""
    ends = (np.arange(n) % 4 == 3).astype(np.float32)
    v = np.arange(n, dtype=np.float32)[:, None]
    data = dict(observations=v, actions=v, rewards=-np.ones(n, np.float32), masks=np.ones(n, np.float32),
                next_observations=v + 1, ends=ends)
    return fmq.ReplayBuffer(data, capacity=cap, horizon=h, device="cpu")


def fill(buf, steps, ep_len=5, first=0):
    for i in range(first, first + steps):  # online row i has observation 100 + i; episodes of ep_len steps
        buf.add([100.0 + i], [100.0 + i], -1.0, 1.0, [101.0 + i], end=i % ep_len == ep_len - 1)


def small_agent(**kw):
    args = dataclasses.replace(fmq.Args(hidden_dim=16, num_layers=2, time_dim=8, best_of_n=4),
                               **{"discount": 0.99, "offline_q_agg": "mean", **kw})
    agent = fmq.make_agent(args, 6, 10, "cpu")
    fmq.freeze_offline_copy(agent)
    with torch.no_grad():  # target critics apart from the critics: a port that mixes them up gives other numbers
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = dict(obs=torch.randn(8, 6), actions=torch.rand(8, 10) * 2 - 1, R=-torch.rand(8), mask=torch.ones(8),
                 next_obs=torch.randn(8, 6))
    return args, agent, batch


# Critics and actors are replaced by stand-ins whose values are known, so a wrong constant, aggregation or network
# role changes the number. Actions are one-hot rows e_k, so a linear critic a @ w reads the value w[k] of candidate k.
E4 = torch.eye(4)


def candidate_actor(B, n=4, regress_to=None):
    """Stand-in actor: one-step samples a_0 + u(a_0, 0, 1) are e_0..e_{n-1} for each of B states; called with a
    tensor r (a regression loss) it returns (regress_to - a_r) / (1 - r), the velocity that lands on regress_to."""
    def actor(obs, a, r, t):
        return E4[:n].repeat(B, 1) - a if isinstance(r, float) else (regress_to - a) / (1 - r)
    actor.act_dim, actor.euler_steps = 4, 0
    return actor


def table_critics(*tables):
    """Stand-in ensemble: member i gives Q_i(s, a) = a @ tables[i] -> [members, batch]."""
    return lambda obs, a: torch.stack([a @ torch.tensor(w) for w in tables])


# current critics: mean picks e_0 (1.5), min picks e_1 (1); target critics: their own argmax is e_2 both ways
CURRENT = table_critics([4.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0])
TARGET = table_critics([1.0, 2.0, 5.0, 0.0], [3.0, -2.0, 5.0, 0.0])


def td_batch():
    return dict(R=torch.tensor([-1.0, 0.5, -2.0]), mask=torch.tensor([1.0, 0.0, 1.0]), next_obs=torch.zeros(3, 6))


def critic_near(q0, args, obs_dim=6, act_dim=10):
    """Critics whose Q sits near q0 (last bias q0, small last weights), for the --amp precision checks."""
    torch.manual_seed(0)
    critic = fmq.Critics(obs_dim, act_dim, args)
    with torch.no_grad():
        critic.net[-1].weight.mul_(0.05)
        critic.net[-1].bias.fill_(q0)
    return critic


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("sps", "time")} for r in rows]


STALL_S = float(os.environ.get("FMQ_TEST_STALL_S", 600))  # a child with no progress for this long is stuck


class Child:
    """`python fmq.py *flags` in a subprocess, waited on by progress, not by a fixed deadline: a loaded machine only
    slows it down. Progress is any change of its stderr (tqdm, messages) or of the files under `watch` (its runs
    dir: csv rows, checkpoints). A child that shows none for STALL_S seconds is killed and the test fails, naming
    what it waited for. Use as a context manager: the child never outlives the test."""

    def __init__(self, *flags, watch=None):
        self.err, self.watch = tempfile.TemporaryFile("w+"), Path(watch) if watch else None
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "fmq.py"), *flags], stdout=subprocess.DEVNULL,
                                     stderr=self.err, text=True)
        self.seen, self.since, self.checked = None, time.monotonic(), 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def progress(self):
        files = []
        for p in sorted(self.watch.rglob("*")) if self.watch and self.watch.exists() else []:
            try:
                files.append((str(p), p.stat().st_size))
            except FileNotFoundError:  # an old checkpoint deleted, a .tmp renamed
                pass
        return os.fstat(self.err.fileno()).st_size, files

    def wait_until(self, done, what):
        """Polls until done() holds. Fails, naming `what`, if the child exits first or stalls for STALL_S."""
        while not done():
            if self.proc.poll() is not None and not done():
                pytest.fail(f"fmq.py exited with code {self.proc.returncode} while the test waited for {what}; "
                            f"stderr:\n{self.stderr()[-2000:]}")
            now = time.monotonic()
            if now - self.checked > 1.0:
                self.checked, seen = now, self.progress()
                if seen != self.seen:
                    self.seen, self.since = seen, now
                elif now - self.since > STALL_S:
                    self.proc.kill()
                    pytest.fail(f"fmq.py made no progress (no new stderr output, no file changes under {self.watch}) "
                                f"for {STALL_S:.0f} s while the test waited for {what}; killed it. stderr:\n"
                                f"{self.stderr()[-2000:]}")
            time.sleep(0.02)

    def finish(self, what="fmq.py to exit"):
        """Waits (on progress) for the child to exit: (exit code, stderr)."""
        self.wait_until(lambda: self.proc.poll() is not None, what)
        return self.proc.returncode, self.stderr()


def run_cli(*flags):
    """Runs fmq.py to the end, watching its --runs-dir (if given) for progress: (exit code, stderr)."""
    watch = flags[flags.index("--runs-dir") + 1] if "--runs-dir" in flags else None
    with Child(*flags, watch=watch) as child:
        return child.finish(f"`fmq.py {shlex.join(flags)}` to finish")


def checkpoint_step(run):
    """The step of the run's newest checkpoint (-1 if none yet)."""
    ckpt = max((run / "checkpoints").glob("step_*.pt"), default=None)
    return int(ckpt.stem.split("_")[1]) if ckpt else -1


def resume_flags(dataset_dir):
    """A small deterministic CPU run with a checkpoint every 10 steps."""
    return ["--dataset-dir", str(dataset_dir), "--hidden-dim", "32", "--num-layers", "2", "--time-dim", "8",
             "--batch-size", "16", "--best-of-n", "4", "--offline-steps", "20", "--online-steps", "300",
             "--eval-episodes", "2", "--eval-interval", "1000", "--log-interval", "10", "--save-interval", "10",
             "--curriculum-start", "5", "--curriculum-end", "15", "--start-training", "10", "--device", "cpu",
             "--deterministic", "--resume", "auto"]


def tiny_rewards(k, steps):
    """The tiny env's rewards over the first `steps` steps of an episode that succeeds at k (np.inf: never)."""
    return [-float(min(2, k - t)) for t in range(1, steps + 1)]


def tiny_env_args(tmp_path, **kw):
    """10 offline and 30 online steps, horizon 3, 5 eval episodes in waves of 2, a checkpoint every 10 steps."""
    base = dict(env_id="tiny", runs_dir=str(tmp_path / "runs"), hidden_dim=16, num_layers=2, time_dim=4, batch_size=8,
                best_of_n=2, horizon=3, offline_steps=10, online_steps=30, eval_interval=20, eval_episodes=5,
                eval_envs=2, log_interval=5, save_interval=10, keep_checkpoints=10, curriculum_start=3,
                curriculum_end=8, device="cpu", deterministic=True, start_training=1)
    return fmq.Args(**{**base, **kw})


def recording_buffer(monkeypatch):
    """Patches fmq.ReplayBuffer to keep every buffer main makes, and the rows it adds (obs, action, reward, mask,
    next_obs, end): (buffers, rows)."""
    buffers, rows = [], []

    class Recording(fmq.ReplayBuffer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            buffers.append(self)

        def add(self, obs, action, reward, mask, next_obs, end):
            rows.append((np.array(obs), np.array(action), reward, mask, np.array(next_obs), bool(end)))
            return super().add(obs, action, reward, mask, next_obs, end)
    monkeypatch.setattr(fmq, "ReplayBuffer", Recording)
    return buffers, rows


def tiny_k(seed):
    """The step where a TinyEnv episode reset with `seed` succeeds (np.inf: never)."""
    return np.inf if seed % 4 == 3 else 3 + seed % 5


def ring(buf):
    """A buffer's chunk starts, in order from the ring's head."""
    return buf.starts_host[(buf.head + np.arange(buf.n_starts)) % buf.cap].tolist()


def cli_flags(args):
    """fmq.py's command-line flags for the Args `args` (the settings that differ from the defaults)."""
    flags = []
    for f in dataclasses.fields(args):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if v != f.default:
            flags += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return flags


# fmq.py's `__main__` on TinyEnv and tiny_dataset, in a subprocess that sends itself signal SIG at the AT-th env step
# of evaluations (AT 0: while it loads the dataset, during start-up). argv: ROOT AT SIG fmq.py-flags..
SIGNAL_DRIVER = """
import atexit, os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
import fmq, test_fmq as t
at, sig, evaluated, envs = int(sys.argv.pop(1)), getattr(signal, sys.argv.pop(1)), [], []


class Env(t.TinyEnv):
    def step(self, action):
        if self is not envs[0]:  # an evaluation env
            evaluated.append(1)
            if len(evaluated) == at:
                os.kill(os.getpid(), sig)
        return super().step(action)


def load_dataset(spec, dataset_dir):
    if at == 0:
        os.kill(os.getpid(), sig)
    return t.tiny_dataset(), None


fmq.env_spec, fmq.load_dataset = lambda env_id: dict(suite="tiny", name="tiny", reward=None), load_dataset
fmq.make_env = lambda spec, env_args=None, render=False: envs.append(Env()) or envs[-1]
atexit.register(lambda: print("evaluation env steps after the signal:", len(evaluated) - at, flush=True))
src = open(fmq.__file__).read()
exec(src[src.index('if __name__ == "__main__":'):].replace('__name__ == "__main__"', "True", 1), vars(fmq))
"""


def run_signalled(args, at, sig):
    return subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, str(ROOT), str(at), sig, *cli_flags(args)],
                          capture_output=True, text=True)


def short_episodes(monkeypatch, steps):
    """Every env fmq.py makes ends its episodes after `steps` steps (gymnasium's TimeLimit), frames 64 x 48."""
    import gymnasium
    real = fmq.make_env
    monkeypatch.setattr(fmq, "make_env", lambda *a, **k: gymnasium.wrappers.TimeLimit(real(*a, **k), steps))
    monkeypatch.setattr(fmq, "VIDEO_SIZE", (64, 48))


# ---------------------------------------------------------------- helpers: known distributions and flag checks
# Each random draw has the distribution the paper / official code says (checked at a fixed seed, tolerances of ~5
# standard errors), each network starts as the official one (members differ), each flag acts only in its phase and
# path (the rest bit-identical), the loaders read small files with known answers, the env table matches its sources.
def _corr(x, y):
    x, y = x.flatten().double(), y.flatten().double()
    return float(((x - x.mean()) * (y - y.mean())).mean() / (x.std(correction=0) * y.std(correction=0)))


def _is_std_normal(x, n_sigma=5.0):
    """Mean 0, variance 1, P(|x| < 1) = 0.6827 and columns uncorrelated, within n_sigma standard errors."""
    x = x.double().reshape(len(x), -1)
    n = x.numel()
    assert abs(x.mean().item()) < n_sigma / n ** 0.5
    assert abs(x.var().item() - 1.0) < n_sigma * (2 / n) ** 0.5
    assert abs((x.abs() < 1).double().mean().item() - 0.6827) < n_sigma * (0.6827 * 0.3173 / n) ** 0.5
    if x.shape[1] > 1:
        assert abs(_corr(x[:, 0], x[:, 1])) < n_sigma / len(x) ** 0.5


FLAG_BASE = dict(hidden_dim=16, num_layers=2, time_dim=4, best_of_n=4, batch_size=8, eta=0.5, curriculum_start=0,
                 curriculum_end=10)


# ---------------------------------------------------------------- helpers: Args and the command line
def shell_commands(text):
    """The `python ...` command lines of a text as argv lists: continuation lines joined, comments dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if line.strip().startswith("python ")]


# ---------------------------------------------------------------- helpers: sampling
def qgbs_actions(**kw):
    args = fmq.Args(**{**FLAG_BASE, "best_of_n": 16, **kw})
    torch.manual_seed(0)
    agent, obs = fmq.make_agent(args, 6, 10, "cpu"), torch.randn(20, 6)
    return {s: fmq.select_action(agent, obs, s, args, torch.Generator().manual_seed(3))
            for s in ("onestep", "best-of-n", "qgbs")}


# ---------------------------------------------------------------- helpers: the flow-map losses
MU, SIGMA = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.2], dtype=torch.float64)


def gaussian_flow_map(wrong=1.0, sigma=SIGMA):
    """Average velocity of the exact flow map from N(0, I) (time 0) to N(MU, SIGMA^2) (time 1) along
    a_t = (1 - t) a_0 + t a_1: X_{r,t}(x) = m_t + (s_t / s_r)(x - m_r), m_t = t MU, s_t^2 = (1-t)^2 + t^2 SIGMA^2.
    `wrong` != 1 scales the map's contraction term: a flow map that is not the exact one."""
    s = lambda t: torch.sqrt((1 - t) ** 2 + t ** 2 * sigma ** 2)
    ds = lambda t: (-(1 - t) + t * sigma ** 2) / s(t)

    def u(obs, x, r, t):
        r, t = (torch.as_tensor(z, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1) for z in (r, t))
        gap = t - r
        safe = torch.where(gap.abs() > 1e-9, gap, torch.ones_like(gap))
        d = torch.where(gap.abs() > 1e-9, (s(t) - s(r)) / (safe * s(r)), ds(r) / s(r))
        return MU + (x - r * MU) * d * wrong
    return u


def _is_uniform01(x, n_sigma=5.0):
    x = x.double().flatten()
    n = len(x)
    assert 0 <= x.min() and x.max() < 1
    assert abs(x.mean().item() - 0.5) < n_sigma * (1 / 12 / n) ** 0.5
    assert abs(x.var().item() - 1 / 12) < n_sigma * (1 / 180 / n) ** 0.5  # Var of (x - 1/2)^2 is 1/80 - 1/144
    assert abs((x < 0.25).double().mean().item() - 0.25) < n_sigma * (0.1875 / n) ** 0.5


# ---------------------------------------------------------------- helpers: fmq_loss
def fmq_stand_ins(critic, u_off=0.0, actor=None, **kw):
    """An agent for fmq_loss with stand-in critics, a constant u_off, and an actor returning `actor` (or 0)."""
    args = fmq.Args(**kw)  # target critics with another gradient and spread: using them gives other numbers
    agent = SimpleNamespace(critic=critic, critic_target=lambda obs, a: -critic(obs, a) * torch.tensor([[1.0], [3.0]]),
                            u_off=lambda obs, a, r, t: torch.full_like(a, u_off),
                            actor=lambda obs, a, r, t: torch.zeros_like(a) if actor is None else actor.expand_as(a))
    return agent, args


# ---------------------------------------------------------------- helpers: the baselines
MODE = 0.9  # +-MODE: a bimodal target that a policy regressed onto its mean would miss


def bimodal(n):
    return torch.where(torch.rand(n, 1) < 0.5, -MODE, MODE)


def mode_fractions(x):
    return [((x - m).abs() < 0.2).float().mean().item() for m in (-MODE, MODE)]


# ---------------------------------------------------------------- helpers: update
def _four_updates(compile, online_target):
    """2 offline then 2 online updates (make_update, batches from a ReplayBuffer) from seed 0; tiny nets."""
    rng = np.random.default_rng(0)
    data = dict(observations=rng.standard_normal((300, 6), dtype=np.float32), actions=rng.uniform(-1, 1, (300, 2)),
                rewards=-np.ones(300), masks=np.ones(300), ends=np.arange(300) % 100 == 99)
    data["next_observations"] = np.roll(data["observations"], -1, 0)
    args = fmq.Args(hidden_dim=16, num_layers=1, time_dim=8, batch_size=8, best_of_n=4, curriculum_start=0,
                    curriculum_end=2, online_target=online_target, compile=compile)
    torch.manual_seed(0)
    agent = fmq.make_agent(args, 6, 2 * args.horizon, "cpu")
    update = fmq.make_update(agent, fmq.ReplayBuffer(data, 0, args.horizon, "cpu"), args)
    start = [p.detach().clone() for p in agent.actor.parameters()]
    infos = [update(step) for step in range(2)]  # step 1 > curriculum_start: with self-distillation
    fmq.freeze_offline_copy(agent)
    infos += [update(step) for step in range(2, 4)]
    state = [t for opt in (agent.critic_opt, agent.actor_opt) for s in opt.state.values() for t in s.values()]
    nets = [p.detach() for k in ("actor", "critic", "critic_target") for p in getattr(agent, k).parameters()]
    return start, nets, state, infos


def one_update(online, **kw):
    """All parameters after one `update` of the same agent on the same batch with the same draws, for Args(**kw)."""
    args = fmq.Args(**{**FLAG_BASE, **kw})
    torch.manual_seed(0)
    agent = fmq.make_agent(args, 6, 10, "cpu")
    batch = dict(obs=torch.randn(8, 6), actions=torch.rand(8, 10) * 2 - 1, R=-torch.rand(8), mask=torch.ones(8),
                 next_obs=torch.randn(8, 6))
    if online:
        fmq.freeze_offline_copy(agent)
        with torch.no_grad():  # the actor moved on from u_off, as after online updates
            for p in agent.actor.parameters():
                p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    fmq.update(agent, batch, 100, args)
    return torch.cat([p.detach().flatten() for m in (agent.actor, agent.critic, agent.critic_target)
                      for p in m.parameters()])


# flag, value, changes the offline update?, changes the online update?
UPDATE_FLAGS = [("online_q_agg", "mean", False, True), ("offline_q_agg", "min", True, False),
                ("official_eta", True, False, True), ("guidance_critic", "mean", False, True),
                ("kappa1", 0.5, False, True), ("beta", 0.0, False, True), ("eta", 1.0, False, True),
                ("online_target", "mvp", False, True), ("online_target", "flow-map", False, True),
                ("flow_map_loss", "lagrangian", True, False), ("discount", 0.5, True, True),
                ("euler_steps", 2, True, True), ("sparse", True, False, False), ("utd_ratio", 3, False, False),
                ("start_training", 7, False, False), ("train_sampler", "qgbs", False, False),
                ("sampler", "onestep", False, False), ("extra_samplers", ("qgbs",), False, False),
                ("qgbs_m", 2, False, False), ("qgbs_k", 0, False, False), ("qgbs_b", 2, False, False),
                ("qgbs_rho", 3.0, False, False), ("qgbs_eta", 0.1, False, False),
                ("qgbs_completion", "flow-map", False, False), ("qgbs_k0_step", False, False, False),
                ("dataset_proportion", 0.5, False, False)]


# ---------------------------------------------------------------- helpers: the training loop
def tiny_flag_run(tmp_path, name, **kw):
    """main on TinyEnv: 4 offline + 8 online steps, horizon 2, evaluations (and checkpoints) at the phase switch
    and the end. Returns the networks at both checkpoints and the eval rows (time dropped)."""
    base = dict(offline_steps=4, online_steps=8, horizon=2, eval_interval=1000, save_interval=1000, eval_episodes=2,
                curriculum_start=1, curriculum_end=3, exp_name=name, batch_size=8)
    fmq.main(tiny_env_args(tmp_path, **{**base, **kw}))
    run = tmp_path / "runs" / f"tiny__{name}__0"
    nets = {}
    for step in (4, 12):
        ckpt = torch.load(run / "checkpoints" / f"step_{step:09d}.pt", weights_only=False)
        nets[step] = torch.cat([v.flatten().float() for k in ("actor", "critic") for v in ckpt[k].values()])
    return nets, [{k: v for k, v in r.items() if k != "time"} for r in read_csv(run / "eval.csv")]


# ---------------------------------------------------------------- helpers: envs and datasets
DATA = ROOT.parent / "shared" / "data"
# OGBench data: the fixtures `ogb` and `ogbench_data` (at the top, with the other fixtures) make it.


def rm_file(root, task):
    return root / task / "mh" / "low_dim_v15.hdf5"


def write_robomimic(path, demos, env_args):
    """A robomimic-format hdf5: data/<demo>/{obs,next_obs}/<key>, actions, rewards, dones; data.attrs['env_args']."""
    import h5py
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args)
        for name, d in demos.items():
            g = data.create_group(name)
            for k in ("actions", "rewards", "dones", "states"):
                g[k] = d[k]
            for group in ("obs", "next_obs"):
                for k, v in d[group].items():
                    g[f"{group}/{k}"] = v


# ---------------------------------------------------------------- helpers: evaluation
class TwoStepRewardEnv:
    """Rewards -2, 0, -2, 0: success (and the episode's end) at step 4."""

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(3), {}

    def step(self, action):
        self.t += 1
        return np.zeros(3), -2.0 * (self.t % 2), self.t == 4, False, {"success": self.t == 4}


# ---------------------------------------------------------------- helpers: logging, videos, W&B
class RenderingTinyEnv(TinyEnv):
    """TinyEnv whose frames (48 x 64) show the episode's step count n: a bar of width 4 n, on 4 grey levels."""

    def reset(self, seed=None):
        self.n = 0
        return super().reset(seed)

    def step(self, action):
        self.n += 1
        return super().step(action)

    def render(self):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :4 * self.n] = 60 * (1 + self.n % 4)
        return frame


def wandb_records(run_file):
    """The records of an offline W&B run's .wandb file: LevelDB's log format after a 7-byte header, 32 KiB blocks of
    records, each with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last). A record still being
    written ends the read."""
    import struct
    from wandb.proto import wandb_internal_pb2
    raw, pos, part, out = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 or pos + 7 + n > len(raw):
            break
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return out


def wandb_runs(wandb_dir):
    """[(run id, entity/group, name, [(history step, keys)])] of each offline run under wandb_dir, oldest first."""
    runs = []
    for f in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
        recs = wandb_records(f)
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        rows = [(r.history.step.num, {i.key or i.nested_key[0] for i in r.history.item}) for r in recs
                if r.WhichOneof("record_type") == "history"]
        runs.append((run.run_id, f"{run.entity}/{run.run_group}", run.display_name, rows))
    return runs


def frames_change(frames):
    """Each frame differs from the one before (mean |difference| over pixels > 1 of 255) and none is blank."""
    diffs = np.abs(np.diff(np.asarray(frames, np.float32), axis=0)).mean(axis=(1, 2, 3))
    return diffs.min() > 1.0 and min(f.std() for f in frames) > 5.0


# ---------------------------------------------------------------- helpers: checkpoints and resume
class Killed(Exception):
    pass


def killed_at(monkeypatch, kill_step):
    """Patches fmq.update to raise Killed at the update of step kill_step (a crash between checkpoints)."""
    real = fmq.update

    def update(agent, batch, step, *a):
        if int(step) == kill_step:
            raise Killed
        return real(agent, batch, step, *a)
    monkeypatch.setattr(fmq, "update", update)
    return lambda: monkeypatch.setattr(fmq, "update", real)


# ---------------------------------------------------------------- helpers: official checkpoints
# tools/fixtures/official_tiny: params_offline.pkl (FlowMapPolicy after 20 updates) and params_online.pkl (FMQAgent
# after 5 more), written by the official JAX code's save_agent, with reference_tiny.npz: 16 fixed inputs and the
# official networks' outputs on them. Tiny nets (hidden (32, 32), Fourier 64) on obs 40, action chunk 5 x 5: the
# sizes of scene-t5 with horizon 5.
OFFICIAL = TOOLS / "fixtures" / "official_tiny"
TINY_ARCH = dict(env_id="scene-t5", horizon=5, hidden_dim=32, num_layers=2, time_dim=64, num_critics=2,
                 actor_layer_norm=False, critic_layer_norm=True)


# ---------------------------------------------------------------- helpers: qgbs.py
def reference_qgbs(jump, q, obs, a_0, eps, rho, eta, complete):
    """Alg. 2 for one state, written as a loop: M one-step samples; each round re-noise every beam member B times to
    t', complete, keep the top-M by Q, then move each by eta * grad Q / ||grad Q||; return the best of the beam."""
    t_p, M = rho / (1 + rho), len(a_0)
    beam = [jump(a[None], 0.0, obs[None]).clamp(-1, 1)[0] for a in a_0]
    for e in eps:  # one round: e is [M, B, d]
        cands = [complete((t_p * beam[m] + (1 - t_p) * e[m, b])[None], t_p, obs[None]).clamp(-1, 1)[0]
                 for m in range(M) for b in range(e.shape[1])]
        qs = [q(obs[None], c[None])[0].item() for c in cands]
        beam = []
        for j in sorted(range(len(cands)), key=lambda j: -qs[j])[:M]:
            a = cands[j].clone().requires_grad_(True)
            g, = torch.autograd.grad(q(obs[None], a[None])[0], a)
            beam.append((cands[j] + eta * g / (g.norm() + 1e-8)).clamp(-1, 1))
    return max(beam, key=lambda a: q(obs[None], a[None])[0].item())


D = 3  # action_dim used by the toy problems


def toy_jump(a_r, r, obs):
    """Deterministic, nonlinear, state-dependent stand-in for X_{r,1}(a_r | s); obs is [n, ...]."""
    s = obs.reshape(obs.shape[0], -1)[:, :D]
    return torch.tanh(0.8 * a_r + 0.5 * s + 0.3 * r) * 1.2


def toy_q(obs, a):
    """Smooth, state-dependent critic with a unique maximiser c(s) per state; returns [n]."""
    c = 0.5 * torch.sin(obs.reshape(obs.shape[0], -1)[:, :D])
    return -((a - c) ** 2).sum(-1) + 0.1 * torch.cos(3 * a).sum(-1)


def make_obs(batch=5, dtype=torch.float64, device="cpu"):
    g = torch.Generator(device=device).manual_seed(123)
    return torch.randn(batch, 4, generator=g, dtype=dtype, device=device)


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _check_shapes(device, dtype):
    obs = make_obs(batch=3, dtype=dtype, device=device).reshape(3, 2, 2)  # non-flat obs
    actions, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=4, K=1, B=2, generator=gen(0, device))
    assert actions.shape == (3, D) and info["q"].shape == (3,) and info["beam"].shape == (3, 4, D)
    for x in (actions, info["q"], info["beam"]):
        assert x.dtype == dtype and x.device.type == torch.device(device).type
    assert isinstance(info["nfe"], int) and info["nfe"] == 12


# ---------------------------------------------------------------- helpers that no test uses
NUMERIC = ("critic/loss", "critic/q", "actor/grad_norm", "success", "return_train", "return_env")


# ---------------------------------------------------------------- Args, validate and the command line
def test_fmq_needs_a_flow_map():
    for bad in (dict(flow_map_loss="none"), dict(euler_steps=10)):
        with pytest.raises(fmq.FMQError, match="fmq needs a flow map"):
            fmq.validate(fmq.Args(**bad))
    fmq.validate(fmq.Args(online_target="flow-map", flow_map_loss="none", euler_steps=10, time_dim=0))


@pytest.mark.slow
def test_cli_smoke_cube_double(tmp_path, ogbench_data):
    code, err = run_cli("--env-id", "cube-dbl-t3", "--dataset-dir", ogbench_data("cube-double-play-v0"), "--runs-dir",
                        str(tmp_path), "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "16", "--best-of-n",
                        "4", "--offline-steps", "10", "--online-steps", "10", "--start-training", "1",
                        "--eval-episodes", "2", "--eval-interval", "10", "--log-interval", "5", "--device", "cpu")
    assert code == 0, err[-2000:]
    evals = read_csv(tmp_path / "cube-dbl-t3__fmq__0" / "eval.csv")
    assert len(evals) == 3 and all(np.isfinite(float(r["return_env"])) for r in evals)
    assert "precision lowered" not in err and "DISPLAY" not in err  # gymnasium's and GLFW's warnings are filtered
    assert all(r["return_train"] == r["return_env"] for r in evals)  # cube: the env's reward, as the ENVS table says


@pytest.mark.parametrize("flags,message", [
    (["--env-id", "scene-t55"], "unknown env id 'scene-t55' (did you mean 'scene-t5'?); valid ids: can, square"),
    (["--offline-steps", "0"], "--offline-steps 0 needs --load-checkpoint"),
    (["--qgbs-rho", "0"], "--qgbs-rho must be > 0"),
    (["--qgbs-m", "0"], "QGBS needs --qgbs-m >= 1"),
    (["--resume", "/nonexistent/run"], "no checkpoint in /nonexistent/run/checkpoints"),
])
@pytest.mark.slow
def test_bad_flags_give_one_clear_line(flags, message):
    code, err = run_cli(*flags)
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fmq: error: ") and message in err


@pytest.mark.slow
def test_horizon_longer_than_episode(tmp_path, ogb):
    code, err = run_cli("--dataset-dir", ogb, "--horizon", "800", "--runs-dir", str(tmp_path))
    assert code != 0 and "Traceback" not in err and "--horizon 800 must be shorter than the episode (750 steps)" in err


@pytest.mark.parametrize("bad,message", [
    (dict(offline_steps=0), "--offline-steps 0 needs --load-checkpoint"), (dict(qgbs_rho=0.0), "--qgbs-rho must"),
    (dict(qgbs_m=0), "QGBS needs --qgbs-m >= 1"), (dict(qgbs_b=0), "QGBS needs"), (dict(qgbs_k=-1), "QGBS needs"),
    (dict(num_critics=1), "--num-critics must be >= 2"), (dict(horizon=0), "--horizon must be >= 1"),
    (dict(time_dim=3), "--time-dim 0/even"), (dict(euler_steps=-1, online_target="mvp"), "--euler-steps >= 0"),
    *[(dict([(k, 0)]), "eval/log/save intervals and counts must be >= 1") for k in (
        "eval_episodes", "eval_envs", "log_interval", "eval_interval", "save_interval", "keep_checkpoints",
        "video_frame_skip")], (dict(batch_size=0), "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
    (dict(start_training=-1), "--start-training must be >= 0"),
    (dict(best_of_n=0), "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
    (dict(utd_ratio=0), "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
    (dict(threads=0), "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
    (dict(dataset_proportion=0.0), "--dataset-proportion must be in (0, 1]"),
    (dict(dataset_proportion=1.5), "--dataset-proportion must be in (0, 1]")])
def test_validate_names_each_bad_setting_and_accepts_the_edges(bad, message):
    with pytest.raises(fmq.FMQError, match=re.escape(message)):
        fmq.validate(fmq.Args(**bad))
    for edge in (dict(), dict(qgbs_k=0), dict(num_critics=2), dict(eval_episodes=1, start_training=0, horizon=1),
                 dict(offline_steps=0, load_checkpoint="x.pt"), dict(time_dim=0), dict(qgbs_rho=1e-3),
                 dict(utd_ratio=1, dataset_proportion=1.0), dict(dataset_proportion=1e-3)):
        fmq.validate(fmq.Args(**edge))


def test_defaults_are_the_official_config():
    """Official configs/config.yaml (and tau of its agents): a wrong default changes every run made with it."""
    expected = dict(discount=0.99, tau=0.005, lr=3e-4, batch_size=256, hidden_dim=512, num_layers=4, time_dim=64,
                    num_critics=2, horizon=5, best_of_n=32, eta=1.0, beta=0.3, kappa1=1e-8, curriculum_start=5000,
                    curriculum_end=50000, start_training=5000, offline_q_agg="mean", online_q_agg=None,
                    online_target="fmq", flow_map_loss="eulerian", euler_steps=0, guidance_critic="q1",
                    official_eta=False, actor_layer_norm=False, critic_layer_norm=True, qgbs_m=4, qgbs_k=1, qgbs_b=4,
                    qgbs_rho=1.5, qgbs_eta=0.3, qgbs_completion="euler", qgbs_k0_step=True, sampler="best-of-n",
                    train_sampler="best-of-n", buffer_size=2_000_000, sparse=False, offline_steps=1_000_000,
                    online_steps=1_000_000, eval_episodes=50, seed=0)
    args = dataclasses.asdict(fmq.Args())
    assert {k: args[k] for k in expected} == expected


def test_help_examples_are_the_readme_quick_check_and_each_trains_online():
    """fmq.py --help's examples: the README's quick check (dataset made offline, its own folder, 5-episode
    evaluations, online updates from step 100), then paper runs; every fmq.py example passes `validate` and updates
    online. A run whose online phase would never update is refused, naming both flags."""
    doc, readme = shell_commands(fmq.__doc__), shell_commands((ROOT / "README.md").read_text())
    assert doc[0][:2] == ["python", "tools/make_dataset.py"] and doc[0] in readme
    assert doc[1][:4] == ["python", "fmq.py", "--exp-name", "quick"] and doc[1] in readme
    quick = tyro.cli(fmq.Args, args=doc[1][2:])
    assert (quick.dataset_dir, quick.eval_episodes, quick.start_training) == (doc[0][-1], 5, 100)
    for cmd in doc[1:]:
        assert cmd[1] == "fmq.py"
        args = tyro.cli(fmq.Args, args=cmd[2:])
        fmq.validate(dataclasses.replace(args, cudagraphs=False))  # the paper runs' --cudagraphs: on a GPU
        assert args.start_training <= args.online_steps
    with pytest.raises(fmq.FMQError, match="--start-training 5000 > --online-steps 1000: the online phase would "
                                           "never update; lower --start-training"):
        fmq.validate(fmq.Args(online_steps=1000))
    fmq.validate(fmq.Args(online_steps=1000, start_training=1000)), fmq.validate(fmq.Args(online_steps=0))


@pytest.mark.slow
def test_a_stop_during_start_up_is_one_line(tmp_path):
    out = run_signalled(tiny_env_args(tmp_path), 0, "SIGTERM")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["fmq: stopped during start-up; nothing was saved"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_rendering_envs_print_no_gymnasium_render_mode_warning():
    code = "import fmq; [fmq.make_env(fmq.env_spec('scene-t5'), render=True) for _ in range(2)]"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "render_mode" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("bad,line", [
    (dict(horizon=0), "--horizon must be >= 1"),
    (dict(qgbs_b=0), "QGBS needs --qgbs-m >= 1, --qgbs-b >= 1, --qgbs-k >= 0"),
    (dict(qgbs_rho=0.0), "--qgbs-rho must be > 0"),
    (dict(euler_steps=1), "--online-target fmq needs a flow map (u(a_r, r, 1), one jump): not --flow-map-loss none or "
                          "--euler-steps"),
    (dict(flow_map_loss="none"), "--online-target fmq needs a flow map (u(a_r, r, 1), one jump): not --flow-map-loss "
                                 "none or --euler-steps"),
    (dict(time_dim=-2, online_target="mvp"), "need --euler-steps >= 0, --time-dim 0/even"),
    (dict(num_critics=1), "--num-critics must be >= 2 (FMQ's delta_critic is the critics' spread)"),
    (dict(threads=0), "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
    (dict(dataset_proportion=2.0), "--dataset-proportion must be in (0, 1]"),
    (dict(online_steps=1, start_training=2), "--start-training 2 > --online-steps 1: the online phase would never "
                                             "update; lower --start-training"),
    (dict(offline_steps=0), "--offline-steps 0 needs --load-checkpoint (a pretrained flow map for u_off) or --resume")])
def test_validate_says_each_problem_in_its_own_words(bad, line):
    with pytest.raises(fmq.FMQError, match=f"^{re.escape(line)}$"):
        fmq.validate(fmq.Args(**bad))


def test_compile_looks_for_the_compiler_cxx_names(monkeypatch):
    monkeypatch.setattr(fmq.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang++" else None)
    monkeypatch.setenv("CXX", "clang++")
    fmq.validate(fmq.Args(compile=True))
    monkeypatch.delenv("CXX")
    with pytest.raises(fmq.FMQError, match=r"^--compile needs a C\+\+ compiler for its kernels \(g\+\+, or set CXX\): "
                                           r"install one \(e\.g\. apt-get install g\+\+\) or leave out --compile$"):
        fmq.validate(fmq.Args(compile=True))


def test_finish_run_writes_final_json_and_the_end_line_and_closes_the_logs(tmp_path, monkeypatch, capsys):
    """The end line lists every sampler's success; --track ends the W&B run; a stopped evaluation-only run (nothing
    to save) says only where it stopped."""
    closed = []
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(finish=lambda: closed.append("wandb")))
    run = SimpleNamespace(writer=SimpleNamespace(close=lambda: closed.append("tb")), stop=[], dir=tmp_path,
                          eval_only=False)
    args = fmq.Args(track=True, eval_episodes=4, sampler="qgbs")
    final = fmq.finish_run(run, None, args, 30, {}, [], {"qgbs": 0.5, "best-of-n": 0.25})
    assert final == json.loads((tmp_path / "final.json").read_text()) == dict(step=30, success=0.5, sampler="qgbs")
    assert capsys.readouterr().out == (f"fmq: done at step 30; success qgbs 0.50, best-of-n 0.25 (4 episodes); files "
                                       f"in {tmp_path} (eval.csv, train.csv, TensorBoard, checkpoints/)\n")
    assert closed == ["tb", "wandb"]
    run.stop, run.buffer, run.eval_only = [signal.SIGTERM], None, True
    assert fmq.finish_run(run, None, fmq.Args(), 0, {}, [], {}) is None
    assert capsys.readouterr().err == "fmq: stopped at step 0 as asked\n"


def test_validate_joins_every_problem_into_one_line_and_cudagraphs_needs_a_cuda_device(monkeypatch):
    with pytest.raises(fmq.FMQError, match="^" + re.escape("--horizon must be >= 1; eval/log/save intervals and counts "
                                                           "must be >= 1 (--video-episodes >= 0)") + "$"):
        fmq.validate(fmq.Args(horizon=0, video_episodes=-1))
    for cuda, device, ok in ((False, "auto", False), (False, "cuda", False), (True, "cpu", False),
                             (True, "auto", True), (True, "cuda:1", True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        fmq.validate(fmq.Args(device=device))
        if ok:
            fmq.validate(fmq.Args(device=device, cudagraphs=True))
        else:
            with pytest.raises(fmq.FMQError, match="^--cudagraphs needs CUDA$"):
                fmq.validate(fmq.Args(device=device, cudagraphs=True))


@pytest.mark.parametrize("flag", ["offline_steps", "online_steps", "start_training"])
def test_a_negative_step_count_names_its_flag(flag):
    with pytest.raises(fmq.FMQError, match=f"^--{flag.replace('_', '-')} must be >= 0$"):
        fmq.validate(fmq.Args(**{flag: -5, "load_checkpoint": "x.pt"}))


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(fmq.shutil, "which", lambda name: None if name == "g++" else f"/usr/bin/{name}")
    fmq.validate(fmq.Args(compile=False))
    with pytest.raises(fmq.FMQError, match=r"--compile needs a C\+\+ compiler .*apt-get install g\+\+"):
        fmq.validate(fmq.Args(compile=True))


# ---------------------------------------------------------------- networks: init, time features, the critics
def test_time_features_are_low_frequency():
    """Official FourierFeatures(64): [cos, sin] of 32 frequencies 10000^(-k/31), 1 down to 1e-4 rad per unit time:
    d/dt of the features at t = 0 is (0,..,0, 1, .., 1e-4), so no feature moves faster than 1 rad per unit time."""
    t = torch.zeros(1, 1, dtype=torch.float64)
    feats, speed = torch.func.jvp(lambda x: fmq.time_features(x, 64), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(feats[0], torch.cat([torch.ones(32), torch.zeros(32)]).double())
    torch.testing.assert_close(speed[0, 32:], 1e4 ** -(torch.arange(32, dtype=torch.float64) / 31), rtol=1e-12, atol=0)
    assert speed.abs().max().item() == pytest.approx(1.0) and speed[0, 63].item() == pytest.approx(1e-4)
    assert torch.equal(fmq.time_features(t + 0.3, 0), t + 0.3)  # time_dim 0: the time itself (QC's input)


def test_time_features_of_small_dims_and_float64_times():
    """dim 0: t itself (Q-chunking's raw time input); dim 2: one frequency, 1; dim 4: 1 and 10000^-1 = 1e-4 (the
    exponent's divisor is dim / 2 - 1, at least 1); a float64 t gets float64 frequencies (exact to 1e-15)."""
    t = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    assert torch.equal(fmq.time_features(t, 0), t)
    torch.testing.assert_close(fmq.time_features(t, 2), torch.cat([t.cos(), t.sin()], -1))
    f = torch.tensor([1.0, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(fmq.time_features(t, 4), torch.cat([(t * f).cos(), (t * f).sin()], -1), rtol=0,
                               atol=1e-15)
    f64 = 1e4 ** -(torch.arange(32, dtype=torch.float64) / 31)
    torch.testing.assert_close(fmq.time_features(t, 64), torch.cat([(t * f64).cos(), (t * f64).sin()], -1), rtol=0,
                               atol=1e-15)
    actor = fmq.FlowMapActor(3, 2, fmq.Args(hidden_dim=8, num_layers=1, time_dim=0))
    assert actor(torch.zeros(4, 3), torch.zeros(4, 2), 0.0, 1.0).shape == (4, 2)  # r and t in raw: 3 + 2 + 2 inputs


def test_actor_takes_times_of_another_dtype_as_the_actions_dtype():
    """r and t given as float64 tensors (or Python floats) act as the float32 ones: cast to the actions' dtype."""
    actor, obs, a = fmq.FlowMapActor(3, 2, fmq.Args(hidden_dim=8, num_layers=1)), torch.randn(4, 3), torch.randn(4, 2)
    r = torch.rand(4, 1)
    torch.testing.assert_close(actor(obs, a, r.double(), torch.ones(4, 1, dtype=torch.float64)), actor(obs, a, r, 1.0))


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_make_agent_puts_nets_on_the_device_with_adam_fused_only_on_cuda(cudagraphs):
    """Actor, critics and target critics on the given device; Adam at --lr, fused on CUDA only (not on the CPU, where
    fused Adam is another kernel), capturable exactly with --cudagraphs."""
    args = fmq.Args(hidden_dim=8, num_layers=1, lr=1e-3, cudagraphs=cudagraphs)
    for device in ["meta", "cpu"] + ["cuda"] * torch.cuda.is_available():
        agent = fmq.make_agent(args, 3, 2, device)
        nets = (agent.actor, agent.critic, agent.critic_target)
        assert {p.device.type for net in nets for p in net.parameters()} == {torch.device(device).type}
        for opt in (agent.actor_opt, agent.critic_opt):
            assert opt.defaults["fused"] is (device == "cuda") and opt.defaults["capturable"] is cudagraphs
            assert opt.defaults["lr"] == 1e-3


def test_mlp_blocks_and_init_follow_the_official_networks():
    """Dense -> GELU (tanh) -> LayerNorm (eps 1e-6) per hidden layer; Xavier-uniform kernels, zero biases."""
    args = fmq.Args(hidden_dim=256, num_layers=2)
    critics, actor = fmq.Critics(40, 25, args), fmq.FlowMapActor(40, 25, args)
    kinds = [type(m).__name__ for m in critics.net]
    assert kinds == ["EnsembleLinear", "GELU", "EnsembleLayerNorm"] * 2 + ["EnsembleLinear"]
    assert [type(m).__name__ for m in actor.net] == ["Linear", "GELU"] * 2 + ["Linear"]  # no LayerNorm in the actor
    assert actor.net[1].approximate == "tanh"
    w, bound = critics.net[3].weight, (6 / (256 + 256)) ** 0.5
    assert w.abs().max() <= bound and w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)
    assert all((m.bias == 0).all() for m in list(actor.net) + list(critics.net) if hasattr(m, "bias"))


def test_amp_ranks_actions_whose_q_differ_by_005_near_minus_100():
    """bf16 holds Q in steps of 0.5 near |Q| = 100: both actions would round to -100 and best-of-N would keep the first.
    The critics' last layer runs in fp32 under --amp, so the ranking and the values hold to ~1e-2."""
    args = fmq.Args(hidden_dim=32, num_layers=2, amp=True)
    critic, obs = critic_near(0.0, args), torch.zeros(2, 6)
    a = torch.stack([-0.5 * torch.ones(10), 0.5 * torch.ones(10)])
    with torch.no_grad():
        raw = critic(obs, a).mean(0)
        critic.net[-1].weight.mul_(0.05 / (raw[1] - raw[0]))  # Q(a_1) - Q(a_0) = +0.05 ...
        critic.net[-1].bias.add_(-100.005 - critic(obs, a).mean(0).mean())  # ... at -100.03 and -99.98
        fp32 = fmq.q_agg(critic, "mean")(obs, a)
        with torch.autocast("cpu", torch.bfloat16):
            amp = fmq.q_agg(critic, "mean")(obs, a)
    torch.testing.assert_close(fp32, torch.tensor([-100.03, -99.98]), atol=1e-3, rtol=0)
    assert amp.dtype == torch.float32 and amp[1] > amp[0] and (amp - fp32).abs().max() < 0.01


@pytest.mark.parametrize("layer_norm", [False, True])
def test_every_network_starts_as_the_official_one_and_ensemble_members_differ(layer_norm):
    """Official MLP init: Xavier-uniform kernels, U(-k, k) with k = sqrt(6 / (fan_in + fan_out)) (variance k^2 / 3),
    for the actor and for each critic member on its own; zero biases; LayerNorm weight 1 and bias 0. Members drawn
    apart (equal ones stay equal: min = mean, delta_critic = 0); the target critics start as the critics."""
    torch.manual_seed(0)
    args = fmq.Args(hidden_dim=96, num_layers=2, time_dim=8, num_critics=3, actor_layer_norm=layer_norm,
                    critic_layer_norm=layer_norm)
    agent = fmq.make_agent(args, 20, 30, "cpu")
    lins = [m for m in agent.critic.net if isinstance(m, fmq.EnsembleLinear)]
    assert [tuple(m.weight.shape) for m in lins] == [(3, 50, 96), (3, 96, 96), (3, 96, 1)]
    for m in lins:
        n, fan_in, fan_out = m.weight.shape
        k = (6 / (fan_in + fan_out)) ** 0.5
        for w in m.weight:
            assert w.abs().max() <= k and w.abs().max() > 0.9 * k
            if w.numel() >= 1000:
                assert w.var().item() == pytest.approx(k ** 2 / 3, rel=5 * (0.8 / w.numel()) ** 0.5)
        assert all(not torch.equal(m.weight[i], m.weight[j]) for i in range(3) for j in range(i))
        assert abs(_corr(m.weight[0], m.weight[1])) < 5 / m.weight[0].numel() ** 0.5
        assert torch.equal(m.bias, torch.zeros(3, 1, fan_out))
    lns = [m for m in agent.critic.net if isinstance(m, fmq.EnsembleLayerNorm)]
    assert len(lns) == 2 * layer_norm
    assert all(torch.equal(m.weight, torch.ones(3, 1, 96)) and torch.equal(m.bias, torch.zeros(3, 1, 96)) for m in lns)
    actor_lins = [m for m in agent.actor.net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in actor_lins] == [(96, 20 + 30 + 16), (96, 96), (30, 96)]
    for m in actor_lins:
        k = (6 / sum(m.weight.shape)) ** 0.5
        assert m.weight.abs().max() <= k and m.weight.abs().max() > 0.9 * k and torch.equal(m.bias, 0 * m.bias)
        assert m.weight.var().item() == pytest.approx(k ** 2 / 3, rel=5 * (0.8 / m.weight.numel()) ** 0.5)
    actor_lns = [m for m in agent.actor.net if isinstance(m, torch.nn.LayerNorm)]
    assert len(actor_lns) == 2 * layer_norm and all(m.eps == 1e-6 for m in actor_lns)
    assert all(torch.equal(m.weight, torch.ones(96)) and torch.equal(m.bias, torch.zeros(96)) for m in actor_lns)
    for p, q in zip(agent.critic.parameters(), agent.critic_target.parameters()):
        assert torch.equal(p, q) and not q.requires_grad
    q = agent.critic(torch.randn(64, 20), torch.rand(64, 30) * 2 - 1)
    assert q.shape == (3, 64) and (q.std(0) > 1e-3).all()  # members disagree from the start


def test_ensemble_layers_compute_per_member_affine_maps_and_layer_norm():
    """EnsembleLinear: member i maps x_i to x_i W_i + b_i; EnsembleLayerNorm: LN(x_i) (eps 1e-6) * w_i + b_i."""
    torch.manual_seed(0)
    lin, ln = fmq.EnsembleLinear(2, 3, 4), fmq.EnsembleLayerNorm(2, 4)
    with torch.no_grad():
        lin.bias.copy_(torch.randn(2, 1, 4)), ln.weight.copy_(torch.randn(2, 1, 4)), ln.bias.copy_(torch.randn(2, 1, 4))
    x = torch.randn(2, 5, 3)
    y = lin(x)
    for i in range(2):
        torch.testing.assert_close(y[i], x[i] @ lin.weight[i] + lin.bias[i])
        h = (y[i] - y[i].mean(-1, keepdim=True)) / (y[i].var(-1, correction=0, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(ln(y)[i], h * ln.weight[i] + ln.bias[i])


# ---------------------------------------------------------------- sampling: flow, one_step, best-of-N, act, QGBS
def test_best_of_n_equals_qgbs_with_k0_on_the_same_noise():
    args, agent, batch = small_agent()
    q_fn = fmq.q_agg(agent.critic, "mean")
    with torch.no_grad():
        a_ref, q_ref = fmq.best_of_n(agent.actor, q_fn, batch["obs"], 16, torch.Generator().manual_seed(5))
        jump = lambda a_r, r, s: a_r + (1.0 - r) * agent.actor(s, a_r, r, 1.0)
        a, info = qgbs.qgbs(jump, q_fn, batch["obs"], action_dim=10, M=16, K=0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(info["q"], q_ref)


@pytest.mark.parametrize("online,target,expected", [(False, "fmq", 0), (True, "fmq", 1), (True, "flow-map", 0),
                                                    (True, "mvp", 0), (False, "mvp", 0)])
def test_acting_selects_by_mean_offline_and_by_min_online(online, target, expected):
    """Official agents: the offline agent's best-of-N uses q_agg (mean: e_0), the FMQ agent's the min (e_1), the
    FlowMapPolicy kept online (flow-map, QC) the mean; MVP here the mean too."""
    args = fmq.Args(best_of_n=3, online_target=target)  # N samples e_0, e_1, e_2 (N is not qgbs_m = 4)
    agent = SimpleNamespace(actor=candidate_actor(2, n=3), critic=CURRENT, u_off=object() if online else None)
    torch.testing.assert_close(fmq.select_action(agent, torch.zeros(2, 6), "best-of-n", args), E4[[expected] * 2])


def test_euler_steps_integrate_u_on_the_diagonal_from_r_to_1():
    """K Euler steps of u(a, t, t) = t from r = 0.4: a + 0.2 * (0.4 + 0.6 + 0.8) = a + 0.36 (left points; the exact
    integral is 0.42, right points would give 0.48); K = 0 is the jump a + 0.6 u(a, 0.4, 1) = a + 0.6."""
    calls = []

    def actor(obs, a, r, t):
        calls.append((r, t))
        return torch.full_like(a, t)
    actor.euler_steps = 3
    a = torch.zeros(2, 1)
    torch.testing.assert_close(fmq.flow(actor, None, a, 0.4), a + 0.36)
    assert [x for rt in calls for x in rt] == pytest.approx([0.4, 0.4, 0.6, 0.6, 0.8, 0.8])
    torch.testing.assert_close(fmq.flow(actor, None, a, 0.4, steps=0), a + 0.6)


@pytest.mark.parametrize("sampler,calls,nfe", [("onestep", 10, 10), ("best-of-n", 10, 40), ("qgbs", 20, 200)])
def test_euler_steps_reach_every_sampler_and_the_td_target(sampler, calls, nfe):
    """One function (`one_step` -> `flow`) draws every candidate: with --euler-steps 10 acting, evaluation (each
    sampler), the TD target and MVP's a* all take 10 diagonal steps (QGBS: 10 from 0, then 10 from t')."""
    seen = []

    def actor(obs, a, r, t):
        seen.append((r, t))
        return torch.zeros_like(a)
    actor.act_dim, actor.euler_steps = 4, 10
    args = fmq.Args(best_of_n=4, euler_steps=10, online_target="flow-map")
    agent = SimpleNamespace(actor=actor, critic=CURRENT, critic_target=TARGET, u_off=object())
    grid = [k / 10 for k in range(10)]
    for draw in (lambda: fmq.td_target(agent, td_batch(), 0.9, 3, "mean", 4), lambda: fmq.mvp_target(
            agent, torch.zeros(3, 6), args), lambda: fmq.select_action(agent, torch.zeros(2, 6), sampler, args)):
        seen.clear()
        draw()
        assert all(r == t for r, t in seen) and [r for r, _ in seen[:10]] == pytest.approx(grid)
    assert len(seen) == calls and fmq.sampler_nfe(sampler, args) == nfe
    if sampler == "qgbs":
        t_prime = args.qgbs_rho / (1 + args.qgbs_rho)
        assert [r for r, _ in seen[10:]] == pytest.approx([t_prime + (1 - t_prime) * g for g in grid])


@pytest.mark.parametrize("online,target,q_agg,expected", [
    (False, "fmq", None, 1), (True, "fmq", None, 1), (False, "mvp", None, 0), (True, "mvp", None, 0),
    (True, "flow-map", None, 0), (False, "flow-map", "min", 1), (True, "fmq", "mean", 0)])
def test_qgbs_ranks_by_the_online_aggregation_with_or_without_u_off(online, target, q_agg, expected):
    """QGBS (K = 0, no eta step: the best of the M = 4 samples e_0..e_3) ranks by the online aggregation, also for an
    offline agent: min for FMQ (e_1), mean for MVP and flow-map (e_0), --online-q-agg if given."""
    args = fmq.Args(online_target=target, online_q_agg=q_agg, qgbs_m=4, qgbs_k=0, qgbs_k0_step=False)
    agent = SimpleNamespace(actor=candidate_actor(2), critic=CURRENT, u_off=object() if online else None)
    torch.testing.assert_close(fmq.select_action(agent, torch.zeros(2, 6), "qgbs", args), E4[[expected] * 2])


def test_select_action_hands_qgbs_its_own_settings():
    """M, K, B, rho, eta of QGBS are --qgbs-*, not best_of_n or eta; the official completion is one Euler step of
    the diagonal velocity from t' (a + (1 - t') u(a, t', t')), Alg. 2's the jump a + (1 - t') u(a, t', 1)."""
    seen = {}

    def actor(obs, a, r, t):
        return torch.full_like(a, t if isinstance(t, float) else 0.0)
    actor.act_dim, actor.euler_steps = 2, 0
    agent = SimpleNamespace(actor=actor, critic=CURRENT, u_off=None)
    real = fmq.qgbs_lib.qgbs
    for completion in ("euler", "flow-map"):
        args = fmq.Args(qgbs_m=3, qgbs_k=2, qgbs_b=5, qgbs_rho=0.7, qgbs_eta=0.11, qgbs_k0_step=False, best_of_n=7,
                        eta=0.9, qgbs_completion=completion)
        fmq.qgbs_lib.qgbs = lambda jump, q, obs, **kw: (seen.update(kw, jump=jump), (obs[:, :2], None))[1]
        try:
            fmq.select_action(agent, torch.zeros(4, 6), "qgbs", args)
        finally:
            fmq.qgbs_lib.qgbs = real
        assert {k: seen[k] for k in ("M", "K", "B", "rho", "eta", "k0_step")} == dict(
            M=3, K=2, B=5, rho=0.7, eta=0.11, k0_step=False)
        a, s = torch.zeros(4, 2), torch.zeros(4, 6)
        torch.testing.assert_close(seen["jump"](a, 0.6, s), a + 0.4)
        if completion == "euler":
            torch.testing.assert_close(seen["complete"](a, 0.6, s), a + 0.4 * 0.6)
        else:
            assert seen["complete"] is None


def test_act_and_the_buffer_keep_a_chunk_in_time_order():
    """A chunk is h actions of act_dim each, flattened time-major: `act` splits a drawn chunk into [h, act_dim] rows
    in that order, and a sampled chunk of the buffer holds h consecutive 2-d actions in that order."""
    chunk = torch.tensor([-0.5, -0.3, -0.1, 0.1, 0.3, 0.5])

    class Fixed(torch.nn.Module):  # every one-step sample a_0 + u(a_0, 0, 1) is `chunk`
        act_dim, euler_steps = 6, 0

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, obs, a, r, t):
            return chunk - a
    agent = SimpleNamespace(actor=Fixed(), critic=CURRENT, u_off=None)
    np.testing.assert_allclose(fmq.act(agent, np.zeros((2, 3)), "onestep", fmq.Args(horizon=3)),
                               chunk.view(1, 3, 2).expand(2, 3, 2).numpy(), atol=1e-6)
    args, agent, _ = small_agent(horizon=5)  # an env's float64 observations reach the float32 nets as float32
    obs = np.random.default_rng(0).normal(size=(3, 6))
    chunks = [fmq.act(agent, o, "best-of-n", args, torch.Generator().manual_seed(0)) for o in (obs, np.float32(obs))]
    assert chunks[0].shape == (3, 5, 2) and np.array_equal(*chunks)
    fp32 = fmq.select_action(agent, torch.tensor(obs, dtype=torch.float32), "best-of-n", args,
                             torch.Generator().manual_seed(0))  # without --amp, no autocast: fp32 exactly
    assert np.array_equal(chunks[0], fp32.detach().view(3, 5, 2).numpy())
    n, v = 12, np.arange(12, dtype=np.float32)
    data = dict(observations=v[:, None], actions=np.stack([v, 100 + v], 1) / 200, rewards=-np.ones(n),
                masks=np.ones(n), next_observations=v[:, None] + 1, ends=np.arange(n) % 4 == 3)
    batch = fmq.ReplayBuffer(data, capacity=n, horizon=3, device="cpu").sample(64, 0.9)
    s = batch["obs"][:, 0]
    torch.testing.assert_close(batch["actions"], torch.stack([s, 100 + s, s + 1, 101 + s, s + 2, 102 + s], 1) / 200)


def test_one_step_starts_from_standard_normal_noise_one_row_per_sample():
    """Alg. 1, line 2: a_0 ~ N(0, I) of shape [B, act_dim], fresh per row, from `generator` when given."""
    seen = []
    actor = lambda obs, a, r, t: (seen.append((a.clone(), r, t)), torch.zeros_like(a))[1]  # noqa: E731
    actor.act_dim, actor.euler_steps = 3, 0
    out = fmq.one_step(actor, torch.zeros(20_000, 2), torch.Generator().manual_seed(5))
    (a_0, r, t), = seen
    assert a_0.shape == (20_000, 3) and (r, t) == (0.0, 1.0)
    _is_std_normal(a_0)
    torch.testing.assert_close(out, a_0.clamp(-1, 1))  # u = 0: the action is the noise, clipped to the box
    fmq.one_step(actor, torch.zeros(20_000, 2), torch.Generator().manual_seed(5))
    assert torch.equal(seen[1][0], a_0)  # the generator's draw, not the global RNG's


@pytest.mark.parametrize("flag,value,k,changes", [
    ("qgbs_k0_step", False, 1, ()), ("qgbs_k0_step", False, 0, ("qgbs",)), ("qgbs_completion", "flow-map", 0, ()),
    ("qgbs_completion", "flow-map", 1, ("qgbs",)), ("qgbs_m", 3, 1, ("qgbs",)), ("qgbs_b", 2, 1, ("qgbs",)),
    ("qgbs_rho", 3.0, 1, ("qgbs",)), ("qgbs_eta", 0.1, 1, ("qgbs",)), ("qgbs_k", 2, 1, ("qgbs",)),
    ("best_of_n", 7, 1, ("best-of-n",)), ("euler_steps", 3, 1, ("onestep", "best-of-n", "qgbs")),
    ("online_q_agg", "mean", 1, ("qgbs",)), ("offline_q_agg", "min", 1, ("best-of-n",)),
    ("eta", 2.0, 1, ()), ("beta", 0.0, 1, ()), ("official_eta", True, 1, ()), ("utd_ratio", 2, 1, ())])
def test_acting_flags_change_only_their_sampler(flag, value, k, changes):
    """The same state, nets and generator: a QGBS flag changes only QGBS's action (qgbs_k0_step only with K = 0,
    qgbs_completion only with K >= 1), best_of_n only best-of-N's, euler_steps every sampler; the critic aggregation
    of acting: offline_q_agg for the offline best-of-N, online_q_agg for QGBS (offline agent)."""
    base = qgbs_actions(qgbs_k=k)
    other = qgbs_actions(**{"qgbs_k": k, flag: value})
    assert {s for s in base if not torch.equal(base[s], other[s])} == set(changes)


# ---------------------------------------------------------------- losses: Theorem 3.2, the trust-region velocity
def test_trust_region_velocity_is_the_maximiser_on_the_boundary():
    """Thm 3.2 against an independent solver (SLSQP on the constrained linearised problem), on random inputs."""
    from scipy.optimize import minimize
    rng = np.random.default_rng(0)
    u_ref, grad_q = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    eta = rng.uniform(0.1, 2.0, size=6)
    u_star = fmq.trust_region_velocity(torch.tensor(u_ref), torch.tensor(grad_q), torch.tensor(eta)).numpy()
    for i in range(6):
        # maximise Q(a_1) + grad_q . (1 - r)(u - u_ref)  s.t. ||u - u_ref|| <= eta; (1 - r) > 0 does not move the argmax
        res = minimize(lambda u: -grad_q[i] @ (u - u_ref[i]), u_ref[i], jac=lambda u: -grad_q[i], method="SLSQP",
                       constraints=[dict(type="ineq", fun=lambda u: eta[i] ** 2 - np.sum((u - u_ref[i]) ** 2),
                                         jac=lambda u: -2 * (u - u_ref[i]))], options=dict(ftol=1e-15, maxiter=500))
        np.testing.assert_allclose(u_star[i], res.x, atol=1e-5)
        assert np.linalg.norm(u_star[i] - u_ref[i]) == pytest.approx(eta[i], abs=1e-12)  # on the boundary
    u_f = fmq.trust_region_velocity(torch.tensor(u_ref), torch.tensor(grad_q), 0.7).numpy()  # a float eta, in float64
    np.testing.assert_allclose(np.linalg.norm(u_f - u_ref, axis=1), 0.7, rtol=0, atol=1e-12)
    # kappa1 > 0 shrinks the step below eta and keeps the direction
    u_k = fmq.trust_region_velocity(torch.tensor(u_ref), torch.tensor(grad_q), 1.0, kappa1=0.5).numpy()
    step = u_k - u_ref
    assert np.all(np.linalg.norm(step, axis=1) < 1.0)
    np.testing.assert_allclose(step / np.linalg.norm(step, axis=1, keepdims=True),
                               grad_q / np.linalg.norm(grad_q, axis=1, keepdims=True), atol=1e-12)


def test_trust_region_velocity_keeps_the_inputs_dtype():
    """float64 velocities with a Python eta: u* = u_ref + .3 g / ||g|| to float64 precision (eta made a float32
    tensor is .30000001192: 4e-8 off)."""
    u_ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    u = fmq.trust_region_velocity(u_ref, g, 0.3)
    assert u.dtype == torch.float64
    torch.testing.assert_close(u, torch.tensor([[1.18, 0.24, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64), rtol=0,
                               atol=1e-15)


# ---------------------------------------------------------------- losses: the flow-map losses, the (r, t) curriculum
@pytest.mark.parametrize("kind", ["eulerian", "lagrangian", "progressive"])
def test_flow_map_losses_vanish_only_for_the_exact_flow_map(kind):
    """Per state s, data N(MU + s, SIGMA^2): the exact flow map is u(x, r, t | s) = s + u_0(x - r s, r, t), u_0 that
    of N(MU, SIGMA^2). Its target (v = None: the model's own velocity) equals it; a target that drops s does not."""
    torch.manual_seed(0)
    x, r = torch.randn(256, 3, dtype=torch.float64), torch.rand(256, 1, dtype=torch.float64) * 0.8
    t = r + 0.05 + torch.rand(256, 1, dtype=torch.float64) * (0.95 - r)
    obs = torch.randn(256, 1, dtype=torch.float64)
    shifted = lambda u_0: lambda s, x, r, t: s + u_0(s, x - r * s, r, t)  # noqa: E731
    u_rt, target = fmq.FLOW_MAP_TARGETS[kind](shifted(gaussian_flow_map()), obs, x, r, t)
    assert (u_rt - target).abs().max() < 1e-8
    u_rt, target = fmq.FLOW_MAP_TARGETS[kind](shifted(gaussian_flow_map(wrong=1.3)), obs, x, r, t)
    assert ((u_rt - target) ** 2).mean() > 1e-3


def test_meanflow_conditional_velocity_target_on_point_mass_data():
    """With a_1 = MU always, the conditional velocity a_1 - a_0 is the marginal one: the MeanFlow target that
    training uses is then exact for the exact flow map, and not for a wrong one."""
    torch.manual_seed(0)
    a_0, r = torch.randn(256, 3, dtype=torch.float64), torch.rand(256, 1, dtype=torch.float64) * 0.8
    t = r + 0.05 + torch.rand(256, 1, dtype=torch.float64) * (0.95 - r)
    a_r, obs = (1 - r) * a_0 + r * MU, torch.zeros(256, 1, dtype=torch.float64)
    point_mass = torch.zeros(3, dtype=torch.float64)
    u_rt, target = fmq.eulerian_target(gaussian_flow_map(sigma=point_mass), obs, a_r, r, t, v=MU - a_0)
    assert (u_rt - target).abs().max() < 1e-8
    u_rt, target = fmq.eulerian_target(gaussian_flow_map(1.3, sigma=point_mass), obs, a_r, r, t, v=MU - a_0)
    assert ((u_rt - target) ** 2).mean() > 1e-3


def test_flow_map_loss_curriculum_and_gradients():
    args = fmq.Args(hidden_dim=16, num_layers=2, time_dim=8)
    actor = fmq.FlowMapActor(4, 3, args)
    obs, a = torch.randn(8, 4), torch.randn(8, 3)
    with_loss = lambda kind: dataclasses.replace(args, flow_map_loss=kind)  # noqa: E731
    for kind in fmq.FLOW_MAP_TARGETS:  # up to curriculum_start the self-distillation term has weight 0
        loss, info = fmq.flow_map_loss(actor, obs, a, args.curriculum_start, with_loss(kind))
        assert loss == info["actor/diag_loss"]
    loss, info = fmq.flow_map_loss(actor, obs, a, args.curriculum_end, with_loss("none"))  # the diagonal loss only
    assert list(info) == ["actor/diag_loss"] and loss == info["actor/diag_loss"]
    for kind in ["lagrangian", "progressive"]:  # r = t: these self-distillation terms vanish
        loss, info = fmq.flow_map_loss(actor, obs, a, 0, with_loss(kind))
        assert info["actor/distill_loss"] < 1e-12
    for kind in fmq.FLOW_MAP_TARGETS:
        loss, info = fmq.flow_map_loss(actor, obs, a, args.curriculum_end, with_loss(kind))
        actor.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and set(info) == {"actor/diag_loss", "actor/distill_loss"} <= set(fmq.TRAIN_FIELDS)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in actor.parameters())
    loss, info = fmq.flow_map_loss(actor, obs, a, args.curriculum_end, with_loss("none"))  # flow matching alone
    assert info == {"actor/diag_loss": loss.detach()}


def test_eulerian_target_without_v_uses_the_models_own_diagonal_velocity():
    """v = None: v = u(a_r, r, r) of the model itself. u(s, a, r, t) = s a (1 + t): v = s a (1 + r), du/dr along
    (v, 1) = s (1 + t) v, target = v + (t - r) s (1 + t) v (each term needs the state s)."""
    u = lambda obs, a, r, t: obs * a * (1 + t)  # noqa: E731
    obs, a_r = torch.tensor([[2.0, -1.0], [0.5, 3.0]]), torch.tensor([[0.3, 0.7], [-0.2, 0.1]])
    r, t = torch.tensor([[0.2], [0.5]]), torch.tensor([[0.6], [0.9]])
    u_rt, target = fmq.eulerian_target(u, obs, a_r, r, t)
    v = obs * a_r * (1 + r)
    torch.testing.assert_close(u_rt, obs * a_r * (1 + t))
    torch.testing.assert_close(target, v + (t - r) * obs * (1 + t) * v)


@pytest.mark.slow
@pytest.mark.parametrize("kind,amp", [("eulerian", False), ("lagrangian", False), ("progressive", False),
                                      ("eulerian", True)])
def test_offline_self_distillation_learns_a_one_step_bimodal_policy(kind, amp):
    """Flow-map pretraining with no teacher: one network call maps noise onto both modes of a_data = +-0.5
    (also under --amp's bf16 autocast)."""
    torch.manual_seed(0)
    args = fmq.Args(hidden_dim=64, num_layers=3, time_dim=16, curriculum_start=300, curriculum_end=1500,
                    flow_map_loss=kind)
    actor = fmq.FlowMapActor(1, 1, args)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    for step in range(3000):
        a = torch.where(torch.rand(256, 1) < 0.5, -0.5, 0.5) + 0.02 * torch.randn(256, 1)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss, _ = fmq.flow_map_loss(actor, torch.zeros(256, 1), a, step, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = fmq.one_step(actor, torch.zeros(4000, 1), torch.Generator().manual_seed(1))
    assert (((x - 0.5).abs() < 0.15) | ((x + 0.5).abs() < 0.15)).float().mean() > 0.6  # on the modes
    assert 0.35 < (x > 0).float().mean() < 0.65  # and on both of them


@pytest.mark.parametrize("kind", ["eulerian", "lagrangian", "progressive"])
def test_self_distillation_target_is_stop_gradient(kind, monkeypatch):
    """sg(target): the loss has no gradient path through the target tensor (deterministic, unlike a learning test)."""
    seen = {}

    def recording(real):
        def target_fn(*a, **k):
            seen["u_rt"], seen["target"] = real(*a, **k)
            return seen["u_rt"], seen["target"]
        return target_fn
    monkeypatch.setattr(fmq, "eulerian_target", recording(fmq.eulerian_target))
    monkeypatch.setitem(fmq.FLOW_MAP_TARGETS, kind, recording(fmq.FLOW_MAP_TARGETS[kind]))
    args = fmq.Args(hidden_dim=16, num_layers=2, time_dim=8, flow_map_loss=kind)
    loss, _ = fmq.flow_map_loss(fmq.FlowMapActor(4, 3, args), torch.randn(8, 4), torch.randn(8, 3), 10 ** 6, args)
    if seen["target"].requires_grad:  # PSD builds its target under no_grad; the others must detach it
        assert torch.autograd.grad(loss, seen["target"], allow_unused=True, retain_graph=True) == (None,)
    assert torch.autograd.grad(loss, seen["u_rt"])[0].abs().sum() > 0  # while the student gets a gradient


def test_sample_r_t_curriculum():
    """Official sample_r_t: r == t up to curriculum_start; at full curriculum r = min of two uniforms (mean 1/3) and
    E[t - r] = 1/3; halfway the interval is halved about its midpoint: E[t - r] = 1/6."""
    torch.manual_seed(0)
    args, n = fmq.Args(curriculum_start=100, curriculum_end=300), 200_000
    r, t = fmq.sample_r_t(n, 100, args, "cpu")
    assert r.shape == t.shape == (n, 1) and torch.equal(r, t)
    for step, gap, mean_r in [(300, 1 / 3, 1 / 3), (10 ** 6, 1 / 3, 1 / 3), (200, 1 / 6, 5 / 12)]:
        r, t = fmq.sample_r_t(n, torch.tensor(step), args, "cpu")
        assert 0 <= r.min() and (t >= r).all() and t.max() <= 1
        assert (t - r).mean().item() == pytest.approx(gap, abs=3e-3)
        assert r.mean().item() == pytest.approx(mean_r, abs=3e-3)


def test_flow_matching_time_is_uniform_per_sample():
    """The diagonal loss's t ~ U[0, 1], one per sample, fed as both r and t."""
    seen = []
    actor = lambda obs, a, r, t: (seen.append((r, t)), torch.zeros_like(a))[1]  # noqa: E731
    torch.manual_seed(0)
    fmq.flow_map_loss(actor, torch.zeros(40_000, 1), torch.zeros(40_000, 2), 0, fmq.Args(flow_map_loss="none"))
    (r, t), = seen
    assert torch.equal(r, t) and r.shape == (40_000, 1) and len(r.unique()) > 39_000
    assert r.mean().item() == pytest.approx(0.5, abs=0.01) and r.var().item() == pytest.approx(1 / 12, abs=0.003)


@pytest.mark.parametrize("kind", ["eulerian", "lagrangian", "progressive"])
def test_flow_map_loss_vanishes_for_the_exact_flow_map_of_point_mass_data(kind):
    """With a_1 = MU always, the exact flow map from N(0, I) has zero diagonal loss (its u(a_t, t, t) is a_1 - a_0)
    and zero self-distillation loss: a reversed interpolation or target, or a wrong time argument, does not."""
    actor = gaussian_flow_map(sigma=torch.zeros(3, dtype=torch.float64))
    args = fmq.Args(flow_map_loss=kind, curriculum_start=10, curriculum_end=20)
    torch.manual_seed(0)
    loss, info = fmq.flow_map_loss(actor, torch.zeros(512, 1, dtype=torch.float64), MU.expand(512, 3), 30, args)
    assert info["actor/diag_loss"].item() < 1e-12 and info["actor/distill_loss"].item() < 1e-12
    wrong = gaussian_flow_map(wrong=1.3, sigma=torch.zeros(3, dtype=torch.float64))
    loss, info = fmq.flow_map_loss(wrong, torch.zeros(512, 1, dtype=torch.float64), MU.expand(512, 3), 30, args)
    assert info["actor/diag_loss"].item() > 1e-2


def test_self_distillation_weight_switches_on_right_after_curriculum_start():
    """Official: weight 0 up to and at curriculum_start, 1 from the next step on (loss = diag + distill exactly)."""
    args = fmq.Args(hidden_dim=16, num_layers=2, time_dim=8, curriculum_start=100, curriculum_end=200)
    actor = fmq.FlowMapActor(4, 3, args)
    obs, a = torch.randn(8, 4), torch.randn(8, 3)
    for step, weight in [(99, 0.0), (100, 0.0), (101, 1.0), (200, 1.0), (10 ** 6, 1.0)]:
        for s in (step, torch.tensor(step)):
            loss, info = fmq.flow_map_loss(actor, obs, a, s, args)
            assert info["actor/distill_loss"] > 0
            expected = info["actor/diag_loss"] + weight * info["actor/distill_loss"]
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6), (step, weight)


def test_sample_r_t_scale_at_the_curriculum_boundaries():
    """A 4-step curriculum (10 -> 14): the interval [r, t] is scaled by (step - 10) / 4, clamped to [0, 1]; E[t - r]
    = scale / 3 and E[r] = 1/2 - scale / 6 (an off-by-one step is a quarter of the scale)."""
    torch.manual_seed(0)
    args, n = fmq.Args(curriculum_start=10, curriculum_end=14), 100_000
    for step, scale in [(9, 0.0), (10, 0.0), (11, 0.25), (13, 0.75), (14, 1.0), (15, 1.0)]:
        r, t = fmq.sample_r_t(n, step, args, "cpu")
        assert (t - r).mean().item() == pytest.approx(scale / 3, abs=3e-3), step
        assert r.mean().item() == pytest.approx(0.5 - scale / 6, abs=4e-3), step
        assert ((r + t) / 2).mean().item() == pytest.approx(0.5, abs=4e-3)
    for start, end in ((10, 11), (10, 10)):  # a one-step ramp, and none: the full interval right after the start
        torch.manual_seed(1)
        r, t = fmq.sample_r_t(1000, 11, fmq.Args(curriculum_start=start, curriculum_end=end), "cpu")
        torch.manual_seed(1)
        torch.testing.assert_close(torch.cat([r, t], 1), torch.rand(2, 1000, 1).sort(0).values.squeeze(-1).T)


def test_flow_map_loss_diag_and_distill_draw_their_own_noise_and_times(monkeypatch):
    """Official FlowMapPolicy.actor_loss: the diagonal loss draws a_0 ~ N(0, I) and t ~ U[0, 1]; the distillation
    draws a second, independent a_0 and its (r, t) from sample_r_t. With a_data = 0 and u = 0: the diagonal input is
    (1 - t) a_0, its loss E[a_0^2] = 1; the distillation's v is -a_0' and a_r = (1 - r) a_0'."""
    seen, got = [], {}
    actor = lambda obs, a, r, t: (seen.append((a.clone(), r.clone(), t.clone())), torch.zeros_like(a))[1]  # noqa
    monkeypatch.setitem(fmq.FLOW_MAP_TARGETS, "eulerian", lambda u, obs, a_r, r, t, v=None: (
        got.update(a_r=a_r, r=r, t=t, v=v), torch.zeros_like(a_r), torch.zeros_like(a_r))[1:])
    torch.manual_seed(0)
    n, args = 40_000, fmq.Args(curriculum_start=0, curriculum_end=1)
    loss, info = fmq.flow_map_loss(actor, torch.zeros(n, 1), torch.zeros(n, 2), 10, args)
    (a_t, t, t2), = seen
    assert torch.equal(t, t2) and t.shape == (n, 1)
    _is_uniform01(t)
    a_0 = a_t / (1 - t)
    _is_std_normal(a_0)
    assert info["actor/diag_loss"].item() == pytest.approx(1.0, abs=5 * (2 / (2 * n)) ** 0.5)
    a_0b = -got["v"]
    _is_std_normal(a_0b)
    torch.testing.assert_close(got["a_r"], (1 - got["r"]) * a_0b)  # a_r and v share the distillation's noise
    assert abs(_corr(a_0, a_0b)) < 5 / (2 * n) ** 0.5  # two draws, not one reused
    assert abs(_corr(t, got["r"])) < 5 / n ** 0.5 and abs(_corr(t, got["t"])) < 5 / n ** 0.5
    r, t_d = got["r"], got["t"]  # full curriculum: the min and max of two uniforms
    assert r.mean().item() == pytest.approx(1 / 3, abs=5 * (1 / 18 / n) ** 0.5)
    assert t_d.mean().item() == pytest.approx(2 / 3, abs=5 * (1 / 18 / n) ** 0.5)


def test_progressive_midpoint_lam_is_uniform_per_sample():
    """PSD: s = r + lam (t - r), lam ~ U[0, 1] per sample; with r = 0, t = 1 the midpoint time s is lam itself."""
    calls = []
    u = lambda obs, a, r, t: (calls.append((r, t)), torch.zeros_like(a))[1]  # noqa: E731
    torch.manual_seed(0)
    n = 40_000
    fmq.progressive_target(u, torch.zeros(n, 1), torch.zeros(n, 2), torch.zeros(n, 1), torch.ones(n, 1))
    (r0, s), (s2, t1), (r3, t3) = calls
    assert torch.equal(s, s2) and torch.equal(t1, torch.ones(n, 1)) and torch.equal(r3, r0)
    _is_uniform01(s)


@pytest.mark.parametrize("start,end", [(100, 100), (100, 101)])
def test_sample_r_t_with_a_curriculum_of_zero_or_one_step_is_full_width_one_step_after_its_start(start, end):
    """The curriculum's length is at least one step: one step after its start the (r, t) interval has its full width,
    i.e. the two sorted uniforms of the same draw."""
    torch.manual_seed(0)
    lo, hi = torch.rand(2, 500, 1).sort(0).values
    torch.manual_seed(0)
    r, t = fmq.sample_r_t(500, 101, fmq.Args(curriculum_start=start, curriculum_end=end), "cpu")
    torch.testing.assert_close(r, lo), torch.testing.assert_close(t, hi)


def test_sample_r_t_at_full_curriculum_is_two_sorted_uniforms():
    """r = min, t = max of two independent U[0, 1]: E r = 1/3, E t = 2/3, Var r = Var t = 1/18, corr(r, t) = 1/2,
    P(r < 1/2) = 3/4, P(t < 1/2) = 1/4 (one draw reused for both, or no sorting, gives other numbers)."""
    torch.manual_seed(0)
    n = 100_000
    r, t = fmq.sample_r_t(n, 10, fmq.Args(curriculum_start=0, curriculum_end=5), "cpu")
    se = lambda var: 5 * (var / n) ** 0.5  # noqa: E731
    assert r.mean().item() == pytest.approx(1 / 3, abs=se(1 / 18))
    assert t.mean().item() == pytest.approx(2 / 3, abs=se(1 / 18))
    assert r.var().item() == pytest.approx(1 / 18, abs=0.002) and t.var().item() == pytest.approx(1 / 18, abs=0.002)
    assert _corr(r, t) == pytest.approx(0.5, abs=0.02)
    assert (r < 0.5).float().mean().item() == pytest.approx(0.75, abs=se(0.1875))
    assert (t < 0.5).float().mean().item() == pytest.approx(0.25, abs=se(0.1875))
    assert len(torch.unique(torch.cat([r, t]))) > 1.95 * n  # float32 ties aside, 2n distinct draws


# ---------------------------------------------------------------- losses: fmq_loss (Algorithm 1)
@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True])
def test_online_fmq_moves_actions_by_eta_along_the_q_gradient(amp):
    """Alg. 1 with a fixed critic: the one-step action of u_theta converges to a_off + eta * grad Q / ||grad Q||."""
    torch.manual_seed(0)
    args = dataclasses.replace(fmq.Args(hidden_dim=64, num_layers=3, time_dim=16, eta=0.2, beta=0.0), discount=0.99)
    agent = fmq.make_agent(args, 3, 2, "cpu")
    fmq.freeze_offline_copy(agent)
    c = torch.tensor([0.8, -0.6])
    agent.critic = lambda obs, a: torch.stack([-((a - c) ** 2).sum(-1), -1.1 * ((a - c) ** 2).sum(-1)])
    opt = torch.optim.Adam(agent.actor.parameters(), lr=1e-3)
    for _ in range(2000):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss, _ = fmq.fmq_loss(agent, torch.randn(256, 3), 0.3 * torch.randn(256, 2), args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        obs, a_0 = torch.randn(2000, 3), torch.randn(2000, 2)
        a_off, a_theta = a_0 + agent.u_off(obs, a_0, 0.0, 1.0), a_0 + agent.actor(obs, a_0, 0.0, 1.0)
        step = a_theta - a_off
        assert step.norm(dim=1).mean() == pytest.approx(0.2, abs=0.02)
        # the Q-gradient is taken at a_1 clipped to [-1, 1] (official code)
        assert torch.nn.functional.cosine_similarity(step, c - a_off.clamp(-1, 1)).mean() > 0.99
        assert (agent.critic(obs, a_theta)[0] - agent.critic(obs, a_off)[0]).mean() > 0.4


def test_fmq_loss_gradient_reaches_only_the_online_actor():
    args, agent, batch = small_agent()
    loss, info = fmq.fmq_loss(agent, batch["obs"], batch["actions"], args)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.actor.parameters())
    assert all(p.grad is None for m in (agent.critic, agent.critic_target, agent.u_off) for p in m.parameters())
    assert not any(p.requires_grad for m in (agent.critic_target, agent.u_off) for p in m.parameters())


def test_fmq_target_is_the_trust_region_displacement_of_u_off():
    """With beta = 0, the minimiser of the FMQ loss is u_off + eta * grad Q1 / ||grad Q1|| at a_1 (Alg. 1)."""
    args, agent, batch = small_agent(beta=0.0, eta=0.7, kappa1=0.0)
    torch.manual_seed(3)
    captured = {}
    real_actor = agent.actor
    agent.actor = lambda obs, a_r, r, t: captured.update(a_r=a_r, r=r) or real_actor(obs, a_r, r, t)
    torch.manual_seed(3)
    fmq.fmq_loss(agent, batch["obs"], batch["actions"], args)
    a_r, r = captured["a_r"], captured["r"]
    u_off = agent.u_off(batch["obs"], a_r, r, 1.0)
    a_1 = (a_r + (1 - r) * u_off).clamp(-1, 1).requires_grad_(True)
    g = torch.autograd.grad(agent.critic(batch["obs"], a_1)[0].sum(), a_1)[0]
    expected = u_off + 0.7 * g / g.norm(dim=1, keepdim=True)
    agent.actor = lambda obs, a_r, r, t: expected  # a perfect actor: zero loss
    torch.manual_seed(3)
    loss, _ = fmq.fmq_loss(agent, batch["obs"], batch["actions"], args)
    assert loss.item() < 1e-12


@pytest.mark.parametrize("official,expected", [(False, 0.150504), (True, 0.235162)])
def test_eta_eff_damps_with_the_per_sample_critic_spread(official, expected):
    """Q1 = g.a, Q2 = g.a + s_0 with s_0 = 2, 4, 6: spreads (std, ddof 0) 1, 2, 3 over their batch mean 2, delta = .5,
    1, 1.5 (unnormalised 1, 2, 3 would differ). With beta .5, eta .8: eta_eff = .8 / (1.25, 1.5, 1.75); the official
    form drops eta: 1 / (...). With u_off = 0, a zero actor and ||g / ||g|||| = 1 the loss is mean(eta_eff^2) / 2."""
    g = torch.tensor([3.0, 4.0])
    critic = lambda obs, a: torch.stack([a @ g, a @ g + obs[:, 0]])  # noqa: E731
    agent, args = fmq_stand_ins(critic, eta=0.8, beta=0.5, official_eta=official)
    loss, info = fmq.fmq_loss(agent, torch.tensor([[2.0], [4.0], [6.0]]), torch.zeros(3, 2), args)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    eta_eff = (1.0 if official else 0.8) / torch.tensor([1.25, 1.5, 1.75])
    assert info["actor/eta_eff"].item() == pytest.approx(eta_eff.mean().item(), rel=1e-6)
    assert info["actor/fmq_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert info["actor/q_grad_norm"].item() == pytest.approx(5.0, rel=1e-6)  # ||grad Q1|| = ||(3, 4)||


def test_fmq_loss_interpolates_a_r_from_noise_to_data():
    """Alg. 1, line 5: a_r = (1 - r) a_0 + r a_1. Two calls on the same noise, with data 0 and data 1, hand u_off
    inputs a_r that differ by exactly r (reversed, a_r = r a_0 + (1 - r) a_1, by 1 - r)."""
    seen = []
    agent, args = fmq_stand_ins(lambda obs, a: a.sum(-1).expand(2, -1))
    agent.u_off = lambda obs, a, r, t: (seen.append((a.clone(), r.clone())), torch.zeros_like(a))[1]
    for a_1 in (0.0, 1.0):
        torch.manual_seed(0)
        fmq.fmq_loss(agent, torch.zeros(64, 1), torch.full((64, 2), a_1), args)
    (a_r0, r), (a_r1, r1) = seen
    assert torch.equal(r, r1)
    torch.testing.assert_close(a_r1 - a_r0, r.expand(-1, 2))


@pytest.mark.parametrize("guidance,expected,norm", [("q1", 0.0, 5.0), ("mean", 0.2, 4.0)])
def test_guidance_critic_q1_or_mean(guidance, expected, norm):
    """Alg. 1 guides with grad Q1 = (3, 4) -> (.6, .8); 'mean' with (grad Q1 + grad Q2) / 2 = (0, 4) -> (0, 1). An
    actor returning (.6, .8) (eta 1, beta 0, u_off 0) has loss 0 for q1 and ((.6)^2 + (.2)^2) / 2 = .2 for mean."""
    critic = lambda obs, a: torch.stack([a @ torch.tensor([3.0, 4.0]), a @ torch.tensor([-3.0, 4.0])])  # noqa: E731
    agent, args = fmq_stand_ins(critic, actor=torch.tensor([0.6, 0.8]), eta=1.0, beta=0.0, guidance_critic=guidance)
    loss, info = fmq.fmq_loss(agent, torch.zeros(16, 1), torch.zeros(16, 2), args)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert info["actor/q_grad_norm"].item() == pytest.approx(norm, rel=1e-6)  # ||(3, 4)||, ||(0, 4)|| per sample


def test_fmq_loss_takes_the_q_gradient_at_a_1_clipped_to_the_action_box():
    """Official _fmq_loss clips a_1 to [-1, 1]. With u_off = 1000 and a_data = 1, a_1 > 1 unclipped; Q = -||relu(a -
    1)||^2 has zero gradient at the clipped a_1 = 1, so the target is u_off and an actor returning it has loss 0
    (unclipped the target moves by eta = 1 along the gradient: loss eta^2 / 2 = 0.5)."""
    critic = lambda obs, a: -((a - 1).clamp_min(0) ** 2).sum(-1).expand(2, -1)  # noqa: E731
    agent, args = fmq_stand_ins(critic, u_off=1000.0, actor=torch.tensor([1000.0, 1000.0]), eta=1.0, beta=0.3)
    loss, _ = fmq.fmq_loss(agent, torch.zeros(64, 1), torch.ones(64, 2), args)
    assert loss.item() < 1e-10


def test_fmq_r_is_uniform_per_sample_and_the_same_for_u_off_and_the_actor():
    """Alg. 1, line 5: r ~ U[0, 1), one per sample; u_off and u_theta see the same r (and t = 1)."""
    seen = {}
    agent, args = fmq_stand_ins(lambda obs, a: a.sum(-1).expand(2, -1))
    agent.u_off = lambda obs, a, r, t: (seen.update(u_off=(r, t)), torch.zeros_like(a))[1]
    agent.actor = lambda obs, a, r, t: (seen.update(actor=(r, t)), torch.zeros_like(a))[1]
    torch.manual_seed(0)
    fmq.fmq_loss(agent, torch.zeros(40_000, 1), torch.zeros(40_000, 2), args)
    (r, t), (r_actor, t_actor) = seen["u_off"], seen["actor"]
    assert torch.equal(r, r_actor) and t == t_actor == 1.0 and r.shape == (40_000, 1)
    assert 0 <= r.min() and r.max() < 1 and len(r.unique()) > 39_000
    assert r.mean().item() == pytest.approx(0.5, abs=0.01) and r.var().item() == pytest.approx(1 / 12, abs=0.003)
    assert (r < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_fmq_loss_logs_its_three_values_and_the_per_sample_norm_of_the_guidance_gradient():
    """info holds fmq_loss (the loss), eta_eff's batch mean and the batch mean of the per-sample ||dQ / da_1||, as
    train.csv's columns. 'mean' guidance: Q1 = a.(3, 4), Q2 = a.(-3, 4) guide with (0, 4) per sample: norm 4 (the
    norm over a batch of 4 samples would be 8; Q averaged over the batch too, 1; summed over the critics, 8)."""
    critic = lambda obs, a: torch.stack([a @ torch.tensor([3.0, 4.0]), a @ torch.tensor([-3.0, 4.0])])  # noqa: E731
    agent, args = fmq_stand_ins(critic, eta=1.0, beta=0.0, guidance_critic="mean")
    loss, info = fmq.fmq_loss(agent, torch.zeros(4, 1), torch.zeros(4, 2), args)
    assert set(info) == {"actor/fmq_loss", "actor/eta_eff", "actor/q_grad_norm"} <= set(fmq.TRAIN_FIELDS)
    assert info["actor/fmq_loss"] == loss and info["actor/q_grad_norm"].item() == pytest.approx(4.0, rel=1e-6)


def test_delta_critic_is_the_population_spread_over_its_batch_mean_plus_1e_8():
    """At critic spreads of 1e-8, where the floor and the ddof show: Q2 - Q1 = 2e-8, 6e-8 -> std (ddof 0) 1e-8, 3e-8,
    batch mean 2e-8, delta = std / (2e-8 + 1e-8) = 1/3, 1; eta 1, beta 1: eta_eff = .75, .5, mean .625 (ddof 1:
    .602; the floor subtracted: .375)."""
    critic = lambda obs, a: torch.stack([1e-6 * a.sum(-1), 1e-6 * a.sum(-1) + obs[:, 0]])  # noqa: E731
    agent, args = fmq_stand_ins(critic, eta=1.0, beta=1.0)
    _, info = fmq.fmq_loss(agent, torch.tensor([[2e-8], [6e-8]]), torch.zeros(2, 2), args)
    assert info["actor/eta_eff"].item() == pytest.approx(0.625, rel=1e-4)


@pytest.mark.parametrize("kappa1,beta,expected", [(5.0, 0.3, 0.125), (0.0, 0.3, 0.5)])
def test_kappa1_floors_the_gradient_norm_in_the_fmq_target(kappa1, beta, expected):
    """g = grad Q / (||grad Q|| + kappa1) with grad Q = (3, 4): kappa1 5 halves the step (target (.3, .4), loss of a
    zero actor (.09 + .16) / 2 = .125); kappa1 0: (.6, .8), loss .5. Equal critics: delta 0, beta has no effect."""
    g = torch.tensor([3.0, 4.0])
    agent, args = fmq_stand_ins(lambda obs, a: (a @ g).expand(2, -1), eta=1.0, beta=beta, kappa1=kappa1)
    loss, _ = fmq.fmq_loss(agent, torch.zeros(8, 1), torch.zeros(8, 2), args)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_fmq_loss_noise_is_standard_normal_and_independent_of_r():
    """Alg. 1, line 5: a_r = (1 - r) a_0 + r a_1, a_0 ~ N(0, I) independent of r ~ U[0, 1]; a_data = 0 reads a_0."""
    seen = {}
    agent, args = fmq_stand_ins(lambda obs, a: a.sum(-1).expand(2, -1))
    agent.u_off = lambda obs, a, r, t: (seen.update(a_r=a, r=r), torch.zeros_like(a))[1]
    torch.manual_seed(0)
    fmq.fmq_loss(agent, torch.zeros(40_000, 1), torch.zeros(40_000, 2), args)
    a_0 = seen["a_r"] / (1 - seen["r"])
    _is_std_normal(a_0)
    assert abs(_corr(a_0.abs().mean(1), seen["r"])) < 5 / 40_000 ** 0.5


# ---------------------------------------------------------------- losses: the baselines (MVP, flow-map, QC)
@pytest.mark.slow
@pytest.mark.parametrize("target", ["mvp", "flow-map"])
def test_mvp_and_flow_map_targets_keep_both_modes(target, monkeypatch):
    """Online updates through `update` on a 1-d toy (s = 0), best_of_n patched to a fixed set. MVP trains toward a*
    (bimodal here; data actions 0): a loss that regresses u(a_r, r, 1) onto a* drawn apart from a_0 gives the mean
    (0% in each mode, measured); the flow-map loss with a* in place of the data keeps both modes. flow-map trains on
    the buffer's actions (bimodal here; a* = 0): whatever the critic picks."""
    torch.manual_seed(0)
    args = fmq.Args(hidden_dim=64, num_layers=3, time_dim=16, curriculum_start=300, curriculum_end=1500, lr=1e-3,
                    online_target=target, best_of_n=4)
    a_star, data = (bimodal, torch.zeros) if target == "mvp" else (lambda n: torch.zeros(n, 1), bimodal)
    monkeypatch.setattr(fmq, "best_of_n", lambda actor, q_fn, obs, n, generator=None: (a_star(len(obs)), None))
    agent = fmq.make_agent(args, 1, 1, "cpu")
    fmq.freeze_offline_copy(agent)
    zeros = torch.zeros(256, 1)
    for step in range(3000):
        batch = dict(obs=zeros, actions=data(256, 1) if target == "mvp" else data(256), R=zeros[:, 0],
                     mask=zeros[:, 0], next_obs=zeros)
        fmq.update(agent, batch, torch.tensor(step), args)
    with torch.no_grad():
        x = fmq.one_step(agent.actor, torch.zeros(4000, 1), torch.Generator().manual_seed(1))
    assert min(mode_fractions(x)) >= 0.3


@pytest.mark.slow
def test_qc_behaviour_flow_euler_steps_give_both_modes_one_step_their_mean():
    """QC's actor (--flow-map-loss none: flow matching only, raw time input): 10 Euler steps of u(a, t, t) reproduce
    both modes of +-0.9 data; one Euler step from t = 0 lands on E[a_1 - a_0 | a_0] + a_0, their mean."""
    torch.manual_seed(0)
    args = fmq.Args(hidden_dim=64, num_layers=3, time_dim=0, flow_map_loss="none", euler_steps=10)
    actor = fmq.FlowMapActor(1, 1, args)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    for step in range(3000):
        loss, info = fmq.flow_map_loss(actor, torch.zeros(256, 1), bimodal(256), step, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert list(info) == ["actor/diag_loss"]
    with torch.no_grad():
        x10 = fmq.one_step(actor, torch.zeros(4000, 1), torch.Generator().manual_seed(1))
        actor.euler_steps = 1
        x1 = fmq.one_step(actor, torch.zeros(4000, 1), torch.Generator().manual_seed(1))
    assert min(mode_fractions(x10)) >= 0.3
    assert (x1.abs() < 0.2).float().mean() > 0.9


@pytest.mark.parametrize("q_agg,expected", [(None, 0), ("min", 1)])
def test_mvp_target_is_the_best_of_n_under_the_mvp_aggregation(q_agg, expected):
    """MVP's a*: best of N one-step samples under the critics, mean (e_0) unless --online-q-agg min (e_1)."""
    args = fmq.Args(online_target="mvp", online_q_agg=q_agg, best_of_n=3)
    agent = SimpleNamespace(actor=candidate_actor(3, n=3), critic=CURRENT)
    torch.testing.assert_close(fmq.mvp_target(agent, torch.zeros(3, 6), args), E4[[expected] * 3])


def test_mvp_target_carries_no_gradient():
    """MVP's a* is a regression target: drawn without autograd, so no gradient flows back through the sampler."""
    args, agent, batch = small_agent(online_target="mvp")
    a_star = fmq.mvp_target(agent, batch["obs"], args)
    assert not a_star.requires_grad and a_star.grad_fn is None


# ---------------------------------------------------------------- losses: the TD target and the critic loss
def test_critic_loss_gradient_reaches_only_the_critic():
    args, agent, batch = small_agent()
    loss, _ = fmq.critic_loss(agent, batch, 0.99, 5, "mean", 4)
    loss.backward()
    assert all(p.grad is not None for p in agent.critic.parameters())
    assert all(p.grad is None for m in (agent.actor, agent.critic_target) for p in m.parameters())


def test_td_target_with_constant_target_critics():
    """R + gamma^h * mask * c, c the mean (-3.5) or min (-5) of constant target critics -2 and -5; row 1 has mask 0."""
    agent = SimpleNamespace(actor=candidate_actor(3), critic=CURRENT,
                            critic_target=lambda obs, a: torch.tensor([[-2.0], [-5.0]]).expand(2, len(a)))
    for agg, c in [("mean", -3.5), ("min", -5.0)]:
        target = fmq.td_target(agent, td_batch(), 0.9, 3, agg, 4)
        torch.testing.assert_close(target, torch.tensor([-1.0 + 0.729 * c, 0.5, -2.0 + 0.729 * c]))


@pytest.mark.parametrize("agg,next_q", [("mean", 2.0), ("min", -2.0)])
def test_td_target_current_critic_selects_target_critic_values(agg, next_q):
    """Official critic_loss: the current critics pick a' among the samples (mean: e_0, min: e_1), the target critics
    value it (mean at e_0: 2, min at e_1: -2). Selecting with the target (5), valuing with the current critics
    (1.5 / 1) or mixing the aggregations (1 / 0) gives other numbers."""
    agent = SimpleNamespace(actor=candidate_actor(3), critic=CURRENT, critic_target=TARGET)
    target = fmq.td_target(agent, td_batch(), 0.9, 3, agg, 4)
    torch.testing.assert_close(target, torch.tensor([-1.0 + 0.729 * next_q, 0.5, -2.0 + 0.729 * next_q]))


def test_amp_td_target_equals_the_fp32_one_near_minus_300():
    """At |Q| ~ 300 bf16's step is 2; with the fp32 last layer the --amp TD target is the fp32 one to 1e-3 relative."""
    args, agent, batch = small_agent()
    agent.critic, agent.critic_target = critic_near(-300.0, args), critic_near(-299.0, args)
    targets = []
    for amp in (False, True):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            targets.append(fmq.td_target(agent, batch, 0.99, 5, "min", 32))
    assert targets[1].dtype == torch.float32
    assert ((targets[1] - targets[0]).abs() / targets[0].abs()).max() < 1e-3


# Each test computes a number that a wrong constant, aggregation, network role, order or sign changes.
@pytest.mark.parametrize("agg,loss,target", [("mean", 2.6265093, 0.1386667), ("min", 11.3745093, -1.8053333)])
def test_critic_loss_is_the_mean_squared_td_error_of_every_member(agg, loss, target):
    """Official critic_loss: mean over members and batch of (Q_i(s, a) - y)^2, y the TD target of
    test_td_target_current_critic_selects_target_critic_values (mean: -1 + .729 * 2, .5, -2 + .729 * 2; min: with -2).
    Q_1, Q_2 at the batch's actions e_0, e_1, e_2: (4, 1, 0) and (-1, 1, 0). The loss of the aggregated Q, or a sum,
    or a target from the current critics gives another number."""
    agent = SimpleNamespace(actor=candidate_actor(3), critic=CURRENT, critic_target=TARGET)
    batch = dict(td_batch(), obs=torch.zeros(3, 6), actions=E4[[0, 1, 2]])
    value, info = fmq.critic_loss(agent, batch, 0.9, 3, agg, 4)
    assert value.item() == pytest.approx(loss, rel=1e-6)
    assert info["critic/q"].item() == pytest.approx(5 / 6, rel=1e-6)
    assert info["critic/target"].item() == pytest.approx(target, rel=1e-5)


# ---------------------------------------------------------------- update: one step, make_update, compile, graphs
def test_update_changes_parameters_and_polyak_moves_targets():
    """Polyak toward the pre-update critic (official target_update reads the pre-update network)."""
    args, agent, batch = small_agent()
    with torch.no_grad():  # targets apart from the critic, or any Polyak rate (tau, 1 - tau, none) would pass
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = [p.clone() for p in agent.critic_target.parameters()]
    critic_before = [p.clone() for p in agent.critic.parameters()]
    info = fmq.update(agent, batch, 0, args)
    assert all(torch.isfinite(v) for v in info.values())
    for p_t, p_b, p, p_new in zip(agent.critic_target.parameters(), before, critic_before, agent.critic.parameters()):
        torch.testing.assert_close(p_t, p_b + args.tau * (p - p_b))
        assert not torch.equal(p, p_new)  # the critic moved
    fmq.update(agent, batch, 1, args)
    assert all(not p.requires_grad and p.grad_fn is None for p in agent.critic_target.parameters())  # frozen, no graph


def test_each_update_starts_from_zero_gradients(monkeypatch):
    """Losses = sum of the parameters: every gradient is exactly 1 after each update, not 2 after the second (no
    gradient accumulation across updates, as optax has none)."""
    args, agent, batch = small_agent()
    total = lambda net: sum(p.sum() for p in net.parameters())  # noqa: E731
    monkeypatch.setattr(fmq, "critic_loss", lambda agent, *a: (total(agent.critic), {}))
    monkeypatch.setattr(fmq, "flow_map_loss", lambda actor, *a: (total(actor), {}))
    monkeypatch.setattr(fmq, "fmq_loss", lambda agent, *a: (total(agent.actor), {}))
    sizes = [sum(p.numel() for p in net.parameters()) for net in (agent.critic, agent.actor)]
    for step in range(2):
        info = fmq.update(agent, batch, step, args)
        for p in [*agent.critic.parameters(), *agent.actor.parameters()]:
            assert torch.equal(p.grad, torch.ones_like(p)), f"update {step}: gradients accumulated"
        logged = [info["critic/grad_norm"].item(), info["actor/grad_norm"].item()]
        assert logged == pytest.approx([n ** 0.5 for n in sizes], rel=1e-6)  # the norm of all-ones gradients


def test_one_update_steps_on_the_summed_loss_at_pre_update_parameters(monkeypatch):
    """Official total_loss: the actor loss sees the pre-update critic, and both nets take one Adam step from the
    gradients at the pre-update parameters (Adam's first step moves every parameter by lr * sign(grad))."""
    args, agent, batch = small_agent()
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    seen = []

    def fmq_recording(agent, *a):
        seen.append([p.detach().clone() for p in agent.critic.parameters()])
        return fmq_loss(agent, *a)
    fmq_loss = fmq.fmq_loss
    monkeypatch.setattr(fmq, "fmq_loss", fmq_recording)
    torch.manual_seed(0)  # without --amp the update's critic loss is the fp32 one, on the same draws
    c_loss, _ = fmq.critic_loss(agent, batch, args.discount, args.horizon, fmq.critic_agg(args, True), args.best_of_n)
    torch.manual_seed(0)
    assert torch.equal(fmq.update(agent, batch, 0, args)["critic/loss"], c_loss)
    assert all(torch.equal(p, q) for p, q in zip(seen[0], critic_before))
    for before, net in [(critic_before, agent.critic), (actor_before, agent.actor)]:
        steps = torch.cat([(p - b).flatten() for p, b in zip(net.parameters(), before)]).abs()
        assert steps.max().item() == pytest.approx(args.lr, rel=1e-3)


def test_update_and_sampling_make_no_tensor_off_the_data_device():
    """Under torch.device('meta') a tensor made without device= lands on meta and mixing it with the (CPU) data fails
    loudly: what would put a CPU tensor next to CUDA data. The updates of every phase and target, each sampler, the
    replay buffer's sampling and sample_r_t with a Python step make none."""
    args, agent, batch = small_agent()
    buf, step = circular_buffer(), torch.tensor(10)  # the loop passes the step as a device tensor
    fill(buf, 3)
    with torch.device("meta"):
        r, t = fmq.sample_r_t(8, 100, args, "cpu")
        assert r.device.type == t.device.type == "cpu"
        assert buf.sample(4, 0.9)["obs"].device.type == "cpu"
        for target in ("fmq", "mvp", "flow-map"):
            a = dataclasses.replace(args, online_target=target)
            info = fmq.update(agent, batch, 10, a)
            assert all(v.device.type == "cpu" for v in info.values())
        agent.u_off = None
        fmq.update(agent, batch, step, args)
        for sampler in ("onestep", "best-of-n", "qgbs"):
            assert fmq.select_action(agent, batch["obs"], sampler, args).device.type == "cpu"
            assert fmq.act(agent, batch["obs"].numpy(), sampler, args).shape == (8, args.horizon, 10 // args.horizon)


def test_act_takes_the_envs_float64_observations_as_float32():
    """Envs return float64 observations (numpy's default); act hands the nets float32 states: the same chunks."""
    args, agent, batch = small_agent(horizon=2)
    obs = batch["obs"][:3].numpy()
    a64 = fmq.act(agent, obs.astype(np.float64), "onestep", args, torch.Generator().manual_seed(0))
    a32 = fmq.act(agent, obs, "onestep", args, torch.Generator().manual_seed(0))
    assert a64.dtype == np.float32 and np.array_equal(a64, a32)


def test_update_logs_both_losses_and_both_gradient_norms_as_train_csv_columns():
    args, agent, batch = small_agent()
    for target in ("fmq", "mvp", "flow-map"):
        info = fmq.update(agent, batch, 10, dataclasses.replace(args, online_target=target))
        assert {"critic/loss", "critic/q", "critic/target", "critic/grad_norm", "actor/grad_norm"} <= set(info)
        assert set(info) <= set(fmq.TRAIN_FIELDS), target


@pytest.mark.parametrize("amp", [False, True])
def test_amp_runs_the_nets_in_bfloat16_autocast_and_only_with_amp(amp):
    """--amp: act and update run the actor's layers in bfloat16 (even where the device's default autocast dtype is
    another: here the CPU's is set to float16); without it, in float32."""
    args, agent, batch = small_agent(amp=amp)
    seen = []
    agent.actor.net[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        fmq.act(agent, batch["obs"][:2].numpy(), "onestep", dataclasses.replace(args, horizon=2))
        fmq.update(agent, batch, 10, args)
    finally:
        torch.set_autocast_dtype("cpu", default)
    assert seen and set(seen) == {torch.bfloat16 if amp else torch.float32}


@pytest.mark.parametrize("online,target,offline_agg,online_agg,expected", [
    (False, "fmq", "mean", None, "mean"), (False, "fmq", "min", None, "min"), (True, "fmq", "mean", None, "min"),
    (True, "mvp", "min", None, "mean"), (True, "flow-map", "min", None, "mean"), (True, "mvp", "mean", "min", "min")])
def test_update_takes_each_methods_td_target_aggregation(online, target, offline_agg, online_agg, expected,
                                                         monkeypatch):
    """The TD target's aggregation in `update`: offline_q_agg offline; online the method's (FMQ min, MVP and
    flow-map mean) or --online-q-agg. The critic loss also gets the discount, horizon and N of the run."""
    args, agent, batch = small_agent(online_target=target, offline_q_agg=offline_agg, online_q_agg=online_agg,
                                     discount=0.9, horizon=3, best_of_n=3)
    if not online:
        agent.u_off = None
    seen = []

    def critic(agent, batch, discount, horizon, agg, n):
        seen.append((discount, horizon, agg, n))
        return critic_loss(agent, batch, discount, horizon, agg, n)
    critic_loss = fmq.critic_loss
    monkeypatch.setattr(fmq, "critic_loss", critic)
    fmq.update(agent, batch, 0, args)
    assert seen == [(0.9, 3, expected, 3)]


@pytest.mark.parametrize("online,target,fits", [(True, "mvp", "a_star"), (True, "flow-map", "data"),
                                                (False, "mvp", "data"), (False, "fmq", "data"), (True, "fmq", None)])
def test_each_method_fits_its_actor_loss_to_its_own_actions(online, target, fits, monkeypatch):
    """Online, MVP fits the offline loss to a* (the best of N under the critics), the official no-FMQ path (flow-map,
    QC) to the buffer's actions, FMQ takes its own loss; offline every method fits the data."""
    args, agent, batch = small_agent(online_target=target)
    if not online:
        agent.u_off = None
    a_star = torch.full_like(batch["actions"], 0.25)
    monkeypatch.setattr(fmq, "best_of_n", lambda actor, q_fn, obs, n, generator=None: (a_star[:len(obs)], None))
    seen, flow_map_loss, fmq_loss = [], fmq.flow_map_loss, fmq.fmq_loss
    monkeypatch.setattr(fmq, "flow_map_loss", lambda actor, obs, a, step, args: (
        seen.append(("flow_map", a, step)), flow_map_loss(actor, obs, a, step, args))[1])
    monkeypatch.setattr(fmq, "fmq_loss", lambda agent, obs, a, args: (
        seen.append(("fmq", a, 7)), fmq_loss(agent, obs, a, args))[1])
    fmq.update(agent, batch, 7, args)
    (kind, a, step), = seen
    assert step == 7  # the flow-map loss's curriculum sees the update's step
    assert kind == ("fmq" if fits is None else "flow_map")
    assert torch.equal(a, a_star if fits == "a_star" else batch["actions"])


def test_make_update_runs_update_on_a_fresh_batch_of_the_runs_size_and_discount(monkeypatch):
    """Each call samples batch_size chunks with the run's discount (rewards -1, h 3, discount 0.9: R = -2.71) and hands
    `update` the step as a device tensor."""
    seen = []
    monkeypatch.setattr(fmq, "update", lambda agent, batch, step, args: seen.append((batch, int(step))) or {})
    args = fmq.Args(batch_size=5, discount=0.9, horizon=3)
    update = fmq.make_update(SimpleNamespace(u_off=None), circular_buffer(), args)
    update(4), update(5)
    assert [(len(b["obs"]), s) for b, s in seen] == [(5, 4), (5, 5)]
    torch.testing.assert_close(seen[0][0]["R"], torch.full((5,), -2.71))


def test_cudagraphs_warm_up_three_eager_updates_on_a_side_stream_then_capture_once_and_replay_per_phase(monkeypatch):
    """--cudagraphs, with torch.cuda's streams and graphs replaced by recorders (the logic, on any machine): per phase,
    3 eager updates on a side stream that waits for the current one (and back), then one capture whose outputs every
    later call returns after a replay, the step written into the captured step tensor; the online phase warms up and
    captures its own graph, and the offline graph is released."""
    import weakref
    log, steps = [], []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            log.append(("enter", self.name))

        def __exit__(self, *a):
            log.append(("exit", self.name))

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

        def replay(self):
            log.append(("replay", self.name))
    graphs = []
    current, side = Recorder("current"), Recorder("side")
    buffer = circular_buffer()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: {buffer.device: side}[device])  # on the buffer's device
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: s)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(Recorder(f"graph{len(graphs)}")) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Recorder(("capture", g.name)))

    def update(agent, batch, step, args):
        steps.append(step)
        log.append(("update", int(step)))
        return {"n": len(steps)}
    monkeypatch.setattr(fmq, "update", update)
    agent = SimpleNamespace(u_off=None)
    step_fn = fmq.make_update(agent, buffer, fmq.Args(batch_size=2, horizon=3, cudagraphs=True))
    eager = lambda s: [("wait", "side", "current"), ("enter", "side"), ("update", s), ("exit", "side"),  # noqa: E731
                       ("wait", "current", "side")]
    assert [step_fn(s) for s in range(5)] == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 4}]
    assert log == eager(0) + eager(1) + eager(2) + [("enter", ("capture", "graph0")), ("update", 3),
                                                    ("exit", ("capture", "graph0")), ("replay", "graph0"),
                                                    ("replay", "graph0")]
    assert steps[3] is steps[0] and int(steps[3]) == 4  # the replay reads the step from the captured tensor
    offline_graph = weakref.ref(graphs[0])
    agent.u_off, log[:] = "frozen", []
    assert [step_fn(s) for s in range(5, 10)] == [{"n": 5}, {"n": 6}, {"n": 7}, {"n": 8}, {"n": 8}]
    assert log == eager(5) + eager(6) + eager(7) + [("enter", ("capture", "graph1")), ("update", 8),
                                                    ("exit", ("capture", "graph1")), ("replay", "graph1"),
                                                    ("replay", "graph1")]
    del graphs[0]
    assert offline_graph() is None  # released at the online capture


def test_compile_sets_dynamos_options_compiles_the_update_with_static_shapes_and_drops_one_note(monkeypatch):
    """--compile (the compiler itself replaced by a recorder; the slow tier runs it): backward and autograd.grad traced,
    nested graph breaks, eager's random draws, torch.compile(dynamic=False) over the whole update, and a log filter
    that drops only dynamo's note on Optimizer.step's record-function label."""
    import logging
    logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
    monkeypatch.setattr(logger, "filters", [])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **k: compiled.append(k) or (lambda: ("compiled", fn())))
    monkeypatch.setattr(fmq, "update", lambda agent, batch, step, args: {"step": int(step)})
    with torch._dynamo.config.patch(trace_autograd_ops=False, nested_graph_breaks=False), \
            torch._inductor.config.patch(fallback_random=False):  # (torch's configs: set back by their own patch)
        step_fn = fmq.make_update(SimpleNamespace(u_off=None), circular_buffer(), fmq.Args(batch_size=2, horizon=3,
                                                                                           compile=True))
        assert (torch._dynamo.config.trace_autograd_ops, torch._dynamo.config.nested_graph_breaks,
                torch._inductor.config.fallback_random) == (True, True, True)
    assert step_fn(7) == ("compiled", {"step": 7}) and compiled == [dict(dynamic=False)]
    record = lambda msg: logging.LogRecord("x", logging.WARNING, "f", 1, msg, ("fn",), None)  # noqa: E731
    (drop,) = logger.filters  # the note: torch/_dynamo/variables/ctx_manager.py's warning_once
    assert not drop(record("Profiler record function %s will be ignored"))
    assert drop(record("Graph break in user code %s"))


def test_polyak_before_the_optimiser_step_is_seen_at_a_large_lr():
    """With lr 0.1 the critic moves ~0.1 per step, so a Polyak step taken after the optimiser step (or with 1 - tau)
    lands ~5e-4 away from tau toward the pre-update critic: far outside the tolerance (float32 rounding, 1e-7)."""
    args, agent, batch = small_agent(lr=0.1)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = [p.clone() for p in agent.critic_target.parameters()]
    critic_before = [p.clone() for p in agent.critic.parameters()]
    fmq.update(agent, batch, 0, args)
    for p_t, p_b, p, p_new in zip(agent.critic_target.parameters(), before, critic_before, agent.critic.parameters()):
        torch.testing.assert_close(p_t, p_b + 0.005 * (p - p_b), atol=1e-7, rtol=1e-6)
        assert (p_new - p).abs().max() > 0.05  # the optimiser step is large


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("online,amp", [(False, False), (True, False), (True, True)])
def test_cuda_graph_replay_is_the_eager_update(online, amp):
    """--cudagraphs: 3 eager warm-up updates, then one captured update replayed. From the same seed, the replays
    draw the same batches and noise as eager updates, so 6 updates leave the same parameters (up to rounding)."""
    rng = np.random.default_rng(0)
    data = dict(observations=rng.standard_normal((500, 6), dtype=np.float32), actions=rng.uniform(-1, 1, (500, 2)),
                rewards=-np.ones(500), masks=np.ones(500), ends=np.arange(500) % 100 == 99)
    data["next_observations"] = np.roll(data["observations"], -1, 0)
    nets = []
    for graphs in (False, True):
        args = fmq.Args(hidden_dim=64, num_layers=2, time_dim=8, batch_size=32, best_of_n=4, discount=0.99,
                        offline_q_agg="mean", curriculum_start=0, curriculum_end=4, cudagraphs=graphs, amp=amp)
        torch.manual_seed(0)
        agent = fmq.make_agent(args, 6, 2 * args.horizon, "cuda")
        if online:
            fmq.freeze_offline_copy(agent)
        flat = lambda: torch.cat([p.detach().flatten() for p in [*agent.actor.parameters(), *agent.critic.parameters()]])
        start = flat()
        update = fmq.make_update(agent, fmq.ReplayBuffer(data, 0, args.horizon, "cuda"), args)
        infos = [update(step) for step in range(6)]
        assert all(torch.isfinite(v).all() for v in infos[-1].values())
        nets.append(flat())
    assert (nets[0] - start).abs().max() > 1e-3  # the updates moved the parameters
    torch.testing.assert_close(nets[1], nets[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("online_target", ["fmq", "mvp", "flow-map"])
def test_compiled_update_is_the_eager_update(online_target):
    """--compile: the eager update under torch.compile draws eager's batches and noise, so from the same seed 2 offline
    + 2 online updates leave the eager parameters, targets and Adam state, up to float32 rounding of a reordered
    computation: |diff| <= 1e-5 + 1e-4 |x|. That is 3% of one Adam step (lr 3e-4), while a compiled graph that drew
    other noise, dropped a term or skipped a step moves 1e-4 or more. Five graphs, none left to eager: the batch
    sample, each phase's losses + backward + Polyak, and each optimiser's Adam step (both phases share those)."""
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.reset()  # earlier compiled updates' cache entries would count toward the recompile limit
    start, *eager = _four_updates(False, online_target)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(trace_autograd_ops=False, nested_graph_breaks=False), \
            torch._inductor.config.patch(fallback_random=False):
        _, *compiled = _four_updates(True, online_target)  # (make_update sets all three; undone here)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 5
    assert max((p - p0).abs().max() for p, p0 in zip(eager[0], start)) > 1e-3  # the updates moved the actor
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag,value,offline,online", UPDATE_FLAGS)
def test_each_flag_changes_exactly_the_updates_it_applies_to(flag, value, offline, online):
    """One update from the same state, batch and draws: an online flag leaves the offline update bit-identical and
    changes the online one (and the reverse for offline flags); acting, QGBS and data flags change neither."""
    kw = dict(online_target="flow-map") if flag == "euler_steps" else {}  # fmq needs a one-jump flow map
    for phase, changes in ((False, offline), (True, online)):
        same = torch.equal(one_update(phase, **kw), one_update(phase, **kw, **{flag: value}))
        assert same != changes, (flag, "online" if phase else "offline")


# ---------------------------------------------------------------- the training loop: main, phases, warm-up, utd
@pytest.mark.slow
def test_tiny_run_end_to_end_and_deterministic(tmp_path, ogb):
    final = fmq.main(tiny_args(tmp_path / "a", ogb))
    run = tmp_path / "a" / "runs" / "scene-t5__fmq__0"
    train, evals = read_csv(run / "train.csv"), read_csv(run / "eval.csv")
    assert [int(r["step"]) for r in train] == [10, 20, 30, 40]
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (20, "offline"), (40, "online")]
    assert all(np.isfinite(float(r[k])) for r in train for k in ("critic/loss", "actor/grad_norm"))
    assert train[-1]["actor/fmq_loss"] != "" and train[0]["actor/diag_loss"] != ""
    assert json.loads((run / "final.json").read_text())["step"] == 40 == final["step"]
    assert json.loads((run / "config.json").read_text())["discount"] == 0.99
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt"))[-1] == "step_000000040.pt"
    fmq.main(tiny_args(tmp_path / "b", ogb))  # same seed, same device: identical numbers
    run_b = tmp_path / "b" / "runs" / "scene-t5__fmq__0"
    assert strip_timing(read_csv(run_b / "train.csv")) == strip_timing(train)
    assert strip_timing(read_csv(run_b / "eval.csv")) == strip_timing(evals)


@pytest.mark.parametrize("reward,sparse,seed", [(None, False, 0), ("sparse", False, 0), ("minus_one", False, 0),
                                                ("minus_one", True, 1), (None, True, 2)])
def test_main_stores_the_reward_training_uses_masks_and_ends(tmp_path, monkeypatch, tiny_env, reward, sparse, seed):
    """30 online steps; training episode i resets with seed * 1_000_003 + i (seed 0: successes at 3, 4, 5, a
    truncation at 12, then 6 steps of the fifth). Stored: the ENVS transform then --sparse's of the env's reward
    (offline data too), mask 0 only at a success (a truncation stays alive), an episode end at each success and
    truncation, the observation the env gave before the action and after it."""
    tiny_env(reward)
    buffers, rows = recording_buffer(monkeypatch)
    fmq.main(tiny_env_args(tmp_path, sparse=sparse, seed=seed, eval_interval=1000, keep_checkpoints=2))
    ckpts = (tmp_path / "runs" / f"tiny__fmq__{seed}" / "checkpoints").glob("*.pt")
    assert sorted(p.name for p in ckpts) == [f"step_0000000{s}.pt" for s in (10, 30, 40)]  # 2 kept, and the switch
    transform = {None: lambda r: r, "sparse": lambda r: -float(r != 0), "minus_one": lambda r: r - 1}[reward]
    final = (lambda r: -float(r != 0)) if sparse else (lambda r: r)
    raw, masks, ends, t = [], [], [], []
    for i in range(30):
        k = tiny_k(seed * 1_000_003 + i)
        n = min(k, TINY_LIMIT)
        raw, t = raw + tiny_rewards(k, n), t + list(range(n))
        masks, ends = masks + [1.0] * (n - 1) + [float(k > TINY_LIMIT)], ends + [False] * (n - 1) + [True]
    if seed == 0:
        assert ends.index(True, 12) == 23 and masks[:24].count(0.0) == 3  # 3 successes, then a truncation
    assert [r[2] for r in rows] == [final(transform(r)) for r in raw[:30]]
    assert [r[3] for r in rows] == masks[:30] and [r[5] for r in rows] == ends[:30]
    obs, actions, next_obs = (np.stack([r[j] for r in rows]) for j in (0, 1, 4))
    np.testing.assert_allclose(obs[:, 0] * TINY_LIMIT, t[:30], atol=1e-5)
    np.testing.assert_allclose(next_obs[:, 0] * TINY_LIMIT, np.add(t[:30], 1), atol=1e-5)
    np.testing.assert_allclose(next_obs[:, 2], actions.mean(1), atol=1e-6)
    offline = tiny_dataset()["rewards"]
    np.testing.assert_array_equal(buffers[0].data["rewards"][:60].numpy(), [final(transform(r)) for r in offline])


def test_main_warm_up_phase_switch_success_counting_and_eval_waves(tmp_path, monkeypatch, tiny_env):
    """Updates at offline steps 0..9, then from online step start_training (1-based, official main.py): 10 + 3 = 13.
    u_off is the actor as it is at the phase switch (step 10), frozen after. train.csv's episode success is the last
    finished episode's; each evaluation runs eval seeds 10000..10004 in waves of 2, 2, 1: success at steps 3, 4, 5,
    never (12 steps, 10003 % 4 == 3), 7: success 0.8, length 6.2, whatever the policy."""
    real, calls, acts, real_act = fmq.update, [], [], fmq.act
    monkeypatch.setattr(fmq, "update", lambda agent, batch, step, *a: calls.append(int(step)) or real(
        agent, batch, step, *a))
    _, rows = recording_buffer(monkeypatch)

    def act(agent, obs, *a):
        chunk = real_act(agent, obs, *a)
        if len(a) == 2:  # (sampler, args), no eval generator: acting in the training env; the online steps done
            acts.append((len(rows), chunk[0]))
        return chunk
    monkeypatch.setattr(fmq, "act", act)
    final = fmq.main(tiny_env_args(tmp_path, start_training=4))
    assert calls == list(range(10)) + list(range(13, 40))
    # a new chunk of 3 actions at each episode start (online steps 0, 3, 7, 12, 24 done) and after each 3 actions
    assert [n for n, _ in acts] == [0, 3, 6, 7, 10, 12, 15, 18, 21, 24, 27]
    for (n, chunk), (m, _) in zip(acts, acts[1:] + [(30, None)]):  # the env gets each chunk's actions in order
        np.testing.assert_array_equal(np.stack([r[1] for r in rows[n:m]]), chunk[:m - n])
    run = tmp_path / "runs" / "tiny__fmq__0"
    switch, last = (torch.load(run / "checkpoints" / f"step_{s:09d}.pt", weights_only=False) for s in (10, 40))
    assert switch["u_off"] is not None and all(torch.equal(switch["u_off"][k], v) for k, v in switch["actor"].items())
    assert all(torch.equal(last["u_off"][k], v) for k, v in switch["actor"].items())
    assert not all(torch.equal(last["actor"][k], v) for k, v in switch["actor"].items())
    train = read_csv(run / "train.csv")
    assert [int(r["step"]) for r in train] == list(range(5, 45, 5))
    # online steps 5, 10, 15, ..: episodes end at online steps 3 (success), 7 (success), 12 (success), 24 (truncated)
    assert [r["env/episode_success"] for r in train] == ["", "", "1.0", "1.0", "1.0", "1.0", "0.0", "0.0"]
    # their returns (the env's rewards, -min(2, k - t)): k = 3: -2 -1 0; k = 4: -5; k = 5: -7; 12 steps of -2
    assert [r["env/episode_return"] for r in train] == ["", "", "-3.0", "-5.0", "-7.0", "-7.0", "-24.0", "-24.0"]
    config = dataclasses.asdict(tiny_env_args(tmp_path, start_training=4))
    assert (run / "config.json").read_text() == json.dumps(config, indent=2)
    assert [r["phase"] for r in train] == ["offline"] * 2 + ["online"] * 6
    assert [(r["actor/diag_loss"] != "", r["actor/fmq_loss"] != "") for r in train] == [(True, False)] * 2 + [
        (False, True)] * 6  # the offline loss up to the phase switch, FMQ's after it
    evals = read_csv(run / "eval.csv")
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (10, "offline"), (20, "online"),
                                                            (40, "online")]
    assert [(float(r["success"]), float(r["length"])) for r in evals] == [(0.8, 6.2)] * 4
    assert [int(r["env_steps"]) for r in evals] == [0, 0, 10, 30]
    assert [int(r["env_steps"]) for r in train] == [0, 0, 5, 10, 15, 20, 25, 30]
    assert (final["step"], final["success"]) == (40, 0.8)


def recorder():
    """(log, calls): log(*a) appends a to calls."""
    calls = []
    return (lambda *a: calls.append(a)), calls


def test_log_train_row_writes_the_losses_episode_and_speed_of_the_step_just_taken(monkeypatch):
    """At step 11 of a run with 10 offline steps, 5 updates after the last row at t = 100 s and now 103 s: the row is
    online (the step just taken, 10, is the first online one), env_steps 1, sps 5 / 3 (1.7 in train.csv); TensorBoard
    gets the losses, the last episode and charts/SPS, W&B the losses and the episode. At step 10 the row is offline."""
    monkeypatch.setattr(fmq.time, "time", lambda: 103.0)
    (scalar, scalars), (wandb, wandbs), (train, rows) = recorder(), recorder(), recorder()
    run = SimpleNamespace(last_log=(6, 100.0), writer=SimpleNamespace(add_scalar=scalar), log_wandb=wandb,
                          log_train=train, last_ckpt=None)
    ep = dict(index=1, last={"env/episode_return": -3.0, "env/episode_success": 1.0})
    args = fmq.Args(offline_steps=10)
    phase, sps = fmq.log_train_row(run, args, 11, {"critic/loss": torch.tensor(0.5)}, ep)
    assert (phase, sps, run.last_log) == ("online", 5 / 3, (11, 103.0))
    logged = {"critic/loss": 0.5, "env/episode_return": -3.0, "env/episode_success": 1.0}
    assert scalars == [(k, v, 11) for k, v in logged.items()] + [("charts/SPS", 5 / 3, 11)]
    assert wandbs == [(logged, 11)]
    assert rows == [({**logged, "step": 11, "phase": "online", "env_steps": 1, "sps": 1.7},)]
    run.last_log = (5, 100.0)
    assert fmq.log_train_row(run, args, 10, {}, {})[0] == "offline" and rows[-1][0]["env_steps"] == 0


def test_evaluate_and_log_names_each_samplers_row_and_key(monkeypatch):
    """The run's sampler logs eval/success, each --extra-samplers one eval/success_<name>; eval.csv rows carry the
    phase (online once u_off exists), env_steps, the sampler's NFE and the time since the run's start (0.1 s)."""
    monkeypatch.setattr(fmq.time, "time", lambda: 112.345)
    success = {"onestep": 0.25, "qgbs": 0.75}
    monkeypatch.setattr(fmq, "evaluate", lambda agent, envs, args, sampler, reward, stop: dict(
        success=success[sampler], length=9.0))
    (scalar, scalars), (wandb, wandbs), (log_eval, rows) = recorder(), recorder(), recorder()
    run = SimpleNamespace(eval_envs=["env"], stop=[], log_eval=log_eval, t0=100.0, rewards=None, video_env=None,
                          writer=SimpleNamespace(add_scalar=scalar), log_wandb=wandb, last_log=None)
    args = fmq.Args(sampler="onestep", extra_samplers=("qgbs",), offline_steps=10, eval_episodes=4)
    got = fmq.evaluate_and_log(run, SimpleNamespace(u_off="frozen"), args, 30)
    assert got == success and run.last_log == (30, 112.345)
    assert scalars == [("eval/success", 0.25, 30), ("eval/success_qgbs", 0.75, 30)]
    assert wandbs == [({"eval/success": 0.25}, 30), ({"eval/success_qgbs": 0.75}, 30)]
    assert rows == [(dict(step=30, phase="online", sampler=s, env_steps=20, nfe=fmq.sampler_nfe(s, args), episodes=4,
                          time=12.3, success=success[s], length=9.0),) for s in ("onestep", "qgbs")]
    args.eval_envs, run.eval_envs, made = 3, None, []
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args: made.append((spec, env_args)) or "env")
    run.spec, run.env_args = "spec", "meta"
    fmq.evaluate_and_log(run, SimpleNamespace(u_off=None), args, 30)  # min(eval_envs, eval_episodes) envs, once
    fmq.evaluate_and_log(run, SimpleNamespace(u_off=None), args, 40)
    assert made == [("spec", "meta")] * 3 and run.eval_envs == ["env"] * 3 and rows[-1][0]["phase"] == "offline"
    stops, videos = [], []  # --video-episodes: the run's sampler, rendered in the video env, stoppable, written

    def evaluate(agent, envs, args, sampler, reward=None, frames=None, stop=()):
        stops.append(stop)
        if frames is not None:
            assert (envs, sampler) == (["video env"], "onestep")
            frames += [np.zeros((2, 2, 3), np.uint8)] * 3
        return dict(success=success[sampler], length=9.0)
    monkeypatch.setattr(fmq, "evaluate", evaluate)
    monkeypatch.setattr(fmq, "write_video", lambda path, frames, writer, log, s: videos.append((path, frames.shape, s)))
    args.video_episodes, run.video_env, run.dir = 1, "video env", Path("rundir")
    fmq.evaluate_and_log(run, SimpleNamespace(u_off=None), args, 50)
    assert all(s is run.stop for s in stops) and len(stops) == 3
    assert videos == [(Path("rundir/videos/step_000000050.mp4"), (3, 2, 2, 3), 50)]


def test_make_env_builds_robomimic_envs_from_the_files_metadata_and_ogbench_ones_rendering_only_when_asked(
        monkeypatch):
    import ogbench
    monkeypatch.setattr(fmq, "RoboMimicEnv", lambda *a: a)
    made = []
    monkeypatch.setattr(ogbench, "make_env_and_datasets", lambda name, **k: made.append((name, k)) or "env")
    assert fmq.make_env(fmq.env_spec("square"), {"env_name": "NutAssemblySquare"}) == (
        {"env_name": "NutAssemblySquare"}, 400, False)
    assert fmq.make_env(fmq.env_spec("can"), {"env_name": "PickPlaceCan"}, render=True)[1:] == (300, True)
    assert fmq.make_env(fmq.env_spec("scene-t5")) == "env"
    fmq.make_env(fmq.env_spec("cube-dbl-t3"), render=True)
    assert made == [("scene-play-singletask-task5-v0", dict(env_only=True)), (
        "cube-double-play-singletask-task3-v0", dict(env_only=True, render_mode="rgb_array", width=200, height=200))]
    assert fmq.VIDEO_SIZE == (200, 200)


def test_start_run_seeds_picks_the_device_sizes_the_buffer_and_refuses_bad_shapes_horizons_and_renderers(
        tmp_path, tiny_env, monkeypatch):
    """Python's, numpy's and torch's global RNGs seeded with --seed; --device auto: CUDA when there is one; the buffer
    check for dataset + online rows of 2 obs + action + reward + mask floats; one line for a dataset of other shapes,
    a horizon as long as the episode, and a video env that cannot render (naming MUJOCO_GL)."""
    checked, made, ids, loads = [], [], [], []
    spec = dict(suite="tiny", name="tiny", reward=None)
    monkeypatch.setattr(fmq, "env_spec", lambda env_id: ids.append(env_id) or spec)
    monkeypatch.setattr(fmq, "preallocation_check", lambda *a: checked.append(a))
    monkeypatch.setattr(fmq, "load_dataset", lambda *a: loads.append(a) or (tiny_dataset(), "meta"))
    monkeypatch.setattr(fmq, "make_env", lambda *a, **k: made.append((a, k)) or TinyEnv())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    run = fmq.start_run(tiny_env_args(tmp_path, seed=3, device="auto", dataset_dir="data/here"))
    assert made == [((spec, "meta"), {})] and (run.env_args, run.spec, ids, loads) == ("meta", spec, ["tiny"], [
        (spec, "data/here")])
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # JAX's GPU matmul precision
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # --deterministic on a GPU
    assert torch.are_deterministic_algorithms_enabled() and not torch.utils.deterministic.fill_uninitialized_memory
    assert (random.random(), np.random.random(), torch.rand(1).item()) == (
        random.Random(3).random(), np.random.RandomState(3).random(),
        torch.rand(1, generator=torch.Generator().manual_seed(3)).item())
    assert run.device == torch.device("cpu") or torch.cuda.is_available()
    assert checked == [(90, 2 * 3 + 2 + 2, run.device)] and (run.n_off, run.buffer.cap) == (60, 90)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an evaluation alone: no buffer on the device
    assert fmq.start_run(tiny_env_args(tmp_path, device="auto", offline_steps=0, online_steps=0,
                                       load_checkpoint="x.pt")).device == torch.device("cuda")
    assert fmq.start_run(tiny_env_args(tmp_path, device="cpu")).device == torch.device("cpu")  # as asked
    spec["suite"], loads[:] = "robomimic", []  # evaluating a RoboMimic checkpoint: its env comes from the dataset
    assert fmq.start_run(tiny_env_args(tmp_path, offline_steps=0, online_steps=0, load_checkpoint="x.pt")
                         ).env_args == "meta" and len(loads) == 1
    spec["suite"] = "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(fmq.FMQError, match=re.escape("--horizon 12 must be shorter than the episode (12 steps)")):
        fmq.start_run(tiny_env_args(tmp_path, horizon=12))
    with pytest.raises(fmq.FMQError, match=f"^--resume {tmp_path}: no checkpoint in {tmp_path}/checkpoints$"):
        fmq.start_run(tiny_env_args(tmp_path, resume=str(tmp_path)))
    (tmp_path / "checkpoints").mkdir()
    torch.save(dict(step=5), tmp_path / "checkpoints" / "step_000000005.pt")
    run = fmq.start_run(tiny_env_args(tmp_path, resume=str(tmp_path)))
    assert (run.resume_from, run.last_ckpt, run.ckpt) == ((tmp_path / "checkpoints" / "step_000000005.pt",) * 2 + (
        dict(step=5),))
    held = tmp_path / "runs" / "tiny__fmq__0"
    (held / "checkpoints").mkdir(parents=True)
    (held / "checkpoints" / "step_000000005.pt").write_bytes(b"")
    with pytest.raises(fmq.FMQError, match=f"^{held} already holds a run; continue it with --resume auto, or pick "
                                           f"another --exp-name$"):
        fmq.start_run(tiny_env_args(tmp_path))
    wide = dict(tiny_dataset(), actions=np.zeros((60, 3), np.float32))
    monkeypatch.setattr(fmq, "load_dataset", lambda spec, dataset_dir: (wide, "meta"))
    with pytest.raises(fmq.FMQError, match=re.escape("dataset shapes (obs (3,), actions (3,)) do not match env tiny "
                                                     "(obs (3,), actions (2,))")):
        fmq.start_run(tiny_env_args(tmp_path, exp_name="w"))

    class Headless(TinyEnv):
        def render(self):
            raise RuntimeError(" no display" + "." * 200)  # stripped, cut at 200 characters
    specs = []
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None, render=False: specs.append((spec, env_args)) or (
        Headless() if render else TinyEnv()))
    for gl, named in (("osmesa", "osmesa"), ("", "glfw")):
        monkeypatch.setenv("MUJOCO_GL", gl)
        with pytest.raises(fmq.FMQError, match=re.escape(f"--video-episodes: rendering with MUJOCO_GL={named} failed "
                                                         f"(RuntimeError: no display{'.' * 190}); headless, use "
                                                         "MUJOCO_GL=egl")):
            fmq.start_run(tiny_env_args(tmp_path, video_episodes=1, exp_name="v"))
    assert specs == [(spec, "meta")] * 4


def test_wandb_logger_keeps_its_run_id_and_last_step_and_a_resumed_run_sends_no_step_again(tmp_path, monkeypatch):
    """--track: wandb.init with the run's project, entity, group, name, id and config; every row is sent (a step's
    train and eval rows), its step written to wandb.json (atomically) first; a Path is sent as a video; a resumed run
    keeps the id and skips the steps its first part sent. Without --track nothing is sent or written."""
    calls = []
    fake = SimpleNamespace(init=lambda **k: calls.append(("init", k)), log=lambda row, step: calls.append((row, step)),
                           Video=lambda path: ("video", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert fmq.wandb_logger(fmq.Args(), tmp_path, False)({"a": 1}, 0) is None and not calls
    args = fmq.Args(track=True, wandb_project="p", wandb_entity="e", wandb_group="g")
    log = fmq.wandb_logger(args, tmp_path / "run1", False)
    (_, init), = calls
    assert re.fullmatch("[0-9a-f]{8}", init.pop("id"))
    assert init == dict(project="p", entity="e", group="g", name="run1", resume="allow",
                        config=dataclasses.asdict(args))
    (tmp_path / "run1").mkdir()
    log({"x": 1.0}, 0), log({"x": 2.0}, 0), log({"v": tmp_path / "a.mp4"}, 5)
    assert calls[1:] == [({"x": 1.0}, 0), ({"x": 2.0}, 0), ({"v": ("video", str(tmp_path / "a.mp4"))}, 5)]
    state = json.loads((tmp_path / "run1" / "wandb.json").read_text())
    assert state["step"] == 5 and sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["wandb.json"]
    del calls[:]
    log = fmq.wandb_logger(args, tmp_path / "run1", True)
    assert calls[0][1]["id"] == state["id"]
    log({"x": 3.0}, 5), log({"x": 4.0}, 6)
    assert calls[1:] == [({"x": 4.0}, 6)]
    assert fmq.wandb_logger(args, tmp_path / "run1", False) and calls[-1][1]["id"] != state["id"]  # a new run
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(fmq.FMQError, match=r"^--track logs to Weights & Biases: `pip install wandb` first$"):
        fmq.wandb_logger(args, tmp_path / "run1", False)


def test_progress_bar_shows_the_phase_speed_and_last_success(tmp_path, tiny_env, capsys):
    """tqdm's bar, on stderr: at each log row the phase of the step just taken, steps per second and the run's
    sampler's last success; at each evaluation the phase to come and the new success (TinyEnv: 0.8)."""
    fmq.main(tiny_env_args(tmp_path, offline_steps=10, online_steps=10, eval_interval=5))
    frames = re.findall(r"\| (\d+)/20 \[[^\]]*?(?:it/s|s/it)(?:, ([^\]]*?))?\s*\]", capsys.readouterr().err)
    shown = [(int(n), re.sub(r"sps=\d+", "sps=S", post)) for n, post in frames]
    row, ev = "phase={}, sps=S, success=0.8", "phase={}, success=0.8"
    assert shown == [(0, ""), (5, row.format("offline")), (5, ev.format("offline")), (10, row.format("offline")),
                     (10, ev.format("online")), (15, row.format("online")), (15, ev.format("online")),
                     (20, row.format("online")), (20, ev.format("online")), (20, ev.format("online"))]


def test_one_online_step_freezes_u_off_and_updates(tmp_path, tiny_env, capsys):
    fmq.main(tiny_env_args(tmp_path, offline_steps=2, online_steps=1))
    run = tmp_path / "runs" / "tiny__fmq__0"
    assert capsys.readouterr().out.splitlines()[0] == (f"fmq: run {run} on cpu, dataset 60 rows; 2 offline + 1 online "
                                                       f"steps (updates from online step 1), starting at step 0")
    ckpt = torch.load(run / "checkpoints" / "step_000000003.pt", weights_only=False)
    assert ckpt["u_off"] is not None and read_csv(run / "train.csv")[-1]["actor/fmq_loss"] != ""


def test_main_runs_on_the_threads_it_is_given(tmp_path, tiny_env):
    """--threads (default 1) sets torch's CPU threads at the start of a run, whatever they were."""
    torch.set_num_threads(2)
    try:
        fmq.main(tiny_env_args(tmp_path, offline_steps=2, online_steps=0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_the_phase_switch_evaluates_the_offline_agent_before_u_off_is_frozen(tmp_path, monkeypatch, tiny_env):
    """As the official main.py (it evaluates the offline agent at its last offline step, then switches): the
    evaluation at step 10, the phase switch, is the offline agent's, labelled offline, its critics aggregated as
    offline (mean; FMQ's online min after). Online from an offline checkpoint (--offline-steps 0): so at step 0."""
    seen, inside, real_eval, real_agg = [], [], fmq.evaluate, fmq.q_agg

    def evaluate(*a, **k):
        seen.append(set()), inside.append(True)
        try:
            return real_eval(*a, **k)
        finally:
            inside.pop()
    monkeypatch.setattr(fmq, "evaluate", evaluate)
    monkeypatch.setattr(fmq, "q_agg", lambda critic, how: (inside and seen[-1].add(how), real_agg(critic, how))[1])
    fmq.main(tiny_env_args(tmp_path))
    evals = read_csv(tmp_path / "runs" / "tiny__fmq__0" / "eval.csv")
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (10, "offline"), (20, "online"),
                                                            (40, "online")]
    assert seen == [{"mean"}, {"mean"}, {"min"}, {"min"}]
    fmq.main(tiny_env_args(tmp_path, exp_name="offline", online_steps=0))
    seen.clear()
    fmq.main(tiny_env_args(tmp_path, exp_name="loaded", offline_steps=0, online_steps=20, load_checkpoint=str(
        tmp_path / "runs" / "tiny__offline__0" / "checkpoints" / "step_000000010.pt")))
    evals = read_csv(tmp_path / "runs" / "tiny__loaded__0" / "eval.csv")
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (20, "online")]
    assert seen == [{"mean"}, {"min"}]


@pytest.mark.slow
def test_time_limit_truncation_is_stored_as_alive(tmp_path, ogbench_data, monkeypatch):
    """An episode cut by the time limit is not terminal: its transitions keep mask 1 (only env termination, i.e.
    success, gives mask 0), and the episode still ends there. Untrained policies do not solve scene in 20 steps."""
    import ogbench
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None: ogbench.make_env_and_datasets(
        spec["name"], env_only=True, max_episode_steps=20))
    stored, real_add = [], fmq.ReplayBuffer.add
    monkeypatch.setattr(fmq.ReplayBuffer, "add", lambda self, *row: stored.append(row[3:]) or real_add(self, *row))
    fmq.main(tiny_args(tmp_path, ogbench_data("scene-play-v0"), env_id="scene-t4", offline_steps=5, online_steps=30,
                       eval_interval=1000, eval_episodes=1, eval_envs=1))
    masks, ends = np.array([m for m, _, _ in stored]), np.array([e for _, _, e in stored])
    assert len(stored) == 30 and ends.sum() == 1 and ends[19]  # one time-limit end, after 20 steps
    assert (masks == 1.0).all()


@pytest.mark.slow
@pytest.mark.parametrize("utd", [1, 3])
def test_utd_ratio_is_k_updates_per_online_step_each_on_its_own_batch(tmp_path, monkeypatch, ogb, utd):
    """Official utd_ratio: after the warm-up, K updates per online env step, each on a fresh batch; offline one per
    step. 5 offline and 10 online steps, start_training 4: 5 + 7 K updates, which both Adams count (K = 1: the
    loop as before, see test_no_online_update_before_start_training)."""
    real, calls = fmq.update, []

    def counting(agent, batch, step, *a):
        calls.append((int(step), float(batch["obs"].sum())))
        return real(agent, batch, step, *a)
    monkeypatch.setattr(fmq, "update", counting)
    short_episodes(monkeypatch, 12)  # quick evaluations
    fmq.main(tiny_args(tmp_path, ogb, offline_steps=5, online_steps=10, start_training=4, eval_interval=100,
                       log_interval=5, utd_ratio=utd))
    assert [s for s, _ in calls] == [0, 1, 2, 3, 4] + [s for s in range(8, 15) for _ in range(utd)]
    assert len({batch for _, batch in calls}) == len(calls)  # no batch used twice
    ckpt = torch.load(tmp_path / "runs" / "scene-t5__fmq__0" / "checkpoints" / "step_000000015.pt",
                      weights_only=False)
    for opt in ("actor_opt", "critic_opt"):
        assert {float(s["step"]) for s in ckpt[opt]["state"].values()} == {5 + 7 * utd}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_utd_ratio_with_cudagraphs_replays_k_updates_per_online_step(tmp_path, ogb):
    """--cudagraphs: each of the K updates is a replay of the captured one; the capturable Adams count 5 + 7 K."""
    fmq.main(tiny_args(tmp_path, ogb, device="cuda", cudagraphs=True, deterministic=False, offline_steps=5,
                       online_steps=10, start_training=4, eval_interval=100, log_interval=5, utd_ratio=3))
    ckpt = torch.load(tmp_path / "runs" / "scene-t5__fmq__0" / "checkpoints" / "step_000000015.pt",
                      map_location="cpu", weights_only=False)
    for opt in ("actor_opt", "critic_opt"):
        assert {float(s["step"]) for s in ckpt[opt]["state"].values()} == {5 + 7 * 3}


@pytest.mark.slow
def test_dataset_proportion_keeps_the_first_rows(tmp_path, monkeypatch, ogb):
    """Official dataset_proportion: the first int(rows * p) rows (597 rows loaded, p 0.35: 208), every field alike."""
    real, seen = fmq.ReplayBuffer, []
    monkeypatch.setattr(fmq, "ReplayBuffer", lambda data, *a: seen.append(dict(data)) or real(data, *a))
    short_episodes(monkeypatch, 12)  # a quick evaluation
    fmq.main(tiny_args(tmp_path, ogb, dataset_proportion=0.35, offline_steps=2, online_steps=0, eval_episodes=1,
                       eval_envs=1))
    full, _ = fmq.load_dataset(fmq.env_spec("scene-t5"), ogb)
    assert len(full["observations"]) == 597 and {len(v) for v in seen[0].values()} == {208}
    for k in ("observations", "actions", "next_observations", "masks", "ends"):
        assert np.array_equal(seen[0][k], full[k][:208]), k
    with pytest.raises(fmq.FMQError, match="--dataset-proportion must be in"):
        fmq.main(tiny_args(tmp_path, ogb, dataset_proportion=0.0))


def test_main_flags_act_in_their_phase_only(tmp_path, tiny_env):
    """On main: an online flag (acting sampler, UTD ratio, start of training, QGBS settings when QGBS acts) leaves the
    pretrained networks bit-identical and changes the final ones; evaluation samplers and QGBS settings that no
    sampler uses change no network; the data flags (sparse, dataset_proportion) change the offline phase already."""
    nets, evals = tiny_flag_run(tmp_path, "base")
    for name, kw, offline, online in [
            ("ts", dict(train_sampler="onestep"), False, True), ("utd", dict(utd_ratio=2), False, True),
            ("st", dict(start_training=6), False, True), ("tsq", dict(train_sampler="qgbs"), False, True),
            ("sp", dict(sparse=True), True, True), ("dp", dict(dataset_proportion=0.5), True, True),
            ("qm", dict(qgbs_m=2, qgbs_k=2, qgbs_completion="flow-map"), False, False),
            ("smp", dict(sampler="onestep"), False, False), ("xs", dict(extra_samplers=("qgbs",)), False, False)]:
        other, other_evals = tiny_flag_run(tmp_path, name, **kw)
        assert torch.equal(nets[4], other[4]) != offline, name
        assert torch.equal(nets[12], other[12]) != online, name
        if name == "qm":  # QGBS settings, no QGBS sampler: the same run to the last logged number
            assert other_evals == evals
    ts_q, _ = tiny_flag_run(tmp_path, "tsq2", train_sampler="qgbs", qgbs_m=2)  # QGBS acting online: its settings act
    tsq, _ = tiny_flag_run(tmp_path, "tsq3", train_sampler="qgbs")
    assert torch.equal(ts_q[4], tsq[4]) and not torch.equal(ts_q[12], tsq[12])
    _, xs_evals = tiny_flag_run(tmp_path, "xs2", extra_samplers=("qgbs",))
    assert [r for r in xs_evals if r["sampler"] == "best-of-n"] == evals  # the run's own rows unchanged
    assert [r["sampler"] for r in xs_evals] == ["best-of-n", "qgbs"] * 3
    assert all(r["nfe"] == "20" for r in xs_evals[1::2])


# ---------------------------------------------------------------- plumbing: envs, datasets, loaders, ENVS table
def test_sparse_flag_composes_with_the_env_table_reward():
    """Official main.py: robomimic r - 1, then --sparse (r != 0) * -1, for any task; without it the table's."""
    rm, cube, scene1 = (fmq.env_spec(e) for e in ("can", "cube-dbl-t3", "scene-play-singletask-task1-v0"))
    np.testing.assert_array_equal(fmq.reward_fn(rm, True)(np.array([1.0, 0.0])), [0.0, -1.0])
    np.testing.assert_array_equal(fmq.reward_fn(rm, False)(np.array([1.0, 0.0])), [0.0, -1.0])
    np.testing.assert_array_equal(fmq.reward_fn(cube, False)(np.array([-2.0, 0.0])), [-2.0, 0.0])
    np.testing.assert_array_equal(fmq.reward_fn(cube, True)(np.array([-2.0, -1.0, 0.0])), [-1.0, -1.0, 0.0])
    np.testing.assert_array_equal(fmq.reward_fn(scene1, True)(np.array([-3.0, 0.0])), [-1.0, 0.0])


def test_dataset_actions_are_clipped_as_the_official_loaders(monkeypatch):
    """Q-chunking's env_utils.make_env_and_datasets clips dataset actions to +-(1 - 1e-5), for every suite."""
    import ogbench
    raw = dict(observations=np.zeros((3, 2), np.float32), actions=np.array([[1.0], [-1.0], [0.5]], np.float32),
               terminals=np.array([0, 0, 1], np.float32))
    monkeypatch.setattr(ogbench, "make_env_and_datasets", lambda *a, **k: (None, dict(raw), None))
    data, _ = fmq.load_dataset(fmq.env_spec("scene-t5"), "/nonexistent")
    np.testing.assert_array_equal(data["actions"][:, 0], np.float32([1 - 1e-5, -1 + 1e-5, 0.5]))
    np.testing.assert_array_equal(data["ends"], raw["terminals"])


def test_env_table_and_unknown_id():
    assert fmq.env_spec("scene-t5")["name"] == "scene-play-singletask-task5-v0"
    assert fmq.env_spec("hmaze-med-t3")["name"] == "humanoidmaze-medium-navigate-singletask-task3-v0"
    # official README table: the mazes are sparse; main.py / config.yaml: discount 0.99 and mean offline for every task
    assert fmq.env_spec("amaze-gnt-t4") == dict(suite="ogbench", name="antmaze-giant-navigate-singletask-task4-v0",
                                                reward="sparse")
    assert (fmq.Args().discount, fmq.Args().offline_q_agg) == (0.99, "mean")
    aggs = {t: [fmq.critic_agg(fmq.Args(online_target=t), online) for online in (False, True)]
            for t in ("fmq", "mvp", "flow-map")}
    assert aggs == {"fmq": ["mean", "min"], "mvp": ["mean", "mean"], "flow-map": ["mean", "mean"]}
    assert fmq.critic_agg(fmq.Args(online_target="flow-map", online_q_agg="min"), True) == "min"
    # sparse = (r != 0) * -1: scene's dense -3..0 becomes -1 / 0; the navigate tasks' -1 / 0 is left as it is
    np.testing.assert_array_equal(fmq.REWARDS["sparse"](np.array([-3.0, -1.0, 0.0])), [-1.0, -1.0, 0.0])
    assert fmq.env_spec("puzzle-3x3-play-singletask-task1-v0")["reward"] is None
    assert len(fmq.ENVS) == 12
    with pytest.raises(fmq.FMQError, match="did you mean 'scene-t5'.*valid ids: can, square"):
        fmq.env_spec("scene-t55")
    with pytest.raises(fmq.FMQError, match="^unknown env id 'qqq'; valid ids: can, square, "):  # nothing close
        fmq.env_spec("qqq")


def test_missing_ogbench_dataset_names_the_path(tmp_path, monkeypatch):
    import urllib.error
    import ogbench.utils

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(ogbench.utils, "download_datasets", no_network)
    with pytest.raises(fmq.FMQError, match=f"{tmp_path}/cube-triple-play-v0.npz is missing.*download_datasets.*"
                       f"mirror zhouzypaul/ogbench_datasets.*tools/make_dataset.py --env cube-triple-play-v0 "
                       f"--out {tmp_path}"):
        fmq.load_dataset(fmq.env_spec("cube-trl-t3"), str(tmp_path))


@pytest.mark.slow
def test_dataset_that_does_not_match_the_env(tmp_path, ogb):
    os.symlink(Path(ogb) / "scene-play-v0.npz", tmp_path / "cube-double-play-v0.npz")
    os.symlink(Path(ogb) / "scene-play-v0-val.npz", tmp_path / "cube-double-play-v0-val.npz")
    with pytest.raises(fmq.FMQError, match=r"dataset shapes \(obs \(40,\).*do not match env"):
        fmq.main(tiny_args(tmp_path, tmp_path, env_id="cube-dbl-t3"))


@pytest.mark.slow
def test_robomimic_guard_separates_v15_files_from_robosuite_14_ones_and_other_controllers(rm_data):
    import h5py
    v15, v141 = rm_data
    for task, (env_name, _) in RM_TASKS.items():
        with h5py.File(rm_file(v15, task)) as f:
            env_args = json.loads(f["data"].attrs["env_args"])
            ok = fmq.robomimic_mismatch(f, fmq.RoboMimicEnv(env_args, 50))
            slack = json.loads(f["data"].attrs["env_args"])
            slack["env_kwargs"]["controller_configs"]["body_parts"]["right"]["kp"] = 75  # robomimic #230: same obs,
            slack = fmq.robomimic_mismatch(f, fmq.RoboMimicEnv(slack, 50))                # other actions
        with h5py.File(rm_file(v141, task)) as f:
            old = fmq.robomimic_mismatch(f, fmq.RoboMimicEnv(json.loads(f["data"].attrs["env_args"]), 50))
        print(f"{task}: v1.5 file {ok}; robosuite 1.4.1 file {old}; kp 150 -> 75 {slack}")
        # obs: extracted from these very states by this robosuite, so equal up to rounding; the 1.4.1 order puts
        # positions (0.1 - 1 m) where 1.5 has poses relative to the gripper. Each side 30x from the tolerance.
        assert ok["obs"] < fmq.RM_TOL["obs"] / 30 and old["obs"] > 30 * fmq.RM_TOL["obs"]
        # replay: the same controller replays its own actions to well under 1% of the motion; 1.4.1's OSC config,
        # converted, means the same actions; half the gain moves the gripper ~25% otherwise (measured 0.245 on can).
        assert ok["replay"] < 0.01 and old["replay"] < 0.01 and slack["replay"] > 2 * fmq.RM_TOL["replay"]
        assert ok["reward"] == old["reward"] == slack["reward"] == 0.0 and slack["obs"] == ok["obs"]
    shared141 = DATA / "robomimic"  # robosuite-1.4.1 files, where a checkout has them beside it
    if (shared141 / "can" / "mh" / "low_dim_v15.hdf5").exists():
        with pytest.raises(fmq.FMQError, match=r"made with robosuite 1\.4\.1; the installed 1\.5\.\d+ does not repr"):
            fmq.load_dataset(fmq.env_spec("can"), str(shared141))


@pytest.mark.slow
def test_robomimic_rewards_or_an_env_that_cannot_be_built_stop_the_run(rm_data, tmp_path):
    import h5py
    import shutil
    path = rm_file(tmp_path, "can")
    path.parent.mkdir(parents=True)
    shutil.copy(rm_file(rm_data[0], "can"), path)
    with h5py.File(path, "a") as f:
        assert f["data/demo_0/rewards"][-1] == 1.0  # demo 0 ends solved: the env's reward() says 1 there
        f["data/demo_0/rewards"][:] = 0.0
    with pytest.raises(fmq.FMQError, match=r"does not reproduce it: .* rewards by 1 \(tolerances"):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))
    with h5py.File(path, "a") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] = "OSC_WARP"
        f["data"].attrs["env_args"] = json.dumps(env_args)
    unbuildable = r"made with robosuite 1\.5\.\d+; the installed 1\.5\.\d+ cannot rebuild its env \(\w+Error: "
    with pytest.raises(fmq.FMQError, match=unbuildable + r".*\); use robomimic's v1\.5 file"):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))


@pytest.mark.slow
def test_robomimic_env_built_from_the_file(rm_data):
    import h5py
    spec = fmq.env_spec("can")
    data, env_args = fmq.load_dataset(spec, str(rm_data[0]))
    assert data["observations"].shape == (4 * 48, 23) and data["actions"].shape == (4 * 48, 7)
    env = fmq.make_env(spec, env_args)
    assert env.reset(seed=1)[0].shape == (23,) and env.action_space.shape == (7,)
    np.testing.assert_array_equal(env.reset(seed=1)[0], env.reset(seed=1)[0])  # robosuite places the can by the seed
    assert np.abs(env.reset(seed=1)[0] - env.reset(seed=2)[0]).max() > 1e-3
    assert env.step(np.zeros(7))[1:3] == (0.0, False)  # a fresh can is not in its bin
    with h5py.File(rm_file(rm_data[0], "can")) as f:  # the last state of demo 0 has the can in its bin
        env.env.sim.set_state_from_flattened(f["data/demo_0/states"][-1])
    env.env.sim.forward()
    _, r, terminated, _, info = env.step(np.r_[0, 0, 1, 0, 0, 0, 0])
    assert (r, terminated, info["success"]) == (1.0, True, True)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["can", "square"])
def test_robomimic_end_to_end(rm_data, task, tmp_path, monkeypatch):
    monkeypatch.setitem(fmq.ENVS, task, {**fmq.ENVS[task], "max_episode_steps": 40})  # short episodes, same code
    data_dir = rm_data[0]
    if task == "square":  # the layout hf_hub_download(..., local_dir=DIR) leaves: DIR/v1.5/square/mh/...
        data_dir = tmp_path / "hf"
        data_dir.mkdir()
        os.symlink(rm_data[0], data_dir / "v1.5")
    final = fmq.main(tiny_args(tmp_path, data_dir, env_id=task, offline_steps=10, online_steps=10,
                               eval_interval=10))
    run = tmp_path / "runs" / f"{task}__fmq__0"
    evals = read_csv(run / "eval.csv")
    assert final["step"] == 20 and [(int(r["step"]), r["phase"]) for r in evals] == [
        (0, "offline"), (10, "offline"), (20, "online")]
    assert all(0.0 <= float(r["success"]) <= 1.0 and np.isfinite(float(r["return_env"])) for r in evals)
    for r in evals:  # robomimic trains on r - 1 (ENVS table): one less per step
        assert float(r["return_train"]) == pytest.approx(float(r["return_env"]) - float(r["length"]))
    assert all(np.isfinite(float(r["critic/loss"])) for r in read_csv(run / "train.csv"))


@pytest.mark.slow
def test_robomimic_dones_end_chunks_as_the_official_terminals(rm_data, tmp_path):
    """Official robomimic loader: terminals = dones (and masks = 1 - dones), so a done inside a demo ends chunks there
    too; each demo's last step ends them anyway."""
    import h5py
    import shutil
    path = rm_file(tmp_path, "can")
    path.parent.mkdir(parents=True)
    shutil.copy(rm_file(rm_data[0], "can"), path)
    with h5py.File(path, "r+") as f:
        dones = f["data/demo_1/dones"][:]
        dones[10] = 1
        f["data/demo_1/dones"][...] = dones
        dones = [f[f"data/demo_{i}/dones"][:] for i in range(len(f["data"]))]  # demo 0 (solved): 1 from success on
    data, _ = fmq.load_dataset(fmq.env_spec("can"), tmp_path)
    ends = set(np.flatnonzero(data["ends"]).tolist())
    assert ends == set(np.flatnonzero(np.concatenate(dones)).tolist()) | {int(n) - 1 for n in np.cumsum(
        [len(d) for d in dones])}
    assert len(dones[0]) + 10 in ends and data["masks"][len(dones[0]) + 10] == 0.0


@pytest.mark.slow
def test_robomimic_file_of_another_robosuite_stops_before_training(rm_data, tmp_path):
    code, err = run_cli("--env-id", "can", "--dataset-dir", str(rm_data[1]), "--runs-dir", str(tmp_path))
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fmq: error: ") and "made with robosuite 1.4.1; the installed 1.5" in line
    assert "does not reproduce it: observations of its states are off by" in line and "hf_hub_download" in line
    assert not list(tmp_path.rglob("train.csv")) and not list(tmp_path.rglob("*.pt"))  # no update ran


@pytest.mark.slow
def test_robomimic_wrong_observation_keys(rm_data, tmp_path):
    import h5py
    import shutil
    path = rm_file(tmp_path, "can")
    path.parent.mkdir(parents=True)
    shutil.copy(rm_file(rm_data[0], "can"), path)
    with h5py.File(path, "a") as f:
        for demo in f["data"]:
            del f[f"data/{demo}/obs/object"]
    with pytest.raises(fmq.FMQError, match=r"lacks observation keys \['object'\]"):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))


def test_missing_robomimic_dataset_names_the_path_and_the_v15_download(tmp_path, monkeypatch):
    with pytest.raises(fmq.FMQError, match=rf"not found at {tmp_path}/square/mh/low_dim_v15.hdf5; use robomimic's "
                       r"v1.5 file.*hf_hub_download\('robomimic/robomimic_datasets', 'v1.5/square/mh/low_dim_v15"):
        fmq.load_dataset(fmq.env_spec("square"), str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # without --dataset-dir: ~/.robomimic (docs/environments.md)
    with pytest.raises(fmq.FMQError, match=f"not found at {tmp_path}/.robomimic/can/mh/low_dim_v15.hdf5; ") as e:
        fmq.load_dataset(fmq.env_spec("can"), None)
    assert f"repo_type='dataset', local_dir='{tmp_path}/.robomimic')" in str(e.value)  # the download goes there


@pytest.mark.parametrize("given", [True, False])
def test_a_missing_dataset_leaves_no_folder_and_offers_dataset_dir_only_if_not_given(tmp_path, monkeypatch, given):
    import urllib.error
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    root = tmp_path / "data" / "ogbench" if given else tmp_path / "home" / ".ogbench" / "data"
    with pytest.raises(fmq.FMQError, match=f"{root}/scene-play-v0.npz is missing") as e:
        fmq.load_dataset(fmq.env_spec("scene-t5"), str(root) if given else None)
    assert str(e.value).endswith("(manipulation datasets only)" if given else "; or pass --dataset-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and not any((tmp_path / "home").iterdir())


def test_a_failed_download_keeps_the_files_it_left(tmp_path, monkeypatch):
    """Only folders the download made and left empty are removed; one holding a partial file stays as it is."""
    import ogbench

    def partial(name, dataset_dir, **k):
        Path(dataset_dir).mkdir(parents=True)
        (Path(dataset_dir) / "scene-play-v0.npz.part").write_bytes(b"12")
        raise ConnectionResetError("reset by peer")
    monkeypatch.setattr(ogbench, "make_env_and_datasets", partial)
    root = tmp_path / "a" / "b"
    with pytest.raises(fmq.FMQError, match=re.escape(f"{root}/scene-play-v0.npz is missing and could not be "
                                                     "downloaded (reset by peer)")):
        fmq.load_dataset(fmq.env_spec("scene-t5"), str(root))
    assert [p.name for p in root.iterdir()] == ["scene-play-v0.npz.part"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MADE))
def test_made_ogbench_data_loads_with_qpos_aligned_to_observations(ogbench_data, name):
    root = Path(ogbench_data(name))
    f = np.load(root / f"{name}.npz")
    # The cube's / the agent's position is both in the observation and in qpos, which the loader relabels from:
    # manipulation obs[19:22] = 10 (block xyz - (0.425, 0, 0)) with the block at qpos[14:17]; mazes obs[:2] = qpos[:2].
    pos = f["observations"][:, 19:22] / 10 + [0.425, 0, 0] if "maze" not in name else f["observations"][:, :2]
    np.testing.assert_allclose(pos, f["qpos"][:, 14:17] if "maze" not in name else f["qpos"][:, :2], atol=1e-5)
    env_id = next(k for k, v in fmq.ENVS.items() if v["name"].startswith(name.replace("-v0", "-singletask")))
    data, _ = fmq.load_dataset(fmq.env_spec(env_id), str(root))
    # non-compact OGBench data: each episode of 200 rows gives 199 transitions, the last one ending the episode
    assert data["observations"].shape == (EPISODES * (EPISODE_STEPS - 1), MADE[name])
    assert np.flatnonzero(data["ends"]).tolist() == [199 * i - 1 for i in range(1, EPISODES + 1)]
    np.testing.assert_array_equal(data["next_observations"][:198], data["observations"][1:199])
    # singletask relabelling from qpos (and button states): reward = -(parts of the task not solved), mask 0 where
    # all are; scene tasks have 5 parts (cube, 2 buttons, drawer, window), cube tasks one per cube, mazes one
    parts = {"scene-play-v0": 5, "cube-double-play-v0": 2, "cube-triple-play-v0": 3}.get(name, 1)
    assert set(np.unique(data["rewards"])) <= set(range(-parts, 1))
    assert ((data["rewards"] == 0) == (data["masks"] == 0)).all()
    if name == "scene-play-v0":  # the oracles change the scene: the number of solved parts varies along the data
        assert len(np.unique(data["rewards"])) > 1


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["scene-t4", "cube-dbl-t4", "cube-trl-t3", "hmaze-med-t3", "amaze-gnt-t4"])
def test_tiny_run_on_each_ogbench_suite(tmp_path, ogbench_data, monkeypatch, env_id):
    """Every OGBench suite of the paper's table, end to end on made data; episodes cut to 40 steps with gymnasium's
    own time limit (the real env, only shorter), so that evaluation takes seconds."""
    import ogbench
    spec = fmq.env_spec(env_id)
    dataset = "-".join(p for p in spec["name"].split("-") if p != "singletask" and not p.startswith("task"))
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None: ogbench.make_env_and_datasets(
        spec["name"], env_only=True, max_episode_steps=40))
    final = fmq.main(tiny_args(tmp_path, ogbench_data(dataset), env_id=env_id, offline_steps=10, online_steps=10,
                               eval_interval=1000, eval_episodes=1, eval_envs=1))
    run = tmp_path / "runs" / f"{env_id}__fmq__0"
    evals = read_csv(run / "eval.csv")
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (10, "offline"), (20, "online")]
    assert [float(r["length"]) for r in evals] == [40.0] * 3  # untrained policies do not solve a task in 40 steps
    assert final["step"] == 20 and final["success"] == 0.0
    assert json.loads((run / "config.json").read_text())["discount"] == 0.99  # official: 0.99 for every task


def test_load_ogbench_masks_from_success_ends_from_terminals(tmp_path):
    """A 2-trajectory antmaze-giant file in OGBench's format (<name>.npz, <name>-val.npz; a trajectory's last row is
    its final observation, terminal 1). ogbench's own loader drops that row, shifts next_observations and terminals,
    and relabels singletask rewards and masks from qpos: success (qpos xy within 0.5 of task 4's goal (44, 16)) gives
    reward 0 and mask 0, anywhere in a trajectory. `ends` are the shifted terminals, not 1 - masks."""
    import ogbench  # noqa: F401 (registers the envs)
    lengths, goal = (6, 5), np.array([44.0, 16.0])
    n = sum(lengths)
    obs = np.arange(n * 29, dtype=np.float32).reshape(n, 29)
    terminals = np.zeros(n, np.float32)
    terminals[np.cumsum(lengths) - 1] = 1
    qpos = np.zeros((n, 15), np.float32)
    qpos[:, :2] = [0.0, 0.0]
    qpos[2, :2], qpos[7, :2] = goal, goal + 0.3  # successes at rows 2 (trajectory 1) and 7 (trajectory 2)
    file = dict(observations=obs, actions=np.full((n, 8), 0.5, np.float32), terminals=terminals, qpos=qpos,
                qvel=np.zeros((n, 14), np.float32))
    for suffix in ("", "-val"):
        np.savez(tmp_path / f"antmaze-giant-navigate-v0{suffix}.npz", **file)
    data, env_args = fmq.load_ogbench(fmq.env_spec("amaze-gnt-t4"), str(tmp_path))
    keep = np.flatnonzero(terminals == 0)  # rows 0-4 and 6-9
    assert env_args is None and len(data["observations"]) == 9
    np.testing.assert_array_equal(data["observations"], obs[keep])
    np.testing.assert_array_equal(data["next_observations"], obs[keep + 1])
    np.testing.assert_array_equal(data["masks"], [1, 1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(data["rewards"], [-1, -1, 0, -1, -1, -1, 0, -1, -1])
    np.testing.assert_array_equal(data["ends"], [0, 0, 0, 0, 1, 0, 0, 0, 1])
    buf = fmq.ReplayBuffer(data, 9, 2, "cpu")  # chunks of 2 end at each trajectory's end, not at a success
    assert sorted(buf.starts_host[:buf.n_starts].tolist()) == [0, 1, 2, 3, 5, 6, 7]


def test_load_robomimic_key_order_demo_order_masks_and_ends(tmp_path, monkeypatch):
    """Official QC robomimic loader: demos in numeric order (demo_2 before demo_10), observations the low-dim keys
    joined in RM_KEYS order (eef_pos, eef_quat, gripper_qpos, object; other keys left out), masks = 1 - dones,
    terminals = dones, and each demo's last step ends chunks. The env guard is stubbed (its own tests are slow)."""
    monkeypatch.setattr(fmq, "RoboMimicEnv", lambda env_args, limit, render=False: ("env", env_args, limit))
    guarded = []
    monkeypatch.setattr(fmq, "robomimic_mismatch", lambda f, env: (guarded.append((f.filename, env)),
                                                                   dict(obs=0, replay=0, reward=0))[1])
    sizes = dict(robot0_eef_pos=3, robot0_eef_quat=4, robot0_gripper_qpos=2, object=5, robot0_joint_pos=7)
    base = dict(robot0_eef_pos=100, robot0_eef_quat=200, robot0_gripper_qpos=300, object=400, robot0_joint_pos=900)

    def demo(i, dones):
        n = len(dones)
        ob = {k: base[k] + 10 * i + np.arange(n, dtype=np.float32)[:, None] + np.zeros((1, s), np.float32)
              for k, s in sizes.items()}
        return dict(obs=ob, next_obs={k: v + 0.5 for k, v in ob.items()}, actions=np.full((n, 7), i / 100, np.float32),
                    rewards=np.float32(dones), dones=np.float32(dones), states=np.zeros((n, 3)))
    demos = {"demo_10": demo(10, [0, 0, 0]), "demo_2": demo(2, [0, 1, 0, 1]), "demo_1": demo(1, [0, 0])}
    env_args = dict(env_name="PickPlaceCan", env_version="1.5.1", env_kwargs={})
    write_robomimic(tmp_path / "can" / "mh" / "low_dim_v15.hdf5", demos, env_args)
    data, got_args = fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))
    assert got_args == env_args and guarded == [(str(tmp_path / "can" / "mh" / "low_dim_v15.hdf5"), ("env", env_args,
                                                                                                   300))]
    order = [1] * 2 + [2] * 4 + [10] * 3
    t = [0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert data["observations"].shape == (9, 14)
    for j, (i, step) in enumerate(zip(order, t)):
        want = np.concatenate([np.full(sizes[k], base[k] + 10 * i + step) for k in fmq.RM_KEYS])
        np.testing.assert_array_equal(data["observations"][j], want)
        np.testing.assert_array_equal(data["next_observations"][j], want + 0.5)
        np.testing.assert_allclose(data["actions"][j], i / 100)
    np.testing.assert_array_equal(data["masks"], [1, 1, 1, 0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(data["rewards"], [0, 0, 0, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(data["ends"], [0, 1, 0, 1, 0, 1, 0, 0, 1])
    assert all(v.dtype == np.float32 for v in data.values())  # as the official loader's
    assert fmq.RM_KEYS == ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    (tmp_path / "v1.5").mkdir()  # hf_hub_download's layout: <root>/v1.5/<task>/mh/low_dim_v15.hdf5
    (tmp_path / "can").rename(tmp_path / "v1.5" / "can")
    np.testing.assert_array_equal(fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))[0]["ends"], data["ends"])
    monkeypatch.setattr(fmq, "robomimic_mismatch", lambda f, env: dict(fmq.RM_TOL))  # errors at the tolerances pass
    assert len(fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))[0]["ends"]) == 9
    monkeypatch.setattr(fmq, "robomimic_mismatch", lambda f, env: dict(obs=0, replay=0.2, reward=0))
    with pytest.raises(fmq.FMQError, match="does not reproduce it"):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))
    demos["demo_1"]["obs"].pop("object")  # the first demo (numeric order) lacks a key
    write_robomimic(tmp_path / "bare" / "can" / "mh" / "low_dim_v15.hdf5", demos, env_args)
    keys = "['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object']"
    with pytest.raises(fmq.FMQError, match=re.escape("lacks observation keys ['object'] (it has ['robot0_eef_pos', "
                                                     f"'robot0_eef_quat', 'robot0_gripper_qpos', 'robot0_joint_pos']); "
                                                     f"FMQ needs the low-dim keys {keys}")):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path / "bare"))
    monkeypatch.setattr(fmq, "RoboMimicEnv", lambda env_args, limit, render=False: {}["no robot"])
    with pytest.raises(fmq.FMQError, match=re.escape("was made with robosuite 1.5.1; the installed ") + r"[\d.]+ "
                       + re.escape("cannot rebuild its env (KeyError: \"'no robot'\"); use robomimic's v1.5 file")):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))

    def long_error(env_args, limit, render=False):
        raise ValueError("  " + "x" * 199 + "yz  ")  # stripped, then cut at 200 characters
    monkeypatch.setattr(fmq, "RoboMimicEnv", long_error)
    with pytest.raises(fmq.FMQError, match=re.escape("(ValueError: '" + "x" * 199 + "y'); use robomimic's")):
        fmq.load_dataset(fmq.env_spec("can"), str(tmp_path))


def test_env_table_limits_and_rewards_match_their_sources():
    """RoboMimic episode limits: Q-chunking's envs/robomimic_utils.py `_get_max_episode_length` (can 300, square
    400), which the official FMQ code imports. OGBench ids: the names ogbench registers (their limits come from the
    registered env spec: scene 750, cube-double 500, cube-triple 1000, humanoidmaze-medium 2000, antmaze-giant 1000).
    Rewards (official README table / main.py): scene and the mazes sparse, can and square r - 1, cube the env's."""
    import gymnasium
    import ogbench  # noqa: F401 (registers the envs)
    assert {k: v.get("max_episode_steps") for k, v in fmq.ENVS.items() if v["suite"] == "robomimic"} == dict(
        can=300, square=400)
    limits = {"scene": 750, "cube-double": 500, "cube-triple": 1000, "humanoidmaze-medium": 2000, "antmaze-giant": 1000}
    r = np.array([-3.0, -1.0, 0.0, 1.0])
    for env_id, spec in fmq.ENVS.items():
        assert spec == fmq.env_spec(env_id)
        if spec["suite"] == "robomimic":
            assert spec["name"] == env_id and spec["reward"] == "minus_one"
            np.testing.assert_array_equal(fmq.reward_fn(spec, False)(r), r - 1)
            continue
        parts = spec["name"].split("-")
        env_name = "-".join(parts[:parts.index("singletask") - 1] + parts[parts.index("singletask"):])
        family = "-".join(parts[:parts.index("singletask") - 1])
        assert gymnasium.spec(env_name).max_episode_steps == limits[family], env_id
        sparse = family.startswith(("scene", "humanoidmaze", "antmaze"))
        assert spec["reward"] == ("sparse" if sparse else None), env_id
        np.testing.assert_array_equal(fmq.reward_fn(spec, False)(r), [-1, -1, 0, -1] if sparse else r)
        np.testing.assert_array_equal(fmq.reward_fn(spec, True)(r), [-1, -1, 0, -1])
    assert [k for k in fmq.ENVS if fmq.ENVS[k]["suite"] == "ogbench"] == [
        "cube-dbl-t3", "cube-dbl-t4", "cube-trl-t3", "cube-trl-t4", "scene-t4", "scene-t5", "hmaze-med-t3",
        "hmaze-med-t4", "amaze-gnt-t4", "amaze-gnt-t5"]
    assert [fmq.ENVS[k]["name"].split("-task")[1] for k in fmq.ENVS if k not in ("can", "square")] == [
        "3-v0", "4-v0", "3-v0", "4-v0", "4-v0", "5-v0", "3-v0", "4-v0", "4-v0", "5-v0"]


def test_any_ogbench_singletask_id_gets_the_ogbench_spec_and_qgbs_keeps_the_papers_defaults():
    """An id outside the table is an OGBench singletask env with its own reward; qgbs.py called alone uses the
    paper's best setting (M 4, K 1, B 4) and the official evaluation's rho 1.5, eta 0.3, Alg. 2's K = 0."""
    import inspect
    name = "puzzle-3x3-play-singletask-task1-v0"
    assert fmq.env_spec(name) == dict(suite="ogbench", name=name, reward=None)
    assert fmq._ogb(name, "sparse") == dict(suite="ogbench", name=name, reward="sparse")  # what the table's rows use
    defaults = {k: p.default for k, p in inspect.signature(qgbs.qgbs).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == dict(action_dim=None, M=4, K=1, B=4, rho=1.5, eta=0.3, generator=None, complete=None,
                            k0_step=False, action_range=(-1.0, 1.0))


# ---------------------------------------------------------------- plumbing: the replay buffer and action chunks
def test_chunk_return_hand_worked():
    """Q-chunking's sample_sequence inside one trajectory: every step's reward counts, terminal (mask 0) steps' own
    nonzero rewards and the steps after them included; the chunk's mask is the product."""
    rewards = torch.tensor([[-1.0, -1.0, -0.5, -1.0, -2.0], [-1.0, -1.0, -1.0, -1.0, -1.0],
                            [2.0, -1.0, -1.0, -1.0, -1.0]])
    masks = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    R, mask = fmq.chunk_return(rewards, masks, 0.9)
    # row 0: -1 - .9 - .5 * .81 - .729 - 2 * .6561; row 1: -(1 + .9 + .81 + .729 + .6561); row 2: 2 - (.9 + ... + .6561)
    torch.testing.assert_close(R, torch.tensor([-4.3462, -4.0951, -1.0951]))
    torch.testing.assert_close(mask, torch.tensor([0.0, 1.0, 0.0]))


def test_chunk_return_keeps_the_rewards_dtype():
    """float64 rewards: R = 1 + .9 + .81 = 2.71 to float64 precision (discount powers in float32 are 2e-8 off)."""
    R, mask = fmq.chunk_return(torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64), 0.9)
    assert R.dtype == torch.float64
    torch.testing.assert_close(R, torch.tensor([1 + 0.9 + 0.9 ** 2], dtype=torch.float64), rtol=0, atol=1e-15)


def test_env_spec_suggests_the_closest_id_only_when_one_is_close():
    with pytest.raises(fmq.FMQError) as e:
        fmq.env_spec("scene-t55")
    assert str(e.value) == ("unknown env id 'scene-t55' (did you mean 'scene-t5'?); valid ids: " + ", ".join(fmq.ENVS)
                            + ", or any OGBench '*-singletask-task*-v0' name")
    with pytest.raises(fmq.FMQError) as e:
        fmq.env_spec("qqqqqqqq")
    assert str(e.value).startswith("unknown env id 'qqqqqqqq'; valid ids: can, square")


def test_replay_buffer_samples_only_valid_starts_uniformly_also_beyond_124_of_them():
    """300 one-episode rows, h 2: starts 0..298, each drawn uniformly (the draw is modulo the count of starts, from a
    range far larger than it); a dataset shorter than the horizon has no start until online rows make one."""
    n = 300
    v = np.arange(n, dtype=np.float32)[:, None]
    data = dict(observations=v, actions=v, rewards=np.zeros(n, np.float32), masks=np.ones(n, np.float32),
                next_observations=v, ends=np.zeros(n, np.float32))
    buf = fmq.ReplayBuffer(data, capacity=n + 1, horizon=2, device="cpu")
    torch.manual_seed(0)
    starts = buf.sample(60_000, 0.9)["obs"][:, 0].long()
    counts = torch.bincount(starts, minlength=n)
    assert counts[n - 1] == 0 and counts[:n - 1].min() > 100 and counts[:n - 1].max() < 300  # mean 200.7
    short = {k: x[:1] for k, x in data.items()}
    buf = fmq.ReplayBuffer(short, capacity=5, horizon=3, device="cpu")
    assert buf.n_starts == 0
    for x in (5.0, 6.0, 7.0):
        buf.add([x], [x], 0.0, 1.0, [x + 1], False)
    assert buf.n_starts == 1 and buf.sample(3, 0.9)["obs"].tolist() == [[5.0]] * 3


def test_replay_buffer_first_valid_start_is_the_rings_head():
    """An episode end at row 0 and h 2: start 0 crosses it; the ring holds starts 1 and 2 from its head, which
    sampling draws alike (and never 0)."""
    v = np.arange(4, dtype=np.float32)[:, None]
    data = dict(observations=v, actions=v, rewards=np.zeros(4, np.float32), masks=np.ones(4, np.float32),
                next_observations=v, ends=np.array([1, 0, 0, 1], np.float32))
    buf = fmq.ReplayBuffer(data, capacity=5, horizon=2, device="cpu")
    torch.manual_seed(0)
    obs = buf.sample(4000, 0.9)["obs"][:, 0]
    assert set(obs.tolist()) == {1.0, 2.0} and abs((obs == 1).float().mean().item() - 0.5) < 0.03


def test_replay_buffer_checkpoint_holds_the_online_rows_only_and_reloads_from_the_rings_head():
    """online_state: the 7 online rows (not the 12 offline ones) of a buffer that wrapped (its ring's head moved);
    loaded into a fresh buffer, the ring starts at its head 0 and samples the chunks the saved buffer held."""
    src, dst = circular_buffer(cap=16), circular_buffer(cap=16)
    fill(src, 7)
    assert src.head > 0
    state = src.online_state()
    assert {k: len(x) for k, x in state["rows"].items()} == dict.fromkeys(fmq.ReplayBuffer.FIELDS, 7)
    dst.load_online_state(state)
    assert dst.ring_t.tolist() == [0, src.n_starts]
    torch.manual_seed(0)
    a = dst.sample(500, 0.9)["obs"]
    torch.manual_seed(0)
    b = src.sample(500, 0.9)["obs"]
    assert set(a[:, 0].tolist()) == set(b[:, 0].tolist())


def test_replay_buffer_chunks_stay_inside_episodes():
    n, h = 20, 3
    ends = np.zeros(n, np.float32)
    ends[[6, 13, 19]] = 1  # trajectories 0-6, 7-13, 14-19
    data = dict(observations=np.arange(n, dtype=np.float32)[:, None], actions=np.arange(n, dtype=np.float32)[:, None],
                rewards=-np.ones(n, np.float32), masks=np.ones(n, np.float32),
                next_observations=np.arange(1, n + 1, dtype=np.float32)[:, None], ends=ends)
    buf = fmq.ReplayBuffer(data, capacity=n + 10, horizon=h, device="cpu")
    starts = set(buf.starts[:buf.n_starts].tolist())
    assert starts == {0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 14, 15, 16, 17}
    for i in range(7):  # an online episode of 4 steps, then one of 3
        buf.add([100.0 + i], [100.0 + i], -1.0, 1.0, [101.0 + i], end=i == 3)
    assert set(buf.starts[:buf.n_starts].tolist()) - starts == {20, 21, 24}
    batch = buf.sample(512, 0.9)
    torch.testing.assert_close(batch["actions"][:, 1:] - batch["actions"][:, :-1], torch.ones(512, h - 1))
    torch.testing.assert_close(batch["next_obs"][:, 0], batch["obs"][:, 0] + h)
    torch.testing.assert_close(batch["R"], torch.full((512,), -2.71))


def test_replay_buffer_is_circular_as_the_official_one():
    """Official ReplayBuffer (Q-chunking, size max(buffer_size, dataset + 1)): once full, online rows overwrite the
    oldest rows, offline first. The buffer then holds exactly the last `cap` rows, and the chunk starts are exactly
    the chunks of those rows that lie inside one episode, also across the array's end."""
    n, cap, h = 12, 16, 3
    buf = circular_buffer(n, cap, h)
    fill(buf, 13)  # 12 + 13 = 25 rows written: rows 0..8 (offline 0..8) overwritten by online 4..12
    held = buf.data["observations"][:, 0].tolist()
    assert sorted(held) == sorted([9.0, 10.0, 11.0] + [100.0 + i for i in range(13)])
    assert held[:9] == [100.0 + i for i in range(4, 13)]  # the oldest (offline) rows went first, in order
    starts = buf.starts_host[(buf.head + np.arange(buf.n_starts)) % cap]
    # valid starts: offline trajectory 8-11 lost row 8 (start 9 is left); online episodes 0-4, 5-9, 10-12
    expected = [9] + [n + i for i in (0, 1, 2, 5, 6, 7, 10)]
    assert starts.tolist() == expected and buf.n_starts == len(expected)
    batch = buf.sample(2048, 0.9)
    obs = batch["obs"][:, 0]
    assert set(obs.tolist()) == {9.0} | {100.0 + i for i in (0, 1, 2, 5, 6, 7, 10)}
    torch.testing.assert_close(batch["actions"], obs[:, None] + torch.arange(h))  # consecutive, also across the end
    torch.testing.assert_close(batch["next_obs"][:, 0], obs + h)


def test_replay_buffer_online_state_round_trip_after_wrapping():
    """A checkpoint of a wrapped buffer restores the same rows and the same chunk starts into a fresh buffer."""
    a, b = circular_buffer(), circular_buffer()
    fill(a, 23)
    state = a.online_state()
    assert len(state["rows"]["rewards"]) == 16  # every row was written online
    with pytest.raises(fmq.FMQError, match="^" + re.escape("the checkpoint was written by an older fmq.py (linear "
                                                           "replay buffer); resume it with that") + "$"):  # no ring
        b.load_online_state({k: v for k, v in state.items() if k != "ring"})
    b.load_online_state(state)
    for k in fmq.ReplayBuffer.FIELDS:
        torch.testing.assert_close(b.data[k], a.data[k])
    ring = lambda buf: buf.starts_host[(buf.head + np.arange(buf.n_starts)) % buf.cap].tolist()  # noqa: E731
    assert ring(b) == ring(a)
    torch.manual_seed(0)  # b samples exactly the chunks of its ring (online row v has observation 88 + v)
    assert set(b.sample(2048, 0.9)["obs"][:, 0].tolist()) == {88.0 + v for v in ring(b)}
    c = circular_buffer()
    fill(c, 3)  # a checkpoint holds the online rows only
    assert c.online_state()["rows"]["observations"][:, 0].tolist() == [100.0, 101.0, 102.0]
    fill(a, 9, first=23), fill(b, 9, first=23)  # and both go on identically
    assert ring(b) == ring(a) and torch.equal(b.data["actions"], a.data["actions"])
    torch.manual_seed(0)
    x = a.sample(64, 0.9)
    torch.manual_seed(0)
    assert all(torch.equal(x[k], v) for k, v in b.sample(64, 0.9).items())


def test_buffer_that_does_not_fit_is_reported_before_training():
    with pytest.raises(fmq.FMQError, match=r"the replay buffer needs .* GiB on cpu but only .* GiB is free"):
        fmq.preallocation_check(10 ** 12, 87, torch.device("cpu"))
    fmq.preallocation_check(1000, 87, torch.device("cpu"))


def test_buffer_check_counts_4_bytes_a_float_8_a_row_and_leaves_a_tenth_free(monkeypatch):
    """A row of F floats takes 4 F + 8 bytes (float32 columns and the int64 index); the buffer may take 90% of the
    free memory: the CPU's available pages, a GPU's free (not total) memory."""
    free = {"SC_AVPHYS_PAGES": 120, "SC_PAGE_SIZE": 1}
    monkeypatch.setattr(fmq.os, "sysconf", lambda name: free[name])
    fmq.preallocation_check(9, 1, torch.device("cpu"))  # 9 x 12 = 108 bytes = 0.9 x 120: fits
    free["SC_AVPHYS_PAGES"] = 119
    with pytest.raises(fmq.FMQError):
        fmq.preallocation_check(9, 1, torch.device("cpu"))
    free.update(SC_AVPHYS_PAGES=2 ** 18, SC_PAGE_SIZE=2 ** 12)  # 1 GiB
    with pytest.raises(fmq.FMQError, match=r"^the replay buffer needs 1\.5 GiB on cpu but only 1\.0 GiB is free; use "
                                           r"fewer --online-steps or another device$"):
        fmq.preallocation_check(2 ** 27, 1, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: {torch.device("cuda:0"): (2 ** 29, 2 ** 40)}[
        device])  # (free, total) of that device
    with pytest.raises(fmq.FMQError, match=r"needs 1\.5 GiB on cuda:0 but only 0\.5 GiB is free"):
        fmq.preallocation_check(2 ** 27, 1, torch.device("cuda:0"))


def test_replay_sampling_is_uniform_over_valid_chunk_starts():
    """Chunks start uniformly among the starts that keep a chunk inside one trajectory (also with the ring's head
    moved on by wrapping); the batch's rows are independent."""
    data = dict(observations=np.arange(12, dtype=np.float32)[:, None], actions=np.zeros((12, 1), np.float32),
                rewards=np.zeros(12, np.float32), masks=np.ones(12, np.float32),
                next_observations=np.arange(1, 13, dtype=np.float32)[:, None],
                ends=np.float32([0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]))
    buf = fmq.ReplayBuffer(data, 12, 3, "cpu")
    torch.manual_seed(0)
    n = 60_000
    starts = buf.sample(n, 0.99)["obs"][:, 0].long()
    assert set(starts.tolist()) == {0, 1, 4, 5, 6, 7}  # 2, 3, 8, 9 would cross an end; 10 runs off the data
    counts = torch.bincount(starts, minlength=12)[[0, 1, 4, 5, 6, 7]].double()
    p = 1 / 6
    assert ((counts / n - p).abs() < 5 * (p * (1 - p) / n) ** 0.5).all()
    assert abs(_corr(starts[:-1].double(), starts[1:].double())) < 5 / n ** 0.5
    for i in range(4):  # online episode of 4 steps overwrites rows 0..3: starts 0, 1 leave, online starts join
        buf.add(np.zeros(1), np.zeros(1), 0.0, 1.0, np.zeros(1), i == 3)
    torch.manual_seed(1)
    starts = buf.sample(n, 0.99)["obs"][:, 0]
    valid = set(buf.starts_host[buf.head + np.arange(buf.n_starts)].tolist())
    assert valid == {4, 5, 6, 7, 12, 13} and buf.n_starts == 6
    for first, p in [(0, 2 / 6), (4, 1 / 6), (7, 1 / 6)]:  # online starts 12, 13 read rows 0, 1 (written 0)
        assert (starts == first).float().mean().item() == pytest.approx(p, abs=5 * (p * (1 - p) / n) ** 0.5)


# ---------------------------------------------------------------- plumbing: evaluation
@pytest.mark.parametrize("env_id,return_train", [("scene-t5", -2.0), ("can", -8.0), ("cube-dbl-t3", -4.0)])
def test_eval_returns_say_which_reward(monkeypatch, env_id, return_train):
    """return_env sums the env's rewards (-4); return_train the ones training sees: scene's table reward is sparse,
    (r != 0) * -1 (two nonzero rewards: -2), can's r - 1 (-4 - 4 = -8), cube's the env's own."""
    monkeypatch.setattr(fmq, "act", lambda agent, obs, sampler, args, gen: np.zeros((len(obs), args.horizon, 1)))
    agent = SimpleNamespace(actor=torch.nn.Linear(1, 1))
    args = fmq.Args(horizon=2, eval_episodes=3)
    res = fmq.evaluate(agent, [TwoStepRewardEnv(), TwoStepRewardEnv()], args, "onestep",
                       fmq.reward_fn(fmq.env_spec(env_id), False))
    assert res == dict(success=1.0, return_train=return_train, return_env=-4.0, length=4.0)


def test_video_episodes_come_after_the_counted_ones_with_a_frame_every_skip_steps_and_at_the_end():
    """With `frames`: the video_episodes episodes after the eval_episodes counted ones, seeds 10_001 and 10_002 after
    one counted episode (successes at steps 4 and 5), a frame every 2 steps and at the end: steps 2, 4 and 2, 4, 5
    (RenderingTinyEnv's bar is 4 x the step wide)."""
    args = tiny_env_args(Path("."), eval_episodes=1, eval_envs=2, video_episodes=2, video_frame_skip=2)
    torch.manual_seed(0)
    agent, frames = fmq.make_agent(args, 3, 2 * args.horizon, "cpu"), []
    res = fmq.evaluate(agent, [RenderingTinyEnv() for _ in range(2)], args, "onestep", frames=frames)
    assert res["length"] == 4.5 and sorted(int((f[0, :, 0] > 0).sum()) // 4 for f in frames) == [2, 2, 4, 4, 5]


@pytest.mark.parametrize("seed,episodes,eval_envs", [(0, 5, 1), (0, 5, 2), (0, 5, 3), (0, 5, 5), (1, 4, 3)])
def test_evaluate_seeds_each_episode_whatever_the_waves(seed, episodes, eval_envs):
    """Episode i resets with seed + 10_000 + i in any wave layout; success and length are the means over all the
    episodes (seed 0: successes at 3, 4, 5, never (12 steps), 7: 0.8 and 6.2; seed 1: 4, 5, never, 7: 0.75 and 7).
    The policy noise comes from a generator seeded with seed + 10_000: the first chunk is exactly the one drawn from
    it, and the global RNG does not change it."""
    args = tiny_env_args(Path("."), eval_episodes=episodes, eval_envs=eval_envs, seed=seed)
    torch.manual_seed(0)
    agent = fmq.make_agent(args, 3, 2 * args.horizon, "cpu")
    envs = [TinyEnv() for _ in range(eval_envs)]
    res = fmq.evaluate(agent, envs, args, "onestep")
    assert (res["success"], res["length"]) == {(0, 5): (0.8, 6.2), (1, 4): (0.75, 7.0)}[seed, episodes]
    ks = [tiny_k(seed + 10_000 + i) for i in range(episodes)]
    assert res["return" if "return" in res else "return_env"] == pytest.approx(np.mean(
        [sum(tiny_rewards(k, min(k, TINY_LIMIT))) for k in ks]))
    first = fmq.act(agent, np.stack([TinyEnv().reset(seed=seed + 10_000 + i)[0] for i in range(eval_envs)]),
                    "onestep", args, torch.Generator().manual_seed(seed + 10_000))
    np.testing.assert_array_equal(np.stack([e.actions[0] for e in envs]), first[:, 0])
    torch.manual_seed(123)  # another global RNG state: the same evaluation
    again = [TinyEnv() for _ in range(eval_envs)]
    fmq.evaluate(agent, again, args, "onestep")
    assert all(np.array_equal(np.stack(a.actions), np.stack(b.actions)) for a, b in zip(envs, again))


def test_evaluation_noise_is_one_stream_across_waves(monkeypatch):
    """One generator for the whole evaluation: wave 2 (episode 10001, 4 steps: 2 chunks of 3) goes on drawing where
    wave 1 (episode 10000, 3 steps: 1 chunk) stopped; it does not start the stream again."""
    draws = []

    def act(agent, obs, sampler, args, gen):
        draws.append(torch.rand(1, generator=gen).item())
        return np.zeros((len(obs), args.horizon, 2), np.float32)
    monkeypatch.setattr(fmq, "act", act)
    args = tiny_env_args(Path("."), eval_episodes=2, eval_envs=1)
    fmq.evaluate(SimpleNamespace(actor=torch.nn.Linear(1, 1)), [TinyEnv()], args, "onestep")
    assert draws == torch.rand(3, generator=torch.Generator().manual_seed(10_000)).tolist()


def test_restore_run_goes_on_with_the_checkpoints_step_episode_queue_clock_and_every_rng(monkeypatch):
    ckpt = dict(step=7, step0=3, time=50.0, buffer="rows", episode=dict(index=2, start=61, ret=-1.0, queue=[[0.5]]),
                rng=dict(python=random.Random(5).getstate(), numpy=np.random.RandomState(5).get_state(),
                         torch=torch.Generator().manual_seed(5).get_state(), cuda=None))
    monkeypatch.setattr(fmq, "load_checkpoint", lambda path, args, agent, c: c if path == "step_7.pt" else None)
    loaded = []
    run = SimpleNamespace(resume_from="step_7.pt", ckpt=ckpt, n_off=60, step0=0, t0=None,
                          buffer=SimpleNamespace(load_online_state=loaded.append))
    monkeypatch.setattr(fmq.time, "time", lambda: 1000.0)
    step, ep, queue = fmq.restore_run(run, None, fmq.Args())
    assert (step, ep, queue, run.step0, run.t0, loaded, run.ckpt) == (7, ckpt["episode"], [[0.5]], 3, 950.0, ["rows"],
                                                                      None)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == (
        random.Random(5).random(), np.random.RandomState(5).random(),
        torch.rand(1, generator=torch.Generator().manual_seed(5)).item())
    fresh = SimpleNamespace(resume_from=None, n_off=60, step0=0)
    assert fmq.restore_run(fresh, None, fmq.Args()) == (0, dict(index=0, start=60, ret=0.0), [])
    # a checkpoint without step0, time and queue (and a GPU run's CUDA RNG states, resumed on a CPU)
    bare = dict(step=7, buffer=None, episode=dict(index=2, start=61, ret=-1.0),
                rng=dict(ckpt["rng"], cuda=[torch.zeros(16, dtype=torch.uint8)]))
    run = SimpleNamespace(resume_from="step_7.pt", ckpt=bare, n_off=60, step0=0, t0=None,
                          buffer=SimpleNamespace(load_online_state=loaded.append))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fmq.restore_run(run, None, fmq.Args())[2] == [] and (run.step0, run.t0) == (0, 1000.0)
    cuda_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", cuda_states.append)
    run.ckpt = bare
    fmq.restore_run(run, None, fmq.Args())
    run.ckpt = dict(bare, rng=dict(bare["rng"], cuda=None))  # a CPU run's checkpoint resumed on a GPU
    fmq.restore_run(run, None, fmq.Args())
    assert cuda_states == [bare["rng"]["cuda"]]
    # --load-checkpoint: only the nets; the curriculum goes on from the checkpoint's own step (and its step0)
    for saved, step0 in ((dict(step=100), 100), (dict(step=100, step0=20), 120)):
        monkeypatch.setattr(fmq, "load_checkpoint", lambda path, args, agent, c=None: saved)
        fresh = SimpleNamespace(resume_from=None, n_off=60, step0=0)
        assert fmq.restore_run(fresh, None, fmq.Args(load_checkpoint="x.pt"))[0] == 0 and fresh.step0 == step0


def test_evaluate_resets_episode_i_with_exactly_seed_plus_10000_plus_i():
    """The reset seeds themselves (TinyEnv's outcomes repeat every 20 seeds, so they cannot tell 10_000 from -10_000)."""
    seeds = []

    class Env(TinyEnv):
        def reset(self, seed=None):
            seeds.append(seed)
            return super().reset(seed=seed)
    args = tiny_env_args(Path("."), eval_episodes=5, eval_envs=2, seed=3)
    fmq.evaluate(fmq.make_agent(args, 3, 2 * args.horizon, "cpu"), [Env(), Env()], args, "onestep")
    assert seeds == [10_003, 10_004, 10_005, 10_006, 10_007]


# ---------------------------------------------------------------- plumbing: logging, videos, Weights & Biases
@pytest.mark.slow
def test_run_prints_its_plan_and_result_and_logs_the_last_offline_step(tmp_path, ogb, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = tiny_args(tmp_path, ogb, offline_steps=13, online_steps=7, eval_interval=20, extra_samplers=("qgbs",))
    final = fmq.main(args)
    run = tmp_path / "runs" / "scene-t5__fmq__0"
    out = capsys.readouterr().out.splitlines()
    n = len(fmq.load_dataset(fmq.env_spec("scene-t5"), ogb)[0]["observations"])
    assert out[0] == (f"fmq: run {run} on cpu, dataset {n} rows; 13 offline + 7 online steps (updates from online "
                      f"step 1), starting at step 0")
    evals = read_csv(run / "eval.csv")
    assert [(int(r["step"]), r["sampler"]) for r in evals][-2:] == [(20, "best-of-n"), (20, "qgbs")]
    assert out[-1] == (f"fmq: done at step 20; success best-of-n {float(evals[-2]['success']):.2f}, qgbs "
                       f"{float(evals[-1]['success']):.2f} (2 episodes); files in {run} (eval.csv, train.csv, "
                       f"TensorBoard, checkpoints/)") and final["success"] == float(evals[-2]["success"])
    train = read_csv(run / "train.csv")
    assert [(int(r["step"]), r["phase"]) for r in train] == [(10, "offline"), (13, "offline"), (20, "online")]
    assert train[1]["actor/diag_loss"] != "" and train[1]["critic/loss"] != ""  # a short run logs its offline losses
    events = EventAccumulator(str(run)).Reload()
    assert [e.step for e in events.Scalars("charts/SPS")] == [10, 13, 20]
    text = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|batch_size|16|" in text and "|env_id|scene-t5|" in text


def test_videos_go_to_tensorboard_as_a_small_preview_and_the_end_line_names_them(tmp_path, monkeypatch, tiny_env,
                                                                                  capsys):
    """--video-episodes 1, a frame every env step: the mp4 holds every frame; TensorBoard's GIF every 2nd frame at half
    size (the GIF of the whole video is ~17x its mp4); the end line names videos/."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None, render=False: RenderingTinyEnv() if render
                        else TinyEnv())  # only the video env renders
    fmq.main(tiny_env_args(tmp_path, offline_steps=2, online_steps=0, video_episodes=1, video_frame_skip=1))
    run = tmp_path / "runs" / "tiny__fmq__0"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fmq: run {run} on cpu, dataset 60 rows; 2 offline + 0 online steps, starting at step 0"
    assert out[-1].endswith(f"files in {run} (eval.csv, train.csv, TensorBoard, checkpoints/, videos/)")
    # the video episode is the 6th (seed 10005): success at step 3 + 10005 % 5 = 3; frames after steps 1, 2, 3
    frames = np.stack([RenderingTinyEnv.render(SimpleNamespace(n=n)) for n in (1, 2, 3)])
    for s in (0, 2):
        np.testing.assert_array_equal(iio.imread(run / "videos" / f"step_{s:09d}.mp4", plugin="FFMPEG",
                                                 index=None).mean(-1).round(-1), frames.mean(-1).round(-1))
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    images = acc.Images("eval/video")
    assert [(i.step, i.width, i.height) for i in images] == [(0, 32, 24), (2, 32, 24)]
    [text] = acc.Tensors("hyperparameters/text_summary")  # the flags as a table in TensorBoard's text tab
    args = dataclasses.asdict(tiny_env_args(tmp_path, offline_steps=2, online_steps=0, video_episodes=1,
                                            video_frame_skip=1))
    assert text.tensor_proto.string_val[0].decode() == "|param|value|\n|-|-|" + "".join(f"\n|{k}|{v}|" for k, v in
                                                                                     args.items())
    gif = iio.imread(images[0].encoded_image_string, extension=".gif", index=None)
    np.testing.assert_array_equal(gif[..., :3], frames[::2, ::2, ::2])


def test_write_video_mp4_at_15_fps_gif_looping_forever_rgb_summary_and_the_wandb_row(tmp_path):
    """The mp4 keeps an odd frame size (macro_block_size=1: no resize to 16 multiples) at 15 fps; the GIF loops for
    ever (loop=0), every 2nd frame at half size, 130 ms a frame (2000 / 15 ms; GIFs count in 10 ms); the image is RGB
    (colorspace 3); W&B gets the mp4's path at the step."""
    import imageio.v3 as iio
    frames = (np.arange(4 * 20 * 30 * 3).reshape(4, 20, 30, 3) % 251).astype(np.uint8)
    summaries, logged = [], []
    writer = SimpleNamespace(file_writer=SimpleNamespace(add_summary=lambda s, step: summaries.append((s, step))))
    path = tmp_path / "videos" / "step_000000007.mp4"
    fmq.write_video(path, frames, writer, lambda row, step: logged.append((row, step)), 7)
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["fps"] == 15 and meta["size"] == (30, 20)
    assert iio.imread(path, plugin="FFMPEG", index=None).shape == (4, 20, 30, 3)
    (summary, step), = summaries
    image = summary.value[0].image
    assert (step, summary.value[0].tag, image.height, image.width, image.colorspace) == (7, "eval/video", 10, 15, 3)
    gif_meta = iio.immeta(image.encoded_image_string, extension=".gif")
    assert (gif_meta["loop"], gif_meta["duration"]) == (0, 130)
    np.testing.assert_array_equal(iio.imread(image.encoded_image_string, extension=".gif", index=None)[..., :3],
                                  frames[::2, ::2, ::2])
    assert logged == [({"eval/video": path}, 7)]


@pytest.mark.slow
def test_wandb_run_killed_and_resumed_is_one_run_with_no_step_twice(tmp_path, ogb, monkeypatch):
    """--track, offline: run a is SIGKILLed after logging step 130 or more, its last checkpoint at step 20 (the phase
    switch; the next is at 300), and resumed. W&B then holds one run id (kept in runs/<run>/wandb.json) and each step
    of 0, 10, ..., 320 at most once: the steps redone after the checkpoint that a had sent are skipped; the rest come
    from the resumed run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.1")  # the killed run's rows reach its file
    flags = [*resume_flags(ogb), "--runs-dir", str(tmp_path / "runs"), "--save-interval", "300", "--track",
             "--wandb-entity", "lab", "--wandb-group", "g1"]
    run = tmp_path / "runs" / "scene-t5__fmq__0"

    def logged():
        files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        return max((r.history.step.num for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "history"),
                   default=-1) if files else -1
    with Child(*flags, watch=tmp_path) as child:
        child.wait_until(lambda: logged() >= 130, "W&B history of step 130 in the offline run")
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()
    assert checkpoint_step(run) == 20 and not (run / "final.json").exists()
    sent = json.loads((run / "wandb.json").read_text())
    assert sent["step"] >= 130
    code, err = run_cli(*flags)
    assert code == 0, err[-2000:]
    (id_a, group_a, name_a, rows_a), (id_b, group_b, name_b, rows_b) = wandb_runs(tmp_path)
    assert id_a == id_b == sent["id"] == json.loads((run / "wandb.json").read_text())["id"]
    assert group_a == group_b == "lab/g1" and name_a == name_b == "scene-t5__fmq__0"
    steps_a, steps_b = [s for s, _ in rows_a], [s for s, _ in rows_b]
    assert steps_a == list(range(0, steps_a[-1] + 1, 10)) and steps_a[-1] > 20  # a sent steps after its checkpoint
    assert steps_b == list(range(sent["step"] + 10, 321, 10))  # b: none of those again, then on to the end
    assert {"critic/loss", "eval/success"} <= dict(rows_b)[320] and "eval/success" in dict(rows_a)[20]


@pytest.mark.slow
def test_video_episodes_are_rendered_written_and_not_counted(tmp_path, ogb, monkeypatch):
    """--video-episodes 2 --video-frame-skip 5, 12-step episodes: frames after steps 5, 10 and 12 of each, 6 per
    evaluation, in runs/<run>/videos/step_XXXXXXXXX.mp4 (decoded: 6 frames of 64 x 48), TensorBoard's eval/video
    and W&B's (offline); eval.csv is the one of the same run without videos."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    short_episodes(monkeypatch, 12)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    kw = dict(offline_steps=10, online_steps=10, eval_interval=10, log_interval=10, save_interval=10)
    fmq.main(tiny_args(tmp_path / "plain", ogb, **kw))
    fmq.main(tiny_args(tmp_path / "video", ogb, video_episodes=2, video_frame_skip=5, track=True, **kw))
    plain, run = (tmp_path / d / "runs" / "scene-t5__fmq__0" for d in ("plain", "video"))
    assert strip_timing(read_csv(run / "eval.csv")) == strip_timing(read_csv(plain / "eval.csv"))
    steps = [0, 10, 20]
    assert sorted(p.name for p in (run / "videos").iterdir()) == [f"step_{s:09d}.mp4" for s in steps]
    for s in steps:
        frames = iio.imread(run / "videos" / f"step_{s:09d}.mp4", plugin="FFMPEG", index=None)
        assert frames.shape == (6, 48, 64, 3) and frames_change(frames[:3]) and frames_change(frames[3:])
    images = EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Images("eval/video")
    assert [(i.step, i.width, i.height) for i in images] == [(s, 32, 24) for s in steps]  # a preview: half size
    assert iio.imread(images[0].encoded_image_string, extension=".gif", index=None).shape[:3] == (3, 24, 32)
    [(_, _, _, rows)] = wandb_runs(tmp_path)
    assert [s for s, keys in rows if "eval/video" in keys] == steps


@pytest.mark.slow
def test_robomimic_video_frames_from_the_offscreen_renderer(rm_data, tmp_path, monkeypatch):
    """can through robosuite's offscreen renderer (agentview): a 7-step episode, skip 3: frames after steps 3, 6, 7."""
    import imageio.v3 as iio
    monkeypatch.setattr(fmq, "VIDEO_SIZE", (64, 48))
    spec = dict(fmq.env_spec("can"), max_episode_steps=7)
    env_args = fmq.load_dataset(spec, rm_data[0])[1]
    env = fmq.make_env(spec, env_args, render=True)
    args = fmq.Args(env_id="can", hidden_dim=32, num_layers=2, time_dim=8, best_of_n=4, eval_episodes=1,
                    video_episodes=1, video_frame_skip=3, device="cpu")
    agent = fmq.make_agent(args, env.observation_space.shape[0], env.action_space.shape[0] * args.horizon, "cpu")
    frames = []
    fmq.evaluate(agent, [env], args, "onestep", frames=frames)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert frames_change(frames)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path))
    fmq.write_video(tmp_path / "videos" / "step_000000000.mp4", np.stack(frames), writer, lambda *a: None, 0)
    assert iio.imread(tmp_path / "videos" / "step_000000000.mp4", plugin="FFMPEG", index=None).shape == (3, 48, 64, 3)


@pytest.mark.slow
def test_video_episodes_without_a_working_renderer_stop_before_training(tmp_path, ogb):
    """No display, MUJOCO_GL=glfw (what mujoco falls back to without EGL or OSMesa): one line, no run folder."""
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    code = subprocess.run([sys.executable, str(ROOT / "fmq.py"), "--dataset-dir", str(ogb), "--runs-dir",
                           str(tmp_path / "runs"), "--video-episodes", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=dict(env, MUJOCO_GL="glfw", OMP_NUM_THREADS="1"))
    assert code.returncode == 1 and code.stderr.strip().splitlines()[-1].startswith(
        "fmq: error: --video-episodes: rendering with MUJOCO_GL=glfw failed ("), code.stderr[-2000:]
    assert "MUJOCO_GL=osmesa (apt-get install libosmesa6)" in code.stderr and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- plumbing: checkpoints, resume, stopping
def test_resumed_rng_states_stay_cpu_byte_tensors(tmp_path):
    """torch.load(map_location=<training device>) would move the saved RNG states to the GPU, where
    torch.set_rng_state refuses them ("RNG state must be a torch.ByteTensor"). An agent on 'meta' shows it on CPU."""
    args, agent, _ = small_agent()
    state = {k: getattr(agent, k).state_dict() for k in fmq.NETS}
    path = fmq.save_checkpoint(tmp_path, dict(state, step=3, args=dataclasses.asdict(args), u_off=None,
                                              rng=dict(torch=torch.get_rng_state())), keep=1)
    with warnings.catch_warnings():  # loading into meta parameters is a no-op, and torch says so per tensor
        warnings.simplefilter("ignore", UserWarning)
        ckpt = fmq.load_checkpoint(path, args, fmq.make_agent(args, 6, 10, "meta"))
    assert ckpt["rng"]["torch"].device.type == "cpu"
    torch.set_rng_state(ckpt["rng"]["torch"])  # what --resume does


@pytest.mark.slow
def test_online_from_offline_checkpoint_with_qgbs_and_mvp_target(tmp_path, ogb):
    fmq.main(tiny_args(tmp_path, ogb, online_steps=0, offline_steps=10, eval_interval=10))
    ckpt = tmp_path / "runs" / "scene-t5__fmq__0" / "checkpoints" / "step_000000010.pt"
    args = tiny_args(tmp_path, ogb, exp_name="online", offline_steps=0, online_steps=10, eval_interval=10,
                     load_checkpoint=str(ckpt), sampler="qgbs", online_target="mvp")
    fmq.main(args)
    evals = read_csv(tmp_path / "runs" / "scene-t5__online__0" / "eval.csv")
    assert [(r["sampler"], r["nfe"]) for r in evals] == [("qgbs", "20")] * 2
    bad = dataclasses.replace(args, exp_name="bad", hidden_dim=64)
    with pytest.raises(fmq.FMQError, match="does not fit this run.*hidden_dim"):
        fmq.main(bad)


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, ogb):
    flags = resume_flags(ogb)
    run_b = tmp_path / "b" / "scene-t5__fmq__0"
    # the uninterrupted run (a) and the one to kill (b) run side by side: same flags, deterministic, same numbers
    with Child(*flags, "--runs-dir", str(tmp_path / "a"), watch=tmp_path / "a") as child_a:
        with Child(*flags, "--runs-dir", str(tmp_path / "b"), watch=tmp_path / "b") as child_b:
            child_b.wait_until(lambda: checkpoint_step(run_b) >= 60, f"run b's checkpoint of step 60 in {run_b}")
            child_b.proc.send_signal(signal.SIGKILL)
            child_b.proc.wait()
        assert not (run_b / "final.json").exists(), "the run finished before it could be killed"
        code, err = run_cli(*flags, "--runs-dir", str(tmp_path / "b"))
        assert code == 0, err[-2000:]
        code, err = child_a.finish("the uninterrupted run (a) to finish")
        assert code == 0, err[-2000:]
    for name in ("train.csv", "eval.csv"):
        a, b = (read_csv(tmp_path / d / "scene-t5__fmq__0" / name) for d in "ab")
        steps = [int(r["step"]) for r in b]
        assert steps == sorted(set(steps)), "duplicated or unordered rows"
        assert strip_timing(a) == strip_timing(b)
    assert (tmp_path / "a" / "scene-t5__fmq__0" / "final.json").read_text() == (run_b / "final.json").read_text()


def test_nan_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny_env):
    """A NaN critic loss from step 25 on: the run stops at the next check (the log at step 30) naming the loss, the
    step and the last good checkpoint (step 20), and saves nothing after it. Weights are checked before a save."""
    real = fmq.critic_loss

    def poisoned(agent, batch, *a):
        loss, info = real(agent, batch, *a)
        poisoned.calls += 1
        return (loss * float("nan"), info) if poisoned.calls > 25 else (loss, info)
    poisoned.calls = 0
    monkeypatch.setattr(fmq, "critic_loss", poisoned)
    run = tmp_path / "runs" / "tiny__fmq__0"
    with pytest.raises(fmq.FMQError, match=f"non-finite critic/loss.* at or before step 30; .*{run}/checkpoints/step_0+20"
                       ):
        fmq.main(tiny_env_args(tmp_path))
    assert max((run / "checkpoints").glob("step_*.pt")).name == "step_000000020.pt"
    ckpt = torch.load(run / "checkpoints" / "step_000000020.pt", weights_only=False)
    assert ckpt["step"] == 20 and all(torch.isfinite(p).all() for p in ckpt["critic"].values())
    args, agent, _ = small_agent()
    fmq.check_finite(SimpleNamespace(last_ckpt="c.pt"), 7, {"critic/loss": 1.0}, agent)  # all finite: no stop
    with torch.no_grad():
        next(agent.critic.parameters())[0, 0, 0] = float("inf")
    with pytest.raises(fmq.FMQError, match=r"non-finite actor/x, network weights at or before step 7; .* c\.pt$"):
        fmq.check_finite(SimpleNamespace(last_ckpt="c.pt"), 7, {"critic/loss": 1.0, "actor/x": float("nan")}, agent)
    with pytest.raises(fmq.FMQError, match=r"^non-finite network weights at or before step 9; training stopped\. Last "
                       r"good checkpoint: none yet$"):  # checked before anything of a checkpoint is saved
        fmq.save_run(SimpleNamespace(last_ckpt=None), agent, args, 9, {}, [])


def test_save_run_keeps_the_run_state_and_every_rng_and_the_cuda_ones_where_there_is_a_gpu(tmp_path, monkeypatch):
    args, agent, _ = small_agent()
    run = SimpleNamespace(last_ckpt=None, step0=4, t0=100.0, dir=tmp_path, buffer=SimpleNamespace(online_state=dict))
    monkeypatch.setattr(fmq.time, "time", lambda: 130.0)
    for gpu, cuda in ((False, None), (True, ["cuda state"])):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda state"])
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        path = fmq.save_run(run, agent, args, 9 + gpu, dict(index=1, start=3, ret=0.0), [[0.5]])
        ckpt = torch.load(path, weights_only=False)
        assert (ckpt["step"], ckpt["step0"], ckpt["time"], ckpt["episode"], ckpt["buffer"]) == (
            9 + gpu, 4, 30.0, dict(index=1, start=3, ret=0.0, queue=[[0.5]]), {})
        assert ckpt["rng"]["python"] == random.Random(1).getstate() and ckpt["rng"]["cuda"] == cuda
        assert np.random.RandomState(2).random() == (np.random.set_state(ckpt["rng"]["numpy"]), np.random.random())[1]
        assert torch.equal(ckpt["rng"]["torch"], torch.Generator().manual_seed(3).get_state())


def test_resume_with_a_row_past_the_checkpoint_an_episode_end_and_a_wrapped_buffer(tmp_path, monkeypatch, tiny_env):
    """A run logging every step, killed in the update of step 37 (its checkpoint: step 30; train.csv already has steps
    31-37; episodes ended at online steps 3, 7, 12, 24, the fourth is replayed from its start; the buffer of 61 rows
    wrapped) and resumed ends exactly as the uninterrupted run: the same csv rows and TensorBoard scalars (steps 31-37
    logged once: TensorBoard's rows from step 31 on purged), the same networks, the same result."""
    args = lambda d: tiny_env_args(tmp_path / d, buffer_size=0, start_training=2, resume="auto",  # noqa: E731
                                   log_interval=1)
    buffers, _ = recording_buffer(monkeypatch)
    real_wandb, resumed = fmq.wandb_logger, []
    monkeypatch.setattr(fmq, "wandb_logger", lambda a, d, r: resumed.append((d.parent.parent.name, r)) or real_wandb(
        a, d, r))
    fmq.main(args("a"))
    real = fmq.update

    class Killed(Exception):
        pass

    def killed_at_37(agent, batch, step, *a):
        if int(step) == 37:
            raise Killed
        return real(agent, batch, step, *a)
    monkeypatch.setattr(fmq, "update", killed_at_37)
    with pytest.raises(Killed):
        fmq.main(args("b"))
    run_a, run_b = (tmp_path / d / "runs" / "tiny__fmq__0" for d in "ab")
    assert buffers[-1].cap == 61 and buffers[-1].written == 60 + 28  # wrapped before the kill
    assert max((run_b / "checkpoints").glob("step_*.pt")).name == "step_000000030.pt"
    assert int(read_csv(run_b / "train.csv")[-1]["step"]) == 37  # rows past the checkpoint
    monkeypatch.setattr(fmq, "update", real)
    fmq.main(args("b"))
    for name in ("train.csv", "eval.csv"):
        a, b = read_csv(run_a / name), read_csv(run_b / name)
        assert [int(r["step"]) for r in b] == [int(r["step"]) for r in a]
        assert strip_timing(a) == strip_timing(b)
    ckpt_a, ckpt_b = (torch.load(r / "checkpoints" / "step_000000040.pt", weights_only=False) for r in (run_a, run_b))
    for k in ("actor", "critic", "critic_target", "u_off"):
        assert all(torch.equal(ckpt_a[k][n], v) for n, v in ckpt_b[k].items()), k
    assert (run_a / "final.json").read_text() == (run_b / "final.json").read_text()
    assert resumed == [("a", False), ("b", False), ("b", True)]  # W&B gets the run folder, and which run goes on
    scalars = [tensorboard_scalars(r) for r in (run_a, run_b)]  # the rows after step 30 purged: none twice or lost
    updated = [s for s in range(1, 41) if s != 11]  # step 11 (online step 1) only collected data: start_training 2
    assert scalars[0] == scalars[1] and [s for s, _ in scalars[0]["critic/loss"]] == updated


def tensorboard_scalars(run):
    """{tag: [(step, value)]} of a run's TensorBoard events, charts/SPS left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t != "charts/SPS"}


def test_a_checkpoint_of_other_nets_is_refused_in_one_line(tmp_path):
    args, agent, _ = small_agent()
    state = dict({k: getattr(agent, k).state_dict() for k in fmq.NETS}, step=1, args=dataclasses.asdict(args))
    path = fmq.save_checkpoint(tmp_path / "run", dict(state, u_off=None), keep=1)  # its folders made as needed
    assert path == tmp_path / "run" / "checkpoints" / "step_000000001.pt"
    fmq.load_checkpoint(tmp_path / "gone.pt", args, fmq.make_agent(args, 6, 10, "cpu"), torch.load(path))  # read
    other = dataclasses.replace(args, hidden_dim=32)
    with pytest.raises(fmq.FMQError, match=r"does not fit this run: it has \{'hidden_dim': 16\}, this run \{'hidden_"
                       r"dim': 32\}"):
        fmq.load_checkpoint(path, other, fmq.make_agent(other, 6, 10, "cpu"))
    fmq.load_checkpoint(path, args, fmq.make_agent(args, 6, 10, "cpu"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, ogb):
    run = tmp_path / "scene-t5__fmq__0"
    with Child(*resume_flags(ogb), "--runs-dir", str(tmp_path), watch=tmp_path) as child:
        child.wait_until(lambda: checkpoint_step(run) >= 30, f"the checkpoint of step 30 in {run}")
        child.proc.send_signal(signal.SIGTERM)
        code, err = child.finish("fmq.py to save a checkpoint and stop after SIGTERM")
    assert code == 0 and "Traceback" not in err and "fmq: SIGTERM: stopping within one env step" in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fmq: stopped at step ") and f"--resume {run}" in line
    stopped_at = int(line.split("at step ")[1].split(" ")[0])
    assert (run / "checkpoints" / f"step_{stopped_at:09d}.pt").exists()
    code, err = run_cli(*resume_flags(ogb), "--runs-dir", str(tmp_path))
    assert code == 0, err[-2000:]
    assert json.loads((run / "final.json").read_text())["step"] == 320


def test_resume_with_more_online_steps_extends_a_finished_and_a_stopped_run(tmp_path, monkeypatch, tiny_env):
    """--resume with --online-steps 30 -> 50 (a buffer of 60 + 30 rows becomes one of 60 + 50): a finished run and a
    run killed at step 27 (checkpoint 20) both go on to step 60 exactly as a run of 50 online steps from the start:
    the same csv rows, networks and result, and a buffer that holds the same rows and chunk starts."""
    buffers, _ = recording_buffer(monkeypatch)
    args = lambda d, online: tiny_env_args(tmp_path / d, online_steps=online, resume="auto")  # noqa: E731
    fmq.main(args("long", 50))
    fmq.main(args("done", 30))
    restore = killed_at(monkeypatch, 27)
    with pytest.raises(Killed):
        fmq.main(args("stopped", 30))
    restore()
    assert [b.cap for b in buffers] == [110, 90, 90] and buffers[-1].written == 60 + 18  # online steps 0..17
    for d in ("done", "stopped"):
        fmq.main(args(d, 50))
        long, run = (tmp_path / x / "runs" / "tiny__fmq__0" for x in ("long", d))
        assert buffers[-1].cap == 110 and buffers[-1].written == buffers[0].written == 110
        for k in fmq.ReplayBuffer.FIELDS:
            assert torch.equal(buffers[-1].rows(k, 0, 110), buffers[0].rows(k, 0, 110)), (d, k)
        assert ring(buffers[-1]) == ring(buffers[0])
        for name in ("train.csv", "eval.csv"):
            assert strip_timing(read_csv(run / name)) == strip_timing(read_csv(long / name)), (d, name)
        assert [int(r["step"]) for r in read_csv(run / "eval.csv")] == [0, 10, 20, 40, 60]
        a, b = (torch.load(r / "checkpoints" / "step_000000060.pt", weights_only=False) for r in (long, run))
        for k in ("actor", "critic", "u_off"):
            assert all(torch.equal(a[k][n], v) for n, v in b[k].items()), (d, k)
        assert (run / "final.json").read_text() == (long / "final.json").read_text()


@pytest.mark.parametrize("target", ["flow-map", "mvp"])
def test_a_run_loaded_from_a_checkpoint_goes_on_with_its_curriculum(tmp_path, monkeypatch, tiny_env, target):
    """The flow-map loss's step (its (r, t) curriculum, and its self-distillation from step curriculum_start on)
    follows the loaded networks' progress, as the official restore keeps its step: online from an offline checkpoint of
    step 10 (--offline-steps 0), the online updates of the flow-map and MVP targets see steps 10, 11, ..; so too a
    resumed run (16, 17) and a run loaded from a checkpoint of that one (10 + 8 = 18)."""
    steps, real = [], fmq.flow_map_loss
    monkeypatch.setattr(fmq, "flow_map_loss", lambda actor, obs, a, step, args: steps.append(int(step)) or real(
        actor, obs, a, step, args))
    kw = dict(curriculum_start=12, curriculum_end=16, online_target=target)
    fmq.main(tiny_env_args(tmp_path, online_steps=0, **kw))
    assert steps == list(range(10))
    online = lambda n, ckpt, name="online": tiny_env_args(  # noqa: E731
        tmp_path, exp_name=name, offline_steps=0, online_steps=n, load_checkpoint=str(ckpt), resume="auto", **kw)
    for n, expected in [(6, list(range(10, 16))), (8, [16, 17])]:  # then resumed with 2 more online steps
        steps.clear()
        fmq.main(online(n, tmp_path / "runs" / "tiny__fmq__0" / "checkpoints" / "step_000000010.pt"))
        assert steps == expected
    steps.clear()
    fmq.main(online(2, tmp_path / "runs" / "tiny__online__0" / "checkpoints" / "step_000000008.pt", "again"))
    assert steps == [18, 19]


def test_keep_checkpoints_never_deletes_the_phase_switch_checkpoint(tmp_path):
    """--keep-checkpoints 2 of a run with 20 offline steps, saving every 10 steps: the two newest and step 20's, the
    one docs/long_runs.md loads to go online."""
    args = dataclasses.asdict(fmq.Args(offline_steps=20))
    for step in range(0, 60, 10):
        fmq.save_checkpoint(tmp_path, dict(step=step, args=args), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000000020.pt", "step_000000040.pt", "step_000000050.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_during_an_evaluation_is_honoured_at_once_saved_and_resumed(tmp_path, tiny_env, sig):
    """A signal at the 3rd env step of the evaluation at step 20 (evaluations at 0 and 10 take 31 steps each): one
    line at once, no env step after it, a checkpoint of step 20, exit status 0 and a line saying where it saved and
    how to resume. The cut evaluation leaves no eval.csv row; the resumed run redoes it and ends as an uninterrupted
    run."""
    out = run_signalled(tiny_env_args(tmp_path / "stopped", resume="auto"), 2 * 31 + 3, sig)
    run = tmp_path / "stopped" / "runs" / "tiny__fmq__0"
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "evaluation env steps after the signal: 0" in out.stdout
    assert f"fmq: {sig}: stopping within one env step (again: at once)" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"fmq: stopped at step 20 as asked; saved {run}/checkpoints/step_"
                                                   f"000000020.pt; continue with the same flags and --resume {run}")
    assert [int(r["step"]) for r in read_csv(run / "eval.csv")] == [0, 10]
    fmq.main(tiny_env_args(tmp_path / "stopped", resume="auto"))
    fmq.main(tiny_env_args(tmp_path / "whole"))
    for name in ("train.csv", "eval.csv", "final.json"):
        whole = tmp_path / "whole" / "runs" / "tiny__fmq__0" / name
        assert strip_timing(read_csv(run / name)) == strip_timing(read_csv(whole)) if name.endswith(".csv") else (
            (run / name).read_text() == whole.read_text())


@pytest.fixture
def signal_handlers():
    """main installs its own SIGTERM / SIGINT handlers: the test's are put back after it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def signals_at_env_step(monkeypatch, n, *sigs):
    """Patches TinyEnv.step to keep every action taken and send `sigs` to this process at the n-th env step (62 env
    steps are the evaluations at steps 0 and 10 of tiny_env_args, so 63 and 64 are the training env's first two)."""
    real_step, actions = TinyEnv.step, []

    def step(self, action):
        actions.append(np.array(action))
        if len(actions) == n:
            for sig in sigs:
                os.kill(os.getpid(), sig)
        return real_step(self, action)
    monkeypatch.setattr(TinyEnv, "step", step)
    return actions


def test_a_stop_in_the_first_online_episode_saves_where_it_is_and_the_resume_replays_that_episode(
        tmp_path, monkeypatch, tiny_env, capsys, signal_handlers):
    """SIGTERM at the training env's 2nd step (after the evaluations at steps 0 and 10, 31 env steps each): the run
    stops at step 12, saves it and says so; resumed, it replays the first online episode from the dataset's end (60
    rows) and ends as an uninterrupted run; an env that no longer gives the episode's observations is refused. Each
    evaluation's success is the actor's (a number of its weights), so final.json holds the last evaluation's."""
    real_evaluate, real_step = fmq.evaluate, TinyEnv.step

    def evaluate(agent, *a, **k):
        weights = next(agent.actor.parameters()).detach()
        return dict(real_evaluate(agent, *a, **k), success=round(float(weights.sum()), 4))
    monkeypatch.setattr(fmq, "evaluate", evaluate)
    steps = signals_at_env_step(monkeypatch, 64, signal.SIGTERM)
    args = lambda d: tiny_env_args(tmp_path / d, resume="auto")  # noqa: E731
    assert fmq.main(args("stopped")) is None
    run = tmp_path / "stopped" / "runs" / "tiny__fmq__0"
    err = capsys.readouterr().err
    assert "fmq: SIGTERM: stopping within one env step (again: at once)\n" in err
    assert err.strip().splitlines()[-1] == (
        f"fmq: stopped at step 12 as asked; saved {run}/checkpoints/step_000000012.pt; continue with the same flags "
        f"and --resume {run}")
    ckpt = torch.load(run / "checkpoints" / "step_000000012.pt", weights_only=False)
    assert ckpt["step"] == 12
    real_obs = TinyEnv.obs
    monkeypatch.setattr(TinyEnv, "obs", lambda self, last=0.0: real_obs(self, last) + 1)  # the env changed
    with pytest.raises(fmq.FMQError, match=r"^replaying the interrupted episode did not reproduce its observations "
                                           r"\(env changed\?\)$"):
        fmq.main(args("stopped"))
    monkeypatch.setattr(TinyEnv, "obs", real_obs)
    replayed = []
    monkeypatch.setattr(TinyEnv, "step", lambda self, action: replayed.append(action) or real_step(self, action))
    fmq.main(args("stopped"))
    np.testing.assert_array_equal(np.stack(replayed[:2]), np.stack(steps[62:64]))  # the episode's 2 actions, again
    assert re.findall(r"\| (\d+)/40 \[", capsys.readouterr().err)[0] == "12"  # the progress bar starts there
    whole = tmp_path / "whole" / "runs" / "tiny__fmq__0"
    whole.mkdir(parents=True)  # a run that failed before its first checkpoint left an eval.csv: a new run rewrites it
    (whole / "eval.csv").write_text("step,success\n0,0.5\n"), (whole / "train.csv").write_text("step\n0\n")
    fmq.main(args("whole"))
    for name in ("train.csv", "eval.csv"):
        assert strip_timing(read_csv(run / name)) == strip_timing(read_csv(whole / name))
    assert int(read_csv(whole / "train.csv")[0]["step"]) == 5  # the leftover row not kept
    evals, final = read_csv(whole / "eval.csv"), json.loads((whole / "final.json").read_text())
    assert (run / "final.json").read_text() == (whole / "final.json").read_text()
    assert final["success"] == float(evals[-1]["success"]) != float(evals[0]["success"])


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch, tiny_env, signal_handlers):
    steps = signals_at_env_step(monkeypatch, 64, signal.SIGINT, signal.SIGINT)  # the training env's 2nd step
    with pytest.raises(SystemExit, match="^fmq: stopped at once by a second SIGINT$"):
        fmq.main(tiny_env_args(tmp_path))
    assert len(steps) == 64


def test_evaluating_a_checkpoint_loads_no_dataset_and_says_what_it_does(tmp_path, monkeypatch, tiny_env, capsys):
    """--offline-steps 0 --online-steps 0 --load-checkpoint: the env gives the shapes, no dataset is loaded, and the
    run's lines name the checkpoint it evaluates and the files it writes (no train.csv or checkpoints/)."""
    fmq.main(tiny_env_args(tmp_path, online_steps=0))
    ckpt = tmp_path / "runs" / "tiny__fmq__0" / "checkpoints" / "step_000000010.pt"
    monkeypatch.setattr(fmq, "load_dataset", lambda *a: pytest.fail("an evaluation loaded the dataset"))
    capsys.readouterr()
    final = fmq.main(tiny_env_args(tmp_path, exp_name="eval", offline_steps=0, online_steps=0,
                                   load_checkpoint=str(ckpt)))
    run, out = tmp_path / "runs" / "tiny__eval__0", capsys.readouterr().out.splitlines()
    assert out[0] == f"fmq: run {run} on cpu, evaluating {ckpt}"
    assert out[-1] == (f"fmq: done at step 0; success best-of-n 0.80 (5 episodes); files in {run} (eval.csv, "
                       "TensorBoard)")
    assert [(r["step"], r["phase"], r["success"]) for r in read_csv(run / "eval.csv")] == [("0", "offline", "0.8")]
    assert final == dict(step=0, success=0.8, sampler="best-of-n") and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_evaluating_a_checkpoint_of_an_ogbench_task_needs_no_dataset_folder(tmp_path):
    args = fmq.Args(env_id="scene-t5", hidden_dim=32, num_layers=2, time_dim=8, best_of_n=4, offline_steps=0,
                    online_steps=0, eval_episodes=1, eval_envs=1, device="cpu", runs_dir=str(tmp_path / "runs"),
                    dataset_dir=str(tmp_path / "no-data"))
    agent = fmq.make_agent(args, 40, 5 * args.horizon, "cpu")  # scene: observations 40, actions 5
    state = dict({k: getattr(agent, k).state_dict() for k in fmq.NETS}, step=0, args=dataclasses.asdict(args))
    path = fmq.save_checkpoint(tmp_path, dict(state, u_off=None), keep=1)
    final = fmq.main(dataclasses.replace(args, load_checkpoint=str(path)))
    assert final["step"] == 0 and 0.0 <= final["success"] <= 1.0 and not (tmp_path / "no-data").exists()


def test_sps_leaves_out_evaluations_and_eval_time_goes_on_across_a_resume(tmp_path, monkeypatch, tiny_env):
    """On a clock that moves 1 s per update and 100 s per evaluation: every train.csv row has sps 1.0 (one update per
    step; evaluations left out) and eval.csv's time is the run's own, 100, 210, 320, 440 at steps 0, 10, 20, 40, also
    in a run killed at step 37 (checkpoint 30) and resumed."""
    now, real_update, real_evaluate = [0.0], fmq.update, fmq.evaluate
    monkeypatch.setattr(fmq, "time", SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(fmq, "update", lambda *a: now.__setitem__(0, now[0] + 1) or real_update(*a))
    monkeypatch.setattr(fmq, "evaluate", lambda *a, **k: now.__setitem__(0, now[0] + 100) or real_evaluate(*a, **k))
    args = lambda d: tiny_env_args(tmp_path / d, resume="auto")  # noqa: E731
    fmq.main(args("whole"))
    restore = killed_at(monkeypatch, 37)
    with pytest.raises(Killed):
        fmq.main(args("resumed"))
    restore()
    fmq.main(args("resumed"))
    for d in ("whole", "resumed"):
        run = tmp_path / d / "runs" / "tiny__fmq__0"
        assert [float(r["sps"]) for r in read_csv(run / "train.csv")] == [1.0] * 8, d
        assert [(int(r["step"]), float(r["time"])) for r in read_csv(run / "eval.csv")] == [
            (0, 100.0), (10, 210.0), (20, 320.0), (40, 440.0)], d


def test_resume_goes_on_from_the_newest_readable_checkpoint_and_says_which_it_skipped(tmp_path, tiny_env, capsys,
                                                                                      monkeypatch):
    """The newest checkpoint (step 40) truncated, as a full disk or a copy cut short leaves it: --resume goes on from
    step 30's, in one line naming the one it skipped and why, and ends as the run did; none readable: an error."""
    run = tmp_path / "runs" / "tiny__fmq__0"
    fmq.main(tiny_env_args(tmp_path, resume="auto"))
    evals, final = read_csv(run / "eval.csv"), (run / "final.json").read_text()
    newest = run / "checkpoints" / "step_000000040.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    fmq.main(tiny_env_args(tmp_path, resume="auto"))
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fmq: ")]
    assert line.startswith(f"fmq: cannot read checkpoint {newest} (RuntimeError: ") and line.endswith(
        "; trying the one before it")
    assert strip_timing(read_csv(run / "eval.csv")) == strip_timing(evals) and (run / "final.json").read_text() == final
    assert torch.load(newest, weights_only=False)["step"] == 40  # saved again, whole
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"")
    with pytest.raises(fmq.FMQError, match=r"cannot read checkpoint .*/step_000000010.pt \(EOFError: Ran out of inpu"
                                           r"t\)$"):
        fmq.main(tiny_env_args(tmp_path, resume="auto"))  # after one line for each newer one
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(" " + "x" * 250)))
    with pytest.raises(fmq.FMQError, match=r"^cannot read checkpoint c\.pt \(RuntimeError: x{200}\)$"):
        fmq.read_checkpoint("c.pt")  # the reason stripped and cut at 200 characters


# ---------------------------------------------------------------- plumbing: official checkpoints in fmq.py
@pytest.mark.slow
@pytest.mark.parametrize("name,sampler,nfe,agg", [("params_online.pkl", "best-of-n", "32", "min"),
                                                  ("params_online.pkl", "qgbs", "20", "min"),
                                                  ("params_offline.pkl", "best-of-n", "32", "mean")])
def test_import_official_checkpoint_evaluates_in_fmq_main(tmp_path, ogb, monkeypatch, capsys, name, sampler, nfe, agg):
    """Evaluation only; critics aggregate as the official agents': FMQAgent (u_off) by min, FlowMapPolicy by mean."""
    out = tmp_path / "official.pt"
    import_official.main([str(OFFICIAL / name), "--env-id", "scene-t5", "--out", str(out)])
    assert f"--hidden-dim 32 --num-layers 2 --load-checkpoint {out} --offline-steps 0" in capsys.readouterr().out
    seen = []
    monkeypatch.setattr(fmq, "q_agg", lambda critic, how, real=fmq.q_agg: seen.append(how) or real(critic, how))
    final = fmq.main(fmq.Args(env_id="scene-t5", load_checkpoint=str(out), offline_steps=0, online_steps=0,
                              eval_episodes=2, eval_envs=2, hidden_dim=32, num_layers=2, dataset_dir=ogb,
                              runs_dir=str(tmp_path / "runs"), device="cpu", sampler=sampler))
    evals = read_csv(tmp_path / "runs" / "scene-t5__fmq__0" / "eval.csv")
    assert [(r["step"], r["sampler"], r["nfe"], r["episodes"]) for r in evals] == [("0", sampler, nfe, "2")]
    assert 0.0 <= float(evals[0]["success"]) <= 1.0 and final["step"] == 0
    assert set(seen) == {agg} and evals[0]["phase"] == ("online" if agg == "min" else "offline")


# ---------------------------------------------------------------- qgbs.py (Algorithm 2)
def test_qgbs_k0_step_is_one_eta_step_after_best_of_m():
    """Official qgbs with K = 0 moves the best-of-M samples by eta * g / ||g|| before the argmax; Alg. 2 does not."""
    obs, eta = make_obs(batch=4), 0.05
    A = torch.tensor([1.0, 3.0, 0.5], dtype=obs.dtype)
    a_star, c = lambda o: 0.9 * torch.cos(o[:, :D]), lambda o: torch.sin(o[:, 1:D + 1])  # noqa: E731
    quad_q = lambda o, a: -(A * (a - c(o)) ** 2).sum(-1)  # noqa: E731
    fixed_jump = lambda a_r, r, o: a_star(o)  # every sample of a state is a*(s)  # noqa: E731
    plain, _ = qgbs.qgbs(fixed_jump, quad_q, obs, action_dim=D, M=3, K=0, eta=eta, generator=gen(0))
    moved, _ = qgbs.qgbs(fixed_jump, quad_q, obs, action_dim=D, M=3, K=0, eta=eta, generator=gen(0), k0_step=True)
    g = -2 * A * (a_star(obs) - c(obs))
    torch.testing.assert_close(plain, a_star(obs))
    torch.testing.assert_close(moved, (a_star(obs) + eta * g / g.norm(dim=-1, keepdim=True)).clamp(-1, 1))


@pytest.mark.parametrize("K,eta", [(1, 0.3), (2, 0.3), (2, 0.05)])
def test_qgbs_equals_alg2_written_as_a_loop_top_m_then_eta_step(K, eta, monkeypatch):
    """Alg. 2's order on distinct candidates and eta > 0: top-M of the completions, then the eta step, each round
    (stepping before the selection, or the candidates instead of the beam, gives other actions). The noise is the
    batched call's own, replayed per state."""
    obs, M, B, rho = make_obs(batch=3), 3, 2, 1.5
    real_randn, draws = torch.randn, []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(real_randn(*a, **k)) or draws[-1])
    complete = lambda a, t, o: a + (1 - t) * toy_jump(a, t, o)  # noqa: E731
    actions, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=M, K=K, B=B, rho=rho, eta=eta, generator=gen(2),
                           complete=complete)
    assert len(draws) == 1 + K
    with torch.enable_grad():
        for i in range(3):
            expected = reference_qgbs(toy_jump, toy_q, obs[i], draws[0][i], [e[i] for e in draws[1:]], rho, eta,
                                      complete)
            torch.testing.assert_close(actions[i], expected)


@pytest.mark.parametrize("M,K,B", [(4, 1, 4), (32, 0, 1), (8, 1, 2), (4, 2, 4), (3, 3, 1), (1, 0, 7)])
def test_nfe_counts_jump_rows(M, K, B):
    obs, rows = make_obs(batch=5), []

    def counting_jump(a_r, r, o):
        assert a_r.shape[0] == o.shape[0]
        rows.append(a_r.shape[0])
        return toy_jump(a_r, r, o)

    _, info = qgbs.qgbs(counting_jump, toy_q, obs, action_dim=D, M=M, K=K, B=B, generator=gen(0))
    assert qgbs.nfe(M, K, B) == M * (1 + K * B)
    assert sum(rows) / obs.shape[0] == qgbs.nfe(M, K, B) == info["nfe"]
    assert len(rows) == 1 + K  # one batched network call per round
    assert qgbs.nfe(4, 1, 4) == 20 and qgbs.nfe(32, 0, 1) == 32  # paper's table


def test_custom_complete_counts_as_nfe_and_is_used():
    obs, calls = make_obs(batch=2), []

    def euler_complete(a_tp, t_prime, o):  # official-code style completion, one NFE per row
        calls.append((a_tp.shape[0], t_prime))
        return a_tp + (1 - t_prime) * toy_jump(a_tp, t_prime, o)

    qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=2, K=2, B=3, rho=1.5, complete=euler_complete,
              generator=gen(0))
    assert calls == [(2 * 2 * 3, pytest.approx(0.6))] * 2


def test_k0_is_best_of_n_on_same_noise():
    obs, N = make_obs(batch=4), 6
    actions, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=N, K=0, B=4, generator=gen(7))
    # Independent best-of-N, loop per state and per sample, same draw: a_0 = randn(batch, N, D).
    a_0 = torch.randn(obs.shape[0], N, D, generator=gen(7), dtype=obs.dtype)
    for i in range(obs.shape[0]):
        cands = [toy_jump(a_0[i, n][None], 0.0, obs[i][None]).clamp(-1, 1)[0] for n in range(N)]
        qs = [toy_q(obs[i][None], a[None])[0] for a in cands]
        best = max(range(N), key=lambda n: qs[n])
        torch.testing.assert_close(actions[i], cands[best])
        torch.testing.assert_close(info["q"][i], qs[best])


def test_same_seed_same_result_other_seed_differs():
    obs = make_obs()
    a1, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=3, K=2, B=2, generator=gen(1))
    a2, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=3, K=2, B=2, generator=gen(1))
    a3, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=3, K=2, B=2, generator=gen(2))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


@pytest.mark.parametrize("eta", [1e-2, 1e-3])
def test_gradient_step_first_order_gain(eta):
    """Thm 3.2: moving by eta * g / ||g|| raises Q by eta * ||g|| + O(eta^2).

    The jump returns a fixed action per state, so every candidate is a*(s) and the final beam is
    a* + eta * g/||g||. For Q = -(a - c)^T A (a - c) the exact gain is eta ||g|| - eta^2 u^T A u.
    """
    obs = make_obs(batch=4)
    A = torch.tensor([1.0, 3.0, 0.5], dtype=obs.dtype)
    a_star = lambda o: torch.cos(o[:, :D])  # noqa: E731
    c = lambda o: torch.sin(o[:, 1 : D + 1])  # noqa: E731
    quad_q = lambda o, a: -(A * (a - c(o)) ** 2).sum(-1)  # noqa: E731
    fixed_jump = lambda a_r, r, o: a_star(o).expand_as(a_r).clone()  # noqa: E731
    with torch.no_grad():  # callers use no_grad; the Q-gradient must still be taken
        actions, info = qgbs.qgbs(fixed_jump, quad_q, obs, action_dim=D, M=2, K=1, B=3, eta=eta,
                                  generator=gen(0), action_range=(-10.0, 10.0))
    g = -2 * A * (a_star(obs) - c(obs))
    gain = info["q"] - quad_q(obs, a_star(obs))
    expected = eta * g.norm(dim=-1)
    assert (gain - expected).abs().max() <= A.max() * eta**2 * (1 + 1e-6)
    assert (gain - expected).abs().max() > 0  # it is second order, not exact: the test can see it
    torch.testing.assert_close(actions, a_star(obs) + eta * g / g.norm(dim=-1, keepdim=True))


def test_gradient_step_leaves_critic_params_untouched():
    net = torch.nn.Linear(4 + D, 1).double()
    q_net = lambda o, a: net(torch.cat([o, a], -1)).squeeze(-1)  # noqa: E731
    with torch.no_grad():
        qgbs.qgbs(toy_jump, q_net, make_obs(), action_dim=D, M=2, K=1, B=2, generator=gen(0))
    assert all(p.grad is None for p in net.parameters())


def test_batched_equals_per_state_loop(monkeypatch):
    """Noise is drawn state-major (leading dim = batch), so state i of a batched call must equal a
    batch-of-one call that sees row i of the same draws. We record the batched draws, then replay
    row i of each in the per-state calls; any mixing across states (wrong topk/gather dim, wrong
    repeat) breaks the equality."""
    obs, kw = make_obs(batch=4), dict(action_dim=D, M=3, K=2, B=2, eta=0.3)
    real_randn, draws = torch.randn, []

    def recording_randn(*args, **kwargs):
        draws.append(real_randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(torch, "randn", recording_randn)
    actions, info = qgbs.qgbs(toy_jump, toy_q, obs, generator=gen(3), **kw)
    assert [x.shape[0] for x in draws] == [obs.shape[0]] * 3
    for i in range(obs.shape[0]):
        replay = iter([x[i : i + 1] for x in draws])
        monkeypatch.setattr(torch, "randn", lambda *a, **k: next(replay))
        a_i, info_i = qgbs.qgbs(toy_jump, toy_q, obs[i : i + 1], **kw)
        torch.testing.assert_close(a_i[0], actions[i])
        torch.testing.assert_close(info_i["q"][0], info["q"][i])
        torch.testing.assert_close(info_i["beam"][0], info["beam"][i])


@pytest.mark.parametrize("K", [0, 1, 2])
def test_returns_argmax_q_of_final_beam(K):
    obs = make_obs(batch=6)
    actions, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=5, K=K, B=3, generator=gen(4))
    beam = info["beam"]
    q = toy_q(obs.repeat_interleave(5, 0), beam.reshape(-1, D)).reshape(6, 5)
    torch.testing.assert_close(info["beam_q"], q)
    torch.testing.assert_close(info["q"], q.max(1).values)
    torch.testing.assert_close(actions, beam[torch.arange(6), q.argmax(1)])
    assert (q.max(1).values[:, None] >= q).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_cpu(dtype):
    _check_shapes("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_cuda(dtype):
    _check_shapes("cuda", dtype)


@pytest.mark.parametrize("bad,message", [
    (dict(M=0), "qgbs: need M >= 1, K >= 0, B >= 1; got M=0, K=1, B=2"),
    (dict(B=0), "qgbs: need M >= 1, K >= 0, B >= 1; got M=2, K=1, B=0"),
    (dict(K=-1), "qgbs: need M >= 1, K >= 0, B >= 1; got M=2, K=-1, B=2"),
    (dict(rho=0.0), "qgbs: need rho > 0 (signal-to-noise ratio); got rho=0.0"),
    (dict(rho=-1.0), "qgbs: need rho > 0 (signal-to-noise ratio); got rho=-1.0"),
    (dict(action_dim=None), "qgbs: pass action_dim (the flow map needs a_0 of known size)")])
def test_invalid_args_raise(bad, message):
    kw = dict(action_dim=D, M=2, K=1, B=2, rho=1.5) | bad
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        qgbs.qgbs(toy_jump, toy_q, make_obs(), **kw)


def test_defaults_are_the_papers_best_setting_and_integer_states_work():
    """Called with no settings, qgbs is M 4, K 1, B 4 (20 NFE), rho 1.5, eta 0.3, completion by the jump, no K = 0
    step, actions in [-1, 1]: the same actions as with those spelled out, on the same noise. Integer states (e.g.
    discrete ones) draw noise and return actions of torch's default dtype."""
    obs = make_obs()
    got, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, generator=gen(0))
    want, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=4, K=1, B=4, rho=1.5, eta=0.3, complete=toy_jump,
                        k0_step=False, action_range=(-1.0, 1.0), generator=gen(0))
    assert info["nfe"] == 20 and info["beam"].shape == (5, 4, D) and torch.equal(got, want)
    ints = torch.arange(20).reshape(5, 4)
    actions, _ = qgbs.qgbs(lambda a_r, r, o: toy_jump(a_r, r, o.float()), lambda o, a: toy_q(o.float(), a), ints,
                           action_dim=D, generator=gen(0))
    assert actions.dtype == torch.get_default_dtype() and actions.shape == (5, D)


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (-0.2, 0.7)])
def test_actions_stay_in_action_range(lo, hi):
    overshoot = lambda a_r, r, o: 5 * a_r + o[:, :D]  # noqa: E731
    for far, bound in ((10.0, hi), (-10.0, lo)):
        far_q = lambda o, a: -((a - far) ** 2).sum(-1)  # maximiser far outside the box  # noqa: E731
        for K in (0, 1, 2):
            actions, info = qgbs.qgbs(overshoot, far_q, make_obs(), action_dim=D, M=4, K=K, B=3, eta=5.0,
                                      generator=gen(K), action_range=(lo, hi))
            for x in (actions, info["beam"]):
                assert x.min() >= lo and x.max() <= hi
        assert torch.allclose(actions, torch.full_like(actions, bound))  # pushed to the bound by the eta step


def test_renoise_input_is_t_prime_mix_of_beam_and_noise(monkeypatch):
    """Alg. 2, line 6: the completion sees t' a_1^m + (1 - t') eps^{mb}, with t' = rho / (1 + rho)."""
    obs, M, B, rho = make_obs(batch=2), 2, 3, 0.8
    real_randn, draws, seen = torch.randn, [], []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(real_randn(*a, **k)) or draws[-1])

    def recording_complete(a_tp, t_prime, o):
        seen.append((a_tp, t_prime))
        return toy_jump(a_tp, t_prime, o)

    qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=M, K=1, B=B, rho=rho, generator=gen(5),
              complete=recording_complete)
    a_0, eps = draws
    assert a_0.dtype == eps.dtype == obs.dtype == torch.float64  # every draw in the states' dtype
    a_1 = toy_jump(a_0.reshape(-1, D), 0.0, obs.repeat_interleave(M, 0)).clamp(-1, 1).reshape(2, M, 1, D)
    t = rho / (1 + rho)
    (a_tp, t_prime), = seen
    assert t_prime == pytest.approx(t)
    torch.testing.assert_close(a_tp, (t * a_1 + (1 - t) * eps).reshape(-1, D))


def test_beam_is_top_m_of_completions():
    """Alg. 2, line 8: with eta = 0 the final beam is exactly the M best of the M*B completions."""
    obs, M, B, outs = make_obs(batch=3), 3, 4, []

    def recording_complete(a_tp, t_prime, o):
        outs.append(toy_jump(a_tp, t_prime, o).clamp(-1, 1))
        return outs[-1]

    _, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=M, K=1, B=B, eta=0.0, generator=gen(6),
                        complete=recording_complete)
    q_all = toy_q(obs.repeat_interleave(M * B, 0), outs[0]).reshape(3, M * B)
    top_q, top = q_all.topk(M, dim=1)
    top_a = outs[0].reshape(3, M * B, D)[torch.arange(3)[:, None], top]
    order = info["beam_q"].argsort(dim=1, descending=True)
    torch.testing.assert_close(info["beam_q"].gather(1, order), top_q)
    torch.testing.assert_close(info["beam"][torch.arange(3)[:, None], order], top_a)


def test_qgbs_defaults_are_the_papers_best_setting_and_alg2_as_written():
    """M=4, K=1, B=4 (the paper's best, 20 NFE), rho=1.5 and eta=0.3 (the official evaluation config), Alg. 2's K = 0
    (no eta step) and actions in [-1, 1]; a call without them equals one that passes them."""
    defaults = {k: p.default for k, p in inspect.signature(qgbs.qgbs).parameters.items()}
    assert {k: defaults[k] for k in ("M", "K", "B", "rho", "eta", "k0_step", "action_range")} == dict(
        M=4, K=1, B=4, rho=1.5, eta=0.3, k0_step=False, action_range=(-1.0, 1.0))
    obs = make_obs(batch=3)
    plain, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, generator=gen(4))
    given, _ = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=4, K=1, B=4, rho=1.5, eta=0.3, generator=gen(4))
    assert torch.equal(plain, given)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "qgbs: pass action_dim (the flow map needs a_0 of known size)"),
    (dict(action_dim=2, M=0), "qgbs: need M >= 1, K >= 0, B >= 1; got M=0, K=1, B=4"),
    (dict(action_dim=2, K=-1), "qgbs: need M >= 1, K >= 0, B >= 1; got M=4, K=-1, B=4"),
    (dict(action_dim=2, B=0), "qgbs: need M >= 1, K >= 0, B >= 1; got M=4, K=1, B=0"),
    (dict(action_dim=2, rho=0.0), "qgbs: need rho > 0 (signal-to-noise ratio); got rho=0.0")])
def test_qgbs_refuses_bad_arguments_in_one_line_naming_them(kwargs, message):
    with pytest.raises(ValueError) as e:
        qgbs.qgbs(toy_jump, toy_q, make_obs(batch=2), **kwargs)
    assert str(e.value) == message


def test_qgbs_clamps_every_candidate_and_step_to_the_action_range():
    """Jumps and completions far outside [-1, 1] on both sides, and a Q whose gradient pushes further out: every
    action the critic scores is inside the range, and the result is the clamped sign pattern."""
    signs = torch.tensor([1.0, -1.0, 1.0])
    jump = lambda a_r, r, o: 10 * signs.expand_as(a_r)  # noqa: E731
    seen = []
    q = lambda o, a: (seen.append(a.detach().clone()), (a * signs).sum(-1))[1]  # noqa: E731
    for K, k0_step in [(1, False), (2, False), (0, True)]:
        actions, _ = qgbs.qgbs(jump, q, torch.zeros(2, 4), action_dim=3, M=2, K=K, B=2, eta=0.3, generator=gen(0),
                               k0_step=k0_step)
        assert torch.equal(actions, signs.expand(2, 3))
        assert all(a.min() >= -1 and a.max() <= 1 for a in seen), (K, k0_step)
        seen.clear()
    actions, _ = qgbs.qgbs(jump, q, torch.zeros(2, 4), action_dim=3, M=2, K=1, B=2, generator=gen(0),
                           action_range=(-0.5, 0.25))
    assert torch.equal(actions, torch.tensor([0.25, -0.5, 0.25]).expand(2, 3))


def test_qgbs_eta_step_divides_by_the_gradient_norm_plus_its_floor():
    """Alg. 2, line 9 with the floor 1e-8: a gradient of norm 1e-8 moves the action by eta * 1e-8 / 2e-8 = eta / 2
    (not a division by zero)."""
    jump = lambda a_r, r, o: torch.zeros_like(a_r)  # noqa: E731
    q = lambda o, a: 1e-8 * a[:, 0]  # noqa: E731
    actions, _ = qgbs.qgbs(jump, q, torch.zeros(3, 2, dtype=torch.float64), action_dim=2, M=1, K=0, eta=0.3,
                           generator=gen(0), k0_step=True)
    torch.testing.assert_close(actions, torch.tensor([[0.15, 0.0]] * 3, dtype=torch.float64))


def test_qgbs_draws_its_noise_in_the_observations_dtype_and_takes_integer_observations():
    """float64 observations: a_0 and eps are float64 draws from the generator, in that order (the completion's input
    reads (1 - t') eps exactly), and the actions are float64; integer observations give default-dtype actions."""
    seen = {}
    jump = lambda a_r, r, o: (seen.setdefault("a_0", a_r.clone()), torch.zeros_like(a_r))[1]  # noqa: E731
    complete = lambda a, t, o: (seen.update(a_tp=a.clone()), torch.zeros_like(a))[1]  # noqa: E731
    actions, _ = qgbs.qgbs(jump, toy_q, torch.zeros(3, D, dtype=torch.float64), action_dim=D, M=2, K=1, B=3,
                           rho=1.5, generator=gen(7), complete=complete)
    ref = gen(7)
    a_0 = torch.randn(3, 2, D, generator=ref, dtype=torch.float64)
    eps = torch.randn(3, 2, 3, D, generator=ref, dtype=torch.float64)
    assert torch.equal(seen["a_0"], a_0.reshape(6, D))
    assert torch.equal(seen["a_tp"], ((1 - 0.6) * eps).reshape(18, D))
    assert actions.dtype == torch.float64
    ints, _ = qgbs.qgbs(lambda a_r, r, o: 0.5 * a_r, lambda o, a: -a.pow(2).sum(-1), torch.ones(3, 2, dtype=torch.long),
                        action_dim=4, M=2, K=1, B=2, generator=gen(1))
    assert ints.dtype == torch.get_default_dtype() and ints.shape == (3, 4) and ints.abs().max() <= 1


def test_qgbs_renoising_noise_is_fresh_standard_normal_per_beam_and_branch():
    """Alg. 2, line 5: eps ~ N(0, I), one per (state, beam, branch), independent of the initial a_0; a jump that
    returns 0 makes a_1 = 0, so the completion's input (1 - t') eps reads eps."""
    seen = {}
    jump = lambda a_r, r, obs: (seen.setdefault("a_0", a_r.clone()), torch.zeros_like(a_r))[1]  # noqa: E731
    complete = lambda a, t, obs: (seen.update(a_tp=a.clone(), t=t), torch.zeros_like(a))[1]  # noqa: E731
    q = lambda obs, a: -(a - 0.1).pow(2).sum(-1)  # noqa: E731
    batch, M, B, d = 500, 4, 5, 3
    qgbs.qgbs(jump, q, torch.zeros(batch, 2), action_dim=d, M=M, K=1, B=B, rho=1.5, eta=0.0,
              generator=torch.Generator().manual_seed(0), complete=complete)
    assert seen["t"] == pytest.approx(0.6)
    eps = (seen["a_tp"] / (1 - 0.6)).reshape(batch, M, B, d)
    _is_std_normal(eps.reshape(-1, d))
    assert abs(_corr(eps[:, :, 0], eps[:, :, 1])) < 5 / (batch * M * d) ** 0.5  # branches differ
    assert abs(_corr(eps[:, 0], eps[:, 1])) < 5 / (batch * B * d) ** 0.5  # beams differ
    a_0 = seen["a_0"].reshape(batch, M, d)
    _is_std_normal(a_0.reshape(-1, d))
    assert abs(_corr(a_0, eps[:, :, 0])) < 5 / (batch * M * d) ** 0.5
