"""A disk that fills up: a real size-limited tmpfs mounted for the test (needs root and tmpfs; skipped
where mounting is not allowed). What a user sees is a clean error naming what to do, before training
where the need is known, and never a store or model that looks complete."""

import json
import shutil
import subprocess

import pytest

from pipeline.targets.reader import TargetsStore


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk; grow(size) remounts it bigger (the user frees space)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", str(disk)], check=False)


def test_a_capture_that_fills_the_disk_says_so_and_resumes_once_there_is_room(kdcache, tiny_tokens, make_teacher,
                                                                              small_disk):
    disk, grow = small_disk
    teacher = make_teacher(1, 32, 2)
    out = disk / "targets.zarr"
    args = ("cache", "--teacher", teacher, "--tokens", tiny_tokens.path, "--out", out, "--top-k", 32,
            "--encoding", "fp32", "--layer", 1, "--rows-per-shard", 32, "--rows-per-chunk", 8)
    full = kdcache(*args)
    assert full.exit_code == 1 and "Traceback" not in full.output, full.output
    assert "the disk is full" in full.output and "re-run the same command" in full.output
    store = TargetsStore(out, require_complete=False)
    assert not store.attrs.get("complete") and len(store.records) < len(store.shard_ranges)
    assert kdcache("verify", out).exit_code == 1
    grow("64m")
    resumed = kdcache(*args)
    assert resumed.exit_code == 0, resumed.output
    assert TargetsStore(out).attrs["complete"] and kdcache("verify", out).exit_code == 0


def test_a_student_or_teacher_that_cannot_be_saved_is_refused_before_training(kdcache, small_tokens, small_targets,
                                                                              small_disk):
    disk, _ = small_disk
    shutil.copytree(small_tokens, disk / "filler", dirs_exist_ok=True)  # the disk is small and partly used
    student = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--out", disk / "student",
                      "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--max-steps", 2, "--batch-size", 4,
                      "--log", disk.parent / "never.csv")
    assert student.exit_code == 1 and "its disk has" in student.output and "the trained student needs" in student.output
    assert not (disk / "student").exists() and not (disk.parent / "never.csv").exists()  # no step was taken
    teacher = kdcache("teacher", "--tokens", small_tokens, "--out", disk / "teacher", "--n-layer", 1,
                      "--n-embd", 32, "--n-head", 2, "--max-steps", 2, "--batch-size", 4)
    assert teacher.exit_code == 1 and "the trained teacher needs" in teacher.output
    assert not (disk / "teacher").exists()


def test_inspect_plot_onto_a_full_disk_names_the_path_and_leaves_no_file(kdcache, small_targets, small_disk):
    disk, _ = small_disk
    (disk / "ballast").write_bytes(b"\0" * (256 * 1024 - 4096 * 2))  # all but a block or two
    try:
        (disk / "more").write_bytes(b"\0" * 8192)
    except OSError:
        pass
    result = kdcache("inspect", small_targets, "--plot", disk / "tail.svg")
    assert result.exit_code == 1 and str(disk / "tail.svg") in result.output, result.output
    assert not (disk / "tail.svg").exists() and not list(disk.glob("tail.svg*"))
    assert json.loads(kdcache("inspect", small_targets, "--json").output)["complete"]
