"""Reading checkpoint files without running code: every torch file distdl reads is unpickled by torch's
weights-only unpickler, which builds tensors, containers and a short list of allowed types and refuses
anything else (a pickle that names `os.system` is refused before it can call it).

DeepSpeed's loaders pass `weights_only=False` themselves. Inside `tensors_only`, torch's own switch
`TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides them, so the refusal happens in the very `torch.load` that
reads the bytes: nothing checks one copy of a file and then loads another. DeepSpeed's optimizer
shards hold four of its own small types (the loss scaler, the ZeRO stage enum and the fragment
address); those, and nothing else, are allowed.

Runs whose files need more (written by a modified DeepSpeed, or by someone who pickled an object
into them) load in full only from folders the user names in `DISTDL_TRUSTED_CHECKPOINTS`
(os.pathsep-separated): their own files, said explicitly, never silently.
"""

from __future__ import annotations

import functools
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distdl.errors import CheckpointError

TRUST_VARIABLE = "DISTDL_TRUSTED_CHECKPOINTS"
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_OFF = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses to run with both set


def checkpoint_types() -> list[Callable[..., Any]]:
    """The non-tensor types DeepSpeed's checkpoints hold (each is plain data: its constructor and its
    state only set numbers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def _allowed_names() -> frozenset[str]:
    return frozenset(f"{kind.__module__}.{kind.__qualname__}" for kind in checkpoint_types())


def trusted_folders() -> list[Path]:
    """The folders the user trusts to unpickle in full (their own runs), from DISTDL_TRUSTED_CHECKPOINTS."""
    return [Path(entry).expanduser().resolve() for entry in os.environ.get(TRUST_VARIABLE, "").split(os.pathsep)
            if entry.strip()]


def is_trusted(path: str | Path) -> bool:
    path = Path(path).resolve()
    return any(path == folder or folder in path.parents for folder in trusted_folders())


@contextmanager
def tensors_only(location: str | Path) -> Iterator[None]:
    """Every torch.load inside (this process's, DeepSpeed's included) unpickles tensors and DeepSpeed's
    own types only; a refusal becomes a CheckpointError naming the file under `location` and the type it
    asked for. A no-op for a location the user trusts (DISTDL_TRUSTED_CHECKPOINTS)."""
    if is_trusted(location):
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_OFF)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(checkpoint_types()):
            yield
    except Exception as err:
        refusal = _unpickling_refusal(err)
        if refusal is None or isinstance(err, CheckpointError):  # not a refusal, or one already named
            raise
        raise refused(location, refusal) from err
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_tensors(file: str | Path) -> Any:
    """torch.load of one checkpoint file on the CPU: tensors and DeepSpeed's types only (unless trusted)."""
    with tensors_only(file):
        return torch.load(file, map_location="cpu", weights_only=not is_trusted(file))


def check_tensors_only(folder: str | Path) -> None:
    """Refuse a checkpoint folder any of whose torch files asks for more than tensors, before workers
    start (a clear error on the driver, not one per rank). The workers' own loads refuse on their own
    in any case: this check is for the message, not the safety."""
    folder = Path(folder)
    if is_trusted(folder):
        return
    for file in sorted(folder.rglob("*.pt")):
        if names := unsafe_globals(file):
            raise _named_refusal(file, names, folder)


def unsafe_globals(file: Path) -> list[str]:
    """The types a torch file's pickle names beyond what `tensors_only` allows (read, never executed)."""
    allowed = _allowed_names()
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(file) if name not in allowed]
    except Exception:  # noqa: BLE001 - not a torch archive: the loader's own error says so
        return []


def _unpickling_refusal(err: BaseException) -> pickle.UnpicklingError | None:
    """The weights-only unpickler's refusal in `err`'s chain (DeepSpeed and distdl wrap it)."""
    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, pickle.UnpicklingError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def refused(location: str | Path, refusal: BaseException | str) -> CheckpointError:
    """The error for a refusal met while reading under `location` (a file or a folder): it names the file
    that asked for more than tensors and the types it asked for, found by reading (never executing) the
    pickles; `refusal` (the unpickler's words) stands in when no file shows it any longer."""
    location = Path(location)
    files = [location] if location.is_file() else sorted(location.rglob("*.pt")) if location.is_dir() else []
    folder = location if location.is_dir() else location.parent
    for file in files:
        if names := unsafe_globals(file):
            return _named_refusal(file, names, folder)
    first_line = (str(refusal).strip().splitlines() or [""])[0][:300]
    return CheckpointError(f"a torch file under {location} holds more than tensors, and distdl does not unpickle it "
                           f"because that could run code ({first_line}). {_trust_hint(folder)}")


def _named_refusal(file: Path, names: list[str], folder: Path) -> CheckpointError:
    return CheckpointError(f"{file} asks for {', '.join(names)}, which a checkpoint of tensors never needs; distdl "
                           f"does not unpickle it because that could run code. {_trust_hint(folder)}")


def _trust_hint(folder: Path) -> str:
    return f"If these are your own files and you trust them, set {TRUST_VARIABLE}={folder} to load them in full"
