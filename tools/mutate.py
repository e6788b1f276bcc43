"""Porting-bug check for fmq.py / qgbs.py ("Aligning Flow Map Policies with Optimal Q-Guidance", FMQ).

People copy fmq.py and qgbs.py into other codebases and port them; the tests are how they know the copy is right.
This tool plants classic porting bugs, one at a time, and checks that the test suite notices each one:
  * every bug in BUGS is a small textual patch (file, exact old snippet, new snippet) with a one-line reason;
  * each is applied to a copy of the code (fmq.py, qgbs.py, test_fmq.py, pytest.ini, tools/, README.md) in a temp
    folder, and the fast tier (the tests not marked `slow`) runs there with `pytest -x` (stop at the first failure);
  * it prints a table (bug, killed or SURVIVED, by which test, seconds) and, last, `N of M porting bugs caught`.
First the unpatched copy runs the same tests: they must pass (that run also measures each test, to order them).
A patch whose old snippet is not found exactly once is an ERROR, never a silent skip. Exit status 0 only when
every bug is caught and every patch applies. Opt-in (not part of `pytest`):

  python tools/mutate.py                       # all bugs, one worker per core (docs/testing.md: its time)
  python tools/mutate.py --only td_drops_mask  # one bug (repeatable)
  python tools/mutate.py --list                # the catalogue
  python tools/mutate.py --tests all           # also the tests marked slow (real envs, subprocesses, training)

When the code changes, edit a bug's `old`/`new` snippet (keep each short and exact); `--list` checks them all.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what each temp copy holds
COPY = ("fmq.py", "qgbs.py", "test_fmq.py", "pytest.ini", "tools", "README.md", "requirements.txt")


def bug(name, why, old, new, file="fmq.py", also=()):
    """One porting bug: replace `old` (exactly once in `file`) by `new`; `also` holds more (file, old, new) edits."""
    return dict(name=name, why=why, edits=[(file, old, new), *also])


# fmt: off
BUGS = [
    # --- critic: the chunked TD target, R + discount^h * mask * max_n Q_target(s', a'_n)
    bug("td_discount_per_step", "TD target discounts the chunk by discount, not discount ** horizon",
        'discount ** horizon * batch["mask"]', 'discount * batch["mask"]'),
    bug("td_drops_mask", "TD target bootstraps through terminal chunks (mask dropped)",
        'discount ** horizon * batch["mask"] * q_agg', "discount ** horizon * q_agg"),
    bug("td_bootstraps_online_critic", "TD target from the online critic, not the target critic",
        "q_agg(agent.critic_target, agg)", "q_agg(agent.critic, agg)"),
    bug("td_bootstraps_from_obs", "TD target bootstraps from s, not from s' after the chunk",
        'batch["next_obs"], n)', 'batch["obs"], n)'),
    bug("td_target_no_sg", "TD target not under no_grad: the critic loss trains the actor",
        "    with torch.no_grad():\n        target = td_target(", "    if True:\n        target = td_target("),
    bug("critic_agg_min_mean_swapped", "ensemble aggregation: 'min' takes the mean and 'mean' the min",
        'critic(obs, a).min(0).values if how == "min" else critic(obs, a).mean(0)',
        'critic(obs, a).mean(0) if how == "min" else critic(obs, a).min(0).values'),
    bug("critic_agg_max", "pessimistic aggregation takes the max of the critics",
        '.min(0).values if how == "min"', '.max(0).values if how == "min"'),
    # --- target networks and Polyak averaging
    bug("target_critic_is_the_critic", "target critic aliases the online critic (no copy)",
        "critic_target=copy.deepcopy(critic).requires_grad_(False)", "critic_target=critic"),
    bug("target_critic_not_frozen", "target critic parameters still require grad",
        "critic_target=copy.deepcopy(critic).requires_grad_(False)", "critic_target=copy.deepcopy(critic)"),
    bug("polyak_tau_flipped", "Polyak step uses 1 - tau (tau read as the fraction kept)",
        "params[0], args.tau)", "params[0], 1 - args.tau)"),
    bug("polyak_lerp_order", "Polyak lerp moves the online critic toward the target",
        "_foreach_lerp_(list(agent.critic_target.parameters()), params[0]",
        "_foreach_lerp_(params[0], list(agent.critic_target.parameters())"),
    bug("polyak_inside_autograd", "Polyak update outside no_grad: the targets join the autograd graph",
        "    with torch.no_grad():  # outside autograd", "    if True:  # outside autograd"),
    bug("no_zero_grad", "gradients accumulate across updates (zero_grad dropped in the port from optax)",
        "agent.critic_opt.zero_grad(set_to_none=True), agent.actor_opt.zero_grad(set_to_none=True)", "None"),
    # --- action chunks and the replay buffer
    bug("chunk_return_masked_by_alive", "chunk return masked by cumprod(masks): rewards at and after a mask-0 step are lost (Q-chunking sums them all)",
        "return (powers * rewards).sum(1)", "return (torch.cumprod(masks, 1) * powers * rewards).sum(1)"),
    bug("chunk_discount_off_by_one", "chunk return discounts the first reward by discount, not 1",
        "powers = discount ** torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)",
        "powers = discount ** (1 + torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype))"),
    bug("chunk_mask_any_alive", "chunk mask is 1 if any step is alive (any/all mix-up), not only if all are",
        "masks.prod(1)", "masks.amax(1)"),
    bug("replay_chunks_cross_episode_ends", "offline chunks may start anywhere, crossing trajectory ends",
        "ok = i[c[i + horizon - 1] - c[i] == 0]", "ok = i"),
    bug("online_chunks_cross_episode_ends", "online chunks ignore episode boundaries",
        "if self.ep_len >= self.h:", "if self.written - self.n_off >= self.h:"),
    bug("replay_overwrite_keeps_chunks", "circular buffer: an overwritten row's chunk stays sampleable",
        "if v >= cap and self.n_starts and self.starts_host[self.head] == v - cap:", "if False:"),
    bug("next_obs_off_by_one", "s' of a chunk taken one step too late",
        'next_observations"][seq[:, -1]]', 'next_observations"][(seq[:, -1] + 1) % self.cap]'),
    bug("truncation_as_terminal", "time-limit truncation stored as terminal (mask 0)",
        "1.0 - term, next_obs", "1.0 - (term or trunc), next_obs"),
    # --- sampling
    bug("actions_not_clipped", "one-step actions are not clipped to [-1, 1]",
        "return flow(actor, obs, a_0).clamp(-1.0, 1.0)", "return flow(actor, obs, a_0)"),
    bug("one_step_r_t_swapped", "the flow-map jump calls u(a_r, 1, r): (r, t) order swapped",
        "return a_r + (1.0 - r) * actor(obs, a_r, r, 1.0)", "return a_r + (1.0 - r) * actor(obs, a_r, 1.0, r)"),
    bug("euler_right_endpoints", "Euler steps evaluate u at the right end of each step",
        "t = r + (1.0 - r) * k / steps", "t = r + (1.0 - r) * (k + 1) / steps"),
    bug("euler_step_size", "Euler steps of 1 / K from any r (the steps overshoot t = 1)",
        "a_r = a_r + (1.0 - r) / steps * actor", "a_r = a_r + 1.0 / steps * actor"),
    bug("best_of_n_argmin", "best-of-N keeps the lowest-Q sample",
        ".view(len(obs), n).max(1)", ".view(len(obs), n).min(1)"),
    bug("time_features_scale", "time features of 1000 t (diffusion-style timestep scale), not 1 down to 1e-4 rad",
        "freqs = 1e4 ** -(", "freqs = 1e3 * 1e4 ** -("),
    # --- offline flow-map pretraining
    bug("fm_target_reversed", "flow-matching target a_0 - a_1 instead of a_1 - a_0",
        "t, t), a_data - a_0)", "t, t), a_0 - a_data)"),
    bug("fm_interpolation_reversed", "interpolation a_t = t a_0 + (1 - t) a_1 (noise at t = 1)",
        "actor(obs, (1 - t) * a_0 + t * a_data, t, t)", "actor(obs, t * a_0 + (1 - t) * a_data, t, t)",
        also=[("fmq.py", "a_r = (1 - r) * a_0 + r * a_data\n    u_rt", "a_r = r * a_0 + (1 - r) * a_data\n    u_rt")]),
    bug("distill_target_no_sg", "self-distillation target not stop-gradient (sg dropped)",
        "distill = F.mse_loss(u_rt, target.detach())", "distill = F.mse_loss(u_rt, target)"),
    # --- online FMQ (Alg. 1) and Theorem 3.2
    bug("fmq_interpolation_reversed", "Alg. 1 line 5 as a_r = r a_0 + (1 - r) a_1",
        "a_r = (1 - r) * a_0 + r * a_data  # line 5", "a_r = r * a_0 + (1 - r) * a_data  # line 5"),
    bug("u_off_is_the_actor", "u_off aliases the online actor (no frozen copy)",
        "agent.u_off = copy.deepcopy(agent.actor).requires_grad_(False)", "agent.u_off = agent.actor"),
    bug("u_off_not_frozen", "the copy u_off still requires grad",
        "agent.u_off = copy.deepcopy(agent.actor).requires_grad_(False)", "agent.u_off = copy.deepcopy(agent.actor)"),
    bug("fmq_reference_is_online_actor", "the trust region is centred on u_theta, not on the frozen u_off",
        "u_off = agent.u_off(obs, a_r, r, 1.0)", "u_off = agent.actor(obs, a_r, r, 1.0)"),
    bug("u_off_at_r_r", "u_off(a_r, r, r) (instantaneous velocity) instead of u_off(a_r, r, 1)",
        "u_off = agent.u_off(obs, a_r, r, 1.0)", "u_off = agent.u_off(obs, a_r, r, r)"),
    bug("a_1_without_1_minus_r", "a_1 = a_r + u_off instead of a_r + (1 - r) u_off (Alg. 1 line 6)",
        "a_1 = (a_r + (1 - r) * u_off)", "a_1 = (a_r + u_off)"),
    bug("fmq_actor_r_t_swapped", "the FMQ regression calls u_theta(a_r, 1, r): (r, t) order swapped",
        "F.mse_loss(agent.actor(obs, a_r, r, 1.0), target)", "F.mse_loss(agent.actor(obs, a_r, 1.0, r), target)"),
    bug("fmq_target_no_sg", "FMQ target not stop-gradient (differentiable grad Q, as jax.grad inside a loss)",
        "grad_q = torch.autograd.grad(q_guide.sum(), a_1)[0]",
        "grad_q = torch.autograd.grad(q_guide.sum(), a_1, create_graph=True)[0]",
        also=[("fmq.py", "eta_eff, args.kappa1).detach()", "eta_eff, args.kappa1)")]),
    bug("guidance_critic_swapped", "--guidance-critic q1 guides with the mean and mean with Q_phi1",
        'qs[0] if args.guidance_critic == "q1" else qs.mean(0)',
        'qs.mean(0) if args.guidance_critic == "q1" else qs[0]'),
    bug("eta_eff_no_damping", "eta_eff without the 1 / (1 + beta * delta_critic) damping",
        "/ (1 + args.beta * delta)", "* torch.ones_like(delta)"),
    bug("delta_not_normalised", "delta_critic is the raw critic spread, not divided by its batch mean",
        "delta = spread / (spread.mean() + 1e-8)", "delta = spread"),
    bug("official_eta_swapped", "--official-eta and the paper's eta_eff swapped",
        "(1.0 if args.official_eta else args.eta)", "(args.eta if args.official_eta else 1.0)"),
    bug("trust_region_descent", "Thm 3.2 step against the Q-gradient",
        "return u_ref + eta * grad_q / (norm + kappa1)", "return u_ref - eta * grad_q / (norm + kappa1)"),
    bug("kappa1_outside_norm", "kappa1 added to the step, not to the gradient norm",
        "eta * grad_q / (norm + kappa1)", "eta * grad_q / norm + kappa1"),
    # --- the baselines: MVP, the official no-FMQ path (flow-map), QC
    bug("mvp_trains_on_data", "MVP's online loss takes the buffer's actions, not the best-of-N action a*",
        'a_1 = mvp_target(agent, batch["obs"], args) if online and args.online_target == "mvp" else batch["actions"]',
        'a_1 = batch["actions"]'),
    bug("flow_map_trains_on_a_star", "the official no-FMQ path trains toward a*, not the buffer's actions",
        'if online and args.online_target == "mvp" else batch["actions"]', 'if online else batch["actions"]'),
    bug("baseline_agg_min", "every method aggregates the critics by min online (official FlowMapPolicy, QC: mean)",
        'args.online_q_agg or ("min" if args.online_target == "fmq" else "mean")', 'args.online_q_agg or "min"'),
    bug("sparse_replaces_table_reward", "--sparse replaces the table's transform instead of following it (robomimic)",
        'REWARDS["sparse" if sparse else None](REWARDS[spec["reward"]](r))', 'REWARDS["sparse" if sparse else spec["reward"]](r)'),
    # --- what CUDA, bf16 and the loaders change
    bug("amp_q_in_bf16", "under --amp the critics' output layer runs in bf16 (Q in steps of 0.5 near 100)",
        "with torch.autocast(h.device.type, enabled=False):", "if True:"),
    bug("resume_rng_on_device", "torch.load maps the RNG states to the training device",
        'map_location="cpu", weights_only=False)', "map_location=next(agent.actor.parameters()).device, weights_only=False)"),
    bug("dataset_actions_unclipped", "dataset actions not clipped to +-(1 - 1e-5) as the official loaders",
        'data["actions"] = data["actions"].clip(-1 + 1e-5, 1 - 1e-5)', "pass"),
    # --- QGBS (Alg. 2)
    bug("qgbs_t_prime_inverted", "t' = 1 / (1 + rho) instead of rho / (1 + rho)",
        "t_prime = rho / (1.0 + rho)", "t_prime = 1.0 / (1.0 + rho)", file="qgbs.py"),
    bug("qgbs_renoise_weights_swapped", "re-noising as (1 - t') a_1 + t' eps",
        "a_tp = t_prime * a_1[:, :, None] + (1.0 - t_prime) * eps",
        "a_tp = (1.0 - t_prime) * a_1[:, :, None] + t_prime * eps", file="qgbs.py"),
    bug("qgbs_top_m_smallest", "the beam keeps the M lowest-Q candidates",
        ".topk(M, dim=1).indices", ".topk(M, dim=1, largest=False).indices", file="qgbs.py"),
    bug("qgbs_gradient_descent", "the beam steps against the Q-gradient",
        "return (a_1 + eta * g", "return (a_1 - eta * g", file="qgbs.py"),
    bug("qgbs_unnormalised_gradient", "the beam steps by eta * grad Q, not eta * grad Q / ||grad Q||",
        "eta * g / (g.norm(dim=-1, keepdim=True) + 1e-8)", "eta * g", file="qgbs.py"),
    bug("qgbs_no_clamp_after_step", "actions leave the action box after the gradient step",
        "+ 1e-8)).clamp(lo, hi)", "+ 1e-8))", file="qgbs.py"),
    bug("qgbs_returns_argmin", "QGBS returns the lowest-Q member of the beam",
        "q, best = beam_q.max(dim=1)", "q, best = beam_q.min(dim=1)", file="qgbs.py"),
    # --- the critic loss, the aggregation of each method, the order of Polyak and Adam
    bug("critic_loss_on_the_mean_q", "critic loss on the ensemble's mean Q, not on every member",
        "loss = F.mse_loss(qs, target.expand_as(qs))", "loss = F.mse_loss(qs.mean(0), target)"),
    bug("critic_loss_summed_over_members", "critic loss summed over the members (mean over the batch only)",
        "loss = F.mse_loss(qs, target.expand_as(qs))", "loss = ((qs - target) ** 2).mean(1).sum()"),
    bug("polyak_after_the_optimiser_step", "Polyak step toward the updated critic (taken after Adam's step)",
        "    with torch.no_grad():  # outside autograd, or the targets would join the graph\n"
        "        torch._foreach_lerp_(list(agent.critic_target.parameters()), params[0], args.tau)\n"
        "    agent.critic_opt.step()\n    agent.actor_opt.step()\n",
        "    agent.critic_opt.step()\n    agent.actor_opt.step()\n"
        "    with torch.no_grad():  # outside autograd, or the targets would join the graph\n"
        "        torch._foreach_lerp_(list(agent.critic_target.parameters()), params[0], args.tau)\n"),
    bug("qgbs_offline_agg_without_u_off", "QGBS of an offline agent ranks by offline_q_agg, not the online one",
        'critic_agg(args, agent.u_off is not None or sampler == "qgbs")', "critic_agg(args, agent.u_off is not None)"),
    bug("mvp_target_by_min", "MVP's a* chosen by the min of the critics (MVP's aggregation is the mean)",
        "q_agg(agent.critic, critic_agg(args, True)), obs, args.best_of_n)", 'q_agg(agent.critic, "min"), obs, args.best_of_n)'),
    bug("td_agg_always_offline", "the TD target keeps offline_q_agg online (FMQ: min)",
        "args.discount, args.horizon, critic_agg(args, online),", "args.discount, args.horizon, critic_agg(args, False),"),
    bug("fmq_guidance_by_target_critic", "FMQ's guidance gradient from the target critics, not the current ones",
        "qs = agent.critic(obs, a_1)", "qs = agent.critic_target(obs, a_1)"),
    # --- FMQ's r, beta, kappa1; the flow-map loss's time, curriculum and weight
    bug("fmq_r_always_zero", "Alg. 1's r fixed at 0 (the flow map trained only from noise)",
        "r, a_0 = torch.rand(B, 1, device=a_data.device), torch.randn_like(a_data)",
        "r, a_0 = torch.zeros(B, 1, device=a_data.device), torch.randn_like(a_data)"),
    bug("fmq_r_one_per_batch", "one r for the whole batch, not one per sample",
        "r, a_0 = torch.rand(B, 1, device=a_data.device), torch.randn_like(a_data)",
        "r, a_0 = torch.rand(1, 1, device=a_data.device).expand(B, 1), torch.randn_like(a_data)"),
    bug("beta_ignored", "eta_eff = eta / (1 + delta_critic): beta dropped",
        "/ (1 + args.beta * delta)", "/ (1 + delta)"),
    bug("kappa1_ignored", "the FMQ target normalises grad Q without the kappa1 floor",
        "trust_region_velocity(u_off, grad_q, eta_eff, args.kappa1)", "trust_region_velocity(u_off, grad_q, eta_eff)"),
    bug("fm_time_logit_normal", "flow-matching time drawn logit-normal (as other flow codes), not U[0, 1]",
        "a_0, t = torch.randn_like(a_data), torch.rand(B, 1, device=a_data.device)",
        "a_0, t = torch.randn_like(a_data), torch.sigmoid(torch.randn(B, 1, device=a_data.device))"),
    bug("curriculum_off_by_one", "the (r, t) curriculum one step ahead",
        "((step - args.curriculum_start) /", "((step - args.curriculum_start + 1) /"),
    bug("distill_weight_from_curriculum_end", "self-distillation weighted in only after curriculum_end",
        "(step > args.curriculum_start) * distill", "(step > args.curriculum_end) * distill"),
    bug("distill_weight_at_curriculum_start", "self-distillation weighted in at curriculum_start itself",
        "(step > args.curriculum_start) * distill", "(step >= args.curriculum_start) * distill"),
    # --- QGBS's settings and order
    bug("qgbs_m_b_swapped", "QGBS's beam size M and branches B swapped",
        "M=args.qgbs_m, K=args.qgbs_k, B=args.qgbs_b", "M=args.qgbs_b, K=args.qgbs_k, B=args.qgbs_m"),
    bug("qgbs_eta_is_fmq_eta", "QGBS steps by FMQ's eta, not --qgbs-eta", "eta=args.qgbs_eta", "eta=args.eta"),
    bug("qgbs_completion_swapped", "--qgbs-completion euler uses the jump and flow-map the Euler step",
        'complete=euler if args.qgbs_completion == "euler" else None',
        'complete=None if args.qgbs_completion == "euler" else euler'),
    bug("qgbs_eta_step_before_renoising", "each round steps the beam by eta before re-noising, then keeps the top-M",
        "        a_1 = eta_step(torch.take_along_dim(a_hat, top[:, :, None], dim=1))",
        "        a_1 = torch.take_along_dim(a_hat, top[:, :, None], dim=1)", file="qgbs.py",
        also=[("qgbs.py", "        eps = torch.randn(batch, M, B, d,", "        a_1 = eta_step(a_1)\n        eps = torch.randn(batch, M, B, d,")]),
    # --- main's loop: stored reward, episode ends, warm-up, phase switch, seeds, evaluation, resume
    bug("online_reward_untransformed", "online transitions store the env's reward, not the transformed one",
        "run.buffer.add(obs, action, float(run.rewards(r)),", "run.buffer.add(obs, action, float(r),"),
    bug("online_reward_ignores_sparse", "online transitions get the table's transform but not --sparse's",
        "run.buffer.add(obs, action, float(run.rewards(r)),",
        "run.buffer.add(obs, action, float(reward_fn(run.spec, False)(r)),"),
    bug("truncation_not_an_end", "a time-limit truncation does not end the stored episode",
        "1.0 - term, next_obs, term or trunc)", "1.0 - term, next_obs, term)"),
    bug("warm_up_off_by_one", "online updates start one env step late (step i >= start_training, 0-based)",
        "step - args.offline_steps + 1 >= args.start_training", "step - args.offline_steps >= args.start_training"),
    bug("phase_switch_late", "u_off frozen one step after the offline phase ends",
        "switch = lambda: step >= args.offline_steps and",
        "switch = lambda: step >= args.offline_steps + 1 and"),
    bug("train_episode_seed_stuck", "every training episode after the first resets with episode 0's seed",
        'obs, queue = run.env.reset(seed=episode_seed(args, ep["index"]))[0], []',
        "obs, queue = run.env.reset(seed=episode_seed(args, 0))[0], []"),
    bug("chunk_queue_kept_across_episodes", "the rest of an action chunk carries over into the next episode",
        'obs, queue = run.env.reset(seed=episode_seed(args, ep["index"]))[0], []',
        'obs = run.env.reset(seed=episode_seed(args, ep["index"]))[0]'),
    bug("eval_seed_ignores_wave", "evaluation waves reuse the first wave's seeds (seed + 10_000 + i)",
        "e.reset(seed=args.seed + 10_000 + first + i)", "e.reset(seed=args.seed + 10_000 + i)"),
    bug("eval_success_of_last_wave", "evaluation success counts only the last wave",
        "episodes += zip(succ, ret_train, ret_env, length)", "episodes = list(zip(succ, ret_train, ret_env, length))"),
    bug("eval_noise_unseeded", "evaluation's policy noise from the global RNG, not its seeded generator",
        "chunk = act(agent, obs[idx], sampler, args, gen)", "chunk = act(agent, obs[idx], sampler, args)"),
    bug("resume_keeps_rows_past_checkpoint", "on resume, csv rows logged after the checkpoint are kept (and redone)",
        'rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]', "rows = list(csv.DictReader(f))"),
    bug("obs_not_advanced", "the online loop acts and stores from a stale observation (obs not set to next_obs)",
        'obs, ep["ret"] = next_obs, ep["ret"] + r', 'obs, ep["ret"] = obs, ep["ret"] + r'),
    bug("chunk_actions_reversed", "an action chunk is executed last action first", "action = queue.pop(0)",
        "action = queue.pop()"),
    bug("act_chunk_transposed", "act reads a chunk action-major ([act_dim, horizon]) instead of time-major",
        "a.float().view(len(obs), args.horizon, -1)", "a.float().view(len(obs), -1, args.horizon).transpose(1, 2)"),
    bug("buffer_chunk_transposed", "a sampled chunk's actions flattened action-major",
        'actions=self.data["actions"][seq].flatten(1)', 'actions=self.data["actions"][seq].transpose(1, 2).flatten(1)'),
    bug("default_tau", "the target critics' Polyak rate defaults to 0.01 (official 0.005)",
        "tau: float = 0.005", "tau: float = 0.01"),
    bug("train_seed_without_stride", "training episode i resets with seed + i (episodes of seeds 0 and 1 overlap)",
        "args.seed * 1_000_003 + i", "args.seed + i"),
    bug("eval_seed_without_run_seed", "evaluation episodes reset with 10_000 + i whatever the run's seed",
        "e.reset(seed=args.seed + 10_000 + first + i)", "e.reset(seed=10_000 + first + i)"),
    bug("eval_generator_seed", "evaluation's policy noise seeded with the run's seed, not seed + 10_000",
        ".manual_seed(args.seed + 10_000)", ".manual_seed(args.seed)"),
    bug("buffer_capacity_no_extra_row", "replay capacity max(buffer_size, dataset) (official: dataset + 1)",
        "max(args.buffer_size, n_off + 1)", "max(args.buffer_size, n_off)"),
    bug("fmq_grad_of_the_mean_q", "FMQ's grad Q of the batch mean of Q (1/B of each sample's gradient)",
        "grad_q = torch.autograd.grad(q_guide.sum(), a_1)[0]", "grad_q = torch.autograd.grad(q_guide.mean(), a_1)[0]"),
    bug("resume_drops_the_checkpoint_row", "on resume, the csv row of the checkpoint's own step is dropped",
        'if int(r["step"]) <= resume_step]', 'if int(r["step"]) < resume_step]'),
    bug("best_of_n_sampler_uses_qgbs_m", "the best-of-n sampler draws qgbs_m samples, not best_of_n",
        "return best_of_n(actor, q_fn, obs, args.best_of_n, generator)[0]",
        "return best_of_n(actor, q_fn, obs, args.qgbs_m, generator)[0]"),
    bug("phase_of_inclusive", "the evaluation at the phase switch is labelled online (by its step, not by u_off)",
        'phase="offline" if agent.u_off is None else "online"', 'phase="offline" if s < args.offline_steps else "online"'),
    bug("keep_one_checkpoint_more", "keep_checkpoints + 1 checkpoints kept",
        '- {switch})[:-keep]', '- {switch})[:-keep - 1]'),
    bug("resume_drops_the_chunk_queue", "on resume, the rest of the interrupted action chunk is dropped",
        'return ckpt["step"], ckpt["episode"], list(ckpt["episode"].get("queue", []))',
        'return ckpt["step"], ckpt["episode"], []'),
    bug("delta_from_target_critics", "delta_critic from the target critics' spread, not the current ones'",
        "spread = qs.detach().std(0, correction=0)", "spread = agent.critic_target(obs, a_1).detach().std(0, correction=0)"),
    bug("mvp_target_with_grad", "MVP's a* drawn with autograd on (the actor is trained through its own target)",
        "    with torch.no_grad():\n        return best_of_n(", "    if True:\n        return best_of_n("),
    bug("batch_discount_per_chunk", "batches sampled with discount ** horizon as the per-step discount",
        "buffer.sample(args.batch_size, args.discount)", "buffer.sample(args.batch_size, args.discount ** args.horizon)"),
    bug("flow_map_loss_at_step_0", "the offline loss always gets step 0 (the curriculum never starts)",
        'flow_map_loss(agent.actor, batch["obs"], a_1, step, args)', 'flow_map_loss(agent.actor, batch["obs"], a_1, 0, args)'),
    bug("validate_rho_zero_allowed", "--qgbs-rho 0 accepted (t' = 0: QGBS re-noises to pure noise)",
        "(args.qgbs_rho <= 0,", "(args.qgbs_rho < 0,"),
    bug("validate_one_critic_allowed", "--num-critics 1 accepted (delta_critic is then 0 / 0)",
        "(args.num_critics < 2,", "(args.num_critics < 1,"),
    bug("checkpoint_fit_unchecked", "a checkpoint of other networks is loaded without the fit check",
        "    if theirs:\n        raise FMQError(f\"checkpoint", "    if False:\n        raise FMQError(f\"checkpoint"),
]
# fmt: on

# ---------------------------------------------------------------- pytest plugin (loaded in the child with -p mutate)
# Selects the tests by the `slow` marker (MUTATE_TESTS: fast = not slow, slow, or all) and runs the slow ones last, so
# that `pytest -x` stops early; notes the first failure in MUTATE_FIRST_FAIL and each test's seconds in MUTATE_TIMES.
_times = {}


def pytest_collection_modifyitems(config, items):
    which = os.environ.get("MUTATE_TESTS", "all")
    slow = lambda it: it.get_closest_marker("slow") is not None  # noqa: E731
    drop = [it for it in items if which != "all" and slow(it) != (which == "slow")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it not in drop]
    items.sort(key=slow)


def _note_failure(nodeid, report):
    path = os.environ.get("MUTATE_FIRST_FAIL")
    if path and report.failed and not Path(path).exists():
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash else str(report.longrepr)).strip()
        Path(path).write_text(json.dumps(dict(test=nodeid, message=message.splitlines()[0][:200] if message else "")))


def pytest_runtest_logreport(report):
    _times[report.nodeid] = _times.get(report.nodeid, 0.0) + report.duration
    _note_failure(report.nodeid, report)


def pytest_collectreport(report):
    _note_failure(report.nodeid or "collection", report)


def pytest_sessionfinish(session):
    if os.environ.get("MUTATE_TIMES"):
        Path(os.environ["MUTATE_TIMES"]).write_text(json.dumps(_times))


# ---------------------------------------------------------------- patches
def apply(bug_, repo):
    """Applies a bug's edits to the copy in `repo`; returns an error message, or None."""
    for file, old, new in bug_["edits"]:
        path = repo / file
        text = path.read_text() if path.exists() else ""
        n = text.count(old)
        if n != 1:
            return f"{bug_['name']}: the old snippet is found {n} times in {file} (must be exactly once): {old!r}"
        if old == new:
            return f"{bug_['name']}: old and new snippets are the same"
        path.write_text(text.replace(old, new))
    return None


def make_copy(dest, files=COPY):
    """A copy of the code in dest/repo, with dest/shared -> the real ../shared (the tests' datasets)."""
    repo = dest / "repo"
    repo.mkdir(parents=True)
    for name in files:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    if (ROOT.parent / "shared").exists():
        (dest / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def check_all(bugs):
    """Applies every patch to a fresh copy: {bug name: error message} for those that do not apply."""
    with tempfile.TemporaryDirectory(prefix="fmq-mutate-check-") as tmp:
        errors = {b["name"]: apply(b, make_copy(Path(tmp) / b["name"], {f for f, _, _ in b["edits"]})) for b in bugs}
    return {k: v for k, v in errors.items() if v}


# ---------------------------------------------------------------- running the tests
RUNNING, LOCK = set(), threading.Lock()


def run_tests(repo, dest, opts):
    """pytest -x in the copy `repo`: (exit code, or None on timeout; output)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mutate", "-rfE",
           "--no-header", "-W", "ignore"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo / "tools"), str(repo)]), PYTHONDONTWRITEBYTECODE="1",
               MUTATE_FIRST_FAIL=str(dest / "first_fail.json"), MUTATE_TIMES=str(dest / "times.json"),
               MUTATE_TESTS=opts.tests,
               # one thread per worker: the nets are tiny, and OpenMP threads spin-wait on a busy machine
               OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    with LOCK:
        RUNNING.add(proc)
    try:
        out = proc.communicate(timeout=opts.timeout)[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]
    finally:
        with LOCK:
            RUNNING.discard(proc)


def run_job(bug_, tmp, opts):
    """One bug (or, for bug_ None, the unpatched baseline) in its own temp copy: a table row."""
    name = bug_["name"] if bug_ else "(unpatched)"
    t0, dest = time.time(), tmp / (bug_["name"] if bug_ else "_unpatched")
    repo = make_copy(dest)
    error = apply(bug_, repo) if bug_ else None
    if error:
        return dict(name=name, result="ERROR", test=error, seconds=0.0)
    code, out = run_tests(repo, dest, opts)
    row = dict(name=name, seconds=time.time() - t0)
    failed = json.loads((dest / "first_fail.json").read_text()) if (dest / "first_fail.json").exists() else None
    times = json.loads((dest / "times.json").read_text()) if (dest / "times.json").exists() else {}
    if not opts.keep:
        shutil.rmtree(dest, ignore_errors=True)
    if code is None:
        return dict(row, result="ERROR", test=f"timed out after {opts.timeout:.0f} s (--timeout)")
    if code == 0:
        return dict(row, result="passed" if bug_ is None else "SURVIVED", test="-", times=times)
    if failed:  # a test (or the collection) failed
        return dict(row, result="killed", test=failed["test"].split("::")[-1], message=failed["message"], out=out)
    return dict(row, result="ERROR", test=f"pytest exit {code}: {out.strip()[-300:]}")



def print_table(rows, verbose):
    w = max(len(r["name"]) for r in rows)
    print(f"{'bug':<{w}}  {'result':<8}  {'seconds':>7}  by test")
    for r in rows:
        extra = f"  ({r['message']})" if verbose and r.get("message") else ""
        print(f"{r['name']:<{w}}  {r['result']:<8}  {r['seconds']:>7.1f}  {r['test']}{extra}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this bug (repeatable)")
    p.add_argument("--list", action="store_true", help="list the catalogue (and check that every patch applies)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="bugs tested in parallel (default: cores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--tests", choices=["fast", "slow", "all"], default="fast",
                   help="fast: the tests not marked slow (default); slow: those marked slow; all: both")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before one bug's test run is an ERROR")
    p.add_argument("--keep", action="store_true", help="keep the temp copies (prints where)")
    p.add_argument("-v", "--verbose", action="store_true", help="add the failing assertion to the table")
    return p.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    names = [b["name"] for b in BUGS]
    if len(set(names)) != len(names):
        sys.exit(f"mutate: error: duplicate bug names {sorted({n for n in names if names.count(n) > 1})}")
    unknown = [n for n in opts.only or [] if n not in names]
    if unknown:
        sys.exit(f"mutate: error: unknown bug {unknown}; see --list")
    bugs = [b for b in BUGS if not opts.only or b["name"] in opts.only]
    errors = check_all(bugs)
    if opts.list:
        w = max(len(b["name"]) for b in bugs)
        for b in bugs:
            files = ", ".join(dict.fromkeys(f for f, _, _ in b["edits"]))
            print(f"{b['name']:<{w}}  {files:<7}  {b['why']}")
            if b["name"] in errors:
                print(f"  ERROR {errors[b['name']]}")
        print(f"{len(bugs)} porting bugs" + (f"; {len(errors)} patches do not apply" if errors else ""))
        return 1 if errors else 0
    for e in errors.values():
        print(f"mutate: ERROR {e}", file=sys.stderr)
    tmp, t0 = Path(tempfile.mkdtemp(prefix="fmq-mutate-")), time.time()
    if opts.keep:
        print(f"temp copies in {tmp}", file=sys.stderr)
    # the unpatched code runs first, beside the first bugs: it must pass, or no result means anything
    jobs, rows = [None] + [b for b in bugs if b["name"] not in errors], []
    try:
        with ThreadPoolExecutor(max(1, min(opts.workers, len(jobs)))) as pool:
            for i, r in enumerate(pool.map(lambda b: run_job(b, tmp, opts), jobs)):
                rows.append(r)
                print(f"[{i}/{len(jobs) - 1}] {r['name']}: {r['result']} {r['test']} ({r['seconds']:.0f} s)",
                      file=sys.stderr)
    except KeyboardInterrupt:
        with LOCK:
            for proc in RUNNING:
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    base, rows = rows[0], rows[1:] + [dict(name=n, result="ERROR", test=e, seconds=0.0) for n, e in errors.items()]
    if base["result"] != "passed":
        sys.exit(f"mutate: error: the unpatched code fails the selected tests ({base['test']}); fix that first:\n"
                 f"{base.get('out', '').strip()[-3000:]}")
    slowest = sorted(base["times"].items(), key=lambda kv: -kv[1])[:5]
    print(f"unpatched: {len(base['times'])} tests pass in {base['seconds']:.0f} s; slowest: "
          + ", ".join(f"{k.split('::')[-1]} {v:.0f} s" for k, v in slowest), file=sys.stderr)
    order = {b["name"]: i for i, b in enumerate(BUGS)}
    rows.sort(key=lambda r: order[r["name"]])
    print_table(rows, opts.verbose)
    caught = sum(r["result"] == "killed" for r in rows)
    print(f"{len(rows)} bugs, {opts.workers} workers, {time.time() - t0:.0f} s in all")
    print(f"{caught} of {len(rows)} porting bugs caught")
    return 0 if caught == len(rows) else 1

if __name__ == "__main__":
    sys.exit(main())
