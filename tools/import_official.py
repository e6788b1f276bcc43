"""Convert a checkpoint of the official FMQ code (JAX, chziakas/flow_map_policy) into an fmq.py checkpoint.

  python tools/import_official.py --env-id cube-trl-t4 --seed 0 --out official_cube-trl-t4.pt
  python tools/import_official.py params_online_sd000.pkl --env-id cube-trl-t4 --out official_cube-trl-t4.pt
  python fmq.py --env-id cube-trl-t4 --load-checkpoint official_cube-trl-t4.pt --offline-steps 0 --online-steps 0
  python tools/qgbs_sweep.py official_cube-trl-t4.pt

The file is `pickle.dump({'agent': flax.serialization.to_state_dict(agent)})`. It is read without jax: the unpickler
allows only the globals in ALLOWED and calls nothing else. Widths, depth, time features, critics and LayerNorms
come from the arrays; obs and action sizes from the env (robomimic ids build it from the dataset file: --dataset-dir).
Every array goes where MAPPING says. A tree with an unknown key, a missing one, or a shape that does not fit the env
stops with one line. An FMQAgent (online) checkpoint has frozen_actor_params: they become u_off.

Without a file, --env-id and --seed name a released checkpoint (HF_REPO, RELEASED): found under --official-dir (laid
out as the Hugging Face repo, checkpoints/<folder>/params_online_sd00<seed>.pkl, with or without the leading
checkpoints/), else that one file is downloaded there with huggingface_hub.
"""
import argparse
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fmq  # noqa: E402

# ---------------------------------------------------------------- the released checkpoints (official README)
HF_REPO = "christoszi/flow-map-policies"  # snapshot_download(HF_REPO, local_dir='.') gives checkpoints/<folder>/...
RELEASED = {"cube-trl-t4": "ctrp4", "cube-trl-t3": "ctrp3", "cube-dbl-t4": "cdp4", "cube-dbl-t3": "cdp3",
            "scene-t4": "sc4", "scene-t5": "sc5", "amaze-gnt-t4": "ag4", "amaze-gnt-t5": "ag5", "hmaze-med-t3": "hm3",
            "hmaze-med-t4": "hm4", "can": "can", "square": "square"}  # fmq.py env id -> folder; seeds 0-4 each


def find_released(env_id, seed, official_dir=None):
    """The path of the released online checkpoint of env_id and seed: under official_dir, else downloaded there."""
    if env_id not in RELEASED or seed not in range(5):
        raise ConversionError(f"no released checkpoint for --env-id {env_id} --seed {seed}: released are seeds 0-4 of "
                              f"{', '.join(RELEASED)}; pass the file itself for others")
    rel, root = f"checkpoints/{RELEASED[env_id]}/params_online_sd{seed:03d}.pkl", Path(official_dir or ".")
    for path in (root / rel, root / rel.split("/", 1)[1]):
        if path.is_file():
            return path
    hint = (f"on a machine with internet run `python -c \"import huggingface_hub as h; h.hf_hub_download('{HF_REPO}', "
            f"'{rel}', local_dir='.')\"` (all of them: h.snapshot_download('{HF_REPO}', local_dir='.')) and copy the "
            f"file to {root / rel}")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ConversionError(f"{rel} is not under {root} and huggingface_hub is not installed (pip install "
                              f"huggingface_hub); or {hint}") from None
    offline = why_offline(huggingface_hub, constants, rel)
    if offline:  # hf_hub_download would retry for ~25 s, printing each try, and leave a lock file behind
        raise ConversionError(f"{rel} is not under {root} and cannot be downloaded ({offline}); {hint}")
    made = [d for d in (root, root / ".cache", root / "checkpoints") if not d.exists()]
    try:
        return Path(huggingface_hub.hf_hub_download(HF_REPO, rel, local_dir=str(root)))
    except Exception as e:  # the download failed midway: remove what it created
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise ConversionError(f"{rel} is not under {root} and its download failed ({type(e).__name__}); {hint}") \
            from None


def why_offline(huggingface_hub, constants, rel):
    """None if the Hub answers one request for the file (no retries), else why not, in a few words."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = huggingface_hub.hf_hub_url(HF_REPO, rel)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=10)
    except Exception as e:  # no network, DNS, refused, timeout, 404: one request, no retry
        return f"{constants.ENDPOINT}: {type(e).__name__}"
    return None


# ---------------------------------------------------------------- reading the pickle without jax
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


def jax_array(fun, args, arr_state, aval_state):
    """jax._src.array._reconstruct_array without jax: the host numpy array (aval_state, i.e. weak_type, dropped)."""
    if fun is not _reconstruct:
        raise pickle.UnpicklingError(f"refusing a jax array rebuilt by {fun!r}")
    arr = fun(*args)
    arr.__setstate__(arr_state)
    if arr.dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing an array of dtype {arr.dtype}")
    return arr


ALLOWED = {("jax._src.array", "_reconstruct_array"): jax_array,  # every global an official checkpoint names
           ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
           ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the same, pickled under numpy 1.x
           ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class OfficialUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: an official checkpoint names only "
                                         f"{', '.join('.'.join(k) for k in ALLOWED)}")
        return ALLOWED[module, name]


def load_official(path):
    """The checkpoint's tree: nested dicts of numpy arrays."""
    with open(path, "rb") as f:
        try:
            return OfficialUnpickler(f).load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # a truncated or foreign file: EOFError, ValueError, TypeError, ...
            raise pickle.UnpicklingError(f"not an official checkpoint ({type(e).__name__}: {e})") from None


def flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}


# ---------------------------------------------------------------- the mapping (docs/official_checkpoints.md)
# Official subtree -> fmq.py module. Inside each, Dense_i is the i-th Linear of the module's `net` and LayerNorm_i its
# i-th LayerNorm. Actor: weight = kernel.T [out, in], bias as is, LayerNorm weight = scale. Critic ensembles: kernel
# [n, in, out] as is, bias [n, out] -> [n, 1, out], LayerNorm scale / bias [n, d] -> weight / bias [n, 1, d].
# Adam moments (opt_state/0/mu, nu) take the same transform as their parameter.
ACTOR, CRITIC = "agent/network/params/modules_actor_bc_flow/mlp", "agent/network/params/modules_critic/value_net"
MAPPING = {
    ACTOR: ("actor", None),
    CRITIC: ("critic", None),
    "agent/network/params/modules_target_critic/value_net": ("critic_target", None),
    "agent/frozen_actor_params/mlp": ("u_off", None),  # FMQAgent (online) checkpoints only
    "agent/network/opt_state/0/mu/modules_actor_bc_flow/mlp": ("actor", "exp_avg"),  # actor_opt
    "agent/network/opt_state/0/nu/modules_actor_bc_flow/mlp": ("actor", "exp_avg_sq"),
    "agent/network/opt_state/0/mu/modules_critic/value_net": ("critic", "exp_avg"),  # critic_opt
    "agent/network/opt_state/0/nu/modules_critic/value_net": ("critic", "exp_avg_sq"),
}
COUNT = "agent/network/opt_state/0/count"  # Adam's step count: both torch Adams' `step`, and the checkpoint's step
TARGET_MOMENTS = r"agent/network/opt_state/0/(mu|nu)/modules_target_critic/.*"  # always 0 (no gradient): dropped
IGNORED = ("agent/rng", "agent/log_alpha", "agent/network/step")  # PRNG key; log(fmq_alpha), untrained; count + 1
LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


class ConversionError(Exception):
    """A tree that does not fit: printed as one line."""


def layers(net):
    """fmq module names of the official Dense_i and LayerNorm_i of an `mlp` or `Critics` Sequential."""
    dense = [n for n, m in net.named_children() if isinstance(m, (nn.Linear, fmq.EnsembleLinear))]
    norms = [n for n, m in net.named_children() if isinstance(m, (nn.LayerNorm, fmq.EnsembleLayerNorm))]
    return {**{f"Dense_{i}": n for i, n in enumerate(dense)}, **{f"LayerNorm_{i}": n for i, n in enumerate(norms)}}


def expected_tree(agent):
    """official key -> (fmq module, parameter name, official shape) for every array that fits `agent`."""
    out = {}
    for prefix, (net, _) in MAPPING.items():
        module = getattr(agent, net)
        if module is None:
            continue
        params = dict(module.named_parameters())
        for layer, name in layers(module.net).items():
            for leaf in ("kernel", "bias") if layer.startswith("Dense") else ("scale", "bias"):
                shape = tuple(params[f"net.{name}.{LEAF[leaf]}"].shape)
                if len(shape) == 3:  # critic ensembles: kernels [n, in, out] as is, the rest [n, 1, d] from [n, d]
                    official = shape if leaf == "kernel" else (shape[0], shape[2])
                else:  # actor: kernels [in, out] = weight.T
                    official = shape[::-1] if leaf == "kernel" else shape
                out[f"{prefix}/{layer}/{leaf}"] = (net, f"net.{name}.{LEAF[leaf]}", official)
    return out


def architecture(flat, env_id, horizon):
    """fmq.Args whose ARCH fields fit the arrays: widths, depth, time features, critics, LayerNorms."""
    for key, ndim in ((f"{ACTOR}/Dense_0/kernel", 2), (f"{CRITIC}/Dense_0/kernel", 3)):
        if key not in flat:
            raise ConversionError(f"missing {key}")
        if flat[key].ndim != ndim:
            raise ConversionError(f"{key} has shape {flat[key].shape}, expected {ndim} dimensions")
    depth = max(int(m[1]) for k in flat if (m := re.fullmatch(rf"{ACTOR}/Dense_(\d+)/\w+", k)))  # Dense_0..Dense_depth
    actor_in, hidden = flat[f"{ACTOR}/Dense_0/kernel"].shape
    n, critic_in, _ = flat[f"{CRITIC}/Dense_0/kernel"].shape
    times = actor_in - critic_in  # 2 x Fourier features of r and t, or 2: raw r, t (official code without config.yaml)
    time_dim = 0 if times == 2 else times // 2 if times > 2 and times % 4 == 0 else fmq.Args.time_dim
    return fmq.Args(env_id=env_id, horizon=horizon, hidden_dim=hidden, num_layers=max(depth, 1), time_dim=time_dim,
                    num_critics=n, actor_layer_norm=f"{ACTOR}/LayerNorm_0/scale" in flat,
                    critic_layer_norm=f"{CRITIC}/LayerNorm_0/scale" in flat)


def convert(tree, env_id, obs_dim, act_dim, horizon=5):
    """An official checkpoint's tree -> an fmq.py checkpoint dict (as fmq.load_checkpoint reads it)."""
    if not isinstance(tree, dict) or set(tree) != {"agent"}:
        raise ConversionError(f"expected {{'agent': ...}} (flax state dict of an official agent), got "
                              f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    flat = flatten(tree)
    leaf = next((k for k, v in flat.items() if not isinstance(v, np.ndarray)), None)
    if leaf is not None or horizon < 1:
        raise ConversionError(f"{leaf} is a {type(flat[leaf]).__name__}, not an array" if leaf else
                              "--horizon must be >= 1")
    args = architecture(flat, env_id, horizon)
    agent = fmq.make_agent(args, obs_dim, act_dim * horizon, "cpu")
    online = any(k.startswith("agent/frozen_actor_params/") for k in flat)
    if online:
        fmq.freeze_offline_copy(agent)
    expected = expected_tree(agent)
    what = (f"{env_id} (obs {obs_dim}, action {act_dim} x horizon {horizon}) with {args.num_layers} hidden layers of "
            f"{args.hidden_dim}, time features {args.time_dim}, {args.num_critics} critics")
    for k in flat:
        if k not in expected and k != COUNT and k not in IGNORED and not re.fullmatch(TARGET_MOMENTS, k):
            raise ConversionError(f"unknown key {k}: not in the official FMQ tree for {what} (encoders are not "
                                  f"supported)")
    for k in (*expected, COUNT):
        if k not in flat:
            raise ConversionError(f"missing {k}")
        want = expected[k][2] if k in expected else ()
        if flat[k].shape != want:
            raise ConversionError(f"{k} has shape {flat[k].shape}, but {what} needs {want}")
    if any(np.any(v != 0) for k, v in flat.items() if re.fullmatch(TARGET_MOMENTS, k)):
        raise ConversionError("nonzero Adam moments for the target critic: not the official FMQ update")

    state, moments = {}, {}
    for k, (net, param, _) in expected.items():
        x = torch.from_numpy(np.array(flat[k], np.float32))
        x = x.T.contiguous() if x.dim() == 2 and k.endswith("kernel") else x.reshape(
            getattr(agent, net).get_parameter(param).shape)
        moment = MAPPING[k.rsplit("/", 2)[0]][1]  # None: a network parameter; exp_avg / exp_avg_sq: Adam's
        target = moments.setdefault((net, moment), {}) if moment else state.setdefault(net, {})
        target[param] = x
    for net, sd in state.items():
        getattr(agent, net).load_state_dict(sd, strict=True)
    count = int(flat[COUNT])
    for net in ("actor", "critic"):
        opt, names = getattr(agent, f"{net}_opt"), [n for n, _ in getattr(agent, net).named_parameters()]
        sd = opt.state_dict()
        sd["state"] = {i: dict(step=torch.tensor(float(count)), exp_avg=moments[net, "exp_avg"][n],
                               exp_avg_sq=moments[net, "exp_avg_sq"][n]) for i, n in enumerate(names)}
        opt.load_state_dict(sd)
    ckpt = {k: getattr(agent, k).state_dict() for k in fmq.NETS}
    ckpt.update(step=count, args=asdict(args), u_off=agent.u_off.state_dict() if online else None)
    return ckpt


def env_shapes(env_id, dataset_dir=None):
    spec = fmq.env_spec(env_id)
    env_args = fmq.load_dataset(spec, dataset_dir)[1] if spec["suite"] == "robomimic" else None
    with warnings.catch_warnings():  # mujoco's glfw (no display) and gymnasium's Box chatter
        warnings.simplefilter("ignore")
        env = fmq.make_env(spec, env_args)
    return env.observation_space.shape[0], env.action_space.shape[0]


def eval_command(args, out):
    """The fmq.py command that only evaluates the converted checkpoint (ARCH flags that differ from the defaults)."""
    flags = [f"--env-id {args.env_id}"]
    for k in (k for k in fmq.ARCH if k != "env_id"):
        v, default = getattr(args, k), getattr(fmq.Args, k)
        if v != default:
            flag = "--" + k.replace("_", "-")
            flags.append((flag if v else f"--no-{flag[2:]}") if isinstance(v, bool) else f"{flag} {v}")
    return f"python fmq.py {' '.join(flags)} --load-checkpoint {out} --offline-steps 0 --online-steps 0"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="an official checkpoint file (params_offline.pkl, ...); default: the "
                   "released one of --env-id and --seed")
    p.add_argument("--env-id", required=True, help="the fmq.py env id it was trained on (e.g. cube-trl-t4)")
    p.add_argument("--seed", type=int, default=0, help="without a file: the released seed (0-4)")
    p.add_argument("--official-dir", default=None, help="without a file: where the released checkpoints are, or go")
    p.add_argument("--out", required=True, help="where to write the fmq.py checkpoint (.pt)")
    p.add_argument("--horizon", type=int, default=5, help="action chunk length it was trained with")
    p.add_argument("--dataset-dir", default=None, help="robomimic ids: the folder of the dataset file (see fmq.py)")
    a = p.parse_args(argv)
    try:
        a.checkpoint = a.checkpoint or find_released(a.env_id, a.seed, a.official_dir)
        tree = load_official(a.checkpoint)
        obs_dim, act_dim = env_shapes(a.env_id, a.dataset_dir)
        ckpt = convert(tree, a.env_id, obs_dim, act_dim, a.horizon)
    except (OSError, pickle.UnpicklingError, ConversionError, fmq.FMQError) as e:
        sys.exit(f"import_official: error: {a.checkpoint or a.env_id}: {e}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, a.out)
    args = fmq.Args(**ckpt["args"])
    kind = "online FMQAgent (with u_off)" if ckpt["u_off"] else "offline FlowMapPolicy"
    print(f"wrote {a.out}: {kind}, {args.num_layers} x {args.hidden_dim}, time features {args.time_dim}, "
          f"{args.num_critics} critics, step {ckpt['step']}\nevaluate: {eval_command(args, a.out)}")


if __name__ == "__main__":
    main()
