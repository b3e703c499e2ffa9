"""Checkpoint manifests: each rank records the sha256 of every file it saved, sha256sum can check
them, a flipped byte or a missing file is named (checkpoint and file), and a resume falls back to
the newest earlier checkpoint that verifies. A real run's checkpoints are in tests/distributed/test_faults.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from distdl.engine.checkpoints import MANIFEST, intact_checkpoint, verify_checkpoint, verify_manifests, write_manifest
from distdl.errors import CheckpointDamaged, CheckpointError
from distdl.rundir import RAY_SNAPSHOT, RECORD_BEFORE_FALLBACK, RunStorage, checkpoint_record


def flip_a_byte(path, offset=None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def fake_checkpoint(folder, step: int, ranks: int = 2) -> None:
    """A checkpoint as the ranks save it: DeepSpeed's tag and files, each rank's random state and
    manifest (each rank saves into a folder of its own; Ray Train merges them)."""
    for rank in range(ranks):
        own = folder.parent / f".rank{rank}-{folder.name}"
        tag = own / f"global_step{step}"
        tag.mkdir(parents=True)
        if rank == 0:
            (own / "latest").write_text(f"global_step{step}")
            torch.save({"module": {"weight": torch.full((64, 64), float(step))}}, tag / "mp_rank_00_model_states.pt")
        torch.save({"state": torch.arange(100) + rank}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"torch": torch.get_rng_state()}, own / f"rng_state_rank{rank}.pt")
        write_manifest(own, rank, ranks)
        for path in sorted(own.rglob("*")):
            if path.is_file():
                target = folder / path.relative_to(own)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)


def ray_record(run_dir, steps: list[int]) -> None:
    results = [{"version": 0, "checkpoint_dir_name": f"checkpoint_{step:08d}", "metrics": {"step": step}}
               for step in steps]
    (run_dir / RAY_SNAPSHOT).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": list(range(len(steps))),
        "latest_checkpoint_result": results[-1], "current_report_index": len(steps)}))


def test_each_rank_records_its_own_files_in_sha256sums_format(tmp_path):
    checkpoint = tmp_path / "checkpoint_00000006"
    fake_checkpoint(checkpoint, 6)
    rank0 = (checkpoint / MANIFEST.format(rank=0, world=2)).read_text().splitlines()
    rank1 = (checkpoint / MANIFEST.format(rank=1, world=2)).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in rank0) == [
        "global_step6/mp_rank_00_model_states.pt", "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "latest", "rng_state_rank0.pt"]
    assert sorted(line.split("  ")[1] for line in rank1) == [
        "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_rank1.pt"]
    for manifest in ("manifest_rank0_of_2.sha256", "manifest_rank1_of_2.sha256"):  # the standard tool agrees
        checked = subprocess.run(["sha256sum", "--check", "--strict", manifest], cwd=checkpoint,
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    verify_manifests(checkpoint)


def test_a_flipped_byte_a_missing_file_and_a_missing_rank_are_named(tmp_path):
    checkpoint = tmp_path / "checkpoint_00000006"
    fake_checkpoint(checkpoint, 6)
    shard = checkpoint / "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_a_byte(shard)
    with pytest.raises(CheckpointDamaged, match=r"checkpoint_00000006 is corrupted: "
                       r"global_step6/zero_pp_rank_1_mp_rank_00_optim_states\.pt does not match the sha256 "
                       r"manifest_rank1_of_2\.sha256 recorded"):
        verify_manifests(checkpoint)
    shard.unlink()
    with pytest.raises(CheckpointDamaged, match=r"incomplete: global_step6/zero_pp_rank_1.*is missing "
                                                r"\(manifest_rank1_of_2\.sha256 lists it\)"):
        verify_manifests(checkpoint)
    # Rank 1's files and manifest gone together: the world size in rank 0's manifest's name tells.
    (checkpoint / "manifest_rank1_of_2.sha256").unlink()
    (checkpoint / "rng_state_rank1.pt").unlink()
    with pytest.raises(CheckpointDamaged, match=r"its manifests \(manifest_rank0_of_2\.sha256\) are not one for "
                                                r"each rank"):
        verify_manifests(checkpoint)


def test_a_read_that_fails_is_not_taken_for_damage(tmp_path, monkeypatch):
    """EIO from a network filesystem may pass: the resume stops naming it, and moves nothing aside."""
    run_dir = tmp_path / "run"
    for step in (6, 12):
        fake_checkpoint(run_dir / f"checkpoint_{step:08d}", step)
    ray_record(run_dir, [6, 12])

    def unreadable(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr("distdl.engine.checkpoints.file_sha256", unreadable)
    with pytest.raises(CheckpointError, match="could not read checkpoint .*checkpoint_00000012.*Input/output error") as err:
        intact_checkpoint(RunStorage(run_dir), "checkpoint_00000012")
    assert not isinstance(err.value, CheckpointDamaged)
    assert checkpoint_record(run_dir)["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000012"
    assert (run_dir / "checkpoint_00000012").is_dir() and not (run_dir / RECORD_BEFORE_FALLBACK).exists()


@pytest.mark.parametrize("line", ["{digest}  ../../outside", "{digest}  /etc/passwd", "not-a-digest  latest"])
def test_a_manifest_that_names_files_outside_the_checkpoint_is_refused(tmp_path, line):
    checkpoint = tmp_path / "checkpoint_00000006"
    fake_checkpoint(checkpoint, 6, ranks=1)
    (checkpoint / MANIFEST.format(rank=0, world=1)).write_text(line.format(digest="0" * 64) + "\n")
    with pytest.raises(CheckpointDamaged, match="manifest_rank0_of_1.sha256 is damaged"):
        verify_manifests(checkpoint)


def test_a_checkpoint_saved_before_manifests_passes(tmp_path):
    checkpoint = tmp_path / "checkpoint_00000006"
    fake_checkpoint(checkpoint, 6, ranks=1)
    (checkpoint / MANIFEST.format(rank=0, world=1)).unlink()
    flip_a_byte(checkpoint / "rng_state_rank0.pt")
    verify_manifests(checkpoint)
    verify_checkpoint(checkpoint)  # its archives are whole: a flipped byte inside one is not seen without manifests


def test_a_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for step in (6, 12, 18):
        fake_checkpoint(run_dir / f"checkpoint_{step:08d}", step)
    ray_record(run_dir, [6, 12, 18])
    flip_a_byte(run_dir / "checkpoint_00000018/global_step18/mp_rank_00_model_states.pt")
    flip_a_byte(run_dir / "checkpoint_00000012/rng_state_rank1.pt")
    storage = RunStorage(run_dir)
    assert intact_checkpoint(storage, "checkpoint_00000018") == "checkpoint_00000006"
    record = checkpoint_record(run_dir)
    assert record["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000006"
    assert [result["checkpoint_dir_name"] for result in record["checkpoint_results"]] == ["checkpoint_00000006"]
    assert record["checkpoint_report_indices"] == [0]
    before = json.loads((run_dir / RECORD_BEFORE_FALLBACK).read_text())
    assert before["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000018", "the old record is kept"
    assert sorted(path.name for path in run_dir.iterdir() if path.is_dir() and not path.name.startswith(".")) == [
        "checkpoint_00000006", "damaged-checkpoint_00000012", "damaged-checkpoint_00000018"]
    said = capsys.readouterr().out
    assert "checkpoint_00000018 is corrupted: global_step18/mp_rank_00_model_states.pt does not match" in said
    assert "Resuming from checkpoint_00000006" in said
    # Nothing left to fall back to: each failure is named.
    flip_a_byte(run_dir / "checkpoint_00000006/latest", offset=0)
    with pytest.raises(CheckpointDamaged, match=r"checkpoint_00000006 is corrupted: latest .*No earlier checkpoint"):
        intact_checkpoint(storage, "checkpoint_00000006")


def test_an_intact_latest_checkpoint_is_kept_and_the_record_untouched(tmp_path):
    run_dir = tmp_path / "run"
    for step in (6, 12):
        fake_checkpoint(run_dir / f"checkpoint_{step:08d}", step)
    ray_record(run_dir, [6, 12])
    before = (run_dir / RAY_SNAPSHOT).read_text()
    assert intact_checkpoint(RunStorage(run_dir), "checkpoint_00000012") == "checkpoint_00000012"
    assert (run_dir / RAY_SNAPSHOT).read_text() == before
