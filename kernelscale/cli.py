"""The ``kernelscale`` command line.

Every user error is a :class:`~kernelscale.errors.KernelscaleError`: printed as one line
``kernelscale: error: ...`` and a non-zero exit status (2; 75 for a stage that stopped on
a signal after checkpointing, so a batch wrapper can requeue it).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

from .errors import ConfigError, Interrupted, KernelscaleError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8G', '512MiB', '1e9' -> bytes (powers of 1024 for suffixes)."""
    m = _SIZE.match(text)
    if not m:
        try:
            return int(float(text))
        except ValueError:
            raise ConfigError(f"cannot read {text!r} as a size (e.g. 8G, 512M)") from None
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_range(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--{what} {text!r}: expected START:STOP")
    return int(m.group(1)), int(m.group(2))


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """'10000x50000x10' -> (n_test, n_train, classes)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ConfigError(f"shape {text!r}: expected N_TESTxN_TRAINxCLASSES, e.g. 10000x50000x10")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--{what} {text!r}: expected ROWSxCOLS")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------- commands

def cmd_simulate(a: argparse.Namespace) -> int:
    from .simulate import simulate

    t0 = time.monotonic()
    s = simulate(a.out, runs=a.runs, files=a.files, n_train=a.n_train, n_test=a.n_test,
                 classes=a.classes, seed=a.seed, progress=not a.quiet)
    print(f"simulate: {s.runs} runs in {len(s.files)} file(s) to {a.out} "
          f"(train {s.n_train}, test {s.n_test}, classes {s.classes}, seed {s.seed}) in "
          f"{time.monotonic() - t0:.1f} s")
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    if a.source.startswith("hf://"):
        from .hub import ingest_hub

        s = ingest_hub(a.source, a.store, glob=a.glob, max_files=a.max_files,
                       max_runs=a.max_runs, revision=a.revision, cache_dir=a.cache_dir,
                       workers=a.download_workers, retries=a.retries,
                       keep_downloads=a.keep_downloads, skip_bad=a.skip_bad,
                       run_chunk=a.run_chunk, show_progress=not a.quiet,
                       shape=parse_shape(a.shape))
    else:
        from .ingest import ingest_local
        from .parallel import parallel_preparer

        with parallel_preparer(a.workers, a.scheduler) as preparer:
            s = ingest_local(a.source, a.store, glob=a.glob, max_files=a.max_files,
                             max_runs=a.max_runs, skip_bad=a.skip_bad,
                             run_chunk=a.run_chunk, show_progress=not a.quiet,
                             preparer=preparer, shape=parse_shape(a.shape))
    print(s.line())
    if s.errors:
        for e in s.errors:
            print(f"kernelscale: error: {e}", file=sys.stderr)
        return 1
    return 0


def kernel_config_from_args(a: argparse.Namespace):  # noqa: ANN201
    from .kernel import KernelConfig

    classes = None
    if a.cls is not None:
        classes = tuple(int(c) for c in a.cls.split(","))
    return KernelConfig(
        store=Path(a.store), out=Path(a.out), runs=a.runs, pairs=a.pairs, device=a.device,
        precision=a.precision,
        max_memory=parse_bytes(a.max_memory) if a.max_memory else None,
        tile=parse_pair(a.tile, "tile"), chunks=parse_pair(a.chunks, "chunks"),
        rows=parse_range(a.rows, "rows"), cols=parse_range(a.cols, "cols"),
        checkpoint_every=a.checkpoint_every, log_softmax=not a.no_log_softmax,
        log_softmax_fp32=a.log_softmax_fp32,
        classes=classes, overwrite=a.overwrite, restart=a.restart,
        show_progress=not a.quiet, run_chunk=a.run_chunk)


def cmd_kernel(a: argparse.Namespace) -> int:
    from .kernel import compute_kernel

    if a.prepare_only:
        from .kernel import prepare_output

        out = prepare_output(kernel_config_from_args(a))
        print(f"kernel: output {a.out} ready, shape {tuple(out.array.shape)} chunks "
              f"{out.chunks}")
        return 0
    s = compute_kernel(kernel_config_from_args(a))
    print(s.line())
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .sources import load_labels
    from .store import Store

    st = Store.open(a.store)
    labels = load_labels(a.labels, n_train=st.shape.n_train, n_test=st.shape.n_test,
                         classes=st.shape.classes)
    ev = evaluate(a.store, a.kernel, labels, k=a.k, weighting=a.weighting, power=a.power,
                  temperature=a.temperature, select=a.select, train_kernel=a.train_kernel,
                  seed=a.seed, ablations_dir=a.ablations, device=a.device,
                  workers=a.workers, show_progress=not a.quiet)
    if a.json:
        print(json.dumps(ev.as_json(), sort_keys=True))
    else:
        print(ev.table())
    return 0


def cmd_curve(a: argparse.Namespace) -> int:
    from .curve import CurveConfig, compute_curve, curve_table

    doc = compute_curve(CurveConfig(
        store=Path(a.store), labels=a.labels, runs=a.runs, out=Path(a.out), k=a.k,
        device=a.device, precision=a.precision,
        max_memory=parse_bytes(a.max_memory) if a.max_memory else None,
        keep_kernels=a.keep_kernels, seed=a.seed, workers=a.workers,
        show_progress=not a.quiet))
    if a.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        print(curve_table(doc))
        print(f"curve: {doc['path']}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import ReportConfig, build_report

    path = build_report(ReportConfig(
        store=Path(a.store), kernel=Path(a.kernel), labels=a.labels, out=Path(a.out),
        train_kernel=Path(a.train_kernel) if a.train_kernel else None,
        curve=Path(a.curve) if a.curve else None,
        ablations=Path(a.ablations) if a.ablations else None, images=a.images, k=a.k,
        weighting=a.weighting, power=a.power, temperature=a.temperature,
        threshold=a.threshold, examples=a.examples, seed=a.seed, device=a.device,
        workers=a.workers, show_progress=not a.quiet))
    print(f"report: {path}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .kernel import describe_kernel
    from .store import Store

    p = Path(a.path)
    if Store.exists(p):
        print(Store.open(p).describe())
    else:
        print(describe_kernel(p))
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .jobs import run_job

    job = a.job or default_job()
    return run_job(job, workdir=a.workdir, quiet=a.quiet, device=a.device)


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    scaling = [int(x) for x in a.scaling.split(",")] if a.scaling else []
    run_bench(Path(a.workdir), n_test=a.n_test, n_train=a.n_train, runs=a.runs,
              classes=a.classes, device=a.device, precision=a.precision, scaling=scaling,
              skip_reference=a.skip_reference, keep=a.keep)
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    from .slurm import submit

    return submit(a.job, workdir=a.workdir, dry_run=a.dry_run,
                  overrides=slurm_overrides(a))


def cmd_status(a: argparse.Namespace) -> int:
    from .slurm import status

    return status(a.job, workdir=a.workdir)


def cmd_gather(a: argparse.Namespace) -> int:
    from .slurm import gather

    return gather(a.job, workdir=a.workdir, evaluate=not a.no_evaluate)


#: ``kernelscale submit`` options that override keys of the job's [slurm] table
SLURM_OVERRIDES = {"partition": str, "account": str, "time": str, "mem": str, "gres": str,
                   "cpus_per_task": int, "tasks": int, "max_parallel": int,
                   "signal_lead": int, "max_requeues": int}


def slurm_overrides(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in SLURM_OVERRIDES if getattr(a, k) is not None}


def default_job() -> str:
    local = Path("jobs/demo.toml")
    if local.is_file():
        return str(local)
    return str(Path(__file__).resolve().parent.parent / "jobs" / "demo.toml")


# --------------------------------------------------------------------------- parser

def add_kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="the store to read")
    p.add_argument("--out", required=True, help="output Zarr group for the kernel")
    p.add_argument("--runs", type=int, help="use the first N runs (default: all)")
    p.add_argument("--pairs", default="test-train",
                   choices=["test-train", "train-train", "test-test"])
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or tf32")
    p.add_argument("--max-memory", help="device memory budget, e.g. 40G")
    p.add_argument("--tile", help="tile shape ROWSxCOLS (multiples of the output chunks)")
    p.add_argument("--chunks", help="output chunk shape ROWSxCOLS (new kernels only)")
    p.add_argument("--rows", help="compute only rows START:STOP (chunk-aligned)")
    p.add_argument("--cols", help="compute only cols START:STOP (chunk-aligned)")
    p.add_argument("--run-chunk", type=int, help="runs folded per step (default: auto)")
    p.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--no-log-softmax", action="store_true",
                   help="ablation: correlate raw logits instead of log-softmax")
    p.add_argument("--log-softmax-fp32", action="store_true",
                   help="evaluate the log-softmax in float32 as the published code does "
                        "(to reproduce its numbers; up to ~6e-3 from the float64 formula "
                        "on confident predictions)")
    p.add_argument("--class", dest="cls", metavar="C[,C...]",
                   help="ablation: kernel of these classes only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing kernel of different inputs")
    p.add_argument("--restart", action="store_true",
                   help="discard a partial kernel / checkpoints of different inputs")


def add_knn_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=3, help="neighbours (default 3)")
    p.add_argument("--weighting", default="none", choices=["none", "power", "softmax"],
                   help="vote weight of a neighbour with kernel value K: 1, max(K,0)^p or "
                        "exp(K/T)")
    p.add_argument("--power", type=float, help="p of --weighting power (default 8)")
    p.add_argument("--temperature", type=float,
                   help="T of --weighting softmax (default 0.02)")
    p.add_argument("--train-kernel", metavar="KERNEL",
                   help="a train-train kernel (`kernelscale kernel --pairs train-train`) of "
                        "the same store and runs: select by leave-one-out (implies --select)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting halves")
    p.add_argument("--workers", type=int, help="threads reading kernel rows (default: cores, "
                                               "at most 4)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernelscale", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a synthetic ensemble in the Hub's layout")
    s.add_argument("out")
    s.add_argument("--runs", type=int, default=200)
    s.add_argument("--files", type=int, default=2)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-test", type=int, default=500)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("ingest", help="ingest log.pt files into a Zarr store")
    s.add_argument("source", help="a directory of log.pt files, or "
                   "hf://datasets/OWNER/NAME[@REVISION][/PATH] (endpoint: HF_ENDPOINT, "
                   "token: HF_TOKEN or `hf auth login`)")
    s.add_argument("--store", required=True)
    s.add_argument("--glob", default="**/log.pt",
                   help="which files under SOURCE (hf://: matched against the path in the "
                   "repo or below PATH)")
    s.add_argument("--max-files", type=int)
    s.add_argument("--max-runs", type=int)
    s.add_argument("--skip-bad", action="store_true",
                   help="record bad files as rejected and go on (still exits non-zero)")
    s.add_argument("--shape", metavar="N_TESTxN_TRAINxCLASSES",
                   help="every file must have this shape (e.g. 10000x50000x10)")
    s.add_argument("--run-chunk", type=int, help="runs per store chunk (new stores only)")
    s.add_argument("--revision", help="hf://: branch, tag or commit (default: main)")
    s.add_argument("--download-workers", type=int, default=4, metavar="N",
                   help="hf://: parallel downloads (default 4)")
    s.add_argument("--retries", type=int, default=5, metavar="N",
                   help="hf://: retries per request on 5xx, timeouts, dropped connections")
    s.add_argument("--keep-downloads", action="store_true",
                   help="hf://: keep downloaded files in the Hub cache after ingesting")
    s.add_argument("--cache-dir", help="hf://: download cache (default: the Hub's, HF_HUB_CACHE)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="local sources: validate and convert N files at once on a dask "
                   "LocalCluster of N processes (default 1: no dask)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="local sources: use the workers of a running dask scheduler "
                   "(e.g. tcp://host:8786) instead of a LocalCluster")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("kernel", help="compute the kernel from a store")
    add_kernel_options(s)
    s.add_argument("--prepare-only", action="store_true",
                   help="only create the output array and its metadata (before parallel "
                   "--rows/--cols tasks start)")
    s.set_defaults(func=cmd_kernel)

    s = sub.add_parser("evaluate", help="baselines and k-NN accuracy from a saved kernel")
    s.add_argument("--store", required=True)
    s.add_argument("--kernel", required=True)
    s.add_argument("--labels", required=True, help="labels.npz or cifar10:ROOT")
    add_knn_options(s)
    s.add_argument("--select", action="store_true",
                   help="choose k and the weighting without test labels: leave-one-out on "
                        "--train-kernel if given, else 2-fold cross-fitting over test halves")
    s.add_argument("--ablations", metavar="DIR",
                   help="compute (or reuse) the per-class and no-log-softmax kernels in DIR "
                        "and report their k-NN accuracy")
    s.add_argument("--device", default="auto", help="for --ablations kernels: auto|cpu|cuda")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("curve", help="ensemble and kernel k-NN accuracy against the "
                                     "number of runs")
    s.add_argument("--store", required=True)
    s.add_argument("--labels", required=True, help="labels.npz or cifar10:ROOT")
    s.add_argument("--runs", required=True, metavar="N,N,...",
                   help="run counts, e.g. 10,20,50,100,200,500,all")
    s.add_argument("--out", default="curve",
                   help="directory for curve.json and the per-point kernels (default: curve)")
    s.add_argument("--k", type=int, default=3, help="k of the majority-vote k-NN")
    s.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]")
    s.add_argument("--precision", default="fp32", help="fp32 (default) or tf32")
    s.add_argument("--max-memory", help="device memory budget, e.g. 40G")
    s.add_argument("--keep-kernels", action="store_true",
                   help="keep each point's kernel (OUT/kernel-runs-N) after scoring it")
    s.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting halves")
    s.add_argument("--workers", type=int, help="threads reading kernel rows")
    s.add_argument("--json", action="store_true", help="print the curve as one JSON object")
    s.set_defaults(func=cmd_curve)

    s = sub.add_parser("report", help="one self-contained HTML report of a kernel")
    s.add_argument("--store", required=True)
    s.add_argument("--kernel", required=True, help="the test-train kernel")
    s.add_argument("--labels", required=True, help="labels.npz or cifar10:ROOT")
    s.add_argument("--out", required=True, help="report directory (index.html + figures)")
    add_knn_options(s)
    s.add_argument("--curve", metavar="JSON", help="curve.json of `kernelscale curve`")
    s.add_argument("--ablations", metavar="DIR",
                   help="compute (or reuse) the per-class and no-log-softmax kernels in DIR")
    s.add_argument("--images", metavar="cifar10:ROOT",
                   help="images for the views (default: --labels when it is cifar10:ROOT)")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="kernel value above which a train example counts as very similar")
    s.add_argument("--examples", type=int, default=8, help="rows of each example view")
    s.add_argument("--device", default="auto", help="for --ablations kernels: auto|cpu|cuda")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("info", help="what a store or kernel holds")
    s.add_argument("path")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("bench", help="benchmark the kernel engine against the reference")
    s.add_argument("--workdir", default="bench-out")
    s.add_argument("--n-test", type=int, default=1000)
    s.add_argument("--n-train", type=int, default=5000)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--runs", type=int, default=2000)
    s.add_argument("--scaling", default="500,1000,2000,4000",
                   help="run counts for the scaling series ('' for none)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", default="fp32")
    s.add_argument("--skip-reference", action="store_true")
    s.add_argument("--keep", action="store_true", help="keep the generated data")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("submit", help="run a job on a Slurm cluster (ingest, kernel array, "
                       "gather); again later: submit only what is missing")
    s.add_argument("job", help="job file with a [slurm] table")
    s.add_argument("--workdir", help="override the job's workdir")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan and the sbatch scripts; submit nothing")
    for key, typ in SLURM_OVERRIDES.items():
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=typ,
                       help=f"override [slurm] {key}")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", help="what a submitted job has done, is doing and has left")
    s.add_argument("job")
    s.add_argument("--workdir", help="override the job's workdir")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("gather", help="check every tile of a submitted kernel, mark it "
                       "complete, evaluate")
    s.add_argument("job")
    s.add_argument("--workdir", help="override the job's workdir")
    s.add_argument("--no-evaluate", action="store_true", help="skip the [evaluate] stage")
    s.set_defaults(func=cmd_gather)

    s = sub.add_parser("run", help="run the stages a job file names")
    s.add_argument("job", nargs="?", help="job file (default: jobs/demo.toml)")
    s.add_argument("--workdir", help="override the job's workdir")
    s.add_argument("--device", help="override the kernel device")
    s.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda m, c, *_: f"kernelscale: warning: {m}\n"
    args = build_parser().parse_args(argv)
    if args.command == "kernel":
        from .kernel import catch_signals_early

        catch_signals_early()
    try:
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KernelscaleError as e:
        print(f"kernelscale: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kernelscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
