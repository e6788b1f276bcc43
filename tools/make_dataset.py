"""Make OGBench play datasets for the manipulation suites offline, with the oracles the `ogbench` package ships.

Follows OGBench's own generator (data_gen_scripts/generate_manipspace.py, --dataset_type=play): the env runs in
'data_collection' mode, a scripted plan oracle (ogbench.manipspace.oracles.plan) solves one random subtask after
another with temporally correlated noise, and every episode is --max-episode-steps rows. The files have the same
keys and dtypes as the downloaded ones (observations, actions, terminals, qpos, qvel; button_states for scene and
puzzle) and load with `ogbench.make_env_and_datasets(name, dataset_dir=OUT)`, so `fmq.py --dataset-dir OUT` trains
on them. Default sizes are the official ones; validation is a tenth of the training episodes (at least one).

  python tools/make_dataset.py --env scene-play-v0 --out ~/.ogbench/data            # official size, all cores
  python tools/make_dataset.py --env cube-double-play-v0 --episodes 20 --out data   # a small one

Locomotion datasets (antmaze, humanoidmaze, ...) were made with trained expert policies that the package does
not ship, so this tool cannot make them. Each episode has its own seed (derived from --seed and its index), so
the files do not depend on --workers.
"""
import argparse
import os
import sys
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Official episode counts (OGBench data_gen_scripts/commands.sh); every episode is 1001 steps.
OFFICIAL_EPISODES = {"cube-single": 1000, "cube-double": 1000, "cube-triple": 3000, "cube-quadruple": 5000,
                     "scene": 1000, "puzzle-3x3": 1000, "puzzle-4x4": 1000, "puzzle-4x5": 3000, "puzzle-4x6": 5000}
LOCOMOTION = ("pointmaze", "antmaze", "humanoidmaze", "antsoccer")
NOISE, NOISE_SMOOTHING = 0.1, 0.5  # the generator's defaults for the plan oracles
# Probability that a cube subtask stacks the cube on another one, drawn per episode (the generator's ranges).
P_STACK = {"cube-single": (0.0, 0.0), "cube-double": (0.0, 0.25), "cube-triple": (0.05, 0.35),
           "cube-quadruple": (0.1, 0.5), "scene": (0.5, 0.5)}


# fmq.py's filter: glfw's warning without a display (dm_control imports it; nothing here renders) and gymnasium's about
# OGBench's float64 bounds. Set again in each worker, which a spawned (not forked) process needs.
QUIET = r".*(X11: The DISPLAY environment variable is missing|Box (low|high)'s precision)"
warnings.filterwarnings("ignore", QUIET)


class DatasetError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def suite_of(dataset):
    """'scene-play-v0' -> 'scene' (a singletask name maps to its play dataset, as ogbench's loader does)."""
    parts = [p for p in dataset.split("-") if p != "singletask" and not p.startswith("task")]
    if any(p in dataset for p in LOCOMOTION):
        raise DatasetError(f"{dataset} is a locomotion dataset: OGBench made it with trained expert policies, which "
                           f"the ogbench package does not ship; download it (docs/environments.md, 'No internet?')")
    suite = "-".join(parts[:-2])
    if suite not in OFFICIAL_EPISODES or parts[-2:] != ["play", "v0"]:
        raise DatasetError(f"cannot make '{dataset}'; this tool makes the manipulation play datasets: "
                           + ", ".join(f"{s}-play-v0" for s in OFFICIAL_EPISODES))
    return suite


def make_env(suite, max_episode_steps):
    """The env in data-collection mode (random subtasks, no termination at a goal) and its plan oracles."""
    import gymnasium
    import ogbench.manipspace  # noqa: F401  (registers the envs)
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle
    env = gymnasium.make(f"{suite}-v0", terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=max_episode_steps)
    noise = dict(env=env, noise=NOISE, noise_smoothing=NOISE_SMOOTHING)
    if suite.startswith("cube"):
        oracles = dict(cube=CubePlanOracle(**noise))
    elif suite == "scene":
        oracles = dict(cube=CubePlanOracle(**noise), button=ButtonPlanOracle(**noise),
                       drawer=DrawerPlanOracle(**noise), window=WindowPlanOracle(**noise))
    else:  # puzzle: only buttons, pressed with a closed gripper
        oracles = dict(button=ButtonPlanOracle(gripper_always_closed=True, **noise))
    return env, oracles


def episode_seed(seed, index):
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def play_episode(env, oracles, suite, seed):
    """One episode as a dict of arrays. The oracles draw their noise from numpy's global RNG and the env from its
    own, so both are seeded. Scene episodes where the cube leaves the view (outside the drawer) are redone, as
    OGBench does, so that goal images stay unambiguous."""
    np.random.seed(seed)
    ob, info = env.reset(seed=seed)
    while True:
        p_stack = np.random.uniform(*P_STACK.get(suite, (0.5, 0.5)))
        oracle = oracles[info["privileged/target_task"]]
        oracle.reset(ob, info)
        rows, done = [], False
        while not done:
            action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if oracle.done:  # subtask solved: the env picks the next one
                new_ob, new_info = env.unwrapped.set_new_target(p_stack=p_stack)
                oracle = oracles[new_info["privileged/target_task"]]
                oracle.reset(new_ob, new_info)
            rows.append(dict(observations=ob, actions=action, terminals=done, qpos=info["prev_qpos"],
                             qvel=info["prev_qvel"], button_states=info.get("prev_button_states")))
            ob = next_ob
        episode = {k: np.stack([r[k] for r in rows]) for k in rows[0] if rows[0][k] is not None}
        if suite != "scene" or scene_is_healthy(episode["qpos"]):
            return cast(episode)
        ob, info = env.reset()


def scene_is_healthy(qpos):
    """OGBench's check: the cube (qpos 14:17) never goes too far right, nor too far left unless in the drawer."""
    _, y, z = qpos[:, 14:17].T
    return not ((y >= 0.29).any() or ((y <= -0.3) & ((z < 0.06) | (z > 0.08))).any())


def cast(episode):
    """The downloaded files' dtypes: terminals bool, button_states int64, everything else float32."""
    dtypes = dict(terminals=bool, button_states=np.int64)
    return {k: v.astype(dtypes.get(k, np.float32)) for k, v in episode.items()}


def save(path, episodes):
    """Concatenates episodes into one OGBench .npz (written to a temp file, then renamed)."""
    arrays = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


_worker = {}  # each process builds its env and oracles once


def _init_worker(suite, max_episode_steps):
    warnings.filterwarnings("ignore", QUIET)
    _worker.update(suite=suite, env_oracles=make_env(suite, max_episode_steps))


def _run_episode(seed):
    return play_episode(*_worker["env_oracles"], _worker["suite"], seed)


def make_dataset(dataset, out, episodes=None, max_episode_steps=1001, workers=1, seed=0, progress=True):
    """Writes OUT/<dataset>.npz (episodes) and OUT/<dataset>-val.npz (a tenth, at least 1); returns both paths."""
    suite = suite_of(dataset)
    name = f"{suite}-play-v0"
    episodes = OFFICIAL_EPISODES[suite] if episodes is None else episodes
    if episodes < 1 or max_episode_steps < 2 or workers < 1:
        raise DatasetError(f"need --episodes >= 1, --max-episode-steps >= 2 and --workers >= 1 "
                           f"(got {episodes}, {max_episode_steps}, {workers})")
    out = Path(out).expanduser()
    paths = out / f"{name}.npz", out / f"{name}-val.npz"
    for p in paths:
        if p.exists():
            raise DatasetError(f"{p} already exists; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [episode_seed(seed, i) for i in range(episodes + max(1, episodes // 10))]
    if workers == 1:
        _init_worker(suite, max_episode_steps)
        results = list(tqdm(map(_run_episode, seeds), total=len(seeds), desc=name, unit="episode",
                            disable=not progress))
    else:
        with Pool(min(workers, len(seeds)), _init_worker, (suite, max_episode_steps)) as pool:
            results = list(tqdm(pool.imap(_run_episode, seeds), total=len(seeds), desc=name, unit="episode",
                                disable=not progress))
    save(paths[0], results[:episodes])
    save(paths[1], results[episodes:])
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="dataset, e.g. scene-play-v0, cube-double-play-v0, puzzle-3x3-play-v0")
    p.add_argument("--out", default="~/.ogbench/data", help="output folder (default: %(default)s, ogbench's)")
    p.add_argument("--episodes", type=int, default=None, help="training episodes (default: the official count)")
    p.add_argument("--max-episode-steps", type=int, default=1001, help="rows per episode (default: %(default)s)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes (default: all cores, %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.error = lambda message: sys.exit(f"make_dataset: error: {message}")  # one line, no usage block
    a = p.parse_args(argv)
    try:
        paths = make_dataset(a.env, a.out, a.episodes, a.max_episode_steps, a.workers, a.seed)
    except (DatasetError, OSError) as e:
        sys.exit(f"make_dataset: error: {e}")
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
