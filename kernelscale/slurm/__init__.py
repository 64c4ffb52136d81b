"""Run a job on a Slurm cluster: an ingest job, a kernel job array, a gather job.

``kernelscale submit JOB.toml`` turns the job file into up to three Slurm jobs chained
with ``--dependency=afterok``:

1. **ingest** (CPU): simulate if the job says so, ingest the source files on dask
   workers, then create the kernel's output array (``kernel --create-only``) so the
   array tasks never race to create it. Left out when the store already holds every
   source file.
2. **kernel** (GPU): a job array with one task per *region* of the output
   (:class:`~kernelscale.plan.ArrayPlan`): a rectangle of tiles of the tile plan, on the
   output's chunk grid, so no two tasks write one chunk. Task ``i`` runs ``kernelscale
   kernel --rows a:b --cols c:d`` for region ``i`` with the plan's tile shape, which makes
   its tiles the very tiles a single-process run with that ``--tile`` computes (same
   operations, same bits on the same device). Only the regions not yet finished are
   submitted.
3. **gather** (CPU): ``kernelscale gather``: checks every tile of the plan against the
   done-markers, marks the kernel complete and evaluates it.

What is done is read from disk, whoever did it: a kernel finished by ``kernelscale run``
(the job's kernel: of its options over the store as it is now) is done for ``status``
and ``submit`` (:func:`~kernelscale.slurm.commands.job_state`). ``--set`` overrides of
the job file reach every script; the gather job is given them too.

Modules: :mod:`.geometry` (the output's shape before the store exists, and the array
plan), :mod:`.scripts` (sbatch scripts from the templates in ``templates/``),
:mod:`.queue` (every on-disk name of a submission, and the calls to sbatch, squeue and
scancel), :mod:`.commands` (``submit``, ``status``, ``gather``). Nothing needs Slurm
except submitting and the running part of ``status``.
"""

from .commands import gather, status, submit

__all__ = ["gather", "status", "submit"]
