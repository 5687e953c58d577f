"""The launch scripts (launch/*.sh): syntax, --help, validation, and the exact commands of --dry-run.

Nothing here calls gcloud, pip, srun or scontrol: dry runs only print, and the tests that execute
something execute the pieces that are local (the source tarball of tpu_vm.sh, the srun task
wrapper of slurm.sh, gpu_host.sh's run of the data stage on CPU).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_host.sh", "slurm.sh"]


def _jax_pin() -> str:
    """The jax version pinned in requirements.txt, read independently of the scripts."""
    m = re.search(r"^jax==(\S+)\s*$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert m, "requirements.txt pins no jax version"
    return m.group(1)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | str = REPO,
         timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands ('+ ' lines), each split back into its words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(cmd: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` in a command, or None."""
    values = [w.split("=", 1)[1] for w in cmd if w.startswith(f"--{name}=")]
    assert len(values) <= 1, (name, cmd)
    return values[0] if values else None


def _remote_words(cmd: list[str]) -> list[str]:
    """The words of a gcloud ssh --command (the remote shell line)."""
    return shlex.split(_flag(cmd, "command"))


def _after(words: list[str], *prefix: str) -> list[str]:
    """The words following the first occurrence of the word sequence ``prefix``, up to '&&'."""
    for i in range(len(words) - len(prefix) + 1):
        if words[i:i + len(prefix)] == list(prefix):
            rest = words[i + len(prefix):]
            return rest[:rest.index("&&")] if "&&" in rest else rest
    raise AssertionError(f"{prefix} not in {words}")


def _minimal_path(tmp_path: Path) -> str:
    """A PATH with only the basic tools the scripts use: no gcloud, srun or scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ["bash", "sed", "head", "grep", "dirname", "basename", "env", "python3"]:
        found = shutil.which(tool)
        assert found, tool
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


# ---------------------------------------------------------------- all scripts


def test_scripts_parse_and_are_executable():
    for name in [*SCRIPTS, "common.sh"]:
        res = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, (name, res.stderr)
    for name in SCRIPTS:
        path = LAUNCH / name
        assert os.access(path, os.X_OK), name
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", name
        assert "set -euo pipefail" in lines, name
    if shutil.which("shellcheck"):  # only when already installed
        res = subprocess.run(["shellcheck", "-x", *(str(LAUNCH / n) for n in SCRIPTS)], cwd=REPO,
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option(script):
    res = _run(script, "--help")
    assert res.returncode == 0 and res.stderr == ""
    # every option the parser accepts (its case patterns) is documented in --help
    source = (LAUNCH / script).read_text()
    options = set(re.findall(r"^\s+(?:-h \| )?(--[a-z][-a-z]*)\)", source, re.MULTILINE))
    assert {"--help", "--dry-run"} <= options and len(options) >= 8
    for opt in options:
        assert re.search(rf"(^|\s){re.escape(opt)}(\s|$|=)", res.stdout), (script, opt)
    assert "Usage:" in res.stdout and "Example:" in res.stdout
    assert f"launch/{script}" in res.stdout.split("Example:")[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_arguments_fail_with_a_message(script):
    for args, message in [
        (["--bogus"], "unknown option --bogus"),
        (["--config.search.population=64"], "after '--'"),
        (["stray"], "unexpected argument stray"),
        (["--workdir"], "option --workdir needs a value"),
        (["--dry-run=yes"], "option --dry-run takes no value"),
    ]:
        res = _run(script, *args)
        assert res.returncode != 0, (script, args)
        assert res.stdout == "" and message in res.stderr, (script, args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# ---------------------------------------------------------------- tpu_vm.sh

_TPU_ARGS = ["--name", "elm-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--spot",
             "--project", "my-proj", "--config", "configs/mlm.py:paper", "--stages=data,teacher",
             "--results", "gs://my-bucket/elm/run1", "--delete", "--dry-run"]
_OVERRIDES = ["--config.search.population=64", "--config.data.train_files=/data/my corpus/*.txt"]


def test_tpu_vm_dry_run_commands(tmp_path):
    # A PATH without gcloud: a dry run never needs it.
    res = _run("tpu_vm.sh", *_TPU_ARGS, "--", *_OVERRIDES,
               env=_env(PATH=_minimal_path(tmp_path), TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert all(c[:4] == tpu for c in cmds if c[0] == "gcloud")
    for c in cmds:
        if c[0] == "gcloud":
            assert _flag(c, "zone") == "us-central2-b" and _flag(c, "project") == "my-proj", c
    verbs = [c[4] if c[:4] == tpu else c[0] for c in cmds]
    assert verbs == ["describe", "create", "bash", "scp", "ssh", "rm", "ssh", "ssh", "ssh", "delete"]
    describe, create, pack, scp, unpack, _, install, main, results, delete = cmds

    assert describe[5] == "elm-v4"  # the reuse check comes first
    assert create[5] == "elm-v4" and _flag(create, "accelerator-type") == "v4-32"
    assert _flag(create, "version") == "tpu-ubuntu2204-base" and "--spot" in create

    # the code goes to every worker
    tarball = pack[-1]
    assert Path(tarball).parent == tmp_path and scp[5] == tarball and _flag(scp, "worker") == "all"
    remote_tar = scp[6].split(":", 1)[1]
    assert scp[6] == f"elm-v4:{remote_tar}"
    assert _flag(unpack, "worker") == "all"
    assert _after(_remote_words(unpack), "tar") == ["-xzf", remote_tar, "-C", "elm-jax"]

    # install on every worker: the requirements, then jax[tpu] at the requirements' jax pin
    assert _flag(install, "worker") == "all"
    words = _remote_words(install)
    assert words[:2] == ["cd", "elm-jax"]
    pins = [w for w in words if w.startswith("jax[")]
    assert pins == [f"jax[tpu]=={_jax_pin()}"]
    assert _after(words, "python3.11", "-m", "venv") == [".venv"]
    assert "requirements.txt" in _after(words, ".venv/bin/python", "-m", "pip", "install", "--quiet", "-r")
    assert words.index("requirements.txt") < words.index(pins[0])

    # the pipeline on ALL workers at once, distributed, with the pass-through overrides last
    assert main[5] == "elm-v4" and _flag(main, "worker") == "all"
    words = _remote_words(main)
    assert words[:3] == ["cd", "elm-jax", "&&"]
    assert _after(words, ".venv/bin/python", "-m", "elm_jax.main") == [
        "--config=configs/mlm.py:paper", "--workdir=workdirs/elm-v4", "--stages=data,teacher",
        "--config.distributed.enabled=True", *_OVERRIDES]

    # results from worker 0, then the VM goes
    assert _flag(results, "worker") == "0"
    assert _after(_remote_words(results), "gcloud", "storage", "rsync") == [
        "--recursive", "workdirs/elm-v4", "gs://my-bucket/elm/run1"]
    assert delete[5] == "elm-v4" and "--quiet" in delete


def test_tpu_vm_source_tarball_is_the_checkout_without_ignored_files(tmp_path):
    """Runs the printed (local) packing command: it ships exactly git's tracked + untracked files."""
    res = _run("tpu_vm.sh", *_TPU_ARGS, env=_env(TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    pack = next(c for c in _commands(res.stdout) if c[0] == "bash")
    subprocess.run(pack, check=True, timeout=120)
    with tarfile.open(pack[-1]) as tar:
        members = {m.name for m in tar.getmembers() if m.isfile() or m.issym()}
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    expected = {f for f in listed if f and os.path.lexists(REPO / f)}
    assert members == expected
    assert {"elm_jax/main.py", "requirements.txt", "launch/tpu_vm.sh"} <= members
    assert not any(m.startswith((".venv/", ".git/")) or "__pycache__" in m for m in members)


def test_tpu_vm_git_clone_and_local_results(tmp_path):
    res = _run("tpu_vm.sh", "--name", "t1", "--zone", "europe-west4-a", "--accelerator-type", "v5litepod-8",
               "--repo", "https://example.org/elm-jax.git", "--ref", "v1.2", "--remote-dir", "src/elm",
               "--workdir", "/mnt/shared/run", "--results", str(tmp_path / "out"), "--no-install", "--dry-run")
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    assert not any(c[0] == "bash" for c in cmds) and not any("jax[" in " ".join(c) for c in cmds)
    create = cmds[1]
    assert "--spot" not in create and _flag(create, "project") is None
    clone = _remote_words(cmds[2])
    assert _flag(cmds[2], "worker") == "all"
    assert _after(clone, "git", "clone", "--quiet") == ["https://example.org/elm-jax.git", "src/elm;", "}"]
    assert _after(clone, "git", "-C", "src/elm", "fetch", "--quiet", "origin") == ["v1.2"]
    main = _remote_words(cmds[3])
    assert _flag(cmds[3], "worker") == "all" and main[:2] == ["cd", "src/elm"]
    assert "--workdir=/mnt/shared/run" in main and "--config.distributed.enabled=True" in main
    assert cmds[4] == ["mkdir", "-p", str(tmp_path / "out")]
    scp = cmds[5]
    assert scp[4:8] == ["scp", "--recurse", "t1:/mnt/shared/run", str(tmp_path / "out")]
    assert _flag(scp, "worker") == "0"
    assert len(cmds) == 6  # no --delete: the VM stays


def test_tpu_vm_validation(tmp_path):
    base = ["--name", "ok", "--zone", "z", "--accelerator-type", "v4-8"]
    cases = [
        (base[2:], "--name is required"),
        (base[:2] + base[4:], "--zone is required"),
        (base[:4], "--accelerator-type is required"),
        (["--name", "Bad_Name", *base[2:]], "--name must be"),
        ([*base, "--ref", "main"], "--ref needs --repo"),
        ([*base, "--results", "s3://b/x"], "--results must be gs://"),
        ([*base, "--config", "configs/nope.py"], "config file configs/nope.py not found"),
    ]
    for args, message in cases:
        res = _run("tpu_vm.sh", *args, "--dry-run")
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    # outside --dry-run gcloud must exist (this PATH has none, so nothing can run)
    res = _run("tpu_vm.sh", *base, env=_env(PATH=_minimal_path(tmp_path)))
    assert res.returncode == 2 and "'gcloud' not found" in res.stderr and res.stdout == ""


# ---------------------------------------------------------------- gpu_host.sh


def test_gpu_host_dry_run_commands(tmp_path):
    venv = tmp_path / "venv"  # does not exist: the venv is created first
    res = _run("gpu_host.sh", "--config", "configs/clm.py:paper", "--workdir", "runs/clm", "--gpus", "0,1,3",
               "--mem-fraction", ".8", "--venv", str(venv), "--dry-run", "--", *_OVERRIDES, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet"]
    assert cmds[:7] == [
        ["cd", str(REPO)],
        ["python3", "-m", "venv", str(venv)],
        [*pip, "--upgrade", "pip"],
        [*pip, "-r", "requirements.txt"],
        [*pip, "--no-deps", "-e", "."],
        [*pip, f"jax[cuda12]=={_jax_pin()}"],
        ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=.8", "CUDA_VISIBLE_DEVICES=0,1,3", py, "-m", "elm_jax.main",
         "--config=configs/clm.py:paper", f"--workdir={tmp_path / 'runs' / 'clm'}", "--stages=all",
         *_OVERRIDES],
    ]
    assert len(cmds) == 7

    # an existing venv is reused; --no-install leaves it alone; no --gpus: every GPU
    res = _run("gpu_host.sh", "--workdir", "/abs/w", "--no-install", "--dry-run")
    cmds = _commands(res.stdout)
    assert res.returncode == 0 and len(cmds) == 2 and cmds[0] == ["cd", str(REPO)]
    assert cmds[1][:2] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"] and "--workdir=/abs/w" in cmds[1]
    assert not any(w.startswith("CUDA_VISIBLE_DEVICES=") for w in cmds[1])

    for args, message in [([], "--workdir is required"), (["--workdir=w", "--gpus", "0,x"], "--gpus must be"),
                          (["--workdir=w", "--mem-fraction", "0"], "--mem-fraction must be"),
                          (["--workdir=w", "--mem-fraction", "1.5"], "--mem-fraction must be")]:
        res = _run("gpu_host.sh", *args, "--dry-run")
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def test_gpu_host_runs_the_pipeline(tmp_path):
    """A real (not dry) run of the data stage on CPU: the launched command works from any directory."""
    res = _run("gpu_host.sh", "--no-install", "--venv", str(Path(sys.executable).parent.parent),
               "--config", "configs/mlm.py:test", "--workdir", "rel/wd", "--stages", "data",
               "--", "--config.data.seq_len=24", cwd=tmp_path, timeout=300,
               env=_env(JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    stats = json.loads((tmp_path / "rel" / "wd" / "data" / "stats.json").read_text())
    assert stats["task"] == "mlm" and stats["seq_len"] == 24  # the config and the override arrived
    assert not (REPO / "rel").exists()  # relative to the caller's directory, not the repository


# ---------------------------------------------------------------- slurm.sh


def test_slurm_header_is_sbatch_directives():
    lines = (LAUNCH / "slurm.sh").read_text().splitlines()
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    directives = [ln.split()[1] for ln in header if ln.startswith("#SBATCH ")]
    names = {d.split("=")[0] for d in directives}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--time"} <= names
    assert "--ntasks-per-node=1" in directives  # one process per node
    assert all(ln.startswith("#SBATCH ") for ln in header[:len(directives)])  # before any command


def test_slurm_dry_run_commands(tmp_path):
    res = _run("slurm.sh", "--dry-run", "--nodelist", "gpu[07-08]", "--workdir", "/shared/run",
               "--config", "configs/mlm.py:paper", "--port", "23456", "--", *_OVERRIDES,
               env=_env(SLURM_NTASKS="2", PATH=_minimal_path(tmp_path)))
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    assert cmds[:4] == [["cd", str(REPO)], ["export", "JAX_COORDINATOR_ADDRESS=gpu07:23456"],
                        ["export", "JAX_NUM_PROCESSES=2"], ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"]]
    srun = cmds[4]
    assert len(cmds) == 5 and srun[0] == "srun"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(srun[:srun.index("bash")])
    task = srun[srun.index("bash"):]
    assert task[1] == "-c" and "JAX_PROCESS_ID=\"$SLURM_PROCID\"" in task[2]
    assert task[4:] == [str(REPO / ".venv" / "bin" / "python"), "-m", "elm_jax.main",
                        "--config=configs/mlm.py:paper", "--workdir=/shared/run", "--stages=all",
                        "--config.distributed.enabled=True", *_OVERRIDES]

    # from a copy of the script elsewhere (as sbatch runs it), inside a job: the job id picks the port
    copy = tmp_path / "slurm_script"
    shutil.copy(LAUNCH / "slurm.sh", copy)
    res = subprocess.run(["bash", str(copy), "--dry-run", "--workdir", "w"], cwd=tmp_path,
                         env=_env(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="1234567", SLURM_NTASKS="3",
                                  SLURM_JOB_NODELIST="a[9-10],login", PATH=_minimal_path(tmp_path)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    assert cmds[1] == ["export", f"JAX_COORDINATOR_ADDRESS=a9:{20000 + 1234567 % 10000}"]
    assert cmds[2] == ["export", "JAX_NUM_PROCESSES=3"]
    assert f"--workdir={tmp_path / 'w'}" in cmds[-1]


def test_slurm_node_list_expansion():
    cases = {
        "node[01-03,07]": ["node01", "node02", "node03", "node07"],
        "n[098-101],login1": ["n098", "n099", "n100", "n101", "login1"],
        "r[1-2]-g[8-9]": ["r1-g8", "r1-g9", "r2-g8", "r2-g9"],
        "x[5]": ["x5"],
    }
    for nodelist, hosts in cases.items():
        res = _run("slurm.sh", "--dry-run", "--nodelist", nodelist, "--workdir", "/w",
                   env=_env(SLURM_NTASKS=str(len(hosts))))
        assert res.returncode == 0, (nodelist, res.stderr)
        cmds = _commands(res.stdout)
        assert cmds[1] == ["export", f"JAX_COORDINATOR_ADDRESS={hosts[0]}:29500"], nodelist
        assert f"--nodes={len(hosts)}" in cmds[-1], nodelist
    for bad in ["a[1-", "a[3-1]", "a]", "a[x]", "a,,b"]:
        res = _run("slurm.sh", "--dry-run", "--nodelist", bad, "--workdir", "/w")
        assert res.returncode == 2 and "cannot parse --nodelist" in res.stderr, bad


def test_slurm_validation():
    for args, env, message in [
        (["--workdir", "/w"], {}, "not inside a SLURM job"),
        (["--workdir", "/w", "--nodelist", "a"], {}, "--nodelist is for --dry-run only"),
        (["--workdir", "/w", "--dry-run"], {}, "needs --nodelist"),
        (["--workdir", "/w", "--dry-run", "--nodelist", "a[1-2]"], {"SLURM_NTASKS": "4"},
         "one process per node expected"),
        (["--workdir", "/w", "--dry-run", "--nodelist", "a", "--port", "80"], {}, "--port must be"),
    ]:
        res = _run("slurm.sh", *args, env=_env(**env))
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_environment_initializes_jax_distributed(tmp_path):
    """Stands in for srun: two tasks run the printed task wrapper with their SLURM_PROCID, in the
    environment the batch step exports; elm_jax.distributed joins them into one 2-process job."""
    port = _free_port()
    res = _run("slurm.sh", "--dry-run", "--nodelist", "localhost,localhost", "--workdir", "/w",
               "--port", str(port), "--", "--config.search.population=6")
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    exported = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    srun = cmds[-1]
    wrapper = srun[srun.index("bash"):srun.index("bash") + 4]
    args = srun[srun.index("elm_jax.main") + 1:]
    probe = (
        "import json, runpy, sys\n"
        "cfg = runpy.run_path('configs/mlm.py')['get_config']('test')\n"
        "cfg.distributed.enabled = True\n"
        "cfg.distributed.initialization_timeout = 60\n"
        "from elm_jax.distributed import maybe_initialize\n"
        "maybe_initialize(cfg.distributed)\n"
        "import jax\n"
        "print(json.dumps([jax.process_index(), jax.process_count(), jax.device_count(), sys.argv[1:]]))\n"
        "jax.distributed.shutdown()\n"
    )
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300", JAX_PLATFORMS="cpu", **exported)
    procs = [subprocess.Popen([*wrapper, sys.executable, "-c", probe, *args], cwd=REPO,
                              env=dict(env, SLURM_PROCID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o[0] for o in outs) == [0, 1] and [o[0] for o in outs] == [0, 1]
    for o in outs:
        assert o[1] == 2 and o[2] == 4  # 2 processes x 2 CPU devices, one global device list
        assert o[3] == args and "--config.distributed.enabled=True" in o[3]
