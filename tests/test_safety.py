"""Safe by default (issue 12): no command destroys what it was not asked to, every bad input gets
one line on stderr and exit code 2, nothing is weakened or replaced without an explicit choice.

Real data (MedMNIST subsets through $DPGEN_DATA_DIR), real runs: the finished run is the session's
shared tiny run of tests/test_release.py (built once), copied before any test changes it.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpgen.cli import main
from dpgen.privacy.ledger import PrivacyLedger
from tests.conftest import REPO, TINY, data_dir


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`dpgen ARGV` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dpgen: error: "), err
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_config(path: Path, raw: dict | None = None, **data_updates) -> Path:
    raw = copy.deepcopy(raw or TINY)
    for role, source in data_updates.items():
        raw["data"][role]["source"] = source
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from tests.test_release import finished_run

    return finished_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


@pytest.fixture
def cfg(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run after `dpgen pretrain` only (no DP fine-tuning yet)."""
    root = tmp_path_factory.mktemp("pretrain_only")
    raw = copy.deepcopy(TINY)
    raw["pretrain"].update({"steps": 2, "checkpoint_every": 2})
    config = write_config(root / "tiny.yaml", raw)
    assert main(["pretrain", str(config), "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


# ----------------------------------------------------------------------------- data loss: --overwrite


def test_overwrite_refuses_a_folder_dpgen_did_not_make(cfg, tmp_path, capsys):
    thesis = tmp_path / "thesis_folder"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Years of work}\n")
    code, _, err = cli(capsys, "run", cfg, "--run-dir", thesis, "--overwrite", "--no-progress")
    assert code == 2 and "not a run directory written by dpgen" in one_error_line(err)
    assert (thesis / "thesis.tex").read_text() == "\\chapter{Years of work}\n"


def test_overwrite_never_deletes_the_current_directory(run_copy, tmp_path, capsys, monkeypatch):
    """Not a plain folder holding the config and the private data, not even a run directory."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(data_dir() / "breastmnist.npz", work / "private.npz")
    config = write_config(work / "tiny.yaml", private=str(work / "private.npz"))
    for cwd in (work, run_copy):
        before = tree(cwd)
        monkeypatch.chdir(cwd)
        code, _, err = cli(capsys, "run", config, "--run-dir", ".", "--overwrite", "--no-progress")
        assert code == 2 and "current directory" in one_error_line(err)
        assert tree(cwd) == before


def test_overwrite_never_deletes_a_run_holding_the_config_or_the_data(run_copy, capsys):
    config = write_config(run_copy / "tiny.yaml")
    before = tree(run_copy)
    code, _, err = cli(capsys, "run", config, "--run-dir", run_copy, "--overwrite", "--no-progress")
    assert code == 2 and "which this command reads" in one_error_line(err)
    shutil.copy(data_dir() / "breastmnist.npz", run_copy / "private.npz")
    config2 = write_config(run_copy.parent / "other.yaml", private=str(run_copy / "private.npz"))
    code, _, err = cli(capsys, "run", config2, "--run-dir", run_copy, "--overwrite", "--no-progress")
    assert code == 2 and "private.npz, which this command reads" in one_error_line(err)
    assert {k: v for k, v in tree(run_copy).items() if k != "private.npz"} == before


def test_overwrite_never_deletes_a_folder_inside_a_run(run_copy, cfg, capsys):
    before = tree(run_copy)
    code, _, err = cli(capsys, "run", cfg, "--run-dir", run_copy / "cohort", "--overwrite", "--no-progress")
    assert code == 2 and "inside the dpgen run" in one_error_line(err)
    assert tree(run_copy) == before


def test_overwrite_still_replaces_a_run_directory(run_copy, cfg, capsys):
    code, _, err = cli(capsys, "pretrain", cfg, "pretrain.steps=1", "--run-dir", run_copy, "--overwrite",
                       "--no-progress")
    assert code == 0, err
    assert not (run_copy / "cohort").exists() and (run_copy / "checkpoints" / "pretrain.safetensors").is_file()


def test_resume_and_overwrite_exclude_each_other(run_copy, cfg, capsys):
    import dpgen
    from dpgen.rundir import RunDirError

    before = tree(run_copy)
    code, _, err = cli(capsys, "run", cfg, "--run-dir", run_copy, "--resume", "--overwrite", "--no-progress")
    assert code == 2 and "--overwrite" in one_error_line(err)
    with pytest.raises(RunDirError, match="exclude each other"):
        dpgen.run(cfg, run_copy, resume=True, overwrite=True, progress=False)
    assert tree(run_copy) == before


def test_resume_of_a_missing_directory_is_an_error_not_a_fresh_run(cfg, tmp_path, capsys):
    code, _, err = cli(capsys, "run", cfg, "--run-dir", tmp_path / "runs" / "mistyped", "--resume", "--no-progress")
    assert code == 2 and "there is no run in" in one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_run_dir_that_is_a_file(cfg, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    code, _, err = cli(capsys, "run", cfg, "--run-dir", f, "--no-progress")
    assert code == 2 and "is a file, not a directory" in one_error_line(err)
    code, _, err = cli(capsys, "run", cfg, "--run-dir", f, "--overwrite", "--no-progress")
    assert code == 2 and f.read_text() == "keep me"


def test_release_overwrite_replaces_only_a_bundle(finished, tmp_path, capsys):
    before = tree(finished)
    code, _, err = cli(capsys, "release", finished, finished / "cohort", "--overwrite")
    assert code == 2 and "inside the dpgen run" in one_error_line(err)
    assert tree(finished) == before
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    code, _, err = cli(capsys, "release", finished, other, "--overwrite")
    assert code == 2 and "not a release bundle written by dpgen" in one_error_line(err)
    assert (other / "thesis.tex").read_text() == "x"
    out = tmp_path / "bundle"
    assert cli(capsys, "release", finished, out)[0] == 0
    code, _, err = cli(capsys, "release", finished, out, "--overwrite")  # a bundle dpgen wrote: replaced
    assert code == 0, err


def test_sweep_resume_and_overwrite_rules(cfg, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "internal").mkdir(parents=True)
    (sweep_dir / "internal" / "sweep.json").write_text("{}\n")
    base = ["sweep", cfg, "--epsilons", "8", "--no-evaluate", "--no-progress"]
    code, _, err = cli(capsys, *base, "--run-dir", sweep_dir, "--resume", "--overwrite")
    assert code == 2 and "exclude each other" in one_error_line(err)
    assert (sweep_dir / "internal" / "sweep.json").is_file()
    code, _, err = cli(capsys, *base, "--run-dir", tmp_path / "no_such_sweep", "--resume")
    assert code == 2 and "there is no sweep in" in one_error_line(err)
    assert not (tmp_path / "no_such_sweep").exists()


# ----------------------------------------------------------------------------- data loss: sample


def test_sample_into_a_finished_run_writes_a_new_cohort_beside_it(run_copy, capsys):
    ledger = PrivacyLedger(run_copy / "privacy" / "ledger.jsonl")
    main_entry = ledger.latest("artifact", name="cohort")
    main_npz = (run_copy / "cohort" / "cohort.npz").read_bytes()
    code, out, err = cli(capsys, "sample", run_copy, "--no-progress")
    assert code == 0, err
    assert (run_copy / "cohort" / "cohort.npz").read_bytes() == main_npz
    (new,) = [p for p in (run_copy / "cohort").iterdir() if p.is_dir()]
    assert f"-> {new}" in out and "note: a new cohort beside the run's own" in out
    entry = ledger.latest("artifact", name=f"cohort/{new.name}")
    assert entry["path"] == f"cohort/{new.name}/cohort.npz"
    assert set(entry) == set(main_entry) and entry["privacy_source"] == main_entry["privacy_source"]
    assert ledger.latest("artifact", name="cohort") == main_entry  # release, card: still the run's cohort
    with np.load(new / "cohort.npz") as z:
        assert len(z["train_labels"]) == main_entry["n"]


def test_a_named_cohort_or_the_runs_own_is_replaced_only_with_overwrite(run_copy, capsys):
    assert cli(capsys, "sample", run_copy, "--name", "small", "--num-images", "2", "--no-progress")[0] == 0
    code, _, err = cli(capsys, "sample", run_copy, "--name", "small", "--num-images", "3", "--no-progress")
    assert code == 2 and "already exists" in one_error_line(err)
    assert cli(capsys, "sample", run_copy, "--name", "small", "--num-images", "3", "--overwrite", "--no-progress")[0] == 0
    with np.load(run_copy / "cohort" / "small" / "cohort.npz") as z:
        assert len(z["train_labels"]) == 3
    ledger = PrivacyLedger(run_copy / "privacy" / "ledger.jsonl")
    n_main = len([e for e in ledger.entries() if e.get("name") == "cohort"])
    assert cli(capsys, "sample", run_copy, "--num-images", "4", "--overwrite", "--no-progress")[0] == 0
    with np.load(run_copy / "cohort" / "cohort.npz") as z:
        assert len(z["train_labels"]) == 4
    assert len([e for e in ledger.entries() if e.get("name") == "cohort"]) == n_main + 1


@pytest.mark.parametrize("n", ["0", "-5"])
def test_sample_num_images_must_be_positive(run_copy, capsys, n):
    before = tree(run_copy)
    code, _, err = cli(capsys, "sample", run_copy, "--num-images", n, "--no-progress")
    assert code == 2 and "--num-images" in one_error_line(err)
    assert tree(run_copy) == before


def test_sample_stage_refuses_zero_images(run_copy):
    from dpgen.config import ConfigError
    from dpgen.pipeline import open_run, sample_stage

    config, rd = open_run(run_copy)
    with pytest.raises(ConfigError, match="at least one image"):
        sample_stage(config, rd, device="cpu", progress=False, num_images=0)


# ----------------------------------------------------------------------------- failed runs leave nothing


def test_a_bad_data_file_leaves_no_run_directory(tmp_path, capsys):
    bad = tmp_path / "private.npz"
    bad.write_text("train_images,train_labels\n1,2\n")
    config = write_config(tmp_path / "c.yaml", private=str(bad))
    for attempt in range(2):  # the same command fails the same way: nothing left in the way
        code, _, err = cli(capsys, "run", config, "--run-dir", tmp_path / "run", "--no-progress")
        assert code == 2 and "private.npz" in one_error_line(err)
        assert not (tmp_path / "run").exists()


def test_a_run_failing_after_it_started_leaves_nothing(tmp_path, capsys):
    """A folder source is first read by the pretrain stage, after the run directory was made."""
    folder = tmp_path / "private"
    folder.mkdir()
    with np.load(data_dir() / "breastmnist.npz") as z:
        images, labels = z["train_images"][:8], z["train_labels"][:8, 0]
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "7.png").write_bytes(b"not a png")
    (folder / "labels.csv").write_text("image,label\n" + "".join(f"{i}.png,{labels[i]}\n" for i in range(8)))
    config = write_config(tmp_path / "c.yaml", private=str(folder))
    code, _, err = cli(capsys, "run", config, "--run-dir", tmp_path / "run", "--no-progress")
    assert code == 2 and "7.png" in one_error_line(err)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()  # a directory the user made: kept, and left empty
    code, _, _ = cli(capsys, "run", config, "--run-dir", tmp_path / "empty", "--no-progress")
    assert code == 2 and (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_resume_takes_a_fixed_config_when_nothing_was_computed(tmp_path, tiny_config, run_copy):
    from dpgen.rundir import RunDir, RunDirError

    RunDir.create(tmp_path / "r", tiny_config)  # as left by a run that failed before training
    fixed = tiny_config.model_copy(update={"seed": 1})
    rd = RunDir.create(tmp_path / "r", fixed, resume=True)
    assert yaml.safe_load(rd.config_path.read_text())["seed"] == 1
    with pytest.raises(RunDirError, match="config differs"):  # a run with progress keeps its config
        RunDir.create(run_copy, fixed, resume=True)


# ----------------------------------------------------------------------------- silent weakening


def test_float_labels_are_refused_not_truncated(tmp_path):
    from dpgen.data import DataError, load_folder, load_npz

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "f.npz", train_images=imgs, train_labels=np.array([[0.5], [1.5], [0.0], [1.0]]))
    with pytest.raises(DataError, match="not whole numbers"):
        load_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "w.npz", train_images=imgs, train_labels=np.array([[0.0], [1.0], [1.0], [0.0]]))
    assert load_npz(tmp_path / "w.npz").labels.tolist() == [0, 1, 1, 0]
    from PIL import Image

    for i in range(2):
        Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("image,label\n0.png,1.0\n1.png,1.5\n")
    with pytest.raises(DataError, match=r"label = '1.5' is not an integer class index"):
        load_folder(tmp_path)


def test_3d_data_with_a_2d_config_is_refused(tmp_path, capsys):
    """Public and private volumes with a 2D config used to train a 3D pixel UNet without a word."""
    for raw in (TINY, yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())):
        raw = copy.deepcopy(raw)
        raw["data"]["public"].update({"source": "adrenalmnist3d", "split": "val"})
        config = write_config(tmp_path / "c.yaml", raw, private="adrenalmnist3d")
        code, _, err = cli(capsys, "run", config, "--run-dir", tmp_path / "run", "--no-progress")
        assert code == 2 and "data.spatial_dims" in one_error_line(err) and "3D volumes" in err
        assert not (tmp_path / "run").exists()
    raw = copy.deepcopy(TINY)
    raw["data"]["spatial_dims"] = 3
    code, _, err = cli(capsys, "run", write_config(tmp_path / "c3.yaml", raw), "--run-dir", tmp_path / "run")
    assert code == 2 and "2D images" in one_error_line(err)


def test_load_of_a_pretrain_only_run_is_not_the_public_model_in_disguise(pretrained):
    import dpgen

    with pytest.raises(FileNotFoundError, match=r"no DP fine-tuned generator yet.*dpgen finetune.*stage='pretrain'"):
        dpgen.load(pretrained, device="cpu")
    assert dpgen.load(pretrained, device="cpu", stage="pretrain").family == "diffusion"


def test_errors_on_a_pretrain_only_run_suggest_a_next_step_that_works(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    for argv in (["sample", run, "--no-progress"], ["privacy", "report", run]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and f"dpgen finetune {run}" in one_error_line(err), argv
    code, out, err = cli(capsys, "finetune", run, "--no-progress")  # the suggested step works
    assert code == 0, err
    assert "finetune: 6 DP-SGD steps" in out and not out.lstrip().startswith("{")  # readable, like `run`
    code, out, err = cli(capsys, "sample", run, "--no-progress", "--json")  # and so does the next one
    assert code == 0, err

    def no_nan(c):
        raise AssertionError(f"not strict JSON: {c}")

    summary = json.loads(out, parse_constant=no_nan)
    assert summary["stages"]["sample"]["n"] == 12 and summary["privacy"]["within_target"] is True


# ----------------------------------------------------------------------------- one line, never a traceback


def test_device_the_cli_does_not_know(cfg, run_copy, tmp_path, capsys):
    for argv in (["run", cfg, "--run-dir", tmp_path / "r"], ["sample", run_copy]):
        code, _, err = cli(capsys, *argv, "--device", "tpu")
        assert code == 2 and "'tpu' is not a device" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_a_text_file_named_npz_does_not_suggest_unpickling(tmp_path, capsys):
    from dpgen.data import DataError, load_npz

    p = tmp_path / "private.npz"
    p.write_text("this is a text file\n")
    with pytest.raises(DataError, match="not a zip archive") as info:
        load_npz(p)
    np.savez(tmp_path / "obj.npz", train_images=np.array([None] * 3, dtype=object), train_labels=np.zeros(3))
    with pytest.raises(DataError) as info2:
        load_npz(tmp_path / "obj.npz")
    for e in (info, info2):
        assert "pickle=" not in str(e.value) and "allow_pickle" not in str(e.value)


def test_rgb_stored_channel_first_is_named_as_such(tmp_path):
    from dpgen.data import DataError, load_npz

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", train_images=rng.integers(0, 255, (5, 3, 28, 28), dtype=np.uint8),
             train_labels=np.arange(5)[:, None] % 2)
    with pytest.raises(DataError, match=r"channel-first.*transpose\(0, 2, 3, 1\)"):
        load_npz(tmp_path / "rgb.npz")


def test_config_path_that_is_a_directory(tmp_path, capsys):
    code, _, err = cli(capsys, "run", tmp_path, "--no-progress")
    assert code == 2 and "is a directory" in one_error_line(err)


def test_privacy_report_errors_exit_2_like_the_others(tmp_path, capsys):
    code, _, err = cli(capsys, "privacy", "report", tmp_path / "nope")
    assert code == 2 and "no such run directory" in one_error_line(err)


_READ_ONLY = r"""
import io, json, sys, contextlib
from dpgen.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = "raised " + type(e).__name__ + ": " + str(e)
    results.append([argv[0], code, err.getvalue()])
print("RESULTS" + json.dumps(results))
"""


def test_a_read_only_file_system_gets_one_line(finished, cfg, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copytree(finished, ro / "run")
    cmds = [["run", str(cfg), "--run-dir", str(ro / "new"), "--no-progress"],
            ["pretrain", str(cfg), "--run-dir", str(ro / "new2"), "--no-progress"],
            ["run", str(ro / "run" / "config.yaml"), "--run-dir", str(ro / "run"), "--resume", "--no-progress"],
            ["sample", str(ro / "run"), "--no-progress"],
            ["report", str(ro / "run"), "--no-pdf"],
            ["release", str(ro / "run"), str(ro / "bundle")]]
    script = [sys.executable, "-c", _READ_ONLY, json.dumps(cmds)]
    if os.geteuid() == 0:  # root ignores permissions: a real read-only bind mount in a private namespace
        if not shutil.which("unshare"):
            pytest.skip("needs unshare")
        mount = f"mount --bind {shlex.quote(str(ro))} {shlex.quote(str(ro))} && " \
                f"mount -o remount,bind,ro {shlex.quote(str(ro))} && exec {shlex.join(script)}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
        if "RESULTS" not in proc.stdout and ("Operation not permitted" in proc.stderr or "mount" in proc.stderr):
            pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()[-200:]}")
        expect = "Read-only file system"
    else:
        os.chmod(ro / "run", 0o555)
        for d in (ro / "run").rglob("*"):
            os.chmod(d, 0o555 if d.is_dir() else 0o444)
        os.chmod(ro, 0o555)
        proc = subprocess.run(script, capture_output=True, text=True)
        os.chmod(ro, 0o755)
        expect = "ermission denied"
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for name, code, err in results:
        assert code == 2, (name, code, err[-2000:])
        assert expect in one_error_line(err), (name, err)


# ----------------------------------------------------------------------------- smaller frictions


def test_help_version_and_early_errors_do_not_load_torch(tmp_path, run_copy):
    """`dpgen --help` took 8-9 s: it imported torch, Opacus and MONAI before printing a line."""
    cfg = write_config(tmp_path / "tiny.yaml")
    script = f"""
import sys, io, contextlib
from dpgen.cli import main
codes = []
for argv in (["--help"], ["--version"], ["run", "--help"], ["run", "missing.yaml"],
             ["run", {str(cfg)!r}, "--run-dir", {str(run_copy)!r}], ["run", {str(cfg)!r}, "--device", "tpu"],
             ["sample", {str(run_copy)!r}, "--num-images", "0"]):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
    if argv == ["--version"]:
        print(out.getvalue().strip())
print(codes, "torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    from dpgen import __version__

    assert proc.stdout.split("\n")[:2] == [f"dpgen {__version__}", "[0, 0, 0, 2, 2, 2, 2] False"], proc.stderr[-2000:]


def test_lazy_help_lines_are_the_commands_own():
    from dpgen.cli import LAZY_COMMANDS, build_parser

    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, (_, line) in LAZY_COMMANDS.items():
        assert helps[name] == line, name
    lazy = build_parser("run", lazy=True).format_help()
    assert all(name in lazy for name in LAZY_COMMANDS)


def test_ctrl_c_prints_the_run_directory_and_the_real_resume_command(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml")
    run_dir = tmp_path / "runs" / "my run"  # a space: the printed command must quote it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "dpgen.cli", "run", str(cfg), "pretrain.steps=12", "pretrain.checkpoint_every=2",
            "--run-dir", str(run_dir)]  # progress bars on: the hint must not be glued to them
    # SIGINT back to its default in the child: a shell starts background jobs (`pytest ... &`, CI
    # runners) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    # a finished checkpoint (not the temporary file of one being written): something to resume
    while proc.poll() is None and time.time() < deadline and not list(run_dir.glob("checkpoints/[!.]*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert out.splitlines()[0] == f"dpgen: run directory: {run_dir}"
    lines = err.splitlines()
    assert "dpgen: interrupted. Continue this run with:" in lines, err[-3000:]
    i = lines.index("dpgen: interrupted. Continue this run with:")
    resume = lines[i + 1].strip()
    assert resume.startswith("dpgen run ") and resume.endswith("--resume")
    tokens = shlex.split(resume)
    assert tokens[tokens.index("--run-dir") + 1] == str(run_dir) and "pretrain.steps=12" in tokens
    done = subprocess.run([sys.executable, "-m", "dpgen.cli", *tokens[1:], "--no-progress"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"dpgen: run directory: {run_dir} (resumed)" in done.stdout and (run_dir / "cohort" / "cohort.npz").is_file()
