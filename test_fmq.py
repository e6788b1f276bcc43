"""Tests for fmq.py, qgbs.py and tools/. `pytest -m "not slow"`: the fast tier (known answers, main on a tiny env);
`pytest`: everything, with the end-to-end tier marked slow (real envs, subprocesses, training); their times are in
docs/testing.md. CUDA tests skip without a GPU."""
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))
import fmq  # noqa: E402
import make_dataset  # noqa: E402
import qgbs  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# OGBench data: the fixtures `ogb` and `ogbench_data` (section "OGBench test data", at the end) make it.


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


# ---------------------------------------------------------------- Theorem 3.2
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
    # kappa1 > 0 shrinks the step below eta and keeps the direction
    u_k = fmq.trust_region_velocity(torch.tensor(u_ref), torch.tensor(grad_q), 1.0, kappa1=0.5).numpy()
    step = u_k - u_ref
    assert np.all(np.linalg.norm(step, axis=1) < 1.0)
    np.testing.assert_allclose(step / np.linalg.norm(step, axis=1, keepdims=True),
                               grad_q / np.linalg.norm(grad_q, axis=1, keepdims=True), atol=1e-12)


# ---------------------------------------------------------------- flow-map losses on a known flow map
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


@pytest.mark.parametrize("kind", ["eulerian", "lagrangian", "progressive"])
def test_flow_map_losses_vanish_only_for_the_exact_flow_map(kind):
    torch.manual_seed(0)
    x, r = torch.randn(256, 3, dtype=torch.float64), torch.rand(256, 1, dtype=torch.float64) * 0.8
    t = r + 0.05 + torch.rand(256, 1, dtype=torch.float64) * (0.95 - r)
    obs = torch.zeros(256, 1, dtype=torch.float64)
    u_rt, target = fmq.FLOW_MAP_TARGETS[kind](gaussian_flow_map(), obs, x, r, t)
    assert (u_rt - target).abs().max() < 1e-8
    u_rt, target = fmq.FLOW_MAP_TARGETS[kind](gaussian_flow_map(wrong=1.3), obs, x, r, t)
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
    for kind in ["lagrangian", "progressive"]:  # r = t: these self-distillation terms vanish
        loss, info = fmq.flow_map_loss(actor, obs, a, 0, with_loss(kind))
        assert info["actor/distill_loss"] < 1e-12
    for kind in fmq.FLOW_MAP_TARGETS:
        loss, info = fmq.flow_map_loss(actor, obs, a, args.curriculum_end, with_loss(kind))
        actor.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and "actor/distill_loss" in info
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in actor.parameters())


# ---------------------------------------------------------------- learning, on problems with a known answer
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


# ---------------------------------------------------------------- action chunks
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
    b.load_online_state(state)
    for k in fmq.ReplayBuffer.FIELDS:
        torch.testing.assert_close(b.data[k], a.data[k])
    ring = lambda buf: buf.starts_host[(buf.head + np.arange(buf.n_starts)) % buf.cap].tolist()  # noqa: E731
    assert ring(b) == ring(a)
    fill(a, 9, first=23), fill(b, 9, first=23)  # and both go on identically
    assert ring(b) == ring(a) and torch.equal(b.data["actions"], a.data["actions"])
    torch.manual_seed(0)
    x = a.sample(64, 0.9)
    torch.manual_seed(0)
    assert all(torch.equal(x[k], v) for k, v in b.sample(64, 0.9).items())


# ---------------------------------------------------------------- gradients flow only where the paper says
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


def test_critic_loss_gradient_reaches_only_the_critic():
    args, agent, batch = small_agent()
    loss, _ = fmq.critic_loss(agent, batch, 0.99, 5, "mean", 4)
    loss.backward()
    assert all(p.grad is not None for p in agent.critic.parameters())
    assert all(p.grad is None for m in (agent.actor, agent.critic_target) for p in m.parameters())


def test_best_of_n_equals_qgbs_with_k0_on_the_same_noise():
    args, agent, batch = small_agent()
    q_fn = fmq.q_agg(agent.critic, "mean")
    with torch.no_grad():
        a_ref, q_ref = fmq.best_of_n(agent.actor, q_fn, batch["obs"], 16, torch.Generator().manual_seed(5))
        jump = lambda a_r, r, s: a_r + (1.0 - r) * agent.actor(s, a_r, r, 1.0)
        a, info = qgbs.qgbs(jump, q_fn, batch["obs"], action_dim=10, M=16, K=0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(info["q"], q_ref)


def test_update_changes_parameters_and_polyak_moves_targets():
    """Polyak toward the pre-update critic (official target_update reads the pre-update network)."""
    args, agent, batch = small_agent()
    with torch.no_grad():  # targets apart from the critic, or any Polyak rate (tau, 1 - tau, none) would pass
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = [p.clone() for p in agent.critic_target.parameters()]
    critic_before = [p.clone() for p in agent.critic.parameters()]
    losses = fmq.make_losses()
    info = fmq.update(agent, batch, 0, args, losses)
    assert all(torch.isfinite(v) for v in info.values())
    for p_t, p_b, p, p_new in zip(agent.critic_target.parameters(), before, critic_before, agent.critic.parameters()):
        torch.testing.assert_close(p_t, p_b + args.tau * (p - p_b))
        assert not torch.equal(p, p_new)  # the critic moved
    fmq.update(agent, batch, 1, args, losses)
    assert all(not p.requires_grad and p.grad_fn is None for p in agent.critic_target.parameters())  # frozen, no graph


def test_each_update_starts_from_zero_gradients():
    """Losses = sum of the parameters: every gradient is exactly 1 after each update, not 2 after the second (no
    gradient accumulation across updates, as optax has none)."""
    args, agent, batch = small_agent()
    total = lambda net: sum(p.sum() for p in net.parameters())  # noqa: E731
    losses = dict(critic=lambda agent, *a: (total(agent.critic), {}), flow_map=lambda actor, *a: (total(actor), {}),
                  fmq=lambda agent, *a: (total(agent.actor), {}))
    for step in range(2):
        fmq.update(agent, batch, step, args, losses)
        for p in [*agent.critic.parameters(), *agent.actor.parameters()]:
            assert torch.equal(p.grad, torch.ones_like(p)), f"update {step}: gradients accumulated"


# ---------------------------------------------------------------- known answers: what the official code computes
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


@pytest.mark.parametrize("online,target,expected", [(False, "fmq", 0), (True, "fmq", 1), (True, "flow-map", 0),
                                                    (True, "mvp", 0), (False, "mvp", 0)])
def test_acting_selects_by_mean_offline_and_by_min_online(online, target, expected):
    """Official agents: the offline agent's best-of-N uses q_agg (mean: e_0), the FMQ agent's the min (e_1), the
    FlowMapPolicy kept online (flow-map, QC) the mean; MVP here the mean too."""
    args = fmq.Args(best_of_n=3, online_target=target)  # N samples e_0, e_1, e_2 (N is not qgbs_m = 4)
    agent = SimpleNamespace(actor=candidate_actor(2, n=3), critic=CURRENT, u_off=object() if online else None)
    torch.testing.assert_close(fmq.select_action(agent, torch.zeros(2, 6), "best-of-n", args), E4[[expected] * 2])


def fmq_stand_ins(critic, u_off=0.0, actor=None, **kw):
    """An agent for fmq_loss with stand-in critics, a constant u_off, and an actor returning `actor` (or 0)."""
    args = fmq.Args(**kw)  # target critics with another gradient and spread: using them gives other numbers
    agent = SimpleNamespace(critic=critic, critic_target=lambda obs, a: -critic(obs, a) * torch.tensor([[1.0], [3.0]]),
                            u_off=lambda obs, a, r, t: torch.full_like(a, u_off),
                            actor=lambda obs, a, r, t: torch.zeros_like(a) if actor is None else actor.expand_as(a))
    return agent, args


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


@pytest.mark.parametrize("guidance,expected", [("q1", 0.0), ("mean", 0.2)])
def test_guidance_critic_q1_or_mean(guidance, expected):
    """Alg. 1 guides with grad Q1 = (3, 4) -> (.6, .8); 'mean' with (grad Q1 + grad Q2) / 2 = (0, 4) -> (0, 1). An
    actor returning (.6, .8) (eta 1, beta 0, u_off 0) has loss 0 for q1 and ((.6)^2 + (.2)^2) / 2 = .2 for mean."""
    critic = lambda obs, a: torch.stack([a @ torch.tensor([3.0, 4.0]), a @ torch.tensor([-3.0, 4.0])])  # noqa: E731
    agent, args = fmq_stand_ins(critic, actor=torch.tensor([0.6, 0.8]), eta=1.0, beta=0.0, guidance_critic=guidance)
    loss, _ = fmq.fmq_loss(agent, torch.zeros(16, 1), torch.zeros(16, 2), args)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_fmq_loss_takes_the_q_gradient_at_a_1_clipped_to_the_action_box():
    """Official _fmq_loss clips a_1 to [-1, 1]. With u_off = 1000 and a_data = 1, a_1 > 1 unclipped; Q = -||relu(a -
    1)||^2 has zero gradient at the clipped a_1 = 1, so the target is u_off and an actor returning it has loss 0
    (unclipped the target moves by eta = 1 along the gradient: loss eta^2 / 2 = 0.5)."""
    critic = lambda obs, a: -((a - 1).clamp_min(0) ** 2).sum(-1).expand(2, -1)  # noqa: E731
    agent, args = fmq_stand_ins(critic, u_off=1000.0, actor=torch.tensor([1000.0, 1000.0]), eta=1.0, beta=0.3)
    loss, _ = fmq.fmq_loss(agent, torch.zeros(64, 1), torch.ones(64, 2), args)
    assert loss.item() < 1e-10


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


def test_time_features_are_low_frequency():
    """Official FourierFeatures(64): [cos, sin] of 32 frequencies 10000^(-k/31), 1 down to 1e-4 rad per unit time:
    d/dt of the features at t = 0 is (0,..,0, 1, .., 1e-4), so no feature moves faster than 1 rad per unit time."""
    t = torch.zeros(1, 1, dtype=torch.float64)
    feats, speed = torch.func.jvp(lambda x: fmq.time_features(x, 64), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(feats[0], torch.cat([torch.ones(32), torch.zeros(32)]).double())
    torch.testing.assert_close(speed[0, 32:], 1e4 ** -(torch.arange(32, dtype=torch.float64) / 31))
    assert speed.abs().max().item() == pytest.approx(1.0) and speed[0, 63].item() == pytest.approx(1e-4)


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


def test_one_update_steps_on_the_summed_loss_at_pre_update_parameters(monkeypatch):
    """Official total_loss: the actor loss sees the pre-update critic, and both nets take one Adam step from the
    gradients at the pre-update parameters (Adam's first step moves every parameter by lr * sign(grad))."""
    args, agent, batch = small_agent()
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    seen = []

    def fmq_recording(agent, *a):
        seen.append([p.detach().clone() for p in agent.critic.parameters()])
        return fmq.fmq_loss(agent, *a)
    losses = dict(fmq.make_losses(), fmq=fmq_recording)
    fmq.update(agent, batch, 0, args, losses)
    assert all(torch.equal(p, q) for p, q in zip(seen[0], critic_before))
    for before, net in [(critic_before, agent.critic), (actor_before, agent.actor)]:
        steps = torch.cat([(p - b).flatten() for p, b in zip(net.parameters(), before)]).abs()
        assert steps.max().item() == pytest.approx(args.lr, rel=1e-3)


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


# ---------------------------------------------------------------- the baselines: MVP, the official no-FMQ path, QC
MODE = 0.9  # +-MODE: a bimodal target that a policy regressed onto its mean would miss


def bimodal(n):
    return torch.where(torch.rand(n, 1) < 0.5, -MODE, MODE)


def mode_fractions(x):
    return [((x - m).abs() < 0.2).float().mean().item() for m in (-MODE, MODE)]


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
        fmq.update(agent, batch, torch.tensor(step), args, fmq.make_losses())
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


def test_fmq_needs_a_flow_map():
    for bad in (dict(flow_map_loss="none"), dict(euler_steps=10)):
        with pytest.raises(fmq.FMQError, match="fmq needs a flow map"):
            fmq.validate(fmq.Args(**bad))
    fmq.validate(fmq.Args(online_target="flow-map", flow_map_loss="none", euler_steps=10, time_dim=0))


def test_sparse_flag_composes_with_the_env_table_reward():
    """Official main.py: robomimic r - 1, then --sparse (r != 0) * -1, for any task; without it the table's."""
    rm, cube, scene1 = (fmq.env_spec(e) for e in ("can", "cube-dbl-t3", "scene-play-singletask-task1-v0"))
    np.testing.assert_array_equal(fmq.reward_fn(rm, True)(np.array([1.0, 0.0])), [0.0, -1.0])
    np.testing.assert_array_equal(fmq.reward_fn(rm, False)(np.array([1.0, 0.0])), [0.0, -1.0])
    np.testing.assert_array_equal(fmq.reward_fn(cube, False)(np.array([-2.0, 0.0])), [-2.0, 0.0])
    np.testing.assert_array_equal(fmq.reward_fn(cube, True)(np.array([-2.0, -1.0, 0.0])), [-1.0, -1.0, 0.0])
    np.testing.assert_array_equal(fmq.reward_fn(scene1, True)(np.array([-3.0, 0.0])), [-1.0, 0.0])


# ---------------------------------------------------------------- what CUDA and bf16 change, seen on the CPU
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


def critic_near(q0, args, obs_dim=6, act_dim=10):
    """Critics whose Q sits near q0 (last bias q0, small last weights), for the --amp precision checks."""
    torch.manual_seed(0)
    critic = fmq.Critics(obs_dim, act_dim, args)
    with torch.no_grad():
        critic.net[-1].weight.mul_(0.05)
        critic.net[-1].bias.fill_(q0)
    return critic


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
            info = fmq.update(agent, batch, 10, a, fmq.make_losses())
            assert all(v.device.type == "cpu" for v in info.values())
        agent.u_off = None
        fmq.update(agent, batch, step, args, fmq.make_losses())
        for sampler in ("onestep", "best-of-n", "qgbs"):
            assert fmq.select_action(agent, batch["obs"], sampler, args).device.type == "cpu"


def test_dataset_actions_are_clipped_as_the_official_loaders(monkeypatch):
    """Q-chunking's env_utils.make_env_and_datasets clips dataset actions to +-(1 - 1e-5), for every suite."""
    import ogbench
    raw = dict(observations=np.zeros((3, 2), np.float32), actions=np.array([[1.0], [-1.0], [0.5]], np.float32),
               terminals=np.array([0, 0, 1], np.float32))
    monkeypatch.setattr(ogbench, "make_env_and_datasets", lambda *a, **k: (None, dict(raw), None))
    data, _ = fmq.load_dataset(fmq.env_spec("scene-t5"), "/nonexistent")
    np.testing.assert_array_equal(data["actions"][:, 0], np.float32([1 - 1e-5, -1 + 1e-5, 0.5]))
    np.testing.assert_array_equal(data["ends"], raw["terminals"])


# ---------------------------------------------------------------- env ids and settings
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


# ---------------------------------------------------------------- end to end
NUMERIC = ("critic/loss", "critic/q", "actor/grad_norm", "success", "return_train", "return_env")


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("sps", "time")} for r in rows]


@pytest.mark.slow
def test_tiny_run_end_to_end_and_deterministic(tmp_path, ogb):
    final = fmq.main(tiny_args(tmp_path / "a", ogb))
    run = tmp_path / "a" / "runs" / "scene-t5__fmq__0"
    train, evals = read_csv(run / "train.csv"), read_csv(run / "eval.csv")
    assert [int(r["step"]) for r in train] == [10, 20, 30, 40]
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (20, "online"), (40, "online")]
    assert all(np.isfinite(float(r[k])) for r in train for k in ("critic/loss", "actor/grad_norm"))
    assert train[-1]["actor/fmq_loss"] != "" and train[0]["actor/diag_loss"] != ""
    assert json.loads((run / "final.json").read_text())["step"] == 40 == final["step"]
    assert json.loads((run / "config.json").read_text())["discount"] == 0.99
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt"))[-1] == "step_000000040.pt"
    fmq.main(tiny_args(tmp_path / "b", ogb))  # same seed, same device: identical numbers
    run_b = tmp_path / "b" / "runs" / "scene-t5__fmq__0"
    assert strip_timing(read_csv(run_b / "train.csv")) == strip_timing(train)
    assert strip_timing(read_csv(run_b / "eval.csv")) == strip_timing(evals)


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
def test_cli_smoke_cube_double(tmp_path, ogbench_data):
    code, err = run_cli("--env-id", "cube-dbl-t3", "--dataset-dir", ogbench_data("cube-double-play-v0"), "--runs-dir",
                        str(tmp_path), "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "16", "--best-of-n",
                        "4", "--offline-steps", "10", "--online-steps", "10", "--eval-episodes", "2", "--eval-interval",
                        "10", "--log-interval", "5", "--device", "cpu")
    assert code == 0, err[-2000:]
    evals = read_csv(tmp_path / "cube-dbl-t3__fmq__0" / "eval.csv")
    assert len(evals) == 3 and all(np.isfinite(float(r["return_env"])) for r in evals)
    assert "precision lowered" not in err and "DISPLAY" not in err  # gymnasium's and GLFW's warnings are filtered
    assert all(r["return_train"] == r["return_env"] for r in evals)  # cube: the env's reward, as the ENVS table says


# ---------------------------------------------------------------- what a run tells its user
class TwoStepRewardEnv:
    """Rewards -2, 0, -2, 0: success (and the episode's end) at step 4."""

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(3), {}

    def step(self, action):
        self.t += 1
        return np.zeros(3), -2.0 * (self.t % 2), self.t == 4, False, {"success": self.t == 4}


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


# ---------------------------------------------------------------- fmq.py subprocesses: wait on progress, not a clock
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
    ckpt = fmq.latest_checkpoint(run)
    return int(ckpt.stem.split("_")[1]) if ckpt else -1


# ---------------------------------------------------------------- bad input: one line, exit code != 0
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


# ---------------------------------------------------------------- kill and resume
def resume_flags(dataset_dir):
    """A small deterministic CPU run with a checkpoint every 10 steps."""
    return ["--dataset-dir", str(dataset_dir), "--hidden-dim", "32", "--num-layers", "2", "--time-dim", "8",
             "--batch-size", "16", "--best-of-n", "4", "--offline-steps", "20", "--online-steps", "300",
             "--eval-episodes", "2", "--eval-interval", "1000", "--log-interval", "10", "--save-interval", "10",
             "--curriculum-start", "5", "--curriculum-end", "15", "--start-training", "10", "--device", "cpu",
             "--deterministic", "--resume", "auto"]


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


# ---------------------------------------------------------------- a tiny env and a synthetic dataset: main in seconds
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


def tiny_rewards(k, steps):
    """The tiny env's rewards over the first `steps` steps of an episode that succeeds at k (np.inf: never)."""
    return [-float(min(2, k - t)) for t in range(1, steps + 1)]


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
    assert sorted(p.name for p in ckpts) == ["step_000000030.pt", "step_000000040.pt"]  # every 10 steps, 2 kept
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
    assert [r["phase"] for r in train] == ["offline"] * 2 + ["online"] * 6
    assert [(r["actor/diag_loss"] != "", r["actor/fmq_loss"] != "") for r in train] == [(True, False)] * 2 + [
        (False, True)] * 6  # the offline loss up to the phase switch, FMQ's after it
    evals = read_csv(run / "eval.csv")
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (10, "online"), (20, "online"),
                                                            (40, "online")]
    assert [(float(r["success"]), float(r["length"])) for r in evals] == [(0.8, 6.2)] * 4
    assert [int(r["env_steps"]) for r in evals] == [0, 0, 10, 30]
    assert [int(r["env_steps"]) for r in train] == [0, 0, 5, 10, 15, 20, 25, 30]
    assert (final["step"], final["success"]) == (40, 0.8)


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


def test_nan_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny_env):
    """A NaN critic loss from step 25 on: the run stops at the next check (the log at step 30) naming the loss, the
    step and the last good checkpoint (step 20), and saves nothing after it."""
    real = fmq.critic_loss

    def poisoned(agent, batch, *a):
        loss, info = real(agent, batch, *a)
        poisoned.calls += 1
        return (loss * float("nan"), info) if poisoned.calls > 25 else (loss, info)
    poisoned.calls = 0
    monkeypatch.setattr(fmq, "critic_loss", poisoned)
    run = tmp_path / "runs" / "tiny__fmq__0"
    with pytest.raises(fmq.FMQError, match=f"non-finite critic/loss.* at step 25; .*{run}/checkpoints/step_0+20.pt"):
        fmq.main(tiny_env_args(tmp_path))
    assert fmq.latest_checkpoint(run).name == "step_000000020.pt"
    ckpt = torch.load(run / "checkpoints" / "step_000000020.pt", weights_only=False)
    assert ckpt["step"] == 20 and all(torch.isfinite(p).all() for p in ckpt["critic"].values())


def test_resume_with_a_row_past_the_checkpoint_an_episode_end_and_a_wrapped_buffer(tmp_path, monkeypatch, tiny_env):
    """A run killed in the update of step 37 (its checkpoint: step 30; train.csv already has step 35; episodes ended at
    online steps 3, 7, 12, 24, the fourth is replayed from its start; the buffer of 61 rows wrapped) and resumed ends
    exactly as the uninterrupted run: the same csv rows (step 35 logged once), the same networks, the same result."""
    args = lambda d: tiny_env_args(tmp_path / d, buffer_size=0, start_training=2, resume="auto")  # noqa: E731
    buffers, _ = recording_buffer(monkeypatch)
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
    assert fmq.latest_checkpoint(run_b).name == "step_000000030.pt"
    assert int(read_csv(run_b / "train.csv")[-1]["step"]) == 35  # a row past the checkpoint
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


# ---------------------------------------------------------------- known answers where a port goes wrong
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


@pytest.mark.parametrize("online,target,q_agg,expected", [
    (False, "fmq", None, 1), (True, "fmq", None, 1), (False, "mvp", None, 0), (True, "mvp", None, 0),
    (True, "flow-map", None, 0), (False, "flow-map", "min", 1), (True, "fmq", "mean", 0)])
def test_qgbs_ranks_by_the_online_aggregation_with_or_without_u_off(online, target, q_agg, expected):
    """QGBS (K = 0, no eta step: the best of the M = 4 samples e_0..e_3) ranks by the online aggregation, also for an
    offline agent: min for FMQ (e_1), mean for MVP and flow-map (e_0), --online-q-agg if given."""
    args = fmq.Args(online_target=target, online_q_agg=q_agg, qgbs_m=4, qgbs_k=0, qgbs_k0_step=False)
    agent = SimpleNamespace(actor=candidate_actor(2), critic=CURRENT, u_off=object() if online else None)
    torch.testing.assert_close(fmq.select_action(agent, torch.zeros(2, 6), "qgbs", args), E4[[expected] * 2])


@pytest.mark.parametrize("q_agg,expected", [(None, 0), ("min", 1)])
def test_mvp_target_is_the_best_of_n_under_the_mvp_aggregation(q_agg, expected):
    """MVP's a*: best of N one-step samples under the critics, mean (e_0) unless --online-q-agg min (e_1)."""
    args = fmq.Args(online_target="mvp", online_q_agg=q_agg, best_of_n=3)
    agent = SimpleNamespace(actor=candidate_actor(3, n=3), critic=CURRENT)
    torch.testing.assert_close(fmq.mvp_target(agent, torch.zeros(3, 6), args), E4[[expected] * 3])


@pytest.mark.parametrize("online,target,offline_agg,online_agg,expected", [
    (False, "fmq", "mean", None, "mean"), (False, "fmq", "min", None, "min"), (True, "fmq", "mean", None, "min"),
    (True, "mvp", "min", None, "mean"), (True, "flow-map", "min", None, "mean"), (True, "mvp", "mean", "min", "min")])
def test_update_takes_each_methods_td_target_aggregation(online, target, offline_agg, online_agg, expected):
    """The TD target's aggregation in `update`: offline_q_agg offline; online the method's (FMQ min, MVP and
    flow-map mean) or --online-q-agg. The critic loss also gets the discount, horizon and N of the run."""
    args, agent, batch = small_agent(online_target=target, offline_q_agg=offline_agg, online_q_agg=online_agg,
                                     discount=0.9, horizon=3, best_of_n=3)
    if not online:
        agent.u_off = None
    seen = []

    def critic(agent, batch, discount, horizon, agg, n):
        seen.append((discount, horizon, agg, n))
        return fmq.critic_loss(agent, batch, discount, horizon, agg, n)
    fmq.update(agent, batch, 0, args, dict(fmq.make_losses(), critic=critic))
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
    seen = []
    losses = fmq.make_losses()
    losses.update(flow_map=lambda actor, obs, a, step, args: (seen.append(("flow_map", a, step)), fmq.flow_map_loss(
        actor, obs, a, step, args))[1], fmq=lambda agent, obs, a, args: (seen.append(("fmq", a, 7)), fmq.fmq_loss(
            agent, obs, a, args))[1])
    fmq.update(agent, batch, 7, args, losses)
    (kind, a, step), = seen
    assert step == 7  # the flow-map loss's curriculum sees the update's step
    assert kind == ("fmq" if fits is None else "flow_map")
    assert torch.equal(a, a_star if fits == "a_star" else batch["actions"])


def test_mvp_target_carries_no_gradient():
    """MVP's a* is a regression target: drawn without autograd, so no gradient flows back through the sampler."""
    args, agent, batch = small_agent(online_target="mvp")
    a_star = fmq.mvp_target(agent, batch["obs"], args)
    assert not a_star.requires_grad and a_star.grad_fn is None


def test_make_update_runs_update_on_a_fresh_batch_of_the_runs_size_and_discount(monkeypatch):
    """Each call samples batch_size chunks with the run's discount (rewards -1, h 3, discount 0.9: R = -2.71) and hands
    `update` the step as a device tensor."""
    seen = []
    monkeypatch.setattr(fmq, "update", lambda agent, batch, step, args, losses: seen.append((batch, int(step))) or {})
    args = fmq.Args(batch_size=5, discount=0.9, horizon=3)
    update = fmq.make_update(SimpleNamespace(u_off=None), circular_buffer(), args, fmq.make_losses())
    update(4), update(5)
    assert [(len(b["obs"]), s) for b, s in seen] == [(5, 4), (5, 5)]
    torch.testing.assert_close(seen[0][0]["R"], torch.full((5,), -2.71))


@pytest.mark.parametrize("bad,message", [
    (dict(offline_steps=0), "--offline-steps 0 needs --load-checkpoint"), (dict(qgbs_rho=0.0), "--qgbs-rho must"),
    (dict(qgbs_m=0), "QGBS needs --qgbs-m >= 1"), (dict(qgbs_b=0), "QGBS needs"), (dict(qgbs_k=-1), "QGBS needs"),
    (dict(num_critics=1), "--num-critics must be >= 2"), (dict(horizon=0), "--horizon must be >= 1"),
    (dict(time_dim=3), "--time-dim 0/even"), (dict(euler_steps=-1, online_target="mvp"), "--euler-steps >= 0"),
    (dict(eval_episodes=0), "counts must be >= 1"), (dict(start_training=-1), "step counts must be >= 0"),
    (dict(best_of_n=0), "need --best-of-n, --batch-size, --utd-ratio >= 1"),
    (dict(utd_ratio=0), "need --best-of-n, --batch-size, --utd-ratio >= 1"),
    (dict(dataset_proportion=0.0), "--dataset-proportion must be in (0, 1]"),
    (dict(dataset_proportion=1.5), "--dataset-proportion must be in (0, 1]")])
def test_validate_names_each_bad_setting_and_accepts_the_edges(bad, message):
    with pytest.raises(fmq.FMQError, match=re.escape(message)):
        fmq.validate(fmq.Args(**bad))
    for edge in (dict(), dict(qgbs_k=0), dict(num_critics=2), dict(eval_episodes=1, start_training=0, horizon=1),
                 dict(offline_steps=0, load_checkpoint="x.pt"), dict(time_dim=0), dict(qgbs_rho=1e-3),
                 dict(utd_ratio=1, dataset_proportion=1.0), dict(dataset_proportion=1e-3)):
        fmq.validate(fmq.Args(**edge))


def test_a_checkpoint_of_other_nets_is_refused_in_one_line(tmp_path):
    args, agent, _ = small_agent()
    state = dict({k: getattr(agent, k).state_dict() for k in fmq.NETS}, step=1, args=dataclasses.asdict(args))
    path = fmq.save_checkpoint(tmp_path, dict(state, u_off=None), keep=1)
    other = dataclasses.replace(args, hidden_dim=32)
    with pytest.raises(fmq.FMQError, match=r"does not fit this run: it has \{'hidden_dim': 16\}, this run \{'hidden_"
                       r"dim': 32\}"):
        fmq.load_checkpoint(path, other, fmq.make_agent(other, 6, 10, "cpu"))
    fmq.load_checkpoint(path, args, fmq.make_agent(args, 6, 10, "cpu"))


def test_polyak_before_the_optimiser_step_is_seen_at_a_large_lr():
    """With lr 0.1 the critic moves ~0.1 per step, so a Polyak step taken after the optimiser step (or with 1 - tau)
    lands ~5e-4 away from tau toward the pre-update critic: far outside the tolerance (float32 rounding, 1e-7)."""
    args, agent, batch = small_agent(lr=0.1)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = [p.clone() for p in agent.critic_target.parameters()]
    critic_before = [p.clone() for p in agent.critic.parameters()]
    fmq.update(agent, batch, 0, args, fmq.make_losses())
    for p_t, p_b, p, p_new in zip(agent.critic_target.parameters(), before, critic_before, agent.critic.parameters()):
        torch.testing.assert_close(p_t, p_b + 0.005 * (p - p_b), atol=1e-7, rtol=1e-6)
        assert (p_new - p).abs().max() > 0.05  # the optimiser step is large


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


@pytest.mark.parametrize("kappa1,beta,expected", [(5.0, 0.3, 0.125), (0.0, 0.3, 0.5)])
def test_kappa1_floors_the_gradient_norm_in_the_fmq_target(kappa1, beta, expected):
    """g = grad Q / (||grad Q|| + kappa1) with grad Q = (3, 4): kappa1 5 halves the step (target (.3, .4), loss of a
    zero actor (.09 + .16) / 2 = .125); kappa1 0: (.6, .8), loss .5. Equal critics: delta 0, beta has no effect."""
    g = torch.tensor([3.0, 4.0])
    agent, args = fmq_stand_ins(lambda obs, a: (a @ g).expand(2, -1), eta=1.0, beta=beta, kappa1=kappa1)
    loss, _ = fmq.fmq_loss(agent, torch.zeros(8, 1), torch.zeros(8, 2), args)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


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
    n, v = 12, np.arange(12, dtype=np.float32)
    data = dict(observations=v[:, None], actions=np.stack([v, 100 + v], 1) / 200, rewards=-np.ones(n),
                masks=np.ones(n), next_observations=v[:, None] + 1, ends=np.arange(n) % 4 == 3)
    batch = fmq.ReplayBuffer(data, capacity=n, horizon=3, device="cpu").sample(64, 0.9)
    s = batch["obs"][:, 0]
    torch.testing.assert_close(batch["actions"], torch.stack([s, 100 + s, s + 1, 101 + s, s + 2, 102 + s], 1) / 200)


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


# ---------------------------------------------------------------- qgbs.py (Algorithm 2)
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


def _check_shapes(device, dtype):
    obs = make_obs(batch=3, dtype=dtype, device=device).reshape(3, 2, 2)  # non-flat obs
    actions, info = qgbs.qgbs(toy_jump, toy_q, obs, action_dim=D, M=4, K=1, B=2, generator=gen(0, device))
    assert actions.shape == (3, D) and info["q"].shape == (3,) and info["beam"].shape == (3, 4, D)
    for x in (actions, info["q"], info["beam"]):
        assert x.dtype == dtype and x.device.type == torch.device(device).type
    assert isinstance(info["nfe"], int) and info["nfe"] == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_cpu(dtype):
    _check_shapes("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_cuda(dtype):
    _check_shapes("cuda", dtype)


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
        update = fmq.make_update(agent, fmq.ReplayBuffer(data, 0, args.horizon, "cuda"), args, fmq.make_losses())
        infos = [update(step) for step in range(6)]
        assert all(torch.isfinite(v).all() for v in infos[-1].values())
        nets.append(flat())
    assert (nets[0] - start).abs().max() > 1e-3  # the updates moved the parameters
    torch.testing.assert_close(nets[1], nets[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(M=0), dict(B=0), dict(K=-1), dict(rho=0.0), dict(rho=-1.0),
                                 dict(action_dim=None)])
def test_invalid_args_raise(bad):
    kw = dict(action_dim=D, M=2, K=1, B=2, rho=1.5) | bad
    with pytest.raises(ValueError):
        qgbs.qgbs(toy_jump, toy_q, make_obs(), **kw)


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (-0.2, 0.7)])
def test_actions_stay_in_action_range(lo, hi):
    overshoot = lambda a_r, r, o: 5 * a_r + o[:, :D]  # noqa: E731
    far_q = lambda o, a: -((a - 10.0) ** 2).sum(-1)  # maximiser far outside the box  # noqa: E731
    for K in (0, 1, 2):
        actions, info = qgbs.qgbs(overshoot, far_q, make_obs(), action_dim=D, M=4, K=K, B=3, eta=5.0,
                                  generator=gen(K), action_range=(lo, hi))
        for x in (actions, info["beam"]):
            assert x.min() >= lo and x.max() <= hi
    assert torch.allclose(actions, torch.full_like(actions, hi))  # pushed to the upper bound


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


# ---------------------------------------------------------------- tools/report.py and tools/sweep.py
EVAL_HEADER = "step,phase,env_steps,success,return_train,return_env,length,sampler,nfe,episodes,time"
TOY = ["--offline-steps", "100", "--online-steps", "100", "--sampler", "onestep"]  # the toy runs' sweep flags
# final success per task and seed (4 seeds x 3 tasks): sorted 0,.1,.2,[.5,.5,.6,.6,.6,.6],.9,1,1
FINALS = {"can": [0.0, 0.5, 0.5, 1.0], "square": [0.6, 0.6, 0.6, 0.6], "scene-t4": [0.1, 0.2, 0.9, 1.0]}


def make_run(runs_dir, env_id, method, seed, final, online_ramp, offline_steps=100, finished=True, extra_rows=()):
    """Run folder as fmq.py writes it: evals every 20 steps, offline success 0.3*final, then an online ramp
    reaching `final` at online env step `online_ramp`."""
    run = Path(runs_dir) / f"{env_id}__{method}__{seed}"
    run.mkdir(parents=True)
    cfg = sweep.cell_config(env_id, seed, method, [*shlex.split(sweep.METHODS.get(method, "")), *TOY])
    (run / "config.json").write_text(json.dumps(dict(cfg, offline_steps=offline_steps)))
    rows = [EVAL_HEADER]
    for step in range(0, offline_steps + 101, 20):
        env_steps = max(0, step - offline_steps)
        phase = "offline" if step <= offline_steps else "online"
        succ = 0.3 * final if phase == "offline" else final * min(1.0, env_steps / online_ramp)
        rows.append(f"{step},{phase},{env_steps},{succ},0,0,0,onestep,1,50,0")
    (run / "eval.csv").write_text("\n".join(rows + list(extra_rows)) + "\n")
    if finished:
        (run / "final.json").write_text(json.dumps({"step": offline_steps + 100, "success": final}))
    return run


def make_grid(runs_dir):
    for env_id, finals in FINALS.items():
        for seed, final in enumerate(finals):
            make_run(runs_dir, env_id, "fmq", seed, final, online_ramp=40)
            make_run(runs_dir, env_id, "mvp", seed, final, online_ramp=80)


def test_final_scores_iqm_and_ci(tmp_path):
    make_grid(tmp_path)
    finals = report.final_scores(report.load_runs(tmp_path, TOY))
    assert len(finals) == 24 and (finals.step == 200).all()
    scores = report.score_matrices(finals, ["fmq", "mvp"])
    assert scores["fmq"].shape == (4, 3)
    np.testing.assert_allclose(scores["fmq"][:, 0], FINALS["can"])  # columns in paper task order
    agg = report.aggregate(scores, reps=300)["fmq"]
    assert agg["iqm"] == pytest.approx(3.4 / 6)  # middle 6 of the 12 sorted scores
    assert agg["mean"] == pytest.approx(6.6 / 12)
    assert agg["iqm_ci"][0] <= agg["iqm"] <= agg["iqm_ci"][1]
    assert agg["mean_ci"][0] <= agg["mean"] <= agg["mean_ci"][1]


def test_missing_seed_uses_common_tasks_and_seeds(tmp_path, capsys):
    make_grid(tmp_path)
    for f in (tmp_path / "square__mvp__3").iterdir():
        f.unlink()
    (tmp_path / "square__mvp__3").rmdir()
    scores = report.score_matrices(report.final_scores(report.load_runs(tmp_path, TOY)), ["fmq", "mvp"])
    assert scores["fmq"].shape == scores["mvp"].shape == (3, 3)
    assert "warning" in capsys.readouterr().out


def test_other_sampler_and_duplicate_steps(tmp_path):
    # a resumed run re-logs step 200 (last row wins) and also logs a QGBS eval
    make_run(tmp_path, "can", "fmq", 0, 0.5, 50, extra_rows=["200,online,100,0.7,0,0,0,onestep,1,50,0",
                                                            "200,online,100,0.9,0,0,0,qgbs,20,50,0"])
    finals = report.final_scores(report.load_runs(tmp_path, TOY)).set_index("method")
    assert finals.success["fmq"] == 0.7 and finals.success["fmq/qgbs"] == 0.9


def test_speedup_known_ratio():
    x = np.arange(1, 11) * 10_000
    base = np.array([0.0, 0.1, 0.2, 0.4, 0.4, 0.3, 0.4, 0.4, 0.4, 0.4])  # best 0.4, first at 40k
    ref = np.array([0.1, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])  # reaches 0.4 at 20k
    np.testing.assert_allclose(report.speedup(x, base, x, ref, qs=(0.5, 1.0)), [30 / 20, 40 / 20])
    slow = np.minimum(ref, 0.3)  # never reaches 0.4 -> skipped (nan)
    s = report.speedup(x, base, x, slow, qs=(0.5, 1.0))
    assert s[0] == pytest.approx(30 / 20) and np.isnan(s[1])
    assert np.isnan(report.speedup(x, 0 * base, x, ref)).all()  # baseline never succeeds: no target
    mean, ci = report.bootstrap_mean_ci([1.0, 2.0, 3.0], reps=500)
    assert mean == 2.0 and ci[0] <= 2.0 <= ci[1]


def test_report_main_table_json_and_figures(tmp_path, capsys):
    make_grid(tmp_path / "runs")
    rc = report.main(["--runs-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "figs"), "--reps", "200",
                      "--out-json", str(tmp_path / "out.json"), "--", *TOY])
    out = capsys.readouterr().out
    assert rc == 0
    for cell in ("0.50 ± 0.35", "0.60 ± 0.00", "0.55 ± 0.40", "ddof=0", "IQM [95% CI]", "0.57 ["):
        assert cell in out
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["aggregate"]["fmq"]["iqm"] == pytest.approx(3.4 / 6)
    # fmq ramps linearly to the final success by 40 online env steps, mvp by 80 -> 2x at every target
    assert res["speedup"]["1.0"]["mean"] == pytest.approx(2.0) and res["speedup"]["0.5"]["mean"] == pytest.approx(2.0)
    assert res["speedup"]["1.0"]["n"] == 3
    for png in ("learning_curves.png", "speedup.png"):
        assert (tmp_path / "figs" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_prints_the_paper_columns_in_its_order(tmp_path, capsys):
    for method in ("zzz", "fmq", "mvp", "qc"):
        make_run(tmp_path / "runs", "can", method, 0, 0.5, 50,
                 extra_rows=["140,online,40,0.9,0,0,0,qgbs,20,50,0"] if method in ("fmq", "mvp") else ())
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path), "--reps", "10", "--",
                        *TOY]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "qc", "mvp", "mvp/qgbs", "fmq", "fmq/qgbs", "zzz"]


def test_report_skips_speedup_without_baseline(tmp_path, capsys):
    make_run(tmp_path / "runs", "can", "fmq", 0, 0.5, 50)
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "figs"), "--reps", "50",
                        "--", *TOY]) == 0
    assert "speedup: skipped" in capsys.readouterr().out
    assert (tmp_path / "figs" / "learning_curves.png").exists() and not (tmp_path / "figs" / "speedup.png").exists()


@pytest.mark.slow
def test_sweep_dry_run_commands_and_skip(tmp_path):
    runs = tmp_path / "runs"
    (runs / "can__fmq__1").mkdir(parents=True)
    (runs / "can__fmq__1" / "final.json").write_text("{}")  # the config fmq.py writes for that cell's command
    cfg = fmq.Args(env_id="can", seed=1, exp_name="fmq", extra_samplers=("qgbs",), offline_steps=1000, resume="auto")
    (runs / "can__fmq__1" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    argv = ["--dry-run", "--env-ids", "can", "square", "--seeds", "0", "1", "--runs-dir", str(runs),
            "--method", "fmq", "--method", "eta05=--eta 0.5", "--method", "qc", "--python", "py",
            "--script", "fmq.py", "--", "--offline-steps", "1000"]
    out = subprocess.run([sys.executable, str(TOOLS / "sweep.py"), *argv], capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    assert "# skip (finished): can__fmq__1" in lines
    assert (f"py fmq.py --env-id square --seed 1 --exp-name eta05 --runs-dir {shlex.quote(str(runs))} "
            "--eta 0.5 --offline-steps 1000 --resume auto") in lines
    assert (f"py fmq.py --env-id can --seed 0 --exp-name qc --runs-dir {shlex.quote(str(runs))} --online-target "
            "flow-map --flow-map-loss none --euler-steps 10 --time-dim 0 --offline-steps 1000 --resume auto") in lines
    assert sum(line.startswith("py fmq.py") for line in lines) == 11
    assert not any("can --seed 1 --exp-name fmq " in line for line in lines)
    assert sorted(p.name for p in runs.iterdir()) == ["can__fmq__1"]  # nothing created, nothing run
    assert not list(runs.rglob("stdout.log"))
    # build_runs is importable and gives the full grid (finished runs included)
    names = [name for name, _ in sweep.build_runs(sweep.parse_args(argv))]
    assert len(names) == 12 and names[0] == "can__fmq__0" and names[-1] == "square__qc__1"
    # every named method's flags parse as fmq.py flags, and the paper's columns are qc, mvp, fmq (+ their qgbs rows)
    for name, flags in sweep.METHODS.items():
        fmq.validate(tyro.cli(fmq.Args, args=shlex.split(flags)))
    assert sweep.PAPER_METHODS == ["qc", "mvp", "fmq"] and report.COLUMNS[2::2] == ["mvp/qgbs", "fmq/qgbs"]
    rc = subprocess.run([sys.executable, str(TOOLS / "sweep.py"), "--method", "mvp-bon"], capture_output=True,
                        text=True)
    assert rc.returncode == 2 and "unknown method 'mvp-bon'" in rc.stderr
    default = sweep.parse_args([])
    assert default.env_ids == sweep.PAPER_ENV_IDS and default.seeds == [0, 1, 2, 3, 4] and default.methods == [
        "qc", "mvp", "fmq"]


def test_sweep_and_report_count_a_folder_only_when_its_config_is_the_cells(tmp_path, capsys):
    """A short check left in the folder of a paper cell (400 steps, the default --exp-name) is not that cell: the
    sweep names it with the first differing setting, neither skips it as finished nor runs it; the report leaves it
    out. The same for an mvp folder trained with fmq's loss. A cell's folder may differ in how it ran (device)."""
    runs = tmp_path / "runs"
    configs = {"scene-t5__fmq__0": fmq.Args(offline_steps=400, online_steps=400, extra_samplers=("qgbs",)),
               "scene-t5__mvp__0": fmq.Args(exp_name="mvp", extra_samplers=("qgbs",)),
               "scene-t5__fmq__1": fmq.Args(seed=1, extra_samplers=("qgbs",), device="cuda", resume="auto")}
    for name, cfg in configs.items():
        make_run(runs, "scene-t5", name.split("__")[1], int(name[-1]), 0.5, 50)  # then the config fmq.py wrote
        (runs / name / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    argv = ["--dry-run", "--env-ids", "scene-t5", "--seeds", "0", "1", "--method", "fmq", "--method", "mvp",
            "--runs-dir", str(runs)]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        f"# not this cell, left alone: {runs / 'scene-t5__fmq__0'} holds another run (offline_steps is 400, the "
        f"cell's 1000000); move it away to run the cell",
        f"# not this cell, left alone: {runs / 'scene-t5__mvp__0'} holds another run (online_target is 'fmq', the "
        f"cell's 'mvp'); move it away to run the cell"]
    assert "# skip (finished): scene-t5__fmq__1" in lines and lines[-1] == "# 1 to run, 1 finished, 2 held by others"
    assert [line.split("--exp-name ")[1][:6] for line in lines if "fmq.py" in line] == ["mvp --"]  # mvp, seed 1
    df = report.load_runs(runs)
    assert sorted(set(df.run)) == ["scene-t5__fmq__1"]
    out = capsys.readouterr().out
    assert f"warning: {runs / 'scene-t5__fmq__0'} not reported: it holds another run than its cell (offline_steps " \
           f"is 400, the cell's 1000000)" in out and "scene-t5__mvp__0 not reported" in out


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, ogb):
    run = tmp_path / "scene-t5__fmq__0"
    with Child(*resume_flags(ogb), "--runs-dir", str(tmp_path), watch=tmp_path) as child:
        child.wait_until(lambda: checkpoint_step(run) >= 30, f"the checkpoint of step 30 in {run}")
        child.proc.send_signal(signal.SIGTERM)
        code, err = child.finish("fmq.py to save a checkpoint and stop after SIGTERM")
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fmq: error: stopped by signal at step ") and f"--resume {run}" in line
    stopped_at = int(line.split("at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{stopped_at:09d}.pt").exists()
    code, err = run_cli(*resume_flags(ogb), "--runs-dir", str(tmp_path))
    assert code == 0, err[-2000:]
    assert json.loads((run / "final.json").read_text())["step"] == 320


def test_buffer_that_does_not_fit_is_reported_before_training():
    with pytest.raises(fmq.FMQError, match=r"the replay buffer needs .* GiB on cpu but only .* GiB is free"):
        fmq.preallocation_check(10 ** 12, 87, torch.device("cpu"))
    fmq.preallocation_check(1000, 87, torch.device("cpu"))


# ---------------------------------------------------------------- tools/gpu_check.py (the GPU check, here at toy sizes)
@pytest.mark.slow
def test_gpu_check_runs_every_step_at_tiny_sizes(tmp_path):
    """The GPU check, on the CPU: tests, bench, made data, a run SIGKILLed past the phase switch and resumed to its
    end. Its summary names the device and holds the update and real-loop times."""
    import gpu_check
    assert gpu_check.main(["--tiny", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert summary["ok"] and summary["device"] and set(summary["steps"]) == {
        "tests", "bench eager", "data", "run (killed)", "run (resumed)"}
    assert summary["steps"]["run (killed)"]["rc"] == -signal.SIGKILL
    assert all(summary["bench eager"][k] > 0 for k in ("offline update", "online update", "online step, real loop"))
    run = summary["run"]
    assert run["final"]["step"] == 80 and run["eval_steps_unique"] and run["losses_finite"]
    assert [int(r["step"]) for r in read_csv(tmp_path / "runs" / "scene-t5__fmq__0" / "eval.csv")] == [0, 40, 80]
    assert "==== run (resumed)" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_strips_unused_assets_from_a_wheel(tmp_path):
    """dm_control's wheel is 56 MB, 47 of them locomotion/suite assets that ogbench never loads: --fetch-wheels drops
    them. The RECORD loses the same lines."""
    import gpu_check
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name in ("dm_control/mjcf/a.py", "dm_control/suite/b.xml", "dm_control/locomotion/c.png"):
            z.writestr(name, "x")
        z.writestr("pkg-1.0.dist-info/RECORD", "dm_control/mjcf/a.py,,\ndm_control/suite/b.xml,,\n"
                                               "dm_control/locomotion/c.png,,\n")
    gpu_check.strip_wheel(whl, gpu_check.STRIP)
    with zipfile.ZipFile(whl) as z:
        assert z.namelist() == ["dm_control/mjcf/a.py", "pkg-1.0.dist-info/RECORD"]
        assert z.read("pkg-1.0.dist-info/RECORD") == b"dm_control/mjcf/a.py,,\n"


# ---------------------------------------------------------------- the tools at their edges: report.py's defaults and
# one-line errors, the sweep's record (sweep.json), what the report says of its runs, the GPU check's wheels
def test_report_writes_its_figures_under_the_runs_folder_by_default(tmp_path, monkeypatch):
    """No --fig-dir: the figures go to {runs_dir}/report, never to a docs/ folder (the repo's tracked figures)."""
    make_grid(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert report.main(["--runs-dir", "runs", "--reps", "10", "--", *TOY]) == 0
    assert (tmp_path / "runs" / "report" / "learning_curves.png").exists()
    assert (tmp_path / "runs" / "report" / "speedup.png").exists() and not (tmp_path / "docs").exists()


def test_report_without_the_sweeps_flags_says_so_in_one_line(tmp_path, capsys):
    """Runs swept with flags after `--`, reported without them (and no sweep.json): every folder holds another run
    than the paper's cell. One line on stderr names a folder, the setting and what to pass; exit status 1."""
    make_grid(tmp_path / "runs")
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "figs")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"report: error: none of the 24 run folders under {tmp_path / 'runs'} is reported (e.g. "
                          f"can__fmq__0: it holds another run than its cell (offline_steps is 100, the cell's 1000000))"
                          f"; pass the flags that tools/sweep.py got after `--` the same way")
    assert not (tmp_path / "figs").exists()
    assert report.main(["--runs-dir", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err == (f"report: error: no run folder with an eval.csv under {tmp_path / 'empty'}: run "
                                       f"tools/sweep.py first, or pass --runs-dir (the folder holding the run "
                                       f"folders)\n")
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--methods", "qc", "--", *TOY]) == 1
    assert capsys.readouterr().err == f"report: error: no runs of --methods qc under {tmp_path / 'runs'}; it holds " \
                                      f"fmq, mvp\n"


def test_sweep_records_its_flags_and_the_report_takes_them(tmp_path, capsys, monkeypatch):
    """A launched sweep writes runs/sweep.json (command, flags after `--`, methods, commit, date); the report, given
    no `--`, takes the flags from it, and its JSON carries the seeds per method, the settings every run shares, each
    run's own, the sweep's record and its own commit and date."""
    runs, launched = tmp_path / "runs", []
    monkeypatch.setattr(sweep, "run_local", lambda todo, *a: launched.extend(todo) or 0)  # no fmq.py run
    argv = ["--env-ids", "square", "--seeds", "9", "--method", "fmq", "--runs-dir", str(runs), "--workers", "1",
            "--", *TOY]
    assert sweep.main(argv) == 0 and [name for name, _ in launched] == ["square__fmq__9"]
    record = json.loads((runs / "sweep.json").read_text())
    assert record["flags"] == TOY and record["methods"] == {"fmq": sweep.METHODS["fmq"]}
    assert record["command"] == shlex.join(["python", "tools/sweep.py", *argv]) and record["seeds"] == [9]
    assert record["commit"] == sweep.git_commit() and record["date"][:2] == "20"
    make_grid(runs)  # the runs of that sweep's flags
    capsys.readouterr()
    assert report.main(["--runs-dir", str(runs), "--reps", "10", "--out-json", str(tmp_path / "r.json")]) == 0
    assert f"the sweep's flags, from {runs / 'sweep.json'}: {shlex.join(TOY)}" in capsys.readouterr().out
    text = (tmp_path / "r.json").read_text()
    res = json.loads(text)
    assert res["seeds"] == {"mvp": [0, 1, 2, 3], "fmq": [0, 1, 2, 3]} and res["flags"] == TOY
    assert '"fmq": [\n   0,\n   1,' in text  # seeds as ints, not 0.0
    assert res["sweep"] == record and res["report"]["commit"] == sweep.git_commit()
    assert res["config"]["offline_steps"] == 100 and res["config"]["sampler"] == "onestep"
    assert "seed" not in res["config"] and "device" not in res["config"]  # a run's own, and how it ran
    assert res["config_per_run"]["can__mvp__2"] == {"env_id": "can", "exp_name": "mvp", "online_target": "mvp",
                                                    "seed": 2}
    assert res["table"]["can"]["fmq"]["mean"] == pytest.approx(0.5)


def test_report_figure_states_seeds_scale_and_axes(tmp_path, monkeypatch):
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    make_grid(tmp_path / "runs")
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--reps", "10", "--", *TOY]) == 0
    curves = figures[0]
    assert curves._suptitle.get_text().splitlines()[1] == ("seeds 0, 1, 2, 3; 100 offline + 100 online steps, 4x512 "
                                                           "nets, batch 256, 50 episodes per evaluation")
    assert curves.axes[0].get_xlabel() == "step (offline: updates; online: env steps)"
    assert [ax.get_title() for ax in curves.axes] == ["can", "square", "scene-t4"]


def test_report_leaves_out_the_speedup_over_a_baseline_that_never_succeeds(tmp_path, capsys):
    """A baseline whose best online mean success is 0.05 gives a target xi of 0.025-0.05, met by evaluation noise: the
    task is left out and named, with the best it reached; no speedup figure."""
    x = np.arange(1, 5) * 10
    assert np.isnan(report.speedup(x, [0.0, 0.05, 0.0, 0.05], x, [0.1, 0.2, 0.3, 0.4], min_best=0.1)).all()
    assert report.speedup(x, [0.0, 0.1, 0.0, 0.1], x, [0.1, 0.2, 0.3, 0.4], qs=(1.0,), min_best=0.1) == [2.0]
    make_run(tmp_path / "runs", "can", "fmq", 0, 0.5, 40)
    make_run(tmp_path / "runs", "can", "mvp", 0, 0.05, 80)
    assert report.main(["--runs-dir", str(tmp_path / "runs"), "--reps", "10", "--out-json", str(tmp_path / "r.json"),
                        "--", *TOY]) == 0
    out = capsys.readouterr().out
    assert "speedup: can left out: mvp's best online mean success is 0.05, below --min-baseline-success 0.1" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["speedup"] == {} and res["speedup_left_out"] == {"can": 0.05}
    assert not (tmp_path / "runs" / "report" / "speedup.png").exists()


def test_gpu_check_fetches_every_package_the_code_imports():
    """--fetch-wheels covers every module fmq.py, qgbs.py, test_fmq.py and tools/*.py import (found with ast, mapped
    to its distribution), but the standard library, the repo's own modules and NOT_FETCHED (torch, and what no step
    of the check runs); its pins are requirements.txt's."""
    import ast
    import importlib.metadata
    import gpu_check
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    own = {"fmq", "qgbs", *(p.stem for p in TOOLS.glob("*.py"))}
    imported = {}
    for path in [ROOT / "fmq.py", ROOT / "qgbs.py", ROOT / "test_fmq.py", *sorted(TOOLS.glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    imported.setdefault(top, set()).add(path.name)
                if name.startswith("torch.utils.tensorboard"):  # torch's module imports the tensorboard package
                    imported.setdefault("tensorboard", set()).add(path.name)
    dists = importlib.metadata.packages_distributions()
    needed = {norm(dists[m][0]): files for m, files in imported.items()}
    fetched = {norm(w.split("==")[0]) for w in gpu_check.WHEELS}
    missing = {d: sorted(f) for d, f in needed.items() if d not in fetched and d not in gpu_check.NOT_FETCHED}
    assert not missing, f"imported but not fetched by gpu_check --fetch-wheels: {missing}"
    assert {"tensorboard", "tqdm", "pytest", "pandas", "rliable", "scipy", "ogbench", "tyro"} <= fetched & set(needed)
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {norm(w.split("==")[0]): w.partition("==")[2] for w in gpu_check.WHEELS} == {
        d: next((v for k, v in pins.items() if norm(k) == d), "") for d in fetched}  # unpinned only if not in there
    assert set(gpu_check.NOT_FETCHED) <= {norm(k) for k in pins}


# ---------------------------------------------------------------- RoboMimic v1.5: files the tests record, the env guard
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


def rm_file(root, task):
    return root / task / "mh" / "low_dim_v15.hdf5"


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
    shared141 = DATA / "robomimic"  # robosuite-1.4.1 files of this project's machines, when they are there
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
        (0, "offline"), (10, "online"), (20, "online")]
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


def test_missing_robomimic_dataset_names_the_path_and_the_v15_download(tmp_path):
    with pytest.raises(fmq.FMQError, match=rf"not found at {tmp_path}/square/mh/low_dim_v15.hdf5; use robomimic's "
                       r"v1.5 file.*hf_hub_download\('robomimic/robomimic_datasets', 'v1.5/square/mh/low_dim_v15"):
        fmq.load_dataset(fmq.env_spec("square"), str(tmp_path))


# ---------------------------------------------------------------- OGBench test data (made here); tools/make_dataset.py
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
    assert [(int(r["step"]), r["phase"]) for r in evals] == [(0, "offline"), (10, "online"), (20, "online")]
    assert [float(r["length"]) for r in evals] == [40.0] * 3  # untrained policies do not solve a task in 40 steps
    assert final["step"] == 20 and final["success"] == 0.0
    assert json.loads((run / "config.json").read_text())["discount"] == 0.99  # official: 0.99 for every task


# What OGBench's generator writes (data_gen_scripts/generate_manipspace.py): keys, dtypes and per-row shapes.
CUBE_DOUBLE_FORMAT = {"observations": ("float32", (37,)), "actions": ("float32", (5,)), "terminals": ("bool", ()),
                      "qpos": ("float32", (28,)), "qvel": ("float32", (26,))}


def run_make_dataset(*flags):
    out = subprocess.run([sys.executable, str(TOOLS / "make_dataset.py"), *flags], capture_output=True, text=True,
                         timeout=3600)  # a generous cap only against a hang: a 2-episode run takes seconds
    return out.returncode, out.stderr


@pytest.mark.slow
def test_make_dataset_writes_ogbench_play_files(tmp_path):
    code, err = run_make_dataset("--env", "cube-double-play-v0", "--episodes", "2", "--max-episode-steps", "60",
                                 "--workers", "2", "--out", str(tmp_path / "a"))
    assert code == 0, err[-2000:]
    # fmq.py's filters hold here too: no glfw warning without a display, no gymnasium warning about float64 bounds
    assert not [line for line in err.splitlines() if "Warn" in line or "WARN" in line or "GLFW" in line], err
    for split, episodes in (("", 2), ("-val", 1)):  # validation: a tenth of the episodes, at least one
        f = np.load(tmp_path / "a" / f"cube-double-play-v0{split}.npz")
        assert {k: (str(f[k].dtype), f[k].shape[1:]) for k in f.files} == CUBE_DOUBLE_FORMAT
        assert len(f["actions"]) == 60 * episodes and np.abs(f["actions"]).max() <= 1.0
        assert np.flatnonzero(f["terminals"]).tolist() == [60 * i - 1 for i in range(1, episodes + 1)]
    # each episode has its own seed: one worker in this process writes the same files as two worker processes
    make_dataset.make_dataset("cube-double-play-v0", tmp_path / "b", 2, 60, workers=1, progress=False)
    for split in ("", "-val"):
        a, b = (np.load(tmp_path / d / f"cube-double-play-v0{split}.npz") for d in "ab")
        assert all(np.array_equal(a[k], b[k]) for k in CUBE_DOUBLE_FORMAT)
    import ogbench
    _, train, val = ogbench.make_env_and_datasets("cube-double-play-singletask-task2-v0",
                                                  dataset_dir=str(tmp_path / "a"))
    assert train["observations"].shape == (2 * 59, 37) and val["rewards"].shape == (59,)
    with pytest.raises(make_dataset.DatasetError, match="already exists"):
        make_dataset.make_dataset("cube-double-play-v0", tmp_path / "a", 2, 60)


@pytest.mark.parametrize("flags,message", [
    (["--env", "antmaze-giant-navigate-v0"], "antmaze-giant-navigate-v0 is a locomotion dataset: OGBench made it "
                                             "with trained expert policies"),
    (["--env", "humanoidmaze-medium-navigate-v0"], "is a locomotion dataset"),
    (["--env", "scene-noisy-v0"], "cannot make 'scene-noisy-v0'; this tool makes the manipulation play datasets"),
    (["--env", "scene-play-v0", "--episodes", "0"], "need --episodes >= 1"),
    (["--env", "scene-play-v0", "--episodes", "two"], "argument --episodes: invalid int value: 'two'"),
])
@pytest.mark.slow
def test_make_dataset_bad_input_one_line(tmp_path, flags, message):
    code, err = run_make_dataset(*flags, "--out", str(tmp_path))
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("make_dataset: error: ") and message in err
    assert not list(tmp_path.iterdir())


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


# ---------------------------------------------------------------- official checkpoints (tools/import_official.py)
# tools/fixtures/official_tiny: params_offline.pkl (FlowMapPolicy after 20 updates) and params_online.pkl (FMQAgent
# after 5 more), written by the official JAX code's save_agent, with reference_tiny.npz: 16 fixed inputs and the
# official networks' outputs on them. Tiny nets (hidden (32, 32), Fourier 64) on obs 40, action chunk 5 x 5: the
# sizes of scene-t5 with horizon 5.
import pickle  # noqa: E402

import import_official  # noqa: E402
import qgbs_sweep  # noqa: E402

OFFICIAL = TOOLS / "fixtures" / "official_tiny"
TINY_ARCH = dict(env_id="scene-t5", horizon=5, hidden_dim=32, num_layers=2, time_dim=64, num_critics=2,
                 actor_layer_norm=False, critic_layer_norm=True)


def official_agent(tmp_path, name="params_online.pkl", tree=None):
    """Converts an official checkpoint (or tree), saves it, and loads it the way fmq.py does."""
    tree = import_official.load_official(OFFICIAL / name) if tree is None else tree
    ckpt = import_official.convert(tree, "scene-t5", 40, 5)
    path = tmp_path / "official.pt"
    torch.save(ckpt, path)
    args = fmq.Args(**ckpt["args"])
    agent = fmq.make_agent(args, 40, 25, "cpu")
    fmq.load_checkpoint(path, args, agent)
    return agent, ckpt, path


def official_tree(agent, count=0):
    """The inverse mapping: an fmq agent's weights in the official checkpoint layout (Adam moments 0)."""
    flat = {import_official.COUNT: np.array(count, np.int32), "agent/network/step": np.array(count + 1, np.int32)}
    for k, (net, param, shape) in import_official.expected_tree(agent).items():
        x = getattr(agent, net).get_parameter(param).detach()
        x = (x.T if x.dim() == 2 and k.endswith("kernel") else x).reshape(shape).numpy()
        flat[k] = np.zeros_like(x) if "/opt_state/" in k else x
    tree = {}
    for k, v in flat.items():
        *path, leaf = k.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def one_line_exit(argv):
    with pytest.raises(SystemExit) as e:
        import_official.main(argv)
    message = str(e.value.code)
    assert message.startswith("import_official: error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("name,prefix", [("params_online.pkl", ""), ("params_offline.pkl", "offline_")],
                         ids=["online", "offline"])
def test_import_official_outputs_match_the_official_code(tmp_path, name, prefix):
    agent, ckpt, _ = official_agent(tmp_path, name)
    ref = np.load(OFFICIAL / "reference_tiny.npz")
    x = {k: torch.from_numpy(ref[k]) for k in ("obs", "a", "r", "t", "a0")}
    actors = dict(online=agent.actor, **(dict(frozen=agent.u_off) if prefix == "" else {}))
    with torch.no_grad():
        out = dict(q_critic=agent.critic(x["obs"], x["a"]), q_target=agent.critic_target(x["obs"], x["a"]))
        for who, u in actors.items():
            out[f"u_{who}"] = u(x["obs"], x["a"], x["r"], x["t"])
            out[f"u0_{who}"] = u(x["obs"], x["a0"], 0.0, 1.0)
            out[f"a1_{who}"] = (x["a0"] + out[f"u0_{who}"]).clamp(-1.0, 1.0)  # the one-step action
    outputs = {k for k in ref.files if k not in x and k.startswith("offline_") == (prefix == "offline_")}
    assert {prefix + k for k in out} == outputs
    for k, v in out.items():
        np.testing.assert_allclose(v.numpy(), ref[prefix + k], rtol=0, atol=1e-5, err_msg=prefix + k)
    assert {k: ckpt["args"][k] for k in fmq.ARCH} == TINY_ARCH
    assert ckpt["args"] == dataclasses.asdict(fmq.Args(**TINY_ARCH))  # everything else: fmq's defaults
    assert ckpt["step"] == (25 if prefix == "" else 20)  # the official Adam count: 20 offline + 5 online updates
    assert (ckpt["u_off"] is None) == (prefix == "offline_")


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


@pytest.mark.slow
def test_import_official_checkpoint_runs_in_qgbs_sweep(tmp_path, monkeypatch):
    import ogbench
    monkeypatch.setattr(fmq, "make_env", lambda spec, env_args=None: ogbench.make_env_and_datasets(
        spec["name"], env_only=True, max_episode_steps=10))  # the real env, cut short
    monkeypatch.setattr(qgbs_sweep, "latency_ms", lambda *a, **k: 0.0)
    _, _, path = official_agent(tmp_path, "params_offline.pkl")
    rows = qgbs_sweep.main([str(path), "--episodes", "1", "--device", "cpu"])
    assert [r["nfe"] for r in rows] == [32, 20, 24, 32, 36, 144]


@pytest.mark.slow
def test_import_official_refuses_a_foreign_pickle_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"agent": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match=f"refusing global {os.system.__module__}.system"):
        import_official.load_official(evil)
    code = subprocess.run([sys.executable, str(TOOLS / "import_official.py"), str(evil), "--env-id", "scene-t5",
                           "--out", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=600)
    assert code.returncode != 0 and code.stderr.count("\n") == 1 and "Traceback" not in code.stderr
    assert code.stderr.startswith(f"import_official: error: {evil}: refusing global ")
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


CRITIC_KEY = "agent/network/params/modules_critic/value_net"
TARGET_KEY = "agent/network/params/modules_target_critic/value_net"
ACTOR_KEY = "agent/network/params/modules_actor_bc_flow/mlp"


def parent(tree, key):
    """The dict that holds `key`'s leaf."""
    for p in key.split("/")[:-1]:
        tree = tree[p]
    return tree


@pytest.mark.parametrize("edit,env_id,message", [
    (lambda t: parent(t, f"{CRITIC_KEY}/LayerNorm_1/scale").pop("scale"), "scene-t5",
     f"missing {CRITIC_KEY}/LayerNorm_1/scale"),
    (lambda t: parent(t, f"{TARGET_KEY}/Dense_1/kernel").update(kernel=np.zeros((2, 32, 31), np.float32)),
     "scene-t5", f"{TARGET_KEY}/Dense_1/kernel has shape (2, 32, 31), but scene-t5 (obs 40, action 5 x horizon 5) "
                 f"with 2 hidden layers of 32, time features 64, 2 critics needs (2, 32, 32)"),
    (None, "cube-dbl-t3", f"{ACTOR_KEY}/Dense_0/kernel has shape (193, 32), but cube-dbl-t3 (obs 37, action 5 x "
                          f"horizon 5) with 2 hidden layers of 32, time features 64, 2 critics needs (190, 32)"),
    (lambda t: t["agent"]["network"]["params"].update(modules_actor_bc_flow_encoder={"w": np.zeros(3, np.float32)}),
     "scene-t5", "unknown key agent/network/params/modules_actor_bc_flow_encoder/w: not in the official FMQ tree"),
], ids=["missing-key", "wrong-shape", "other-env", "unknown-key"])
def test_import_official_mismatched_tree_gives_one_line(tmp_path, edit, env_id, message):
    tree = import_official.load_official(OFFICIAL / "params_online.pkl")
    if edit:
        edit(tree)
    path = tmp_path / "edited.pkl"
    path.write_bytes(pickle.dumps(tree))  # plain numpy arrays: the unpickler reads them too
    err = one_line_exit([str(path), "--env-id", env_id, "--out", str(tmp_path / "x.pt")])
    assert message in err, err
    assert not (tmp_path / "x.pt").exists()


def test_import_official_adam_state_steps_as_optax(tmp_path):
    """Official: one optax.adam over all params (count, mu, nu); here actor_opt and critic_opt. After the mapping
    one fmq.update must be the step optax would take: m = b1 mu + (1 - b1) g, v = b2 nu + (1 - b2) g^2,
    p -= lr m_hat / (sqrt(v_hat) + eps), bias corrections at count + 1."""
    flat = import_official.flatten(import_official.load_official(OFFICIAL / "params_online.pkl"))
    agent, ckpt, _ = official_agent(tmp_path)
    opt = lambda k: f"agent/network/opt_state/0/{k}/modules_"
    layer = lambda net, kind, i: [m for m in net.net if isinstance(m, kind)][i]  # the i-th layer of that kind
    pairs = [(agent.actor_opt, "actor_bc_flow/mlp/Dense_1/kernel", layer(agent.actor, torch.nn.Linear, 1).weight),
             (agent.actor_opt, "actor_bc_flow/mlp/Dense_2/bias", layer(agent.actor, torch.nn.Linear, 2).bias),
             (agent.critic_opt, "critic/value_net/Dense_0/kernel", layer(agent.critic, fmq.EnsembleLinear, 0).weight),
             (agent.critic_opt, "critic/value_net/LayerNorm_1/scale",
              layer(agent.critic, fmq.EnsembleLayerNorm, 1).weight)]
    before = []
    for optim, key, p in pairs:
        mu, nu = (torch.from_numpy(flat[opt(m) + key]) for m in ("mu", "nu"))
        mu, nu = (x.T if key.startswith("actor") and x.dim() == 2 else x.reshape(p.shape) for x in (mu, nu))
        state = optim.state[p]
        assert float(state["step"]) == 25 == int(flat["agent/network/opt_state/0/count"])
        assert torch.equal(state["exp_avg"], mu) and torch.equal(state["exp_avg_sq"], nu) and mu.abs().sum() > 0
        before.append((p.detach().clone(), mu, nu))
    torch.manual_seed(0)
    batch = dict(obs=torch.randn(16, 40), actions=torch.rand(16, 25) * 2 - 1, R=-torch.rand(16), mask=torch.ones(16),
                 next_obs=torch.randn(16, 40))
    args = dataclasses.replace(fmq.Args(**ckpt["args"]), best_of_n=4)
    fmq.update(agent, batch, ckpt["step"], args, fmq.make_losses())
    for (optim, _, p), (p0, mu, nu) in zip(pairs, before):
        m, v = 0.9 * mu + 0.1 * p.grad, 0.999 * nu + 0.001 * p.grad ** 2
        step = 3e-4 * (m / (1 - 0.9 ** 26)) / ((v / (1 - 0.999 ** 26)).sqrt() + 1e-8)
        assert float(optim.state[p]["step"]) == 26 and step.abs().max() > 1e-5
        torch.testing.assert_close(optim.state[p]["exp_avg"], m)
        torch.testing.assert_close(p.detach() - p0, -step, rtol=1e-3, atol=1e-7)


def test_import_official_other_architectures_round_trip():
    """Raw r, t inputs (official code without config.yaml: time_dim 0), an actor LayerNorm, 3 critics, 3 layers."""
    arch = dict(hidden_dim=16, num_layers=3, time_dim=0, num_critics=3, actor_layer_norm=True, critic_layer_norm=False)
    agent = fmq.make_agent(fmq.Args(**arch), 40, 25, "cpu")
    ckpt = import_official.convert(official_tree(agent, count=7), "scene-t5", 40, 5)
    assert {k: ckpt["args"][k] for k in fmq.ARCH} == dict(TINY_ARCH, **arch)
    assert ckpt["u_off"] is None and ckpt["step"] == 7
    for k in ("actor", "critic", "critic_target"):
        assert ckpt[k].keys() == getattr(agent, k).state_dict().keys()
        assert all(torch.equal(v, getattr(agent, k).state_dict()[n]) for n, v in ckpt[k].items())


# ---------------------------------------------------------------- official main.py flags: utd_ratio, dataset_proportion
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


# ---------------------------------------------------------------- released checkpoints by env id (import_official.py)
def test_released_checkpoint_table_covers_every_paper_task():
    assert set(import_official.RELEASED) == set(fmq.ENVS)
    assert [import_official.RELEASED[k] for k in ("cube-trl-t4", "cube-dbl-t3", "scene-t5", "amaze-gnt-t4",
                                                  "hmaze-med-t3", "square")] == ["ctrp4", "cdp3", "sc5", "ag4", "hm3",
                                                                                 "square"]


@pytest.mark.parametrize("prefix", ["checkpoints/", ""], ids=["repo-layout", "folders-only"])
def test_import_official_finds_the_released_file_by_env_id_and_seed(tmp_path, prefix, capsys):
    """--env-id scene-t5 --seed 3 reads <dir>/[checkpoints/]sc5/params_online_sd003.pkl (here the online tiny
    fixture), not the other seed's or the other task's file beside it (here the offline one, which has no u_off)."""
    import shutil
    for folder, seed, name in (("sc5", 3, "params_online.pkl"), ("sc5", 0, "params_offline.pkl"),
                               ("sc4", 3, "params_offline.pkl")):
        path = tmp_path / "hf" / f"{prefix}{folder}" / f"params_online_sd{seed:03d}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(OFFICIAL / name, path)
    out = tmp_path / "sc5_sd003.pt"
    import_official.main(["--env-id", "scene-t5", "--seed", "3", "--official-dir", str(tmp_path / "hf"), "--out",
                          str(out)])
    ckpt = torch.load(out, weights_only=False)
    want = import_official.convert(import_official.load_official(OFFICIAL / "params_online.pkl"), "scene-t5", 40, 5)
    assert ckpt["u_off"] is not None and ckpt["step"] == want["step"]
    assert all(torch.equal(v, want["actor"][k]) for k, v in ckpt["actor"].items())
    assert "online FMQAgent" in capsys.readouterr().out
    assert "seeds 0-4" in one_line_exit(["--env-id", "scene-t5", "--seed", "5", "--out", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("env,why", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                     ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "http://127.0.0.1:9: ConnectError")],
                         ids=["hf-offline", "unreachable"])
def test_import_official_offline_and_not_found_says_what_to_fetch(tmp_path, env, why):
    """Without the file and without the Hub: one line at once (no retries printed), and nothing left on disk (no
    lock folder of a download that never started)."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("HF_")}, HF_HOME=str(tmp_path / "hf_home"),
               OMP_NUM_THREADS="1", **env)
    code = subprocess.run([sys.executable, str(TOOLS / "import_official.py"), "--env-id", "cube-trl-t4", "--seed", "2",
                           "--official-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, env=env)
    rel = "checkpoints/ctrp4/params_online_sd002.pkl"
    assert code.returncode == 1 and code.stderr.count("\n") == 1, code.stderr
    assert code.stderr.startswith(f"import_official: error: cube-trl-t4: {rel} is not under {tmp_path / 'none'} and "
                                  f"cannot be downloaded ({why}); ")
    assert f"hf_hub_download('christoszi/flow-map-policies', '{rel}'" in code.stderr
    assert str(tmp_path / "none" / rel) in code.stderr and not (tmp_path / "x.pt").exists()
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- Weights & Biases: --track, --resume continues the run
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


# ---------------------------------------------------------------- videos of evaluation rollouts (--video-episodes)
def short_episodes(monkeypatch, steps):
    """Every env fmq.py makes ends its episodes after `steps` steps (gymnasium's TimeLimit), frames 64 x 48."""
    import gymnasium
    real = fmq.make_env
    monkeypatch.setattr(fmq, "make_env", lambda *a, **k: gymnasium.wrappers.TimeLimit(real(*a, **k), steps))
    monkeypatch.setattr(fmq, "VIDEO_SIZE", (64, 48))


def frames_change(frames):
    """Each frame differs from the one before (mean |difference| over pixels > 1 of 255) and none is blank."""
    diffs = np.abs(np.diff(np.asarray(frames, np.float32), axis=0)).mean(axis=(1, 2, 3))
    return diffs.min() > 1.0 and min(f.std() for f in frames) > 5.0


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
    assert [(i.step, i.width, i.height) for i in images] == [(s, 64, 48) for s in steps]
    assert iio.imread(images[0].encoded_image_string, extension=".gif", index=None).shape == (6, 48, 64, 3)
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


# ---------------------------------------------------------------- the compiled update (--compile)
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
    update = fmq.make_update(agent, fmq.ReplayBuffer(data, 0, args.horizon, "cpu"), args, fmq.make_losses())
    start = [p.detach().clone() for p in agent.actor.parameters()]
    infos = [update(step) for step in range(2)]  # step 1 > curriculum_start: with self-distillation
    fmq.freeze_offline_copy(agent)
    infos += [update(step) for step in range(2, 4)]
    state = [t for opt in (agent.critic_opt, agent.actor_opt) for s in opt.state.values() for t in s.values()]
    nets = [p.detach() for k in ("actor", "critic", "critic_target") for p in getattr(agent, k).parameters()]
    return start, nets, state, infos


@pytest.mark.slow
@pytest.mark.parametrize("online_target", ["fmq", "mvp", "flow-map"])
def test_compiled_update_is_the_eager_update(online_target):
    """--compile: one torch.compile graph per phase (batch sampling, losses, backward, Adam, Polyak) draws eager's
    batches and noise, so from the same seed 2 offline + 2 online updates leave the eager parameters, targets and Adam
    state, up to float32 rounding of a reordered computation: |diff| <= 1e-5 + 1e-4 |x|. That is 3% of one Adam step
    (lr 3e-4), while a wrong Adam (no bias correction: 3x the first step), Polyak or loss term moves 1e-4 or more."""
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.reset()  # earlier compiled updates' cache entries would count toward the recompile limit
    start, *eager = _four_updates(False, online_target)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(trace_autograd_ops=False), torch._inductor.config.patch(fallback_random=False):
        _, *compiled = _four_updates(True, online_target)  # (make_update sets both; undone here)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # offline and online, no fallback
    assert max((p - p0).abs().max() for p, p0 in zip(eager[0], start)) > 1e-3  # the updates moved the actor
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(fmq.shutil, "which", lambda name: None if name == "g++" else f"/usr/bin/{name}")
    fmq.validate(fmq.Args(compile=False))
    with pytest.raises(fmq.FMQError, match=r"--compile needs a C\+\+ compiler .*apt-get install g\+\+"):
        fmq.validate(fmq.Args(compile=True))
