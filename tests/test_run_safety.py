"""A run directory loses nothing: refused commands touch nothing, one writer at a time, resumes
keep the run's settings, damaged files have a way out, and bad input ends in one line.

Every CLI call here is in-process (:func:`test_train._cli`); runs are 2-step runs of the tiny
configuration, sharing the module's cached warm start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY, _cli, _one_line_error, _records, _same, _tiny_flags

from decomp.runlog import atomic_write, read_jsonl
from decomp.training import warmstart
from decomp.training.rundir import LOCK_FILE, RunLock


@pytest.fixture
def cli(capsys):
    return lambda *args: _cli(*map(str, args), capsys=capsys)


@pytest.fixture
def finished(tmp_path, cache, cli) -> Path:
    """A finished 2-step ce run (checkpoint at steps 2)."""
    out = tmp_path / "run"
    ok = cli("run", "--regime", "ce", "--out", out, *_tiny_flags(cache))
    assert ok.returncode == 0, ok.stderr
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != LOCK_FILE}


def test_overwrite_with_a_model_that_cannot_load_keeps_the_old_run(finished, cli):
    before = _snapshot(finished)
    _one_line_error(cli("run", "--out", finished, "--overwrite", "--model", finished.parent / "typo", "--task", "add1"),
                    "not a local checkpoint folder")
    assert _snapshot(finished) == before


def test_overwrite_with_a_failing_warm_start_keeps_the_old_run(finished, cli, monkeypatch):
    before = _snapshot(finished)

    def fail(*args, **kwargs):
        raise warmstart.WarmStartError("warm start did not land")

    monkeypatch.setattr(warmstart, "_train", fail)
    failed = cli("run", "--out", finished, "--overwrite", *_tiny_flags(finished.parent / "empty-cache"))
    # the warm start's own progress line, then the error
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == "decomp run: error: warm start did not land"
    assert _snapshot(finished) == before


def test_resume_keeps_the_saved_steps_and_settings_unless_given(finished, cli, cache):
    # --resume alone continues the run as it was saved: its 2 steps, not the default 200
    again = cli("run", "--out", finished, "--resume", "--cache-dir", cache, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert json.loads((finished / "config.json").read_text())["config"]["steps"] == 2
    assert [m["step"] for m in read_jsonl(finished / "metrics.jsonl")] == [0, 1, 2]
    # a given --steps extends it; a changed setting is still refused
    longer = cli("run", "--out", finished, "--resume", "--steps", "3", "--cache-dir", cache, "--no-progress")
    assert longer.returncode == 0, longer.stderr
    assert [m["step"] for m in read_jsonl(finished / "metrics.jsonl")] == [0, 1, 2, 3]
    _one_line_error(cli("run", "--out", finished, "--resume", "--regime", "policy", "--cache-dir", cache),
                    "config differs")


def test_a_live_run_refuses_a_second_writer_and_a_killed_one_leaves_no_stale_lock(finished, cli, cache):
    before = _snapshot(finished)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from decomp.training.rundir import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(finished)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--resume"], ["--overwrite"]):
            _one_line_error(cli("run", "--out", finished, *extra, *_tiny_flags(cache), "--regime", "ce"),
                            f"being written by another decomp process (pid {holder.pid})")
        assert _snapshot(finished) == before
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: the run resumes
    again = cli("run", "--out", finished, "--resume", "--steps", "3", "--cache-dir", cache, "--no-progress")
    assert again.returncode == 0, again.stderr


def test_the_lock_is_held_while_training_and_released_after(tmp_path, cache, monkeypatch):
    import decomp.training.loop as loop

    seen = []
    real = loop.train_step

    def spy(state, step):
        with pytest.raises(Exception, match="being written by another decomp process"):
            RunLock(state.out).acquire()
        seen.append(step)
        return real(state, step)

    monkeypatch.setattr(loop, "train_step", spy)
    out = tmp_path / "run"
    loop.train(dataclasses.replace(TINY, steps=2, decomp_every=0), out, cache_dir=cache, progress=False,
               log=lambda s: None)
    assert seen == [1, 2]
    RunLock(out).acquire().release()  # free again


def test_a_damaged_config_says_how_to_start_over(finished, cli, cache):
    (finished / "config.json").write_bytes(b'{"config": {"regime": "ce", "ste')  # cut off
    for extra in (["--resume"], []):
        _one_line_error(cli("run", "--out", finished, *extra, *_tiny_flags(cache), "--regime", "ce"), "--overwrite")
    ok = cli("run", "--out", finished, "--overwrite", *_tiny_flags(cache), "--regime", "ce")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((finished / "config.json").read_text())["config"]["regime"] == "ce"
    # a damaged config.json beside files decomp did not write: never replaced
    (finished / "config.json").write_bytes(b"\xff\xfe")
    (finished / "notes.txt").write_text("mine")
    _one_line_error(cli("run", "--out", finished, "--overwrite", *_tiny_flags(cache)), "did not write")
    assert (finished / "notes.txt").read_text() == "mine"


def test_atomic_writes_are_flushed_to_disk_and_leave_no_temporary_file(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    atomic_write(tmp_path / "checkpoint.pt", lambda tmp: tmp.write_bytes(b"data"))
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"data"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_during_the_checkpoint_keeps_the_last_one_and_resumes(tmp_path, cache, cli, monkeypatch):
    out = tmp_path / "run"
    assert cli("run", "--regime", "ce", "--out", out, *_tiny_flags(cache)).returncode == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    _one_line_error(cli("run", "--out", out, "--resume", "--steps", "4", "--cache-dir", cache, "--no-progress"),
                    "the previous checkpoint is kept")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real)
    ok = cli("run", "--out", out, "--resume", "--steps", "4", "--cache-dir", cache, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_temporary_files_of_a_killed_writer_are_removed_on_resume(finished, cli, cache):
    left = finished / ".checkpoint.pt.k2j4x9.tmp"
    left.write_bytes(b"half a checkpoint")
    ok = cli("run", "--out", finished, "--resume", "--cache-dir", cache, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert not left.exists()


def test_ctrl_c_exits_130_and_the_run_resumes_to_the_same_records(tmp_path, cache, cli, monkeypatch):
    import decomp.training.loop as loop

    full = tmp_path / "full"
    assert cli("run", "--regime", "ce", "--out", full, *_tiny_flags(cache)).returncode == 0
    real = loop.train_step

    def interrupted(state, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(state, step)

    monkeypatch.setattr(loop, "train_step", interrupted)
    out = tmp_path / "cut"
    stopped = cli("run", "--regime", "ce", "--out", out, *_tiny_flags(cache), "--set", "checkpoint_every=1")
    assert stopped.returncode == 130 and "--resume" in stopped.stderr
    monkeypatch.setattr(loop, "train_step", real)
    ok = cli("run", "--out", out, "--resume", "--cache-dir", cache, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert _same(_records(full, "metrics.jsonl"), _records(out, "metrics.jsonl"))


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(finished, cli, cache):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3)
    torch.save(ckpt, finished / "checkpoint.pt")
    _one_line_error(cli("run", "--out", finished, "--resume", "--steps", "3", "--cache-dir", cache),
                    "does not fit this run's model")


def test_folders_that_are_not_runs_are_refused(tmp_path, cli, cache, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    for out in (str(Path("~").expanduser()), "."):
        for extra in ([], ["--overwrite"], ["--resume"]):
            _one_line_error(cli("run", "--out", out, *extra, *_tiny_flags(cache)), "holds no decomp run")
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"]


@pytest.mark.parametrize(("args", "message"), [
    (["compare", "--seeds", "0,0"], "--seeds names 0 more than once"),
    (["compare", "--regimes", "ce,detach,ce"], "--regimes names ce more than once"),
    (["run", "--seed", str(2**64)], "seed must be an integer in [0, 2^62)"),
    (["run", "--seed", "-1"], "seed must be an integer in [0, 2^62)"),
    (["run", "--set", "sft_target_accuracy=2"], "sft_target_accuracy must lie in (0, 1)"),
    (["run", "--set", "sft_target_tolerance=0.5"], "sft_target_tolerance must be positive"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, cli, args, message):
    _one_line_error(cli(*args, "--out", tmp_path / "x"), message)
    assert not (tmp_path / "x").exists()


def test_a_corrupt_warm_start_cache_is_retrained(tmp_path, monkeypatch):
    from decomp.training.tasks import make_task

    task = make_task("add")
    cfg = TINY.warmstart_config()
    model_cfg = TINY.model_config(task)
    trained = []

    def fake_train(model_cfg, task, seed, cfg):
        trained.append(seed)
        return {"w": torch.full((2,), float(len(trained)))}, {"steps": 1, "accuracy": 0.3, "seconds": 0.0}

    monkeypatch.setattr(warmstart, "_train", fake_train)
    logs: list[str] = []
    state, info = warmstart.warm_start(model_cfg, task, 0, cfg, tmp_path, log=logs.append)
    assert not info["cached"] and trained == [0]
    Path(info["path"]).write_bytes(b"not a torch file")
    state, info = warmstart.warm_start(model_cfg, task, 0, cfg, tmp_path, log=logs.append)
    assert trained == [0, 0] and not info["cached"] and any("unreadable" in line for line in logs)
    state, info = warmstart.warm_start(model_cfg, task, 0, cfg, tmp_path, log=logs.append)
    assert info["cached"] and trained == [0, 0] and torch.equal(state["w"], torch.full((2,), 2.0))


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(finished, cli, cache):
    saved = json.loads((finished / "config.json").read_text())
    for field in ("sft_target_tolerance", "sft_max_steps"):  # settings this version added
        del saved["config"][field]
    (finished / "config.json").write_text(json.dumps(saved))
    ok = cli("run", "--out", finished, "--resume", "--steps", "3", "--cache-dir", cache, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert [m["step"] for m in read_jsonl(finished / "metrics.jsonl")] == [0, 1, 2, 3]
