r"""FMQ (Flow Map Q-Guidance, "Aligning Flow Map Policies with Optimal Q-Guidance", Ziakas, Russo, Bose, 2026): trains
a one-step flow map policy offline on the task's dataset, then online in its env (runs/{env_id}__{exp_name}__{seed}).

examples:
  python tools/make_dataset.py --env scene-play-v0 --episodes 4 --out /tmp/ogbench-small   # a small scene dataset
  python fmq.py --exp-name quick --dataset-dir /tmp/ogbench-small --hidden-dim 64 --num-layers 2 --batch-size 64 \
    --best-of-n 8 --offline-steps 1000 --online-steps 1000 --start-training 100 --curriculum-start 100 \
    --curriculum-end 500 --eval-interval 1000 --eval-episodes 5 --log-interval 250   # the quick check on it
  python fmq.py --env-id cube-dbl-t3 --extra-samplers qgbs   # a paper run (FMQ, FMQ + QGBS), on a GPU if there is one
  python fmq.py --env-id cube-dbl-t3 --resume auto            # continue that run after a stop
"""
# Read top to bottom: Args -> networks -> sampling -> losses -> update -> main (the loop); then the plumbing.
import copy
import csv
import difflib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from ctypes.util import find_library
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import qgbs as qgbs_lib  # Algorithm 2 (Q-Guided Beam Search), a separate file that others copy alone

Sampler = Literal["onestep", "best-of-n", "qgbs"]
FlowMapLoss = Literal["eulerian", "lagrangian", "progressive", "none"]
Samplers = Annotated[tuple[Sampler, ...], tyro.conf.arg(help_behavior_hint="(default: none)")]  # tyro shows ()


@dataclass
class Args:
    # --- task & algorithm ---
    env_id: str = "scene-t5"  # task: a paper id (scene-t5, cube-dbl-t3, can, ...) or any OGBench singletask name
    offline_steps: int = int(1e6)  # offline pretraining steps: flow map and critics trained on the dataset
    online_steps: int = int(1e6)  # online fine-tuning steps: one env step and --utd-ratio updates each
    utd_ratio: int = 1  # updates per online env step, each on its own batch (offline: one per step)
    dataset_proportion: float = 1.0  # train on the first int(rows * p) rows of the dataset only
    buffer_size: int = int(2e6)  # replay buffer rows (at least dataset + 1); when full, the oldest are overwritten
    sparse: bool = False  # rewards become (r != 0) * -1, after the task's own transform, offline and online
    batch_size: int = 256  # minibatch size of each update
    hidden_dim: int = 512  # width of the hidden layers of the actor and the critics
    num_layers: int = 4  # number of hidden layers of the actor and the critics
    time_dim: int = 64  # Fourier features for each of the times r and t; 0 feeds r and t in raw (as Q-chunking)
    actor_layer_norm: bool = False  # LayerNorm after each hidden layer of the actor
    critic_layer_norm: bool = True  # LayerNorm after each hidden layer of the critics
    lr: float = 3e-4  # Adam learning rate (actor and critics)
    discount: float = 0.99  # discount factor per env step
    tau: float = 0.005  # Polyak averaging rate of the target critics
    num_critics: int = 2  # number of critics (at least 2: FMQ damps its step by their disagreement)
    offline_q_agg: Literal["mean", "min"] = "mean"  # how the critics combine offline (TD target, best-of-N choice)
    online_q_agg: Optional[Literal["mean", "min"]] = None  # online/QGBS critic aggregation; None: min if fmq, else mean
    horizon: int = 5  # action chunk length: actions per policy call, executed open-loop
    best_of_n: int = 32  # candidates of the best-of-N action (the TD target's next action, the best-of-n sampler)
    flow_map_loss: FlowMapLoss = "eulerian"  # offline self-distillation loss of the flow map; none: flow matching only
    euler_steps: int = 0  # 0: an action is one flow-map jump; K > 0: K Euler steps of the velocity (Q-chunking: 10)
    curriculum_start: int = 5000  # offline step where self-distillation starts and the (r, t) gaps start to widen
    curriculum_end: int = 50000  # offline step where the (r, t) gaps reach their full width
    start_training: int = 5000  # online updates start at this online env step (the steps before only collect data)
    online_target: Literal["fmq", "mvp", "flow-map"] = "fmq"  # online actor loss: FMQ (Alg. 1), MVP, or the offline one
    eta: float = 1.0  # trust-region radius eta of the Q-guided step (Thm 3.2)
    beta: float = 0.3  # critic-disagreement damping in eta_eff = eta / (1 + beta * delta_critic)
    kappa1: float = 1e-8  # gradient-norm floor kappa1 in g = grad Q / (||grad Q|| + kappa1)
    official_eta: bool = False  # the official code's eta_eff = 1 / (1 + beta * delta_critic): ignores --eta
    guidance_critic: Literal["q1", "mean"] = "q1"  # critic whose gradient guides FMQ: the first (Alg. 1) or mean
    # --- acting & QGBS ---
    sampler: Sampler = "best-of-n"  # evaluation sampler: best-of-n (the paper's FMQ column), qgbs (FMQ + QGBS)
    extra_samplers: Samplers = ()  # more samplers evaluated each time, in eval.csv rows of their own (e.g. qgbs)
    train_sampler: Sampler = "best-of-n"  # sampler that acts online: best-of-n (official code), onestep (Alg. 1)
    qgbs_m: int = 4  # QGBS beam size M
    qgbs_k: int = 1  # QGBS renoising rounds K
    qgbs_b: int = 4  # QGBS branches B per beam member
    qgbs_rho: float = 1.5  # QGBS signal-to-noise ratio rho: renoise to t' = rho / (1 + rho)
    qgbs_eta: float = 0.3  # QGBS trust-region step eta
    qgbs_completion: Literal["euler", "flow-map"] = "euler"  # QGBS completion: an Euler step (official), Alg. 2's jump
    qgbs_k0_step: bool = True  # with --qgbs-k 0, still take one eta step (official); off: Alg. 2, i.e. best-of-M

    # --- run: name, seed, device, speed ---
    exp_name: str = "fmq"  # experiment name; the run folder is {runs_dir}/{env_id}__{exp_name}__{seed}
    seed: int = 0  # seed of python, numpy, torch and the training env (evaluation episodes use seed + 10000 on)
    deterministic: bool = False  # deterministic torch kernels: a rerun on the same device gives the same numbers
    device: str = "auto"  # where to train: 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:i]'
    threads: int = 1  # CPU threads of torch's ops (torch.set_num_threads); on a GPU run only host-side ops use them
    compile: bool = False  # run the update under torch.compile: a graph per phase, one per Adam step (needs g++)
    amp: bool = False  # run the networks' forward passes in bfloat16 autocast
    cudagraphs: bool = False  # GPU only: capture each phase's whole update as one CUDA graph and replay it
    dataset_dir: Optional[str] = None  # dataset folder; None: ~/.ogbench/data (OGBench) or ~/.robomimic (RoboMimic)
    # --- logging & checkpoints ---
    runs_dir: str = "runs"  # where run folders go (config.json, train.csv, eval.csv, TensorBoard events, checkpoints/)
    track: bool = False  # also log to Weights & Biases (a resumed run continues the same W&B run)
    wandb_project: str = "fmq"  # Weights & Biases project name, used with --track
    wandb_entity: Optional[str] = None  # Weights & Biases entity (user or team), with --track; None: yours
    wandb_group: Optional[str] = None  # Weights & Biases run group (official run_group), with --track
    log_interval: int = 5000  # steps between rows of train.csv and TensorBoard (and checks for NaN losses)
    eval_interval: int = int(1e5)  # steps between evaluations (there is one also at step 0, phase switch and end)
    eval_episodes: int = 50  # episodes per evaluation, for each evaluated sampler
    eval_envs: int = 10  # evaluation envs stepped together, in waves (an OGBench env holds ~160 MB of memory)
    video_episodes: int = 0  # episodes rendered to runs/<run>/videos/ after each evaluation, not counted
    video_frame_skip: int = 3  # a video frame every this many env steps (and at each episode's end)
    save_interval: int = int(1e5)  # steps between checkpoints (one is also saved at each evaluation)
    keep_checkpoints: int = 3  # how many of the most recent checkpoints to keep on disk
    resume: Optional[str] = None  # continue a stopped run: its folder, or 'auto' for this command's run folder
    load_checkpoint: Optional[str] = None  # start from this checkpoint file's networks (e.g. with --offline-steps 0)

class FMQError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# ---------------------------------------------------------------- networks
def time_features(t, dim):
    """Fourier features of a time in [0, 1] (official `FourierFeatures`): [cos, sin] of t times dim / 2 log-spaced
    frequencies 10000^(-k / (dim / 2 - 1)), from 1 down to 1e-4 rad per unit time. dim 0: t itself (QC's input)."""
    if dim == 0:
        return t
    freqs = 1e4 ** -(torch.arange(dim // 2, device=t.device, dtype=t.dtype) / max(dim // 2 - 1, 1))
    return torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)], -1)


def mlp(in_dim, hidden, out_dim, layers, layer_norm):
    """Official `MLP`: Dense -> GELU (flax's tanh form) -> LayerNorm (eps 1e-6) per hidden layer, then Dense; Dense
    kernels Xavier-uniform (variance_scaling 1, fan_avg), biases 0."""
    mods = []
    for k in range(layers):
        mods += [nn.Linear(in_dim if k == 0 else hidden, hidden), nn.GELU("tanh")]
        mods += [nn.LayerNorm(hidden, 1e-6)] * layer_norm
    net = nn.Sequential(*mods, nn.Linear(hidden, out_dim))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
    return net


class FlowMapActor(nn.Module):
    """Average velocity u_theta(a_r, r, t | s) of a flow map X_{r,t}(a_r|s) = a_r + (t - r) u_theta(a_r, r, t|s).
    Actions are flattened chunks of `horizon` actions; a_0 ~ N(0, I) is noise, a_1 an action."""

    def __init__(self, obs_dim, act_dim, args):
        super().__init__()
        self.act_dim, self.time_dim, self.euler_steps = act_dim, args.time_dim, args.euler_steps  # see `flow`
        self.net = mlp(obs_dim + act_dim + 2 * max(args.time_dim, 1), args.hidden_dim, act_dim, args.num_layers,
                       args.actor_layer_norm)

    def forward(self, obs, a_r, r, t):
        r, t = (x.to(a_r.dtype).reshape(-1, 1).expand(len(a_r), 1) if torch.is_tensor(x)
                else a_r.new_full((len(a_r), 1), x) for x in (r, t))
        return self.net(torch.cat([obs, a_r, time_features(r, self.time_dim), time_features(t, self.time_dim)], -1))


class EnsembleLinear(nn.Module):
    def __init__(self, n, in_dim, out_dim):
        super().__init__()
        k = math.sqrt(6.0 / (in_dim + out_dim))  # Xavier-uniform per member, zero bias (as `mlp`)
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-k, k))
        self.bias = nn.Parameter(torch.zeros(n, 1, out_dim))

    def forward(self, x):  # [n, B, in] -> [n, B, out]
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    def __init__(self, n, dim):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n, 1, dim)), nn.Parameter(torch.zeros(n, 1, dim))

    def forward(self, x):
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=1e-6), self.weight)


class Critics(nn.Module):
    """`num_critics` Q networks on action chunks as one batched ensemble: Q(s, a) -> [num_critics, B]."""

    def __init__(self, obs_dim, act_dim, args):
        super().__init__()
        n, h = args.num_critics, args.hidden_dim
        mods = []
        for k in range(args.num_layers):
            mods += [EnsembleLinear(n, obs_dim + act_dim if k == 0 else h, h), nn.GELU("tanh")]
            mods += [EnsembleLayerNorm(n, h)] * args.critic_layer_norm  # after the GELU, as the official `MLP`
        self.net, self.n = nn.Sequential(*mods, EnsembleLinear(n, h, 1)), n

    def forward(self, obs, a):
        h = self.net[:-1](torch.cat([obs, a], -1).expand(self.n, -1, -1))
        with torch.autocast(h.device.type, enabled=False):  # fp32 Q under --amp: bf16 steps 0.5 apart near |Q| = 100
            return self.net[-1](h.float()).squeeze(-1)


def q_agg(critic, how):
    """Q(s, a) -> [B], aggregated over the ensemble."""
    return lambda obs, a: critic(obs, a).min(0).values if how == "min" else critic(obs, a).mean(0)


def critic_agg(args, online):
    """Aggregation of TD target, best-of-N and QGBS: offline_q_agg offline; online --online-q-agg, else the method's:
    min for FMQ (official FMQAgent), mean for flow-map (official FlowMapPolicy kept online, QC) and mvp."""
    return (args.online_q_agg or ("min" if args.online_target == "fmq" else "mean")) if online else args.offline_q_agg


def make_agent(args, obs_dim, act_dim, device):
    actor, critic = FlowMapActor(obs_dim, act_dim, args).to(device), Critics(obs_dim, act_dim, args).to(device)
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=args.lr, fused=torch.device(device).type == "cuda",
                                        capturable=args.cudagraphs)  # capturable: its step count stays on the device
    return SimpleNamespace(actor=actor, critic=critic, critic_target=copy.deepcopy(critic).requires_grad_(False),
                           u_off=None, actor_opt=adam(actor), critic_opt=adam(critic))


def freeze_offline_copy(agent):
    """Alg. 1's u_off: a frozen copy of the pretrained flow map."""
    agent.u_off = copy.deepcopy(agent.actor).requires_grad_(False)


# ---------------------------------------------------------------- sampling (Alg. 1 line 2; Alg. 2 lives in qgbs.py)
def flow(actor, obs, a_r, r=0.0, steps=None):
    """X_{r,1}(a_r | s): the flow map's jump a_r + (1 - r) u(a_r, r, 1) if steps is 0, else `steps` Euler steps of
    the instantaneous velocity u(a, t, t) from r to 1 (a flow-matching policy; QC takes 10). steps: --euler-steps."""
    steps = actor.euler_steps if steps is None else steps
    if steps == 0:
        return a_r + (1.0 - r) * actor(obs, a_r, r, 1.0)
    for k in range(steps):
        t = r + (1.0 - r) * k / steps
        a_r = a_r + (1.0 - r) / steps * actor(obs, a_r, t, t)
    return a_r


def one_step(actor, obs, generator=None):
    """Alg. 1, line 2: a_1 = X_{0,1}(a_0 | s) = a_0 + u_theta(a_0, 0, 1 | s), a_0 ~ N(0, I): one network evaluation.
    Every action the agent draws (acting, evaluation, TD target, MVP's target) starts here."""
    a_0 = torch.randn(len(obs), actor.act_dim, device=obs.device, generator=generator)
    return flow(actor, obs, a_0).clamp(-1.0, 1.0)


def best_of_n(actor, q_fn, obs, n, generator=None):
    """The best of n one-step samples under q_fn: (actions [B, d], their Q [B])."""
    obs_n = obs.repeat_interleave(n, 0)
    a = one_step(actor, obs_n, generator)
    q_best, i = q_fn(obs_n, a).view(len(obs), n).max(1)
    return a.view(len(obs), n, -1)[torch.arange(len(obs), device=obs.device), i], q_best


def select_action(agent, obs, sampler, args, generator=None):
    """Action chunks [B, act_dim] for states [B, obs_dim] with the chosen sampler (no gradient to the nets). Critics
    aggregate as the official agents' (`critic_agg`): offline_q_agg offline, the online one online and in QGBS."""
    actor, q_fn = agent.actor, q_agg(agent.critic, critic_agg(args, agent.u_off is not None or sampler == "qgbs"))
    if sampler == "onestep":
        return one_step(actor, obs, generator)
    if sampler == "best-of-n":
        return best_of_n(actor, q_fn, obs, args.best_of_n, generator)[0]
    jump = lambda a_r, r, s: flow(actor, s, a_r, r)  # X_{r,1}(a_r | s)
    euler = lambda a_r, r, s: flow(actor, s, a_r, r, max(actor.euler_steps, 1))  # official: one diagonal Euler step
    return qgbs_lib.qgbs(jump, q_fn, obs, action_dim=actor.act_dim, M=args.qgbs_m, K=args.qgbs_k, B=args.qgbs_b,
                         rho=args.qgbs_rho, eta=args.qgbs_eta, generator=generator, k0_step=args.qgbs_k0_step,
                         complete=euler if args.qgbs_completion == "euler" else None)[0]


def sampler_nfe(sampler, args):
    """Network evaluations per action selection (each flow-map jump is --euler-steps of them, if any)."""
    n = dict(onestep=1, qgbs=qgbs_lib.nfe(args.qgbs_m, args.qgbs_k, args.qgbs_b)).get(sampler, args.best_of_n)
    return n * max(args.euler_steps, 1)


def act(agent, obs, sampler, args, generator=None):
    """Action chunks [B, horizon, act_dim] (numpy) for states [B, obs_dim] (numpy), on the training device."""
    device = next(agent.actor.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
        a = select_action(agent, torch.as_tensor(obs, dtype=torch.float32, device=device), sampler, args, generator)
    return a.float().view(len(obs), args.horizon, -1).cpu().numpy()


# ---------------------------------------------------------------- losses (Thm 3.2, Alg. 1 lines 4-9, baselines)
def trust_region_velocity(u_ref, grad_q, eta, kappa1=0.0):
    """Theorem 3.2: the velocity within ||u - u_ref||_2 <= eta that maximises the first-order expansion of Q at
    a_1, u* = u_ref + eta * grad_q / (||grad_q||_2 + kappa1). Batched over the leading dim; eta a scalar or [B]."""
    eta = torch.as_tensor(eta, dtype=u_ref.dtype, device=u_ref.device).reshape(-1, *[1] * (u_ref.dim() - 1))
    norm = grad_q.flatten(1).norm(dim=1).reshape(-1, *[1] * (u_ref.dim() - 1))
    return u_ref + eta * grad_q / (norm + kappa1)


def eulerian_target(u, obs, a_r, r, t, v=None):
    """Eulerian / MeanFlow: X_{r,t}(a_r) is constant along the flow in r, so u(a_r, r, t) = v(a_r, r) + (t - r)
    (d/dr) u(a_r, r, t), d/dr = partial_r + v . grad_a (one JVP). v: MeanFlow's conditional velocity a_1 - a_0
    (unbiased for the marginal one; what training uses), or, if None, the model's own u(a_r, r, r)."""
    v = u(obs, a_r, r, r).detach() if v is None else v
    u_rt, du_dr = torch.func.jvp(lambda a, r_: u(obs, a, r_, t), (a_r, r), (v, torch.ones_like(r)))
    return u_rt, v + (t - r) * du_dr


def lagrangian_target(u, obs, a_r, r, t, v=None):
    """Lagrangian self-distillation (LSD): d/dt X_{r,t}(a_r) = v(X_{r,t}(a_r), t), i.e.
    u(a_r, r, t) = v(X_{r,t}(a_r), t) - (t - r) partial_t u(a_r, r, t)."""
    u_rt, du_dt = torch.func.jvp(lambda t_: u(obs, a_r, r, t_), (t,), (torch.ones_like(t),))
    x_t = (a_r + (t - r) * u_rt).detach()
    return u_rt, u(obs, x_t, t, t) - (t - r) * du_dt


def progressive_target(u, obs, a_r, r, t, v=None):
    """Progressive self-distillation (PSD): X_{r,t} = X_{s,t} o X_{r,s} for s = r + lam (t - r), i.e.
    u(a_r, r, t) = lam u(a_r, r, s) + (1 - lam) u(X_{r,s}(a_r), s, t)."""
    lam = torch.rand_like(r)
    s = r + lam * (t - r)
    with torch.no_grad():
        u_rs = u(obs, a_r, r, s)
        u_st = u(obs, a_r + (s - r) * u_rs, s, t)
    return u(obs, a_r, r, t), lam * u_rs + (1 - lam) * u_st


FLOW_MAP_TARGETS = dict(eulerian=eulerian_target, lagrangian=lagrangian_target, progressive=progressive_target)


def sample_r_t(n, step, args, device):
    """(r, t), each [n, 1] on `device`, 0 <= r <= t <= 1 (official `flow_utils.sample_r_t`): two sorted uniforms,
    their interval shrunk about its midpoint by a factor 0 up to `curriculum_start`, rising linearly to 1 at
    `curriculum_end`."""
    step = torch.as_tensor(step, dtype=torch.float32, device=device)
    lo, hi = torch.rand(2, n, 1, device=device).sort(0).values
    scale = ((step - args.curriculum_start) / max(args.curriculum_end - args.curriculum_start, 1)).clamp(0.0, 1.0)
    mid, half = (lo + hi) / 2, scale * (hi - lo) / 2
    return mid - half, mid + half


def flow_map_loss(actor, obs, a_data, step, args):
    """Offline pretraining with no multi-step teacher (official `FlowMapPolicy.actor_loss`): the diagonal (flow
    matching) loss ||u(a_t, t, t) - (a_1 - a_0)||^2, plus, after `curriculum_start` steps, a self-distillation loss
    ||u(a_r, r, t) - sg(target)||^2 on its own noise (not with --flow-map-loss none). `step` may be a tensor."""
    B, step = len(a_data), torch.as_tensor(step, device=a_data.device)
    a_0, t = torch.randn_like(a_data), torch.rand(B, 1, device=a_data.device)
    diag = F.mse_loss(actor(obs, (1 - t) * a_0 + t * a_data, t, t), a_data - a_0)
    if args.flow_map_loss == "none":
        return diag, {"actor/diag_loss": diag.detach()}
    (r, t), a_0 = sample_r_t(B, step, args, a_data.device), torch.randn_like(a_data)  # the distillation's own noise
    a_r = (1 - r) * a_0 + r * a_data
    u_rt, target = FLOW_MAP_TARGETS[args.flow_map_loss](actor, obs, a_r, r, t, v=a_data - a_0)  # v: eulerian only
    distill = F.mse_loss(u_rt, target.detach())
    loss = diag + (step > args.curriculum_start) * distill  # weight 0 up to curriculum_start, as the official code
    return loss, {"actor/diag_loss": diag.detach(), "actor/distill_loss": distill.detach()}


def fmq_loss(agent, obs, a_data, args):
    """Alg. 1, lines 5-9 (official `FMQAgent._fmq_loss`): regress u_theta(a_r, r, 1) onto sg(u_off + eta_eff g)."""
    B = len(a_data)
    r, a_0 = torch.rand(B, 1, device=a_data.device), torch.randn_like(a_data)
    a_r = (1 - r) * a_0 + r * a_data  # line 5
    with torch.no_grad():
        u_off = agent.u_off(obs, a_r, r, 1.0)
    a_1 = (a_r + (1 - r) * u_off).clamp(-1.0, 1.0).requires_grad_(True)  # line 6, clipped as in the official code
    qs = agent.critic(obs, a_1)
    q_guide = qs[0] if args.guidance_critic == "q1" else qs.mean(0)
    grad_q = torch.autograd.grad(q_guide.sum(), a_1)[0]  # d Q / d a only: no gradient reaches the critic
    spread = qs.detach().std(0, correction=0)
    delta = spread / (spread.mean() + 1e-8)  # delta_critic: per-sample critic spread / its batch mean
    eta_eff = (1.0 if args.official_eta else args.eta) / (1 + args.beta * delta)  # line 8
    target = trust_region_velocity(u_off, grad_q, eta_eff, args.kappa1).detach()  # line 7 and sg(.) of line 9
    loss = F.mse_loss(agent.actor(obs, a_r, r, 1.0), target)  # line 9
    return loss, {"actor/fmq_loss": loss.detach(), "actor/eta_eff": eta_eff.mean(),
                  "actor/q_grad_norm": grad_q.norm(dim=1).mean()}


def mvp_target(agent, obs, args):
    """MVP's generate and select (Zhan et al. 2026): a* = the best of N samples under the critics, drawn as acting
    draws; `update` fits a* with the offline loss (MeanFlow + the instantaneous velocity constraint = diagonal loss)."""
    with torch.no_grad():
        return best_of_n(agent.actor, q_agg(agent.critic, critic_agg(args, True)), obs, args.best_of_n)[0]


def td_target(agent, batch, discount, horizon, agg, n):
    """Chunked TD target R + discount^h mask Q_target(s', a') (official `critic_loss`): a' is the best of n samples
    (`one_step`) under the current critics (official `sample_actions`), valued by the target critics; both use `agg`."""
    a_next, _ = best_of_n(agent.actor, q_agg(agent.critic, agg), batch["next_obs"], n)
    return batch["R"] + discount ** horizon * batch["mask"] * q_agg(agent.critic_target, agg)(batch["next_obs"], a_next)


def critic_loss(agent, batch, discount, horizon, agg, n):
    with torch.no_grad():
        target = td_target(agent, batch, discount, horizon, agg, n)
    qs = agent.critic(batch["obs"], batch["actions"])
    loss = F.mse_loss(qs, target.expand_as(qs))
    return loss, {"critic/loss": loss.detach(), "critic/q": qs.mean().detach(), "critic/target": target.mean()}


# ---------------------------------------------------------------- update (plain eager; make_update adds the speed)
def update(agent, batch, step, args):
    """One update (official `total_loss`): both losses at the pre-update parameters, one step on their sum, Polyak
    toward the pre-update critic (official `target_update`). Returns logged values on the device (no sync); no
    autocast cache, which a CUDA graph must not capture."""
    agent.critic_opt.zero_grad(set_to_none=True), agent.actor_opt.zero_grad(set_to_none=True)
    online, device = agent.u_off is not None, batch["obs"].device
    params = [list(agent.critic.parameters()), list(agent.actor.parameters())]
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp, cache_enabled=not args.cudagraphs):
        c_loss, info = critic_loss(agent, batch, args.discount, args.horizon, critic_agg(args, online), args.best_of_n)
        if online and args.online_target == "fmq":
            a_loss, a_info = fmq_loss(agent, batch["obs"], batch["actions"], args)
        else:  # offline; online, flow-map keeps the offline loss on replay data and mvp takes it toward a*
            a_1 = mvp_target(agent, batch["obs"], args) if online and args.online_target == "mvp" else batch["actions"]
            a_loss, a_info = flow_map_loss(agent.actor, batch["obs"], a_1, step, args)
    (c_loss + a_loss).backward()
    grads = [[p.grad for p in ps] for ps in params]
    info["critic/grad_norm"], info["actor/grad_norm"] = map(nn.utils.get_total_norm, grads)  # stay on the device
    with torch.no_grad():  # outside autograd, or the targets would join the graph
        torch._foreach_lerp_(list(agent.critic_target.parameters()), params[0], args.tau)
    agent.critic_opt.step()
    agent.actor_opt.step()
    return dict(info, **a_info)


def make_update(agent, buffer, args):
    """step -> logged values of one update on a fresh batch (the step reaches it as a device tensor). All the speed is
    here: --compile runs `update` under torch.compile (a graph per phase, and one per Adam step: torch.optim breaks
    the graph on purpose); --cudagraphs captures each phase's whole update as a CUDA graph after 3 eager warm-ups."""
    step_t = torch.zeros((), device=buffer.device)
    run = lambda: update(agent, buffer.sample(args.batch_size, args.discount), step_t, args)
    if args.compile:
        torch._dynamo.config.trace_autograd_ops = True  # backward() and fmq_loss's autograd.grad in the graph
        torch._dynamo.config.nested_graph_breaks = True  # after each Adam step, resume inside `update`: fewer graphs
        torch._inductor.config.fallback_random = True  # eager's random draws (on the CPU, 10x faster than its own)
        drop = lambda r: "record function" not in str(r.msg)  # dynamo's note that Optimizer.step's label is ignored
        logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(drop)
        run = torch.compile(run, dynamic=False)
    graphs = {}  # phase (online?) -> dict(warm=eager updates so far, graph=, out=static outputs)

    def step_fn(step):
        step_t.fill_(step)
        if not args.cudagraphs:
            return run()
        g = graphs.setdefault(agent.u_off is not None, dict(warm=0))
        if g["warm"] < 3:
            side = torch.cuda.Stream(buffer.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                info = run()
            torch.cuda.current_stream().wait_stream(side)
            g["warm"] += 1
            return info
        if "graph" not in g:
            graphs.pop(agent.u_off is None, None)  # the other phase's graph is done with
            g["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g["graph"]):
                g["out"] = run()
        g["graph"].replay()
        return g["out"]
    return step_fn


# ---------------------------------------------------------------- training loop (Alg. 1)
def main(args: Args):
    """Phase 1, offline pretraining of the flow map and critics on the task's dataset; the transition, u_off frozen;
    Phase 2, online fine-tuning in the env with FMQ (Alg. 1) or a baseline's actor loss. What it calls after the
    method (envs and datasets, the buffer, logs, checkpoints) is plumbing, after the marked line below."""
    run = start_run(args)  # checks, seeds, device, dataset, envs and the replay buffer
    agent = make_agent(args, run.obs_dim, run.act_dim * args.horizon, run.device)
    step, ep, queue = restore_run(run, agent, args)  # --resume: the run's whole state; --load-checkpoint: the nets
    update_fn = make_update(agent, run.buffer, args) if run.buffer else None
    open_logs(run, args, step)  # the run folder: config.json, train.csv, eval.csv, TensorBoard, W&B
    obs = reset_training_env(run, args, ep)  # (resuming: replays the interrupted episode)
    total = args.offline_steps + args.online_steps
    due = lambda s: s % args.eval_interval == 0 or s in (total, args.offline_steps)  # an evaluation at step s
    switch = lambda: step >= args.offline_steps and args.online_steps > 0 and agent.u_off is None and not run.stop
    print(f"fmq: run {run.dir} on {run.device}, " + (f"evaluating {args.load_checkpoint}" if run.eval_only else (
        f"dataset {run.n_off} rows; {args.offline_steps} offline + {args.online_steps} online steps" + f" (updates "
        f"from online step {args.start_training})" * (args.online_steps > 0) + f", starting at step {step}")),
          flush=True)
    results = {r["sampler"]: float(r["success"]) for r in run.evals}
    if due(step) and all(int(r["step"]) != step for r in run.evals):  # step 0, or an evaluation a stop cut short
        results = evaluate_and_log(run, agent, args, step) or results
    if switch():  # online from an offline checkpoint
        freeze_offline_copy(agent)
    run.last_log = (step, time.time())
    pbar = tqdm(total=total, initial=step, dynamic_ncols=True, mininterval=1.0)
    while step < total and not run.stop:
        online = step >= args.offline_steps
        if online:  # Phase 2, Alg. 1 lines 2-3: act (best-of-N, as the official code), store the transition
            queue = queue or list(act(agent, obs[None], args.train_sampler, args)[0])
            action = queue.pop(0)
            next_obs, r, term, trunc, info = run.env.step(action)
            run.buffer.add(obs, action, float(run.rewards(r)), 1.0 - term, next_obs, term or trunc)
            obs, ep["ret"] = next_obs, ep["ret"] + r
            if term or trunc:
                last = {"env/episode_return": ep["ret"], "env/episode_success": float(info["success"])}
                ep = dict(index=ep["index"] + 1, start=run.buffer.written, ret=0.0, last=last)
                obs, queue = run.env.reset(seed=episode_seed(args, ep["index"]))[0], []
        info = {}  # online warm-up: the first start_training - 1 online steps only collect data (official main.py)
        if not online or step - args.offline_steps + 1 >= args.start_training:
            for _ in range(args.utd_ratio if online else 1):
                info = update_fn(run.step0 + step)  # Alg. 1 lines 4-9 (Phase 1: the flow-map loss), a fresh batch
        step += 1
        pbar.update(1)
        if step % args.log_interval == 0 or step in (total, args.offline_steps):
            phase, sps = log_train_row(run, args, step, info, ep)
            pbar.set_postfix(phase=phase, sps=f"{sps:.0f}", success=results.get(args.sampler, "-"))
        if due(step):
            results = evaluate_and_log(run, agent, args, step) or results
            pbar.set_postfix(phase="online" if step >= args.offline_steps else "offline",
                             success=results.get(args.sampler))
        if switch():  # the transition, after the offline agent's evaluation: u_off (Alg. 1's input) frozen
            freeze_offline_copy(agent)
        if (due(step) or step % args.save_interval == 0) and not run.stop:
            run.last_ckpt = save_run(run, agent, args, step, ep, queue)
    pbar.close()
    return finish_run(run, agent, args, step, ep, queue, results)


# ================================================================ plumbing
# Everything below serves the method above: envs & datasets, the replay buffer, evaluation, logging &
# videos, checkpoints & resume, validation. A reader of the method can stop here.


# ---------------------------------------------------------------- the run: what main calls
def start_run(args):
    """Checks, seeds, device, dataset, envs and replay buffer, before any network (an evaluation alone: no dataset)."""
    spec = env_spec(args.env_id)
    validate(args)
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # start-up: SIGTERM stops as Ctrl-C does (`__main__`)
    named = args.resume not in (None, "auto")  # --resume names the run folder
    run_dir = Path(args.resume) if named else Path(args.runs_dir) / f"{args.env_id}__{args.exp_name}__{args.seed}"
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"), reverse=True)  # newest first (zero-padded steps)
    if args.resume is None and ckpts:  # a new run never starts over a checkpoint
        raise FMQError(f"{run_dir} already holds a run; continue it with --resume auto, or pick another --exp-name")
    resume_from, ckpt = read_checkpoint(*ckpts) if args.resume else (None, None)  # the newest readable one
    if named and resume_from is None:
        raise FMQError(f"--resume {args.resume}: no checkpoint in {run_dir / 'checkpoints'}")

    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every new tensor is slow on CPU
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # JAX's default GPU precision
    eval_only = args.offline_steps + args.online_steps == 0 and args.resume is None
    data, env_args = ({}, None) if eval_only and spec["suite"] != "robomimic" else load_dataset(spec, args.dataset_dir)
    data = {k: v[:int(len(v) * args.dataset_proportion)] for k, v in data.items()}  # official dataset_proportion
    env = make_env(spec, env_args)
    try:  # videos: a first frame now, not at the first evaluation hours later
        video_env = make_env(spec, env_args, render=True) if args.video_episodes else None
        if video_env:
            video_env.reset(seed=0), video_env.render()
    except Exception as e:
        raise FMQError(f"--video-episodes: rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL') or 'glfw'} failed ("
                       f"{type(e).__name__}: {str(e).strip()[:200]}); headless, use MUJOCO_GL=egl on a GPU machine or "
                       f"MUJOCO_GL=osmesa (apt-get install libosmesa6)") from None
    obs_dim, act_dim, limit = env.observation_space.shape[0], env.action_space.shape[0], env.spec.max_episode_steps
    if data and (data["observations"].shape[1:] != (obs_dim,) or data["actions"].shape[1:] != (act_dim,)):
        raise FMQError(f"dataset shapes (obs {data['observations'].shape[1:]}, actions {data['actions'].shape[1:]}) "
                       f"do not match env {spec['name']} (obs ({obs_dim},), actions ({act_dim},))")
    if args.horizon >= limit:
        raise FMQError(f"--horizon {args.horizon} must be shorter than the episode ({limit} steps)")
    rewards, buffer, n_off = reward_fn(spec, args.sparse), None, len(data.get("observations", ()))
    if not eval_only:
        data["rewards"] = rewards(data["rewards"]).astype(np.float32)
        capacity = min(max(args.buffer_size, n_off + 1), n_off + args.online_steps)  # official; no row never written
        preallocation_check(capacity, 2 * obs_dim + act_dim + 2, device)
        buffer = ReplayBuffer(data, capacity, args.horizon, device)
    return SimpleNamespace(spec=spec, dir=run_dir, resume_from=resume_from, ckpt=ckpt, device=device, stop=[],
                           eval_only=eval_only, env_args=env_args, env=env, video_env=video_env, eval_envs=None,
                           obs_dim=obs_dim, act_dim=act_dim, rewards=rewards, buffer=buffer, n_off=n_off, step0=0,
                           t0=time.time(), last_ckpt=resume_from)


def open_logs(run, args, step):
    """The run folder (only now: a run that fails to start leaves none) and its logs; from here on a stop request
    (Ctrl-C, SIGTERM) is acknowledged at once and honoured within one env step."""
    def request_stop(sig, _):
        if run.stop:
            raise SystemExit(f"fmq: stopped at once by a second {signal.Signals(sig).name}")
        run.stop.append(sig)
        tqdm.write(f"fmq: {signal.Signals(sig).name}: stopping within one env step (again: at once)", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    resumed = run.resume_from is not None
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "config.json").write_text(json.dumps(asdict(args), indent=2))
    run.log_wandb = wandb_logger(args, run.dir, resumed)
    run.writer = SummaryWriter(str(run.dir), purge_step=step + 1 if resumed else None)
    run.writer.add_text("hyperparameters", "|param|value|\n|-|-|" + "".join(f"\n|{k}|{v}|" for k, v in
                                                                             vars(args).items()))
    run.log_train, _ = csv_logger(run.dir / "train.csv", TRAIN_FIELDS, step if resumed else None)
    run.log_eval, run.evals = csv_logger(run.dir / "eval.csv", EVAL_FIELDS, step if resumed else None)


def episode_seed(args, i):
    return args.seed * 1_000_003 + i  # the training env's episode i starts from this seed


def reset_training_env(run, args, ep):
    """The training env at episode ep["index"]'s start; resuming, replayed to where the buffer's rows end (checked)."""
    obs, _ = run.env.reset(seed=episode_seed(args, ep["index"]))
    if run.resume_from is not None:
        for a in run.buffer.rows("actions", ep["start"], run.buffer.written).cpu().numpy():
            obs = run.env.step(a)[0]
        stored = run.buffer.rows("next_observations", ep["start"], run.buffer.written)
        if len(stored) and not np.allclose(obs, stored[-1].cpu()):
            raise FMQError("replaying the interrupted episode did not reproduce its observations (env changed?)")
    return obs


def log_train_row(run, args, step, info, ep):
    """A train.csv / TensorBoard / W&B row of the last update and training episode -> (phase, sps)."""
    sps = (step - run.last_log[0]) / (time.time() - run.last_log[1])
    run.last_log = (step, time.time())
    losses = {k: float(v) for k, v in info.items()}
    check_finite(run, step, losses)
    row = {**losses, **ep.get("last", {})}
    for k, v in dict(row, **{"charts/SPS": sps}).items():
        run.writer.add_scalar(k, v, step)
    run.log_wandb(row, step)
    phase = "offline" if step - 1 < args.offline_steps else "online"  # of the step just taken
    run.log_train(dict(row, step=step, phase=phase, env_steps=max(step - args.offline_steps, 0), sps=round(sps, 1)))
    return phase, sps


def evaluate_and_log(run, agent, args, s):
    """{sampler: success} at step s for the run's sampler and --extra-samplers, logged; None if a stop cut it short."""
    run.eval_envs = run.eval_envs or [make_env(run.spec, run.env_args)
                                      for _ in range(min(args.eval_envs, args.eval_episodes))]
    results = {sampler: evaluate(agent, run.eval_envs, args, sampler, run.rewards, stop=run.stop)
               for sampler in dict.fromkeys((args.sampler, *args.extra_samplers))}  # the first is the run's own
    if run.stop:
        return None
    for sampler, res in results.items():
        run.log_eval(dict(step=s, phase="offline" if agent.u_off is None else "online", sampler=sampler,
                          env_steps=max(s - args.offline_steps, 0), nfe=sampler_nfe(sampler, args),
                          episodes=args.eval_episodes, time=round(time.time() - run.t0, 1), **res))
        key = "eval/success" + ("" if sampler == args.sampler else f"_{sampler}")
        run.writer.add_scalar(key, res["success"], s), run.log_wandb({key: res["success"]}, s)
    if args.video_episodes and evaluate(agent, [run.video_env], args, args.sampler, frames=(frames := []),
                                        stop=run.stop):
        write_video(run.dir / "videos" / f"step_{s:09d}.mp4", np.stack(frames), run.writer, run.log_wandb, s)
    run.last_log = (s, time.time())  # sps leaves evaluations out
    return {sampler: res["success"] for sampler, res in results.items()}


def finish_run(run, agent, args, step, ep, queue, results):
    """Closes the logs; a requested stop saves the run (exit status 0); else final.json and the end line."""
    run.writer.close()
    if args.track:
        sys.modules["wandb"].finish()
    if run.stop:  # a requested stop, not an error
        print(f"fmq: stopped at step {step} as asked" + (f"; saved {save_run(run, agent, args, step, ep, queue)}; "
              f"continue with the same flags and --resume {run.dir}" if run.buffer else ""), file=sys.stderr)
        return None
    final = dict(step=step, success=results.get(args.sampler), sampler=args.sampler)
    (run.dir / "final.json").write_text(json.dumps(final))
    held = "eval.csv, TensorBoard" if run.eval_only else "eval.csv, train.csv, TensorBoard, checkpoints/"
    print(f"fmq: done at step {step}; success " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()) + f" "
          f"({args.eval_episodes} episodes); files in {run.dir} ({held}{', videos/' * (args.video_episodes > 0)})")
    return final


# ---------------------------------------------------------------- envs & datasets
def _ogb(name, reward=None):
    return dict(suite="ogbench", name=name, reward=reward)


# Every per-env setting lives here. reward (official main.py and README table): 'sparse' -> (r != 0) * -1 (a no-op on
# the navigate tasks: already -1 / 0); 'minus_one' -> r - 1; None: the env's.
ENVS = {
    "can": dict(suite="robomimic", name="can", max_episode_steps=300, reward="minus_one"),
    "square": dict(suite="robomimic", name="square", max_episode_steps=400, reward="minus_one"),
    **{f"cube-dbl-t{k}": _ogb(f"cube-double-play-singletask-task{k}-v0") for k in (3, 4)},
    **{f"cube-trl-t{k}": _ogb(f"cube-triple-play-singletask-task{k}-v0") for k in (3, 4)},
    **{f"scene-t{k}": _ogb(f"scene-play-singletask-task{k}-v0", reward="sparse") for k in (4, 5)},
    **{f"hmaze-med-t{k}": _ogb(f"humanoidmaze-medium-navigate-singletask-task{k}-v0", reward="sparse") for k in (3, 4)},
    **{f"amaze-gnt-t{k}": _ogb(f"antmaze-giant-navigate-singletask-task{k}-v0", reward="sparse") for k in (4, 5)},
}
VIDEO_SIZE = (200, 200)  # width, height of video frames (even: H.264)
REWARDS = {None: lambda r: r, "sparse": lambda r: np.where(r != 0, -1.0, 0.0), "minus_one": lambda r: r - 1.0}
RM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # robomimic low-dim keys
RM_TOL = dict(obs=0.01, replay=0.1, reward=1e-6)  # env guard tolerances, see robomimic_mismatch
RM_HINT = ("use robomimic's v1.5 file, made with robosuite 1.5 (pip install huggingface_hub; python -c \"import "
           "huggingface_hub; huggingface_hub.hf_hub_download('robomimic/robomimic_datasets', 'v1.5/{name}/mh/"
           "low_dim_v15.hdf5', repo_type='dataset', local_dir='{root}')\")")
logging.getLogger("robosuite_logs").addFilter(lambda r: r.levelno >= logging.ERROR)  # robosuite's import chatter
warnings.filterwarnings("ignore", r".*(X11: The DISPLAY environment variable is missing|Box (low|high)'s precision|"
                        r"initialised with render_mode='rgb_array' that is not in the possible render_modes)")
GL = "egl" if torch.cuda.is_available() and find_library("EGL_nvidia") else "osmesa" if find_library("OSMesa") else None
if GL and "MUJOCO_GL" not in os.environ:  # render headless (dm_control would try GLFW, which needs a display)
    os.environ["MUJOCO_GL"] = GL


def env_spec(env_id):
    if env_id in ENVS or "-singletask-" in env_id:
        return dict(ENVS.get(env_id) or _ogb(env_id))
    close = difflib.get_close_matches(env_id, list(ENVS), n=1)
    raise FMQError(f"unknown env id '{env_id}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                   + f"; valid ids: {', '.join(ENVS)}, or any OGBench '*-singletask-task*-v0' name")


class RoboMimicEnv:
    """robosuite 1.5 env built from a robomimic file's env_args as robomimic >= 0.4's EnvRobosuite does, with its
    low-dim keys and gymnasium's step API (robomimic itself is not used: PyPI has only 0.3, of robosuite 1.4)."""

    def __init__(self, env_args, max_episode_steps, render=False):
        import gymnasium
        import robosuite
        from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config
        kwargs = dict(env_args["env_kwargs"], has_renderer=False, has_offscreen_renderer=render, ignore_done=True,
                      use_object_obs=True, use_camera_obs=False, camera_depths=False)
        cc = dict(kwargs.get("controller_configs") or {})
        if "body_parts_controller_configs" in cc:  # robosuite 1.5.0's name for body_parts (arms nested)
            parts = dict(cc.pop("body_parts_controller_configs"))
            cc["body_parts"] = {**parts.pop("arms", {}), **parts}
        if cc:  # robosuite's own converter turns a <= 1.4 arm config into 1.5's composite one
            kwargs["controller_configs"] = refactor_composite_controller_config(
                cc, np.atleast_1d(kwargs["robots"])[0], ["right"])
        self.env = robosuite.make(env_args["env_name"], **kwargs)
        self.spec = SimpleNamespace(max_episode_steps=max_episode_steps)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (self.env.action_dim,), np.float32)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, self.reset(seed=0)[0].shape, np.float32)

    def observe(self, ob=None):
        ob = self.env._get_observations(force_update=True) if ob is None else ob
        return np.concatenate([ob["object-state" if k == "object" else k] for k in RM_KEYS]).astype(np.float32)

    def reset(self, seed=None):
        if seed is not None:  # placements, arm noise: numpy's global RNG in robosuite 1.5.1, env.rng from 1.5.2
            np.random.seed(seed)
            self.env.rng = np.random.default_rng(seed)
        self.t = 0
        return self.observe(self.env.reset()), {}

    def render(self):  # robomimic's agentview camera, upright
        return self.env.sim.render(width=VIDEO_SIZE[0], height=VIDEO_SIZE[1], camera_name="agentview")[::-1]

    def step(self, action):
        ob, reward, _, _ = self.env.step(action)  # reward(): what the file's rewards hold (the guard checks)
        self.t += 1
        success = bool(self.env._check_success())
        return self.observe(ob), float(reward), success, self.t >= self.spec.max_episode_steps, {"success": success}


def robomimic_mismatch(f, env):
    """How far `env` is from the one that recorded robomimic file f (3 demos), next to RM_TOL. obs: restored states
    vs obs (robosuite 1.4's `object` order: ~1). replay: the gripper's miss after stepping actions[k] from states[k],
    over how far it moved (8 rows a demo): other controllers, scalings, gains. reward: env.reward() vs rewards."""
    import mujoco
    sim, model = env.env.sim, env.env.sim.model._model
    aside, site = mujoco.MjData(model), env.env.robots[0].eef_site_id["right"]

    def gripper(qpos):  # kinematics aside: the sim's derived data stays as the last step left it
        aside.qpos[:] = qpos
        mujoco.mj_kinematics(model, aside)
        return aside.site_xpos[site].copy()

    def restore(state, forward=True):
        sim.set_state_from_flattened(state)
        return (sim.forward(), env.observe())[1] if forward else None

    obs_err, missed, moved, reward_err = [], 0.0, 0.0, 0.0
    demos = [f["data"][name] for name in sorted(f["data"], key=lambda d: int(d.split("_")[-1]))]
    for d in [d for d in demos if len(d["actions"]) >= 16][:3]:
        states, actions, rewards, n = d["states"][:], d["actions"][:], d["rewards"][:], len(d["actions"])
        obs, qpos = np.concatenate([d["obs"][k][:] for k in RM_KEYS], -1), states[:, 1:1 + model.nq]
        for k in (n // 4, n // 2, 3 * n // 4):
            restore(states[k - 1])
            obs_err.append(np.abs(restore(states[k]) - obs[k]).max())
        restore(states[n // 2 - 1]), env.env.step(actions[n // 2 - 1])
        for k in range(n // 2, min(n // 2 + 8, n - 1)):
            restore(states[k], forward=False), env.env.step(actions[k])
            missed += np.linalg.norm(gripper(sim.data.qpos) - gripper(qpos[k + 1]))
            moved += np.linalg.norm(gripper(qpos[k + 1]) - gripper(qpos[k]))
        for k in {n - 2, *np.flatnonzero(rewards[:-1])[:1]}:
            restore(states[k + 1])
            reward_err = max(reward_err, abs(env.env.reward() - rewards[k]))
    return dict(obs=float(np.median(obs_err)) if obs_err else np.inf,  # no demo of 16 steps: no verdict, no run
                replay=missed / max(moved, 0.01), reward=reward_err)  # 1 cm: an arm at rest tells no gains apart


def make_env(spec, env_args=None, render=False):
    """One env with gymnasium's API (`env_args`: the robomimic file's env metadata); render: env.render() works."""
    if spec["suite"] == "robomimic":
        return RoboMimicEnv(env_args, spec["max_episode_steps"], render)
    import ogbench
    size = dict(render_mode="rgb_array", width=VIDEO_SIZE[0], height=VIDEO_SIZE[1]) if render else {}
    return ogbench.make_env_and_datasets(spec["name"], env_only=True, **size)


def load_dataset(spec, dataset_dir):
    """Offline data as numpy arrays (`ends`: each trajectory's last step) and robomimic's env metadata (or None)."""
    data, env_args = (load_robomimic if spec["suite"] == "robomimic" else load_ogbench)(spec, dataset_dir)
    data["actions"] = data["actions"].clip(-1 + 1e-5, 1 - 1e-5)  # official loaders (env_utils.py action_clip_eps)
    return data, env_args


def reward_fn(spec, sparse):
    """Rewards as training sees them (official main.py): the ENVS table's transform, then --sparse's (r != 0) * -1."""
    return lambda r: REWARDS["sparse" if sparse else None](REWARDS[spec["reward"]](r))


def load_ogbench(spec, dataset_dir):
    import ogbench
    root = Path(dataset_dir or "~/.ogbench/data").expanduser()
    name = "-".join(p for p in spec["name"].split("-") if p != "singletask" and not p.startswith("task"))
    made = [p for p in (root, *root.parents) if not p.exists()]  # what ogbench makes to download into
    try:
        _, data, _ = ogbench.make_env_and_datasets(spec["name"], dataset_dir=str(root), compact_dataset=False)
    except OSError as e:  # a failed download (no network) is an URLError, an OSError
        for p in made:  # left empty by the failed download
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise FMQError(f"OGBench dataset {root / (name + '.npz')} is missing and could not be downloaded ({e}); "
                       f"on a machine with internet run `python -c \"import ogbench; ogbench.download_datasets"
                       f"(['{name}'], '{root}')\"` or take {name}.npz and {name}-val.npz from the Hugging Face "
                       f"mirror zhouzypaul/ogbench_datasets, and copy them there; or make them offline with "
                       f"`python tools/make_dataset.py --env {name} --out {root}` (manipulation datasets only)"
                       + "; or pass --dataset-dir" * (dataset_dir is None)) from None
    return dict(data, ends=data["terminals"]), None


def load_robomimic(spec, dataset_dir):
    import h5py
    import robosuite
    root, rel = Path(dataset_dir or "~/.robomimic").expanduser(), Path(spec["name"]) / "mh" / "low_dim_v15.hdf5"
    path = next((p for p in (root / rel, root / "v1.5" / rel) if p.exists()), None)  # v1.5/: hf_hub_download's
    hint = RM_HINT.format(name=spec["name"], root=root)
    if path is None:
        raise FMQError(f"RoboMimic dataset not found at {root / rel}; {hint}, or pass --dataset-dir")
    with h5py.File(path, "r") as f:
        demos = [f["data"][name] for name in sorted(f["data"], key=lambda d: int(d.split("_")[-1]))]
        missing = [k for k in RM_KEYS if k not in demos[0]["obs"]]
        if missing:
            raise FMQError(f"{path} lacks observation keys {missing} (it has {sorted(demos[0]['obs'])}); "
                           f"FMQ needs the low-dim keys {list(RM_KEYS)}")
        cat = lambda demo, group: np.concatenate([demo[group][k][:] for k in RM_KEYS], -1)
        parts = [(cat(d, "obs"), d["actions"][:], d["rewards"][:], d["dones"][:], cat(d, "next_obs")) for d in demos]
        env_args = json.loads(f["data"].attrs["env_args"])
        why = f"{path} was made with robosuite {env_args.get('env_version')}; the installed {robosuite.__version__}"
        try:  # the env guard: never train on data whose env the installed robosuite does not reproduce
            err = robomimic_mismatch(f, RoboMimicEnv(env_args, spec["max_episode_steps"]))
        except Exception as e:
            raise FMQError(f"{why} cannot rebuild its env ({type(e).__name__}: {str(e).strip()[:200]!r}); {hint}")
    if any(err[k] > RM_TOL[k] for k in RM_TOL):
        raise FMQError(f"{why} does not reproduce it: observations of its states are off by {err['obs']:.2g}, its "
                       f"actions replayed miss by {err['replay']:.2g} of the motion, rewards by {err['reward']:.2g} "
                       f"(tolerances {RM_TOL}); {hint}")
    obs, actions, rewards, dones, next_obs = (np.concatenate(x).astype(np.float32) for x in zip(*parts))
    ends = dones.copy()  # official terminals = dones; and each demo's last step
    ends[np.cumsum([len(p[0]) for p in parts]) - 1] = 1.0
    return dict(observations=obs, actions=actions, rewards=rewards, masks=1.0 - dones,
                next_observations=next_obs, ends=ends), env_args


# ---------------------------------------------------------------- replay buffer
def chunk_return(rewards, masks, discount):
    """Action-chunk reward and mask of a chunk inside one trajectory (Q-chunking's `sample_sequence`): the reward is
    sum_k discount^k r_k over all h steps, also after a mask-0 step (which only offline OGBench data has mid-chunk:
    online episodes end at success); the mask is 0 if any step has mask 0."""
    powers = discount ** torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)
    return (powers * rewards).sum(1), masks.prod(1)


class ReplayBuffer:
    """The dataset and the online rows on the training device, preallocated; circular as the official one: row v of
    the running count lives at v % capacity, the oldest (offline first) overwritten. Chunks lie inside one episode:
    `starts`, a ring of chunk starts, gains one when a chunk's last step is stored, loses one when its first goes."""

    FIELDS = ("observations", "actions", "rewards", "masks", "next_observations")

    def __init__(self, data, capacity, horizon, device):
        n_off, self.h, self.device = len(data["observations"]), horizon, device
        self.cap = cap = max(capacity, n_off)
        self.data = {k: torch.zeros((cap,) + data[k].shape[1:], device=device) for k in self.FIELDS}
        for k in self.FIELDS:
            self.data[k][:n_off] = torch.as_tensor(data[k], dtype=torch.float32)
        ends = np.asarray(data["ends"], bool).copy()
        ends[-1] = True
        c = np.concatenate([[0], np.cumsum(ends)])
        i = np.arange(max(n_off - horizon + 1, 0))
        ok = i[c[i + horizon - 1] - c[i] == 0]  # no trajectory end among steps i .. i + h - 2
        self.starts_host = np.zeros(cap, np.int64)  # the ring on the host: which start leaves needs no device read
        self.starts_host[:len(ok)] = ok
        self.starts = torch.tensor(self.starts_host, device=device)
        self.n_off, self.written, self.head, self.n_starts, self.ep_len = n_off, n_off, 0, len(ok), 0
        self.ring_t = torch.tensor([0, len(ok)], device=device)  # head, count: sampling reads no host value (graphs)

    def add(self, obs, action, reward, mask, next_obs, end):
        v, cap = self.written, self.cap
        if v >= cap and self.n_starts and self.starts_host[self.head] == v - cap:  # its first row goes now
            self.head, self.n_starts = (self.head + 1) % cap, self.n_starts - 1
        row = torch.as_tensor(np.hstack([obs, action, reward, mask, next_obs]), dtype=torch.float32,
                              device=self.device)  # one host-to-device copy (each copy waits for the GPU)
        for k, x in zip(self.FIELDS, row.split([self.data[k][0].numel() for k in self.FIELDS])):
            self.data[k][v % cap] = x.view(self.data[k].shape[1:])
        self.written, self.ep_len = v + 1, self.ep_len + 1
        if self.ep_len >= self.h:  # a chunk ending at this step now lies inside the episode
            tail = (self.head + self.n_starts) % cap
            self.starts_host[tail] = self.starts[tail] = v + 1 - self.h
            self.n_starts += 1
        self.ring_t[0], self.ring_t[1] = self.head, self.n_starts
        if end:
            self.ep_len = 0

    def rows(self, key, start, stop):
        """Rows of the running count start .. stop - 1."""
        return self.data[key][torch.arange(start, stop, device=self.device) % self.cap]

    def sample(self, batch_size, discount):
        j = self.ring_t[0] + torch.randint(2**62, (batch_size,), device=self.device) % self.ring_t[1]
        seq = (self.starts[j % self.cap, None] + torch.arange(self.h, device=self.device)) % self.cap
        R, mask = chunk_return(self.data["rewards"][seq], self.data["masks"][seq], discount)
        return dict(obs=self.data["observations"][seq[:, 0]], actions=self.data["actions"][seq].flatten(1),
                    R=R, mask=mask, next_obs=self.data["next_observations"][seq[:, -1]])

    def online_state(self):
        """What a checkpoint holds: the rows written online that are still here, and the chunk-start ring."""
        kept = min(self.written - self.n_off, self.cap)
        return dict(rows={k: self.rows(k, self.written - kept, self.written).cpu() for k in self.FIELDS},
                    written=self.written, ring=(self.starts_host.copy(), self.head, self.n_starts), ep_len=self.ep_len)

    def load_online_state(self, state):
        """online_state into this buffer, whose capacity may differ (resumed with other --online-steps)."""
        if "ring" not in state:
            raise FMQError("the checkpoint was written by an older fmq.py (linear replay buffer); resume it with that")
        (w, kept), (starts, head, n) = (state["written"], min(len(state["rows"]["rewards"]), self.cap)), state["ring"]
        for k, x in state["rows"].items():
            self.data[k][torch.arange(w - kept, w, device=self.device) % self.cap] = x[len(x) - kept:].to(self.device)
        ring = starts[(head + np.arange(n)) % len(starts)]
        ring = ring[ring >= w - self.cap]  # a start whose first row a smaller capacity overwrote leaves
        self.starts_host[:len(ring)], self.head, self.n_starts = ring, 0, len(ring)
        self.starts.copy_(torch.from_numpy(self.starts_host))
        self.written, self.ep_len, self.ring_t[0], self.ring_t[1] = w, state["ep_len"], 0, len(ring)


# ---------------------------------------------------------------- evaluation
def evaluate(agent, envs, args, sampler, reward=REWARDS[None], frames=None, stop=()):
    """Success, return_train (rewards as training sees them), return_env and length, means over args.eval_episodes
    episodes in lockstep in `envs`, episode i seeded args.seed + 10_000 + i. With a list `frames`, the video episodes
    after those (rendered, not counted, as the official `evaluate`). None once `stop` holds a stop request."""
    gen, episodes = torch.Generator(next(agent.actor.parameters()).device).manual_seed(args.seed + 10_000), []
    start = args.eval_episodes if frames is not None else 0  # the video episodes come after the counted ones
    end = start + (args.video_episodes if frames is not None else args.eval_episodes)
    for first in range(start, end, len(envs)):
        wave = envs[:min(len(envs), end - first)]
        obs = np.stack([e.reset(seed=args.seed + 10_000 + first + i)[0] for i, e in enumerate(wave)])
        live, (succ, ret_train, ret_env, length) = np.ones(len(wave), bool), np.zeros((4, len(wave)))
        while live.any():
            idx = np.flatnonzero(live)
            chunk = act(agent, obs[idx], sampler, args, gen)
            for k in range(args.horizon):  # the chunk runs open-loop
                for j, i in enumerate(idx):
                    if stop:
                        return None
                    if live[i]:
                        obs[i], r, term, trunc, info = wave[i].step(chunk[j, k])
                        ret_train[i], ret_env[i], length[i] = ret_train[i] + reward(r), ret_env[i] + r, length[i] + 1
                        succ[i], live[i] = info["success"], not (term or trunc)
                        if frames is not None and (length[i] % args.video_frame_skip == 0 or not live[i]):
                            frames.append(wave[i].render().copy())
        episodes += zip(succ, ret_train, ret_env, length)
    return dict(zip(("success", "return_train", "return_env", "length"), map(float, np.mean(episodes, 0))))


# ---------------------------------------------------------------- logging & videos
EVAL_FIELDS = ("step", "phase", "env_steps", "success", "return_train", "return_env", "length", "sampler", "nfe",
               "episodes", "time")
TRAIN_FIELDS = ("step", "phase", "env_steps", "sps", "critic/loss", "critic/q", "critic/target", "critic/grad_norm",
                "actor/diag_loss", "actor/distill_loss", "actor/fmq_loss", "actor/eta_eff",
                "actor/q_grad_norm", "actor/grad_norm", "env/episode_return", "env/episode_success")


def write_video(path, frames, writer, log_wandb, step, fps=15):
    """Frames [T, H, W, 3] to an mp4 (imageio's ffmpeg), to W&B with --track, and to TensorBoard as a GIF (add_video's
    image summary, without its moviepy) of every 2nd frame at half size: ~3x the mp4, the whole video's ~17x."""
    import imageio.v3 as iio
    from tensorboard.compat.proto.summary_pb2 import Summary
    path.parent.mkdir(exist_ok=True)
    iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, macro_block_size=1)
    small = frames[::2, ::2, ::2]
    gif = iio.imwrite("<bytes>", small, extension=".gif", duration=2000 / fps, loop=0)
    image = Summary.Image(height=small.shape[1], width=small.shape[2], colorspace=3, encoded_image_string=gif)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), step)
    log_wandb({"eval/video": path}, step)


def csv_logger(path, fields, resume_step=None):
    """CSV writer, and the rows kept: on resume, rows logged after the checkpoint are dropped (they will be redone)."""
    rows = []
    if resume_step is not None and path.exists():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fields, restval="", extrasaction="ignore")
    writer.writeheader(), writer.writerows(rows), f.flush()
    return (lambda row: (writer.writerow(row), f.flush())), rows


def wandb_logger(args, run_dir, resumed):
    """With --track, log(row, step) to a W&B run that --resume continues (id and last step sent in run_dir/wandb.json;
    steps W&B holds are not sent again: offline W&B would log them twice). A Path in a row is a video."""
    if not args.track:
        return lambda row, step: None
    try:
        import wandb
    except ImportError:
        raise FMQError("--track logs to Weights & Biases: `pip install wandb` first") from None
    path = run_dir / "wandb.json"
    state = json.loads(path.read_text()) if resumed and path.exists() else dict(id=os.urandom(4).hex(), step=-1)
    wandb.init(project=args.wandb_project, entity=args.wandb_entity, group=args.wandb_group, name=run_dir.name,
               id=state["id"], resume="allow", config=asdict(args))

    def log(row, step):
        if step > state["step"]:  # the step is recorded first: a kill in between loses a row, never logs one twice
            path.with_suffix(".tmp").write_text(json.dumps(dict(state, step=step)))
            os.replace(path.with_suffix(".tmp"), path)
            wandb.log({k: wandb.Video(str(v)) if isinstance(v, Path) else v for k, v in row.items()}, step=step)
    return log


def check_finite(run, step, row=(), agent=None):
    """Stops the run at a NaN/inf: in a logged loss or gradient norm (the log row syncs anyway), or, before a checkpoint
    is saved, in a network's weights (a NaN update leaves NaN weights: Adam turns NaN or inf gradients into NaN)."""
    bad = [k for k in row if not math.isfinite(row[k])]
    if agent and not all(p.isfinite().all() for p in (*agent.actor.parameters(), *agent.critic.parameters())):
        bad.append("network weights")
    if bad:
        raise FMQError(f"non-finite {', '.join(bad)} at or before step {step}; training stopped. "
                       f"Last good checkpoint: {run.last_ckpt or 'none yet'}")


# ---------------------------------------------------------------- checkpoints & resume
ARCH = ("env_id", "horizon", "hidden_dim", "num_layers", "time_dim", "num_critics", "actor_layer_norm",
        "critic_layer_norm")
NETS = ("actor", "critic", "critic_target", "actor_opt", "critic_opt")


def save_checkpoint(run_dir, state, keep):
    """Atomic write; keeps the `keep` newest checkpoints and the phase switch's (to --load-checkpoint to go online)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path, switch = (ckpt_dir / f"step_{s:09d}.pt" for s in (state["step"], state["args"]["offline_steps"]))
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    for old in sorted(set(ckpt_dir.glob("step_*.pt")) - {switch})[:-keep]:
        old.unlink()
    return path


def read_checkpoint(*paths):
    """(path, contents) of the first of `paths` that can be read, one line for each one skipped; (None, None): none."""
    for i, path in enumerate(paths):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay CPU ByteTensors
        except Exception as e:  # truncated or corrupt: EOFError, OSError, RuntimeError (zip), UnpicklingError
            why = f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).strip()[:200]})"
            if i == len(paths) - 1:
                raise FMQError(why) from None
            print(f"fmq: {why}; trying the one before it", file=sys.stderr)
    return None, None


def load_checkpoint(path, args, agent, ckpt=None):
    """Loads networks and optimisers into `agent` after checking that the checkpoint (`ckpt`, if read) fits this run."""
    ckpt = read_checkpoint(path)[1] if ckpt is None else ckpt
    theirs = {k: ckpt["args"].get(k) for k in ARCH if ckpt["args"].get(k) != getattr(args, k)}
    if theirs:
        raise FMQError(f"checkpoint {path} does not fit this run: it has {theirs}, this run "
                       f"{ {k: getattr(args, k) for k in theirs} }")
    for k in NETS:
        getattr(agent, k).load_state_dict(ckpt[k])
    if ckpt.get("u_off") is not None:
        freeze_offline_copy(agent)
        agent.u_off.load_state_dict(ckpt["u_off"])
    return ckpt


def save_run(run, agent, args, step, ep, queue):
    """The run's whole state: nets, optimisers, u_off, the buffer's online rows, the training episode, every RNG."""
    check_finite(run, step, agent=agent)
    state = {k: getattr(agent, k).state_dict() for k in NETS}
    state.update(step=step, step0=run.step0, time=time.time() - run.t0, args=asdict(args),
                 u_off=agent.u_off.state_dict() if agent.u_off else None,
                 buffer=run.buffer.online_state(), episode=dict(ep, queue=list(queue)),
                 rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    return save_checkpoint(run.dir, state, args.keep_checkpoints)


def restore_run(run, agent, args):
    """(step, training episode, action queue) to start from. --resume: all save_run saved; --load-checkpoint: the
    nets, and in run.step0 their step, where the flow-map curriculum goes on (the official restore keeps its step)."""
    ep = dict(index=0, start=run.n_off, ret=0.0)
    if run.resume_from is not None:
        ckpt = load_checkpoint(run.resume_from, args, agent, run.ckpt)
        run.step0, run.t0 = ckpt.get("step0", 0), time.time() - ckpt.get("time", 0.0)  # eval.csv's `time` goes on
        run.buffer.load_online_state(ckpt["buffer"])
        rng = ckpt["rng"]
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        run.ckpt = None  # (its memory)
        return ckpt["step"], ckpt["episode"], list(ckpt["episode"].get("queue", []))
    if args.load_checkpoint:
        ckpt = load_checkpoint(args.load_checkpoint, args, agent)
        run.step0 = ckpt["step"] + ckpt.get("step0", 0)
    return 0, ep, []


# ---------------------------------------------------------------- validation
def validate(args):
    problems = [msg for bad, msg in [
        (args.horizon < 1, "--horizon must be >= 1"),
        (min(args.qgbs_m, args.qgbs_b, args.qgbs_k + 1) < 1, "QGBS needs --qgbs-m >= 1, --qgbs-b >= 1, --qgbs-k >= 0"),
        (args.qgbs_rho <= 0, "--qgbs-rho must be > 0"),
        (args.online_target == "fmq" and (args.flow_map_loss == "none" or args.euler_steps > 0),
         "--online-target fmq needs a flow map (u(a_r, r, 1), one jump): not --flow-map-loss none or --euler-steps"),
        (min(args.euler_steps, args.time_dim) < 0 or args.time_dim % 2, "need --euler-steps >= 0, --time-dim 0/even"),
        (args.num_critics < 2, "--num-critics must be >= 2 (FMQ's delta_critic is the critics' spread)"),
        (min(args.best_of_n, args.batch_size, args.utd_ratio, args.threads) < 1,
         "need --best-of-n, --batch-size, --utd-ratio, --threads >= 1"),
        (not 0 < args.dataset_proportion <= 1, "--dataset-proportion must be in (0, 1]"),
        (min(args.eval_episodes, args.eval_envs, args.log_interval, args.eval_interval, args.save_interval,
             args.keep_checkpoints, args.video_episodes + 1, args.video_frame_skip) < 1,
         "eval/log/save intervals and counts must be >= 1 (--video-episodes >= 0)"),
        *[(getattr(args, k) < 0, f"--{k.replace('_', '-')} must be >= 0") for k in ("offline_steps", "online_steps",
                                                                                     "start_training")],
        (0 < args.online_steps < args.start_training, f"--start-training {args.start_training} > --online-steps "
         f"{args.online_steps}: the online phase would never update; lower --start-training"),
        (args.cudagraphs and not (torch.cuda.is_available() and "cpu" not in args.device), "--cudagraphs needs CUDA"),
        (args.compile and not shutil.which(os.environ.get("CXX", "g++")), "--compile needs a C++ compiler for its "
         "kernels (g++, or set CXX): install one (e.g. apt-get install g++) or leave out --compile"),
        (args.offline_steps == 0 and not (args.load_checkpoint or args.resume),
         "--offline-steps 0 needs --load-checkpoint (a pretrained flow map for u_off) or --resume"),
    ] if bad]
    if problems:
        raise FMQError("; ".join(problems))


def preallocation_check(n_rows, row_floats, device):
    need = n_rows * (row_floats * 4 + 8)
    free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
            else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > 0.9 * free:
        raise FMQError(f"the replay buffer needs {need / 2**30:.1f} GiB on {device} but only {free / 2**30:.1f} GiB "
                       f"is free; use fewer --online-steps or another device")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except FMQError as e:
        sys.exit(f"fmq: error: {e}")
    except KeyboardInterrupt:  # a stop request during start-up, before the run's folder is made: nothing to save
        sys.exit("fmq: stopped during start-up; nothing was saved")
