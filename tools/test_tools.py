"""Tests for tools/: report.py, sweep.py, make_dataset.py, import_official.py, qgbs_sweep.py, gpu_check.py,
mutmut_run.py. A plain `pytest` (or `pytest -m "not slow"`) from the repository root collects them with test_fmq.py;
the helpers they share with test_fmq.py are imported from it."""
import dataclasses
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from test_fmq import OFFICIAL, ROOT, TINY_ARCH, TOOLS, read_csv  # noqa: E402
import fmq  # noqa: E402
import import_official  # noqa: E402
import bitcheck  # noqa: E402
import make_dataset  # noqa: E402
import mutmut_run  # noqa: E402
import qgbs_sweep  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402


# ---------------------------------------------------------------- helpers: report.py and sweep.py
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


# ---------------------------------------------------------------- helpers: make_dataset.py
# What OGBench's generator writes (data_gen_scripts/generate_manipspace.py): keys, dtypes and per-row shapes.
CUBE_DOUBLE_FORMAT = {"observations": ("float32", (37,)), "actions": ("float32", (5,)), "terminals": ("bool", ()),
                      "qpos": ("float32", (28,)), "qvel": ("float32", (26,))}


def run_make_dataset(*flags):
    out = subprocess.run([sys.executable, str(TOOLS / "make_dataset.py"), *flags], capture_output=True, text=True,
                         timeout=3600)  # a generous cap only against a hang: a 2-episode run takes seconds
    return out.returncode, out.stderr


# ---------------------------------------------------------------- helpers: import_official.py
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


CRITIC_KEY = "agent/network/params/modules_critic/value_net"
TARGET_KEY = "agent/network/params/modules_target_critic/value_net"
ACTOR_KEY = "agent/network/params/modules_actor_bc_flow/mlp"


def parent(tree, key):
    """The dict that holds `key`'s leaf."""
    for p in key.split("/")[:-1]:
        tree = tree[p]
    return tree


# ---------------------------------------------------------------- tools/report.py and tools/sweep.py
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


# ---------------------------------------------------------------- tools/gpu_check.py (the GPU check at toy sizes)
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


def test_gpu_check_fetches_every_package_the_code_imports():
    """--fetch-wheels covers every module fmq.py, qgbs.py, test_fmq.py and tools/*.py import (found with ast, mapped
    to its distribution), but the standard library, the repo's own modules and NOT_FETCHED (torch, and what no step
    of the check runs); its pins are requirements.txt's."""
    import ast
    import importlib.metadata
    import gpu_check
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    own = {"fmq", "qgbs", "test_fmq", *(p.stem for p in TOOLS.glob("*.py"))}
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
    needed = {norm(dists[m][0] if m in dists else m): files for m, files in imported.items()}  # (mutmut: opt-in)
    fetched = {norm(w.split("==")[0]) for w in gpu_check.WHEELS}
    missing = {d: sorted(f) for d, f in needed.items() if d not in fetched and d not in gpu_check.NOT_FETCHED}
    assert not missing, f"imported but not fetched by gpu_check --fetch-wheels: {missing}"
    assert {"tensorboard", "tqdm", "pytest", "pandas", "rliable", "scipy", "ogbench", "tyro"} <= fetched & set(needed)
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {norm(w.split("==")[0]): w.partition("==")[2] for w in gpu_check.WHEELS} == {
        d: next((v for k, v in pins.items() if norm(k) == d), "") for d in fetched}  # unpinned only if not in there
    assert set(gpu_check.NOT_FETCHED) - {"mutmut"} <= {norm(k) for k in pins}  # mutmut: installed for its tool only


# ---------------------------------------------------------------- tools/make_dataset.py
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


# ---------------------------------------------------------------- tools/import_official.py and tools/qgbs_sweep.py
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
    fmq.update(agent, batch, ckpt["step"], args)
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


# ---------------------------------------------------------------- tools/bitcheck.py
def test_bitcheck_digest_hashes_tensors_in_key_order_without_args_and_time(tmp_path):
    """The digest is sha256 over each key and each tensor's dtype, shape and bytes, keys sorted, `args` and `time`
    left out: a checkpoint that differs only there digests alike; one float's last bit, a dtype or a key does not."""
    import hashlib
    x = torch.tensor([1.0, -2.0])
    h = hashlib.sha256()
    h.update(b"rng"), h.update(b"5"), h.update(b"w"), h.update(b"(torch.float32, (2,))" + x.numpy().tobytes())
    assert bitcheck.digest({"w": x, "rng": 5, "args": {"lr": 1}, "time": 3.0}) == h.hexdigest()[:16]
    assert bitcheck.digest({"w": x, "rng": 5, "args": {"lr": 2}, "time": 9.0}) == h.hexdigest()[:16]
    bumped = torch.tensor([1.0, np.nextafter(np.float32(-2.0), np.float32(0))])
    for other in ({"w": bumped, "rng": 5}, {"w": x.double(), "rng": 5}, {"v": x, "rng": 5}, {"w": x, "rng": 6}):
        assert bitcheck.digest(other) != h.hexdigest()[:16]
    (tmp_path / "a.csv").write_text("step,time,sps,loss\n10,1.5,99,0.25\n")
    (tmp_path / "b.csv").write_text("step,time,sps,loss\n10,7.0,12,0.25\n")
    (tmp_path / "c.csv").write_text("step,time,sps,loss\n10,1.5,99,0.26\n")
    assert bitcheck.csv_digest(tmp_path / "a.csv") == bitcheck.csv_digest(tmp_path / "b.csv")
    assert bitcheck.csv_digest(tmp_path / "a.csv") != bitcheck.csv_digest(tmp_path / "c.csv")


def test_mutmut_run_counts_each_status_for_the_method_and_the_rest(tmp_path):
    """mutmut's exit codes per mutant (its .meta files) -> statuses; METHOD's patterns split the method (losses,
    the buffer's methods, qgbs.py) from the rest (main's loop, videos)."""
    (tmp_path / "mutants").mkdir()
    codes = {"fmq.x_flow_map_loss__mutmut_1": 1, "fmq.xǁReplayBufferǁadd__mutmut_4": None,
             "fmq.x_main__mutmut_2": 0, "fmq.x_write_video__mutmut_5": 36}
    (tmp_path / "mutants" / "fmq.py.meta").write_text(json.dumps(dict(exit_code_by_key=codes)))
    (tmp_path / "mutants" / "qgbs.py.meta").write_text(json.dumps(dict(exit_code_by_key={"qgbs.x_qgbs__mutmut_3": 33})))
    assert mutmut_run.counts(tmp_path) == {"method": {"generated": 3, "killed": 1, "not checked": 1, "no tests": 1},
                                           "rest": {"generated": 2, "survived": 1, "timeout": 1}}
