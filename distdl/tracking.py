"""Rank-0 tracking: metrics.jsonl and summary.json in the run directory, progress on the console, W&B.

Progress is a live bar when the driver's console is a terminal, and otherwise (a Slurm log, a Ray
Job's log) one plain line per log step, as HF Trainer and Lightning log in batch jobs.

W&B is best effort: a failure to start or to log warns once and training goes on.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distdl.config import TrackingSection
from distdl.rundir import METRICS_FILE, SUMMARY_FILE, WANDB_ID_FILE, RunSummary


def wandb_logged_in() -> bool:
    """Whether this machine has W&B credentials (environment or ~/.netrc), without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str) -> str:
    """auto -> WANDB_MODE if the user set it, else online when logged in, offline otherwise."""
    if requested != "auto":
        return requested
    from_env = os.environ.get("WANDB_MODE")
    if from_env in ("online", "offline", "disabled"):
        return from_env
    return "online" if wandb_logged_in() else "offline"


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per training run: the id is kept in the run directory so a resume continues it."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return run_id


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop lines a crashed attempt logged after the checkpoint being resumed from."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class Tracker:
    """Lives on rank 0 only."""

    def __init__(
        self,
        section: TrackingSection,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        wandb_mode: str,
        start_step: int,
        max_steps: int,
        console_is_terminal: bool = False,
    ) -> None:
        self.run_dir = run_dir
        truncate_metrics(run_dir, start_step)
        self._metrics = open(run_dir / METRICS_FILE, "a")
        self._wandb = self._start_wandb(section, run_name, config, wandb_mode)
        self._bar = self._start_bar(start_step, max_steps) if section.progress_bar and console_is_terminal else None
        self._progress = ProgressLine(start_step, max_steps)

    def _start_wandb(self, section: TrackingSection, run_name: str, config: dict[str, Any], mode: str) -> Any:
        if mode == "disabled":
            return None
        try:
            import wandb

            settings = dict(project=section.wandb_project, entity=section.wandb_entity, group=section.wandb_group,
                            name=run_name,
                            id=wandb_run_id(self.run_dir), resume="allow", config=config, dir=str(self.run_dir))
            try:
                return wandb.init(**settings, mode=mode,
                                  settings=wandb.Settings(init_timeout=section.wandb_init_timeout))
            except Exception as err:
                if mode != "online":
                    raise
                # No login on this node, or no network: keep the run for a later `wandb sync`.
                warnings.warn(f"W&B online failed ({err}); logging offline instead, to upload later with wandb sync")
                wandb.teardown()  # the failed online attempt still holds the run id
                return wandb.init(**settings, mode="offline")
        except Exception as err:  # W&B must never stop training
            warnings.warn(f"W&B could not start ({err}); training goes on, metrics stay in {self.run_dir / METRICS_FILE}")
            return None

    def _start_bar(self, start_step: int, max_steps: int) -> Any:
        # tqdm_ray draws worker bars on the driver's console without garbling Ray's log stream.
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=max_steps, desc="train", unit="step")
        bar.update(start_step)
        return bar

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Numbers, and image files (`Path` values: W&B images; their paths in metrics.jsonl)."""
        # Wall-clock time as W&B's _timestamp: start-up and queueing delays are read from it.
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except OSError as err:
            raise OSError(err.errno, f"could not write {self._metrics.name}: {err.strerror}") from err
        if self._bar is None:
            # Written, not printed: Ray Train would pass a print through its logger as well.
            sys.stdout.write(self._progress.line(step, metrics) + "\n")
            sys.stdout.flush()
        if self._wandb is not None:
            try:
                import wandb

                # An unknown value (an MFU without a known peak) is left out rather than charted as 0.
                self._wandb.log({k: wandb.Image(str(v)) if isinstance(v, Path) else v for k, v in metrics.items()
                                 if v is not None}, step=step)
            except Exception as err:
                warnings.warn(f"W&B logging failed ({err}); continuing without W&B")
                self._wandb = None

    def finish(self, summary: RunSummary) -> None:
        if self._wandb is not None:
            try:
                summary["wandb_run_dir"] = str(Path(self._wandb.dir).parent)
                summary["wandb_run_id"] = self._wandb.id
                self._wandb.summary.update(scalar_entries(summary))
                self._wandb.finish()
            except Exception as err:
                warnings.warn(f"W&B could not finish ({err})")
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_plain) + "\n")
        self._metrics.close()
        if self._bar is not None:
            self._bar.close()


class ProgressLine:
    """One plain line per log step: the step, the losses and evaluation metrics, throughput, the
    learning rate and the time left at this session's mean step rate."""

    SHOWN = ("loss", "loss_d", "loss_g", "lr", "samples_per_s", "mfu")

    def __init__(self, start_step: int, max_steps: int) -> None:
        self.start_step, self.max_steps = start_step, max_steps
        self.started = time.monotonic()

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        shown = [name for name in self.SHOWN if name in metrics]
        shown += sorted(name for name in metrics if name.startswith("eval_"))
        values = " ".join(f"{name}={_shown(name, metrics[name])}" for name in shown
                          if isinstance(metrics[name], (int, float)) or name == "mfu")
        done = step - self.start_step
        left = (time.monotonic() - self.started) / done * (self.max_steps - step) if done > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
        return f"distdl: step {step}/{self.max_steps} {values} eta={eta}"


def _shown(name: str, value: Any) -> str:
    if name == "mfu":
        return "?" if value is None else f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def scalar_entries(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numbers and strings of a nested summary, keyed "best/eval_accuracy" as W&B panels group them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(scalar_entries(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
