"""A batch job from end to end: find the rows, skip those already done, run, write, report.

``run_batch(job)`` discovers the input's rows (``inputs.discover``), opens the output (``output``:
the ids it already holds are skipped, so a rerun resumes), and hands the remaining rows to the
local runner (``local.run_local``: one process, the continuous-batching engine) or, with
``job.ray`` set, to the Ray Data runner (``ray_data.run_ray``). Both give their records to a
``job.ChunkSink`` (chunked writes, progress bar with rate and ETA from tqdm). The returned
``Summary`` says how many rows were done, failed, skipped and how long it took.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .inputs import Row, discover
from .job import BatchJob, ChunkSink, Summary
from .output import open_output

log = logging.getLogger(__name__)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise InputError('the progress bar needs tqdm: pip install "minicpmv[batch]" (or pass --no-progress)') from e
    return tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, smoothing=0.1)


def run_batch(job: BatchJob) -> Summary:
    """Run ``job`` (see the module docstring); returns what happened."""
    started = time.perf_counter()
    if job.ray is not None:
        from .ray_setup import import_ray

        import_ray()  # a missing extra fails before any file is listed
    _refuse_input_as_output(job)
    found = discover(job.input, default_prompt=job.prompt)
    writer = open_output(job.output)
    todo: list[Row] = [r for r in found.rows if r.id not in writer.done]
    summary = Summary(rows=len(found.rows), already_done=len(found.rows) - len(todo),
                      skipped_files=found.skipped_files)
    if summary.already_done:
        log.info("%s already holds %d of the %d rows; doing the other %d", job.output, summary.already_done,
                 summary.rows, len(todo))
    bar = _progress(len(found.rows), summary.already_done, job.progress)
    sink = ChunkSink(writer, chunk_rows=job.chunk_rows, chunk_seconds=job.chunk_seconds, progress=bar)
    try:
        if todo:
            if job.ray is not None:
                from .ray_data import run_ray  # Ray is imported only here, through ray_setup

                run_ray(job, todo, sink)
            else:
                from .local import run_local

                run_local(job, todo, sink)
    finally:
        sink.flush()  # on an interrupt too: every finished row reaches the output
        writer.close()
        if bar is not None:
            bar.close()
    summary.written, summary.failed, summary.duplicates = writer.written, writer.failed, writer.duplicates
    summary.seconds = time.perf_counter() - started
    return summary


def _refuse_input_as_output(job: BatchJob) -> None:
    if Path(job.input).is_file() and Path(job.input).resolve() == Path(job.output).resolve():
        raise InputError(f"the output {job.output} is the input table; give another output file")
