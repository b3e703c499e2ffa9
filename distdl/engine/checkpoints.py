"""The one home of checkpoint files: their names, the per-rank random-state files, verification,
consolidation to fp32, resharding for another worker count, which checkpoint of a run is which
(Ray Train's record), and `trained_state`, the one reader of a finished run's weights.

A checkpoint folder (`checkpoint_<step>`) holds DeepSpeed's own sharded files (`latest`, then
`global_step<N>/` with the model states and each rank's ZeRO shards), one `rng_state_rank<r>.pt` per
rank, and for a workload with several engines (a GAN) one such DeepSpeed folder per engine. Each rank
records the sha256 of every file it saved in `manifest_rank<r>_of_<n>.sha256` (n: the world size), which every reader checks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Collection, Optional

import torch

from distdl.engine.safe_loading import check_tensors_only, load_tensors, refused, tensors_only
from distdl.errors import CheckpointDamaged, CheckpointError, ConfigError
from distdl.rundir import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_SCORE,
    CONFIG_FILE,
    RunStorage,
    aside,
    checkpoint_record,
    is_checkpoint,
    is_uri,
    point_record_at,
    saved_config,
)

# Each rank's random state (torch's, and its own GPU's), beside DeepSpeed's files.
RNG_FILE = "rng_state_rank{rank}.pt"
# Each rank's record of the files it saved, in sha256sum's format (`sha256sum -c` checks one by hand);
# its name holds the world size, so that a checkpoint missing a rank's files and manifest is seen.
MANIFEST = "manifest_rank{rank}_of_{world}.sha256"
_MANIFEST_NAME = re.compile(r"manifest_rank(\d+)_of_(\d+)\.sha256$")


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint saved at `step` (Ray Train's checkpoint_dir_name)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def save_rng_state(directory: str | Path, rank: int, device: torch.device) -> None:
    """This rank's random state into a checkpoint folder it is writing."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        # This worker's own GPU only: on resume it may sit at another index on its node.
        state["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(state, Path(directory) / RNG_FILE.format(rank=rank))


def restore_rng_state(directory: str | Path, rank: int, device: torch.device) -> None:
    """This rank's random state as the checkpoint saved it (the same worker count saved it)."""
    rng_file = Path(directory) / RNG_FILE.format(rank=rank)
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {rng_file.name}: it is incomplete")
    state = load_tensors(rng_file)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def saved_world_size(checkpoint: str | Path | list[str]) -> Optional[int]:
    """How many workers saved a checkpoint (each saves its random state); None for a foreign folder.
    `checkpoint`: its folder, or the names of its files (listed on object storage)."""
    pattern = RNG_FILE.format(rank="*")
    if isinstance(checkpoint, list):
        return sum(fnmatch.fnmatch(name, pattern) for name in checkpoint) or None
    return len(list(Path(checkpoint).glob(pattern))) or None


def engine_folder(checkpoint_dir: str | Path, engine: str, engines: int) -> Path:
    """Where one of a workload's `engines` engines saves in a checkpoint folder: the folder itself for a
    single engine, else a sub-folder named after the engine (a GAN's generator/ and discriminator/)."""
    return Path(checkpoint_dir) if engines == 1 else Path(checkpoint_dir) / engine


def deepspeed_tag(step: int) -> str:
    """The name of the folder DeepSpeed writes an engine's files into (its `latest` file names it)."""
    return f"global_step{step}"


# ----------------------------------------------------------------------------- integrity


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**22), b""):
            digest.update(block)  # releases the GIL: files hash side by side in threads
    return digest.hexdigest()


def _sha256_of(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def write_manifest(directory: str | Path, rank: int, world_size: int) -> None:
    """Record the sha256 of every file this rank saved into `directory`, its own checkpoint folder
    (Ray Train merges the ranks' folders into the checkpoint)."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file() and not _MANIFEST_NAME.match(path.name))
    lines = [f"{digest}  {path.relative_to(directory).as_posix()}\n" for path, digest in zip(files, _sha256_of(files))]
    (directory / MANIFEST.format(rank=rank, world=world_size)).write_text("".join(lines))


def verify_manifests(checkpoint_dir: str | Path) -> None:
    """Every rank's manifest is there, and every file they list, with the sha256 it had when it was
    saved; `CheckpointDamaged` names the checkpoint and the file. A checkpoint saved before manifests
    were written has none and passes."""
    checkpoint_dir = Path(checkpoint_dir)
    expected = _listed_files(checkpoint_dir)
    missing = [path for path in expected if not path.is_file()]
    if missing:
        path = missing[0]
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is incomplete: {path.relative_to(checkpoint_dir)} is "
                                f"missing ({expected[path][1]} lists it)")
    try:
        digests = _sha256_of(list(expected))
    except OSError as err:  # a read that failed, which may succeed again: not evidence of damage
        raise CheckpointError(f"could not read checkpoint {checkpoint_dir} to check it ({err})") from err
    for path, digest in zip(expected, digests):
        if digest != expected[path][0]:
            raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is corrupted: {path.relative_to(checkpoint_dir)} "
                                    f"does not match the sha256 {expected[path][1]} recorded when it was saved")


def _listed_files(checkpoint_dir: Path) -> dict[Path, tuple[str, str]]:
    """Each file the manifests list, with its sha256 and the manifest's name; the manifests of every
    rank of the world size they name must be there."""
    manifests = {int(match[1]): (int(match[2]), path) for path in sorted(checkpoint_dir.iterdir())
                 if (match := _MANIFEST_NAME.match(path.name))} if checkpoint_dir.is_dir() else {}
    worlds = {world for world, _ in manifests.values()}
    if manifests and (len(worlds) != 1 or set(manifests) != set(range(worlds.pop()))):
        saved = sorted(path.name for _, path in manifests.values())
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is incomplete: its manifests ({', '.join(saved)}) "
                                "are not one for each rank of one world size")
    expected: dict[Path, tuple[str, str]] = {}
    for _, manifest in manifests.values():
        for line in manifest.read_text().splitlines():
            digest, _, name = line.partition("  ")
            relative = Path(name)
            if not re.fullmatch(r"[0-9a-f]{64}", digest) or relative.is_absolute() or ".." in relative.parts:
                raise CheckpointDamaged(f"checkpoint {checkpoint_dir}: {manifest.name} is damaged (a line reads "
                                        f"{line[:120]!r}; each must be a sha256 and a path inside the checkpoint)")
            expected[checkpoint_dir / relative] = (digest, manifest.name)
    return expected


# ----------------------------------------------------------------------------- DeepSpeed's files


def _tagged_model_states(checkpoint_dir: Path) -> tuple[Path, list[Path]]:
    """The tag folder `latest` points at and its model-state files; an error names what is missing."""
    tag_file = checkpoint_dir / "latest"
    if not tag_file.is_file():
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is corrupted or not a DeepSpeed checkpoint: "
                                "it has no 'latest' file")
    tag_dir = checkpoint_dir / tag_file.read_text().strip()
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointDamaged(f"checkpoint {checkpoint_dir} is corrupted: {tag_dir.name}/ has no model states")
    return tag_dir, model_files


def verify_checkpoint(checkpoint_dir: str | Path) -> None:
    """Integrity check before workers start: every file has the sha256 it was saved with, the tag
    exists and every torch file is a whole archive.

    torch.save writes zip archives whose index sits at the end, so a truncated file fails to open
    (the check for checkpoints saved before the manifests).
    """
    verify_manifests(checkpoint_dir)
    _verify_archives(Path(checkpoint_dir))


def _verify_archives(checkpoint_dir: Path) -> None:
    engine_dirs = _engine_folders(checkpoint_dir)
    if engine_dirs and engine_dirs != [checkpoint_dir]:
        # Several engines (a GAN): each saved into its own sub-folder.
        for engine_dir in engine_dirs:
            _verify_archives(engine_dir)
        _check_archives(sorted(checkpoint_dir.glob("*.pt")), checkpoint_dir)
        return
    tag_dir, _ = _tagged_model_states(checkpoint_dir)
    _check_archives(sorted(tag_dir.glob("*.pt")) + sorted(checkpoint_dir.glob("*.pt")), checkpoint_dir)


def _check_archives(files: list[Path], checkpoint_dir: Path) -> None:
    import zipfile

    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except zipfile.BadZipFile as err:
            raise CheckpointDamaged(f"checkpoint file {file} is corrupted ({err}); the run cannot resume from "
                                    f"{checkpoint_dir.name}") from err
        except OSError as err:  # a read that failed, which may succeed again
            raise CheckpointError(f"could not read checkpoint file {file} ({err})") from err


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a DeepSpeed checkpoint of any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    tag_dir, model_files = _tagged_model_states(checkpoint_dir)
    try:
        model_states = load_tensors(model_files[0])
        stage = int(model_states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        # ZeRO 1-3 (and bf16 at stage 0, whose optimizer keeps the fp32 master weights) need the
        # optimizer shards; plain stage 0 keeps full fp32 weights in the model states.
        if stage > 0 or any(tag_dir.glob("bf16_zero_pp_rank_*")):
            with tensors_only(checkpoint_dir):
                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
        else:
            state = model_states["module"]
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint {tag_dir} could not be read: {err}") from err
    return {name: tensor.float() for name, tensor in state.items()}


# ----------------------------------------------------------------------------- elastic resume

# DeepSpeed's universal-checkpoint converter reads Adam's two moments (and the step count) from every ZeRO
# partition. Other optimizers' state (SGD's and LARS's momentum) rides in those two slots and is named
# back afterwards; at ZeRO-3, whose shards the converter reads differently, only Adam-style state goes.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
UNIVERSAL_LATEST = "latest_universal"
_SHARD_RANK = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_partitions(checkpoint_dir: str | Path) -> Optional[int]:
    """Over how many data-parallel ranks a checkpoint's optimizer state is partitioned; None when it is
    not partitioned (plain ZeRO-0), so that any number of workers loads it as saved."""
    tag_dir, _ = _tagged_model_states(Path(checkpoint_dir))
    ranks = {int(match.group(1)) for file in tag_dir.iterdir() if (match := _SHARD_RANK.match(file.name))}
    return len(ranks) or None


def reshard_checkpoint(checkpoint_dir: str | Path, world_size: int) -> bool:
    """Make a checkpoint whose ZeRO partitions were saved by another number of workers loadable by
    `world_size` workers; whether the workers must then load it as DeepSpeed's universal checkpoint.

    DeepSpeed's own converter (`ds_to_universal`) gathers every partition's fp32 weights and optimizer
    state into one file per parameter and state; a loading engine slices its own partition out of them,
    on any number of ranks. It writes beside the saved tag (`<tag>_universal/`, `latest_universal`),
    which stays as it was. A converted checkpoint is reused on the next resume.
    """
    checkpoint_dir = Path(checkpoint_dir)
    partitioned = {folder: saved for folder in _engine_folders(checkpoint_dir)
                   if (saved := saved_partitions(folder)) is not None}
    if not partitioned or all(saved == world_size for saved in partitioned.values()):
        return False
    for folder, saved in partitioned.items():
        _convert_to_universal(folder, f"{saved} workers to {world_size}")
    return True


def _engine_folders(checkpoint_dir: Path) -> list[Path]:
    """The folders one engine each saved into: the checkpoint itself, or one per engine (a GAN)."""
    if (checkpoint_dir / "latest").is_file():
        return [checkpoint_dir]
    return sorted(d for d in checkpoint_dir.glob("*") if (d / "latest").is_file())


def _convert_to_universal(engine_dir: Path, what: str) -> None:
    """DeepSpeed's `ds_to_universal` on the tag `latest` names, written whole before it is named."""
    import shutil

    tag = (engine_dir / "latest").read_text().strip()
    target = engine_dir / f"{tag}_universal"
    pointer = engine_dir / UNIVERSAL_LATEST
    if target.is_dir() and pointer.is_file() and pointer.read_text().strip() == target.name:
        return
    partial, view = engine_dir / f"{target.name}.partial", engine_dir / f"{tag}.adam-view"
    for leftover in (partial, view):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        carried = _adam_view(engine_dir / tag, view, what)
        _run_converter(engine_dir / tag if carried is None else view, partial, engine_dir / tag)
        _name_state_back(partial, carried or {})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(view, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    pointer_partial = engine_dir / f"{UNIVERSAL_LATEST}.partial"
    pointer_partial.write_text(target.name)
    pointer_partial.replace(pointer)


def _adam_view(tag_dir: Path, view: Path, what: str) -> Optional[dict[str, str]]:
    """When the saved optimizer state is not Adam's: a copy of the tag whose ZeRO shards hold it in
    Adam's two moment slots, for DeepSpeed's converter, and which slot holds which state. None when the
    state is Adam's and the converter reads the tag as saved."""
    shards = sorted(file for file in tag_dir.iterdir() if _SHARD_RANK.match(file.name))
    first_saved = load_tensors(shards[0])
    first = first_saved["optimizer_state_dict"]
    if "base_optimizer_state" not in first:  # ZeRO-3's layout, which the converter reads as Adam's only
        keys = {key for state in first["optimizer_state_dict"]["state"].values() for key in state}
        if not set(ADAM_MOMENTS) <= keys:
            raise CheckpointError(
                f"checkpoint {tag_dir.parent} cannot be resharded from {what}: at ZeRO-3 DeepSpeed's universal "
                f"checkpoint carries Adam-style moments only (adam, adamw, lamb), and this optimizer keeps "
                f"{', '.join(sorted(keys)) or 'no state'}. Resume on the worker count that saved it")
        return None
    keys = sorted({key for state in first["base_optimizer_state"]["state"].values() for key in state} - {"step"})
    if set(keys) == set(ADAM_MOMENTS):
        return None
    if len(keys) > len(ADAM_MOMENTS):
        raise CheckpointError(f"checkpoint {tag_dir.parent} cannot be resharded from {what}: its optimizer keeps "
                              f"{len(keys)} tensors per parameter ({', '.join(keys)}); DeepSpeed's universal "
                              "checkpoint carries two. Resume on the worker count that saved it")
    carried = dict(zip(ADAM_MOMENTS, keys))
    view.mkdir()
    loaded = {shards[0]: first_saved}  # read above already; each shard can be gigabytes
    for file in tag_dir.iterdir():
        if not _SHARD_RANK.match(file.name):
            _link_or_copy(file, view / file.name)  # the model states, unchanged and often large
            continue
        saved = loaded.pop(file, None) or load_tensors(file)
        optimizer = saved["optimizer_state_dict"]
        states = optimizer["base_optimizer_state"]["state"]
        for group, partition in enumerate(optimizer["single_partition_of_fp32_groups"]):
            state = states.setdefault(group, {})
            # The saved state may keep the partition's padding, which the fp32 copy drops.
            like = next((state[key] for key in keys if key in state), partition)
            for slot in ADAM_MOMENTS:
                state[slot] = state.pop(carried[slot]) if slot in carried else torch.zeros_like(like)
        torch.save(saved, view / file.name)
    return carried


def _link_or_copy(source: Path, target: Path) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


_CONVERTER = ("import runpy, sys, torch; from distdl.engine.safe_loading import checkpoint_types; "
              "torch.serialization.add_safe_globals(checkpoint_types()); sys.argv[0] = 'ds_to_universal'; "
              "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)")


def _run_converter(source: Path, output: Path, tag_dir: Path) -> None:
    import subprocess
    import sys

    # A process of its own: the converter fans out over process pools and prints its progress. It reads
    # tensors only (tensors_only's switch reaches it through the environment; its forked pool inherits the
    # allowed types).
    command = [sys.executable, "-c", _CONVERTER, "--input_folder", str(source), "--output_folder", str(output),
               "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "2"]
    with tensors_only(source):
        done = subprocess.run(command, capture_output=True, text=True)
    if "UnpicklingError" in done.stderr:
        raise refused(source, done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise CheckpointError(f"could not convert checkpoint {tag_dir} to DeepSpeed's universal checkpoint for "
                              f"another worker count: {lines[-1] if lines else done.returncode}")


def _name_state_back(universal: Path, carried: dict[str, str]) -> None:
    """Each parameter's state files under their own names again; the unused moment slots removed."""
    if not carried:
        return
    for parameter in (universal / "zero").iterdir():
        if not parameter.is_dir():
            continue
        for slot in ADAM_MOMENTS:
            file = parameter / f"{slot}.pt"
            if slot in carried:
                file.rename(parameter / f"{carried[slot]}.pt")
            else:
                file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- which checkpoint (Ray Train's record)


def _latest_recorded(run_dir: Path) -> dict[str, Any]:
    """Ray Train's record of the checkpoint it resumes from ({} before the first one)."""
    return checkpoint_record(run_dir).get("latest_checkpoint_result") or {}


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the checkpoint Ray Train would resume from."""
    return (_latest_recorded(run_dir).get("metrics") or {}).get("step")


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint Ray Train resumes from: the latest one its record holds as complete.

    Never the highest-numbered folder: a save cut short leaves a folder that was never recorded.
    """
    run_dir = Path(run_dir)
    latest = _latest_recorded(run_dir).get("checkpoint_dir_name")
    if latest:
        return run_dir / latest
    if any(run_dir.glob(CHECKPOINT_PREFIX + "*")):
        raise ConfigError(f"run directory {run_dir} holds no complete checkpoint: Ray Train recorded none of its "
                          "checkpoint_* folders (a save cut short?)")
    raise ConfigError(f"run directory {run_dir} holds no checkpoint (checkpoint_*)")


def _kept(run_dir: Path, kept: Optional[Collection[str]]) -> set[str]:
    """The checkpoint folders a run holds: listed by the caller (object storage), or found locally."""
    return set(kept) if kept is not None else {p.name for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
                                               if p.is_dir() and is_checkpoint(p.name)}


def best_checkpoint(run_dir: Path, kept: Optional[Collection[str]] = None) -> Path:
    """The kept checkpoint with the highest score, for runs that rank checkpoints by a metric."""
    present = _kept(run_dir, kept)
    results = checkpoint_record(run_dir).get("checkpoint_results", [])
    scored = [r for r in results if isinstance((r.get("metrics") or {}).get(CHECKPOINT_SCORE), (int, float))
              and r["checkpoint_dir_name"] in present]
    if not scored:
        raise ConfigError(f"run directory {run_dir} holds no scored checkpoint (its workload keeps the latest only); "
                          "use --checkpoint latest")
    # Ties go to the later checkpoint, as Ray Train ranks them.
    best = max(scored, key=lambda r: (r["metrics"][CHECKPOINT_SCORE], r["checkpoint_dir_name"]))
    return Path(run_dir) / best["checkpoint_dir_name"]


def find_checkpoint(run_dir: Path, which: str, kept: Optional[Collection[str]] = None) -> Path:
    """`latest`, `best`, or a checkpoint folder's name (`kept`: the checkpoints on object storage)."""
    if which == "latest":
        return latest_checkpoint(run_dir)
    if which == "best":
        return best_checkpoint(run_dir, kept)
    which = Path(which).name  # a folder's path, or a name with a trailing slash from the shell
    present = _kept(run_dir, kept)
    if which not in present:
        listed = ", ".join(sorted(present)) or "none"
        raise ConfigError(f"--checkpoint {which!r}: not latest, best, or a checkpoint of {run_dir} (kept: {listed})")
    return Path(run_dir) / which


# ----------------------------------------------------------------------------- resuming a run


def resume_checkpoint(storage: RunStorage) -> Optional[str]:
    """The checkpoint a rerun of this run resumes from, checked before any worker starts; None when Ray
    Train recorded none yet. A local checkpoint whose files do not match their manifests gives way
    to the newest earlier one that does (`intact_checkpoint`).

    On object storage it is not read back here: an object is written whole or not at all, Ray Train
    records a checkpoint only once every rank's upload finished, and the workers check the files
    they download; its presence is checked."""
    if checkpoint_step(storage.local) is None:
        return None
    name = latest_checkpoint(storage.local).name
    if storage.remote:
        if name not in storage.checkpoints():
            raise CheckpointError(f"{storage.location(name)} is missing; Ray Train recorded it as the run's latest "
                                  "checkpoint")
        return name
    name = intact_checkpoint(storage, name)
    check_tensors_only(storage.local / name)
    return name


def intact_checkpoint(storage: RunStorage, latest: str) -> str:
    """`latest` if it verifies; else the newest earlier checkpoint of Ray Train's record that does,
    made the one Ray Train resumes from (the damaged ones moved aside, kept for a look). An error
    names each checkpoint that failed when none verifies."""
    failures = []
    for result in [_latest_recorded(storage.local), *_earlier_results(storage.local, latest)]:
        name = result["checkpoint_dir_name"]
        try:
            verify_checkpoint(storage.local / name)
        except CheckpointDamaged as err:  # a read that failed for another reason is raised, not fallen back from
            failures.append(str(err))
            continue
        if name != latest:
            later = _later_results(storage.local, result)
            point_record_at(storage.local, result)  # first: the record never names a folder moved aside
            damaged = [aside(storage.local, result["checkpoint_dir_name"]) for result in later]
            print(f"distdl: {failures[0]}. Resuming from {name}, the newest checkpoint whose files match their "
                  f"manifests; moved aside: {', '.join(damaged)}", flush=True)
        return name
    raise CheckpointDamaged("; ".join(failures) + ". No earlier checkpoint of the run verifies: start afresh "
                          "(--overwrite), or from a copy of the run you trust")


def _earlier_results(run_dir: Path, latest: str) -> list[dict[str, Any]]:
    """Ray Train's records of the run's kept checkpoints before `latest`, newest first."""
    results = [result for result in checkpoint_record(run_dir).get("checkpoint_results", [])
               if result["checkpoint_dir_name"] != latest and (run_dir / result["checkpoint_dir_name"]).is_dir()]
    return sorted(results, key=lambda result: result["checkpoint_dir_name"], reverse=True)


def _later_results(run_dir: Path, kept: dict[str, Any]) -> list[dict[str, Any]]:
    return [result for result in checkpoint_record(run_dir).get("checkpoint_results", [])
            if result["checkpoint_dir_name"] > kept["checkpoint_dir_name"]
            and (run_dir / result["checkpoint_dir_name"]).is_dir()]


@dataclass(frozen=True)
class Reshard:
    """A checkpoint saved by another number of workers than the resuming run's."""

    saved_workers: int
    universal: bool  # the workers load DeepSpeed's universal checkpoint (else the checkpoint whole)


def reshard_for_workers(storage: RunStorage, name: str, workers: int) -> Optional[Reshard]:
    """Make checkpoint `name` of a run loadable by `workers` workers; None when as many saved it (or it
    is not distdl's). On object storage it is resharded in the working copy and what that wrote pushed."""
    saved = saved_world_size(storage.file_names(name) if storage.remote else storage.local / name)
    if saved in (None, workers):
        return None
    stored = storage.file_names(name)
    folder = storage.pull_checkpoint(name)
    if storage.remote:
        verify_manifests(folder)  # a local one was checked before (resume_checkpoint)
    universal = reshard_checkpoint(folder, workers)
    storage.push_new(name, stored)  # what resharding added (DeepSpeed copies some files with their times)
    return Reshard(saved, universal)


# ----------------------------------------------------------------------------- a finished run's weights


def _is_checkpoint_of_a_run(path: Path) -> bool:
    """A local checkpoint_* folder inside a distdl run directory."""
    return path.name.startswith(CHECKPOINT_PREFIX) and (path.parent / CONFIG_FILE).is_file()


def is_run_location(path: Path) -> bool:
    """A local distdl run directory, or one of its checkpoint_* folders."""
    return (path / CONFIG_FILE).is_file() or _is_checkpoint_of_a_run(path)


class TrainedState:
    """One checkpoint of a run, read through this node's file system: the run directory's files, which
    checkpoint `which` names (found on first use), its folder (downloaded on first use from object
    storage) and the weights in it."""

    def __init__(self, storage: RunStorage, which: str = "latest", key: str = "") -> None:
        self.storage, self.which, self.key = storage, which, key

    @property
    def run_dir(self) -> Path:
        return self.storage.local

    @cached_property
    def name(self) -> str:
        """The checkpoint's folder name; an error names the key when the run has no such checkpoint."""
        try:
            return find_checkpoint(self.run_dir, self.which, self.storage.checkpoints()).name
        except ConfigError as err:
            raise ConfigError(f"{self.key}: {err}" if self.key else str(err)) from None

    @cached_property
    def checkpoint(self) -> Path:
        """The checkpoint folder (once per node from object storage: the node's processes share it),
        its files checked against their manifests."""
        folder = self.storage.pull_checkpoint(self.name)
        verify_manifests(folder)
        return folder

    def config(self, workload: Optional[str] = None) -> dict[str, Any]:
        """The run's saved config (of `workload`, when given: another is refused, naming the key)."""
        return saved_config(self.run_dir, workload, self.key)

    def weights(self, engine: str = "") -> dict[str, torch.Tensor]:
        """fp32 weights on the CPU, gathered from every ZeRO partition, named as in the model; `engine`:
        which of a workload's engines (a GAN's `generator`), for workloads with several."""
        return consolidated_state_dict(self.checkpoint / engine)

    def describe(self) -> str:
        return f"{self.name} of run {self.storage}"


def trained_state(run: str | Path, which: str = "latest", key: str = "") -> TrainedState:
    """A run's checkpoint, to read its weights: the one way anything reads a finished run (an export, a
    warm start, a GAN's classifier, a study's trained solutions).

    `run`: a run directory (a path, or its URI on object storage) or one of its checkpoint_* folders;
    `which`: `latest` (the latest checkpoint Ray Train recorded complete), `best` (by the workload's
    metric) or a checkpoint_* name. A run on object storage is pulled into a copy of its own in this
    node's cache (a live run's working copy on the node stays as it is). Errors name `key`, the config
    key that named the run, when given."""
    if is_uri(str(run)):
        location = str(run).rstrip("/")
        parent, _, named = location.rpartition("/")
        if named.startswith(CHECKPOINT_PREFIX):  # a folder of the run on the store: its files are checked below
            location, which = parent, named
    else:
        location = Path(run).expanduser()
        if _is_checkpoint_of_a_run(location):
            location, which = location.parent, location.name
    storage = RunStorage(location, key=key or "the run directory", cache="read")
    storage.pull()
    if not (storage.local / CONFIG_FILE).is_file():
        raise ConfigError(f"{key + ': ' if key else ''}{storage} is not a distdl run directory (no {CONFIG_FILE})")
    return TrainedState(storage, which, key)
