"""Sweeps: planning (names, overrides, commands), the generated per-run config, collecting results,
and one real two-point sweep of the cheap stages on the test config."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from elm_jax import config as config_lib
from elm_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_CONFIG = os.path.join(REPO, "configs", "sweep_budgets_kd.py")
SAFE = re.compile(r"^[A-Za-z0-9._=,+-]+$")


def test_dry_run_prints_one_command_per_point_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    assert sweep.main(["run", f"--config={SWEEP_CONFIG}:test", f"--root={root}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert not root.exists()
    commands = [ln.strip() for ln in out.splitlines() if " -m elm_jax.main " in ln]
    assert len(commands) == 4  # 2 budgets x 2 distillation losses
    names = [re.search(r"--workdir=(\S+)", c).group(1) for c in commands]
    assert len(set(names)) == 4 and all(n.startswith(f"{root}/") for n in names)
    for c, wd in zip(commands, names):
        assert c == f"{sys.executable} -m elm_jax.main --config={wd}/config.py --workdir={wd} --stages=all"
        assert SAFE.match(os.path.basename(wd))
    # every (budget, loss) pair appears once, and the ambiguous field keeps its section
    pairs = {(re.search(r"budgets=(\w+)", n).group(1), re.search(r"supernet\.kd_loss=(\w+)", n).group(1))
             for n in names}
    assert pairs == {(b, k) for b in ("small", "tiny") for k in ("pearson", "mse")}


def test_run_names_are_stable_unique_and_safe():
    fields = sweep.leaf_fields(config_lib.load_config("configs/mlm.py:test"))
    name = lambda p: sweep.run_name(p, fields)
    # shortest suffix unique in the config: kd_loss exists in supernet and retrain, seq_len once
    assert sweep.short_field("supernet.kd_loss", fields) == "supernet.kd_loss"
    assert sweep.short_field("data.seq_len", fields) == "data.seq_len"  # latency.seq_len too
    assert sweep.short_field("data.mask_rate", fields) == "mask_rate"
    assert sweep.short_field("teacher.train.steps", fields) == "teacher.train.steps"
    # exact spellings carry no hash; lists, dicts and replaced characters do
    assert name({"data.mask_rate": 0.2, "supernet.kd_loss": "mse"}) == "mask_rate=0.2,supernet.kd_loss=mse"
    assert name({}) == "base"
    h = sweep.point_hash({"data.train_files": "a b/c*.txt"})
    assert name({"data.train_files": "a b/c*.txt"}) == f"train_files=a_b_c_.txt-{h}"
    budgets = [{"name": "small", "max_params": 16000}]
    assert name({"search.budgets": budgets}) == f"budgets=small-{sweep.point_hash({'search.budgets': budgets})}"
    # the name depends on the point only (stable when points are added) ...
    assert name({"search.budgets": budgets}) == name({"search.budgets": [dict(budgets[0])]})
    # ... and different points get different names, even when their readable parts agree
    points = [{"search.budgets": [{"name": "small", "max_params": m}]} for m in (15000, 16000)]
    points += [{"data.train_files": s} for s in ("a/b", "a_b", "a b")]
    points += [{"supernet.gt_weight": v} for v in (0.5, 1.0, 1)]
    names = [name(p) for p in points]
    assert len(set(names[:-1])) == len(names) - 1 and names[-2] != names[-1]
    assert all(SAFE.match(n) and len(n) <= sweep.MAX_NAME + 9 for n in names)
    long = name({"data.train_files": "x" * 500})
    assert len(long) == sweep.MAX_NAME + 9 and long.startswith("train_files=xxx")


def _field(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_generated_config_applies_the_point(tmp_path):
    points = sweep.plan(f"{SWEEP_CONFIG}:test", tmp_path)
    p = points[3]
    sweep.prepare(p, f"{SWEEP_CONFIG}:test")
    cfg = config_lib.load_config(str(p.workdir / "config.py"))  # loaded the way --config loads it
    base = config_lib.load_config("configs/mlm.py:test")
    assert [dict(b) for b in cfg.search.budgets] == [{"name": "tiny", "max_params": 14_000}]
    assert cfg.supernet.kd_loss == cfg.retrain.kd_loss == "mse" == p.overrides["supernet.kd_loss"]
    changed = {k for k in sweep.leaf_fields(base) if repr(_field(cfg, k)) != repr(_field(base, k))}
    assert changed == {"search.budgets", "supernet.kd_loss", "retrain.kd_loss"}
    saved = json.loads((p.workdir / "overrides.json").read_text())
    assert saved["overrides"] == p.overrides and saved["name"] == p.name
    # a directory holding another point is refused
    other = sweep.Point(p.name, {"supernet.kd_loss": "pearson"}, p.workdir, p.command)
    with pytest.raises(sweep.SweepError, match="holds another sweep point"):
        sweep.prepare(other, f"{SWEEP_CONFIG}:test")


@pytest.mark.parametrize("point,message", [
    ("{'supernet.kd_los': 'mse'}", "sweep field supernet.kd_los: config has no such field"),
    ("{'supernt.kd_loss': 'mse'}", "config has no field supernt"),
    ("{'supernet.kd_loss': 'cosine'}", r"config.supernet.kd_loss: must be one of \['pearson', 'mse'\]"),
    ("{'data.seq_len': 'long'}", "sweep field data.seq_len"),
    ("{'supernet': {'kd_loss': 'mse'}}", "is a group of fields"),
    ("{'seed': object()}", "is not a Python literal"),
])
def test_bad_points_fail_before_anything_runs(tmp_path, point, message):
    path = tmp_path / "bad_sweep.py"
    path.write_text("import runpy\n"
                    f"_mlm = runpy.run_path({os.path.join(REPO, 'configs', 'mlm.py')!r})\n"
                    "def get_config(arg=None):\n    return _mlm['get_config']('test')\n"
                    f"def get_sweep():\n    return [{{}}, {point}]\n")
    with pytest.raises(sweep.SweepError, match=message):
        sweep.plan(str(path), tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_duplicate_points_are_refused(tmp_path):
    path = tmp_path / "dup.py"
    path.write_text("import runpy\n"
                    f"_mlm = runpy.run_path({os.path.join(REPO, 'configs', 'mlm.py')!r})\n"
                    "def get_config(arg=None):\n    return _mlm['get_config']('test')\n"
                    "def get_sweep(arg=None):\n    return [{'seed': 1}, {'seed': 2}, {'seed': 1}]\n")
    with pytest.raises(sweep.SweepError, match="sweep points 0 and 2 have the same run name 'seed=1'"):
        sweep.plan(str(path), tmp_path)
    assert sweep.main(["run", f"--config={path}", f"--root={tmp_path}", "--dry_run"]) == 2


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _finished_run(run_dir, overrides, loss_shift, rc=0):
    """The files a finished run holds (as search.py, export.py, retrain.py, finetune.py and the
    evaluate stage write them), with losses shifted by ``loss_shift``."""
    _write(run_dir / "overrides.json", {"name": run_dir.name, "source": "sweep.py:test", "overrides": overrides})
    _write(run_dir / "sweep_run.json", {"returncode": rc, "stages": "all"})
    _write(run_dir / "search" / "result.json", {"budgets": {"small": {"describe": "b1h2 -", "params": 15104,
                                                                     "score": 5.5 + loss_shift}}})
    _write(run_dir / "export" / "result.json", {
        "small": {"kind": "found", "describe": "b1h2 -", "params": 15104},
        "small_uniform_mobilebert": {"kind": "uniform mobilebert", "describe": "m0h2 m0h2", "params": 15904}})
    _write(run_dir / "retrain" / "result.json", {
        "small": {"before": {"loss": 5.6 + loss_shift}, "after": {"loss": 5.4 + loss_shift}},
        "small_uniform_mobilebert": {"before": {"loss": 5.7 + loss_shift}, "after": {"loss": 5.45 + loss_shift}}})
    _write(run_dir / "finetune" / "result.json", {"small": {"test_accuracy": 0.625},
                                                  "small_uniform_mobilebert": {"test_accuracy": 0.5}})
    _write(run_dir / "evaluate" / "result.json", {
        "small": {"loss": 5.4 + loss_shift, "perplexity": 221.4},
        "small_uniform_mobilebert": {"loss": 5.45 + loss_shift, "perplexity": 232.8},
        "teacher": {"loss": 5.17, "perplexity": 176.1}})


def test_collect_builds_one_table_from_the_runs(tmp_path, capsys):
    budgets = [{"name": "small", "max_params": 16000}]
    _finished_run(tmp_path / "b", {"search.budgets": budgets, "supernet.kd_loss": "pearson"}, 0.0)
    _finished_run(tmp_path / "a", {"search.budgets": budgets, "supernet.kd_loss": "mse"}, 0.1)
    stopped = tmp_path / "c"  # stopped after the teacher stage, exit code 1
    _write(stopped / "overrides.json", {"overrides": {"supernet.kd_loss": "mse", "seed": 3}})
    _write(stopped / "sweep_run.json", {"returncode": 1, "stages": "all"})
    _write(stopped / "teacher" / "result.json", {"eval": {"loss": 5.3}})
    (tmp_path / "not_a_run").mkdir()

    assert sweep.main(["collect", f"--root={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "sweep.md").read_text()
    assert printed == md
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["model"]) for r in rows] == [
        ("a", "small"), ("a", "small_uniform_mobilebert"), ("b", "small"),
        ("b", "small_uniform_mobilebert"), ("c", "")]
    a_small, a_mob, b_small, _, c = rows
    assert a_small["supernet.kd_loss"] == "mse" and b_small["supernet.kd_loss"] == "pearson"
    assert json.loads(a_small["search.budgets"]) == budgets and c["search.budgets"] == ""
    assert c["seed"] == "3" and a_small["seed"] == ""
    assert float(a_small["search loss"]) == pytest.approx(5.6)
    assert float(a_small["val loss (inherited)"]) == pytest.approx(5.7)
    assert float(a_small["val loss (retrained)"]) == pytest.approx(5.5)
    assert float(b_small["val loss (retrained)"]) == pytest.approx(5.4)
    assert a_mob["kind"] == "uniform mobilebert" and a_mob["search loss"] == ""
    assert float(a_mob["perplexity"]) == pytest.approx(232.8) and a_mob["polarity test acc."] == "0.5"
    assert a_small["status"] == "done (all)" and c["status"] == "failed (exit 1)"
    assert float(c["teacher val loss"]) == pytest.approx(5.3) and float(a_small["teacher val loss"]) == 5.17
    # the markdown: formatted cells, budgets by name and bounds
    line = next(ln for ln in md.splitlines() if ln.startswith("| a | done (all) | small(max_params=16,000) "))
    assert line.endswith("| small | found | `b1h2 -` | 15,104 | 5.6 | 5.7 | 5.5 | 221.4 | 0.625 | 5.17 |")
    assert sweep.main(["collect", f"--root={tmp_path / 'not_a_run'}"]) == 2
    assert "holds no sweep runs" in capsys.readouterr().err


def test_real_two_point_sweep_of_the_cheap_stages(tmp_path):
    """data + teacher for two teacher lengths; the second run of the same sweep skips both."""
    cfg_file = tmp_path / "sweep_teacher_steps.py"
    cfg_file.write_text("import runpy\n"
                        f"_mlm = runpy.run_path({os.path.join(REPO, 'configs', 'mlm.py')!r})\n"
                        "def get_config(arg=None):\n    return _mlm['get_config'](arg)\n"
                        "def get_sweep(arg=None):\n"
                        "    return [{'teacher.train.steps': s, 'search.budgets': [{'name': 'b', 'max_params': m}]}\n"
                        "            for s, m in ((4, 15000), (6, 16000))]\n")
    root = tmp_path / "root"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300")
    cmd = [sys.executable, "-m", "elm_jax.sweep", "run", f"--config={cfg_file}:test", f"--root={root}",
           "--stages=data,teacher"]
    run = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dirs = sorted(p.parent for p in root.glob("*/overrides.json"))
    assert len(dirs) == 2
    for d in dirs:
        point = json.loads((d / "overrides.json").read_text())["overrides"]
        teacher = json.loads((d / "teacher" / "result.json").read_text())
        assert teacher["train"]["final_step"] == point["teacher.train.steps"]  # the override reached main
        steps = point["teacher.train.steps"]
        assert f"[teacher] training 27,744 parameters for {steps} steps" in (d / "run.log").read_text()
        status = json.loads((d / "sweep_run.json").read_text())
        assert status["returncode"] == 0 and status["stages"] == "data,teacher"
    # the budgets (a list, not settable by a flag) reached the run's config
    cfg = config_lib.load_config(str(dirs[0] / "config.py"))
    assert [dict(b) for b in cfg.search.budgets] == [{"name": "b", "max_params": 15000}]

    again = subprocess.run(cmd[:-1] + ["--stages=teacher"], check=False, cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("(complete: skipped)") == 2
    assert "ran 0, skipped 2, failed 0" in again.stdout

    assert sweep.main(["collect", f"--root={root}"]) == 0
    with open(root / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["teacher.train.steps"]) for r in rows] == [4, 6]
    for r, d in zip(rows, dirs):
        teacher = json.loads((d / "teacher" / "result.json").read_text())
        assert float(r["teacher val loss"]) == teacher["eval"]["loss"]
        assert r["status"] == "done (data,teacher)" and r["model"] == ""
