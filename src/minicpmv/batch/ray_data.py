"""The Ray Data runner: CPU workers read, decode and preprocess rows; a pool of model replicas
(actors holding the model and a continuous-batching engine) answers them; results stream back
to this process, which writes them.

Pipeline (``run_ray(job, rows, sink)``):

1. ``ray.data.from_items`` of the rows still to do (each one JSON string: id, prompt, media
   path, settings; results come back as JSON strings too, so no value is coerced on the way).
2. ``map_batches(PrepareStage)`` on an actor pool of ``cpu_workers`` CPU actors: each loads the
   checkpoint's processor only (no weights) and turns rows into ``prepare.Prepared`` objects
   (model inputs, or the row's error).
3. ``map_batches(ReplicaStage)`` on a fixed pool of ``replicas`` actors with
   ``gpus_per_replica`` / ``cpus_per_replica`` each: a replica loads the model once and
   answers ``rows_per_call`` rows at a time through the same engine adapter as the local
   runner (batch-invariant, so greedy answers equal the local run's).
4. ``iter_batches`` streams finished rows to the sink as they come.

Failures: Ray Data restarts a replica that dies (``max_restarts=-1``) and retries the rows it
held (``max_task_retries=-1``); the writer drops a second result for an id, so a row is written
exactly once even when a retried call had already produced some of its rows. Inputs cross
processes through Ray's own object transport. The media files and the checkpoint must be
readable at the same path on every node. Ray is imported only through ``ray_setup``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..errors import InputError
from .engine_adapter import Answer, EngineAdapter
from .inputs import Row
from .job import BatchJob, ChunkSink, RayOptions, record
from .prepare import Prepared, Preparer, load_processor
from .ray_setup import connect, import_ray

log = logging.getLogger(__name__)


class PrepareStage:
    """Ray Data callable on CPU workers: rows -> ``Prepared`` (one per row, in order)."""

    def __init__(self, model: str, defaults: dict[str, Any]) -> None:
        self.preparer = Preparer(load_processor(model), defaults)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = [Row.from_json(str(text)) for text in batch["row"]]
        prepared = np.empty(len(rows), dtype=object)
        prepared[:] = [self.preparer(r) for r in rows]
        return {"prepared": prepared}


class ReplicaStage:
    """Ray Data callable on a model replica: ``Prepared`` rows -> output records."""

    def __init__(self, model: str, dtype: str, device: str, max_batch_size: int, max_model_len: int | None,
                 batch_invariant: bool, threads: int, pid_dir: str | None = None) -> None:
        import torch

        from ..api import load

        torch.set_num_threads(max(1, threads))
        self.adapter = EngineAdapter(load(model, dtype=dtype, device=device), max_batch_size=max_batch_size,
                                     max_model_len=max_model_len, batch_invariant=batch_invariant)
        if pid_dir:  # lets an operator (or a test) find and signal the replica processes
            with open(os.path.join(pid_dir, f"replica-{os.getpid()}.pid"), "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items: list[Prepared] = list(batch["prepared"])
        ready = [p for p in items if p.error is None]
        answers = dict(zip((p.id for p in ready),
                           self.adapter.run([(p.inputs, p.settings) for p in ready]), strict=True))
        recs = [record(p.id, answers[p.id] if p.error is None else Answer(error=p.error)) for p in items]
        return {"record": np.asarray([json.dumps(r, ensure_ascii=False) for r in recs], dtype=object)}


def build_dataset(job: BatchJob, rows: list[Row]) -> Any:
    """The lazy Ray Dataset of output records for ``rows`` (executed when iterated)."""
    ray = import_ray()
    opts = job.ray
    assert opts is not None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job has its own bar
    ctx.print_on_execution_start = False
    ctx.enable_fallback_to_arrow_object_ext_type = True  # Prepared objects travel as Python objects
    ctx.execution_options.preserve_order = False
    per_call = opts.rows_per_call or 2 * job.max_batch_size
    blocks = max(1, -(-len(rows) // per_call))
    ds = ray.data.from_items([{"row": r.to_json()} for r in rows], override_num_blocks=blocks)
    ds = ds.map_batches(
        PrepareStage, fn_constructor_kwargs={"model": job.model, "defaults": dict(job.defaults)},
        batch_size=per_call, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, opts.cpu_workers)),
        num_cpus=1,
    )
    return ds.map_batches(
        ReplicaStage,
        fn_constructor_kwargs={
            "model": job.model, "dtype": job.dtype, "device": job.device, "max_batch_size": job.max_batch_size,
            "max_model_len": job.max_model_len, "batch_invariant": job.batch_invariant,
            "threads": max(1, int(opts.cpus_per_replica)), "pid_dir": opts.pid_dir,
        },
        batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=opts.replicas),
        num_cpus=opts.cpus_per_replica, num_gpus=opts.gpus_per_replica or None,
    )


def check_resources(opts: RayOptions, have: dict[str, float], *, strict: bool) -> None:
    """Refuse (``strict``: a local instance, which cannot grow) or warn when the cluster has fewer
    CPUs or GPUs than the replicas and CPU workers reserve: Ray would wait for them forever."""
    need_cpu = opts.replicas * opts.cpus_per_replica + max(1, opts.cpu_workers)
    need_gpu = opts.replicas * opts.gpus_per_replica
    cpu, gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if need_cpu <= cpu and need_gpu <= gpu:
        return
    msg = (f"the Ray cluster offers {cpu:g} CPUs and {gpu:g} GPUs, but {opts.replicas} replica(s) and "
           f"{max(1, opts.cpu_workers)} CPU worker(s) reserve {need_cpu:g} CPUs and {need_gpu:g} GPUs; lower "
           "--replicas / --cpus-per-replica / --gpus-per-replica / --cpu-workers"
           + (" or raise --ray-num-cpus" if strict else ""))
    if strict:
        raise InputError(msg)
    log.warning("%s (waiting for the cluster to grow)", msg)


def run_ray(job: BatchJob, rows: list[Row], sink: ChunkSink) -> None:
    """Answer ``rows`` on Ray; see the module docstring."""
    opts = job.ray
    assert opts is not None
    started = connect(opts.address, num_cpus=opts.num_cpus, object_store_mb=opts.object_store_mb)
    ray = import_ray()
    try:
        check_resources(opts, ray.cluster_resources(), strict=started)
        for batch in build_dataset(job, rows).iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["record"]:
                sink.add(json.loads(str(text)))
            sink.tick()
    finally:
        if started:
            ray.shutdown()
