"""Test workloads that meet faults at known points, so real kills and real full disks hit mid-run.

Each fault happens once per run directory (a marker file records it), so the restarted or rerun
attempt trains normally. Where a test must deliver the fault itself (SIGKILL from outside), the
worker writes its pid and waits to be killed at the chosen point.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import torch

from distdl.registry import WORKLOADS
from distdl.workloads.base import Workload
from distdl.workloads.bert_pretrain import BertPretrain

# Longer than any test waits: a worker nobody kills must not hang the suite.
WAIT_TO_BE_KILLED_S = 300


def wait_to_be_killed(marker: Path) -> None:
    marker.write_text(f"{os.getpid()}\n")
    time.sleep(WAIT_TO_BE_KILLED_S)
    os._exit(1)


class CountingBertPretrain(BertPretrain):
    """Counts micro-batches across resumes: the fault points are micro-batch numbers of the whole run."""

    def train_batches(self, start):
        self.micro_batch = start
        return super().train_batches(start)

    def loss(self, model, batch):
        self.micro_batch += 1
        self.before_micro_batch(self.micro_batch)
        return super().loss(model, batch)

    def before_micro_batch(self, micro_batch: int) -> None:
        pass

    def first_time(self, name: str) -> bool:
        """True once per run directory, on the rank that creates the marker `name`."""
        marker = self.context.run_dir / name
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return False
        return True


@WORKLOADS.register("bert_pretrain_killed_once")
class BertPretrainKilledOnce(CountingBertPretrain):
    """Rank 1 writes its pid at micro-batch 7 and waits there for the test's SIGKILL."""

    def before_micro_batch(self, micro_batch):
        if micro_batch == 7 and self.context.rank == 1 and self.first_time("killed_once"):
            wait_to_be_killed(self.context.run_dir / "worker_pid")


@WORKLOADS.register("bert_pretrain_killed_while_saving")
class BertPretrainKilledWhileSaving(CountingBertPretrain):
    """Rank 1 copies one file of its step-12 checkpoint into storage, then waits there to be killed
    (the test kills the driver): a checkpoint folder cut short in the middle of Ray Train's upload."""

    def __init__(self, sections, context):
        super().__init__(sections, context)
        if context.rank == 1 and not (context.run_dir / "killed_while_saving").exists():
            from ray.train.v2._internal.execution import storage

            upload = storage._pyarrow_fs_copy_files

            def upload_then_hang(source, destination, **kwargs):
                if "checkpoint_00000012" in str(destination) and self.first_time("killed_while_saving"):
                    first = sorted(p for p in Path(source).rglob("*") if p.is_file())[0]
                    target = Path(destination) / first.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(first.read_bytes())
                    wait_to_be_killed(self.context.run_dir / "saving_pid")
                return upload(source, destination, **kwargs)

            storage._pyarrow_fs_copy_files = upload_then_hang


@WORKLOADS.register("bert_pretrain_paused_for_a_stop")
class BertPretrainPausedForAStop(CountingBertPretrain):
    """Rank 0 writes its pid at micro-batch 6 and waits there until the test creates `release` (after
    signalling the driver and seeing rank 0 take the stop request in), so the step the run stops at is known."""

    def before_micro_batch(self, micro_batch):
        if micro_batch == 6 and self.context.rank == 0 and self.first_time("paused_for_a_stop"):
            (self.context.run_dir / "paused_pid").write_text(f"{os.getpid()}\n")
            release = self.context.run_dir / "release"
            deadline = time.monotonic() + WAIT_TO_BE_KILLED_S
            while not release.exists():
                if time.monotonic() > deadline:
                    os._exit(1)
                time.sleep(0.05)


@WORKLOADS.register("bert_pretrain_fills_storage")
class BertPretrainFillsStorage(CountingBertPretrain):
    """At micro-batch 10 rank 0 fills the storage filesystem, as another job might, leaving 256 KiB:
    room for log lines, not for a checkpoint."""

    def before_micro_batch(self, micro_batch):
        if micro_batch == 10 and self.context.rank == 0 and self.first_time("filled_storage"):
            fill_filesystem(self.context.run_dir.parent / "filler", leave_bytes=256 * 1024)


def fill_filesystem(path: Path, leave_bytes: int) -> None:
    chunk = b"\0" * 2**20
    with open(path, "wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        out.truncate(max(0, out.tell() - leave_bytes))


@WORKLOADS.register("bert_pretrain_diverges")
class BertPretrainDiverges(CountingBertPretrain):
    """Rank 1's loss becomes NaN from micro-batch 9 on (rank 0's stays finite)."""

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if self.micro_batch >= 9 and self.context.rank == 1:
            loss = loss * torch.tensor(float("nan"))
        return loss, metrics


@WORKLOADS.register("bert_pretrain_broken_node")
class BertPretrainBrokenNode(BertPretrain):
    """Rank 1 cannot read its data, as on a node without the shared corpus."""

    def __init__(self, sections, context):
        if context.rank == 1:
            raise FileNotFoundError("corpus shard unreadable on this node")
        super().__init__(sections, context)


@WORKLOADS.register("bert_pretrain_fills_storage_before_the_controller")
class BertPretrainFillsStorageBeforeTheController(CountingBertPretrain):
    """Both ranks upload their step-12 shards whole; then rank 0 fills the storage filesystem before
    Ray Train's controller records the checkpoint, so the controller, not a worker, meets the full disk
    first. The workers then wait to be stopped with the failed run, writing nothing more.

    The step's report carries enough metrics that the controller's new snapshot needs more room than
    truncating its old one frees (a long run's snapshot grows with its checkpoints the same way)."""

    def __init__(self, sections, context):
        super().__init__(sections, context)
        import ray.train
        import torch.distributed as dist
        from ray.train.v2._internal.execution import storage

        upload, report = storage._pyarrow_fs_copy_files, ray.train.report

        def upload_then_fill(source, destination, **kwargs):
            result = upload(source, destination, **kwargs)
            if "checkpoint_00000012" in str(destination):
                dist.barrier()  # every rank's shards are in storage
                if context.rank == 0 and self.first_time("filled_storage"):
                    fill_filesystem(context.run_dir.parent / "filler", leave_bytes=0)
            return result

        def report_then_wait(metrics, checkpoint=None, checkpoint_dir_name=None, **kwargs):
            report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name, **kwargs)
            if checkpoint_dir_name == "checkpoint_00000012":
                time.sleep(WAIT_TO_BE_KILLED_S)
                os._exit(1)

        storage._pyarrow_fs_copy_files = upload_then_fill
        ray.train.report = report_then_wait

    def evaluate(self, model, step):
        metrics = super().evaluate(model, step)
        if step == 12:
            metrics.update({f"padding_{i:04d}": float(i) for i in range(1000)})
        return metrics


@WORKLOADS.register("no_export_format")
class NoExportFormat(Workload):
    """A plugin's workload that defines no export format."""

    def train_batches(self, start):
        return iter(())

    def evaluate(self, model, step):
        return {}


class _Uncompilable(torch.nn.Module):
    """The model, behind a forward that torch.compile refuses to trace (dynamo forbids tracing its
    own maybe_mark_dynamic, and raises a plain AssertionError that cannot be pickled)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        torch._dynamo.maybe_mark_dynamic(inputs["input_ids"], 0)
        return self.model(**inputs)


@WORKLOADS.register("bert_pretrain_uncompilable")
class BertPretrainUncompilable(BertPretrain):
    def build_model(self) -> torch.nn.Module:
        return _Uncompilable(super().build_model())
