"""The ``kernelscale`` argument parser: every subcommand, its options and help, and the
command (:mod:`kernelscale.cli_commands`) it runs."""

from __future__ import annotations

import argparse
from typing import Any

from . import cli_commands as c
from .cli_commands import SLURM_OVERRIDES
from .version import __version__


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if ("%(default)" in h or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings
                or "default" in h):
            return h
        return h + " (default: %(default)s)"


DESCRIPTION = """\
The ensemble-correlation kernel of large ensembles of trained networks: ingest their
logits into a store, compute the kernel (tiled, resumable, on a GPU or the CPU), then
evaluate its k-NN classifier and write a report. `kernelscale run` runs a whole job file
(default: the bundled demo); `kernelscale COMMAND --help` explains each command."""

#: what ``--labels`` accepts (kernelscale.labels describes the formats)
LABELS_HELP = ("LABELS.npz (int arrays train, test; optional class_names), "
               "LABELS.train.npy with LABELS.test.npy (optional LABELS.class_names.npy), "
               "or cifar10:ROOT")


# --------------------------------------------------------------------------- parser

def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """-q, -v and --version, accepted before and after the subcommand.

    On subcommands their default is SUPPRESS, so an option given before the subcommand
    is not reset by the subparser's default.
    """
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("global options")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or progress lines", **kw)
    g.add_argument("-v", "--verbose", action="count",
                   help="more log output (-vv: debug)", **({"default": 0} if top else kw))
    g.add_argument("--version", action="version", version=f"kernelscale {__version__}")


def add_kernel_options(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    p.add_argument("--store", required=True, help="the store to read")
    if out:
        p.add_argument("--out", required=True, help="output Zarr group of the kernel")
        p.add_argument("--runs", type=int, help="use the first N runs (default: all)")
        p.add_argument("--pairs", default="test-train",
                       choices=["test-train", "train-train", "test-test"],
                       help="rows x columns of the kernel")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32"],
                   help="GEMM precision (tf32: ~3e-5 from float64, GPUs only)")
    p.add_argument("--max-memory", metavar="BYTES",
                   help="device memory budget, e.g. 40G (default: 80%% of a GPU, 1/4 of RAM)")
    if not out:
        return
    p.add_argument("--tile", metavar="ROWSxCOLS",
                   help="tile shape, multiples of the output chunks (default: planned)")
    p.add_argument("--chunks", metavar="ROWSxCOLS",
                   help="output chunk shape, new kernels only (default: 1024x4096)")
    p.add_argument("--rows", metavar="START:STOP", help="compute only these rows "
                   "(chunk-aligned)")
    p.add_argument("--cols", metavar="START:STOP", help="compute only these columns "
                   "(chunk-aligned)")
    p.add_argument("--runs-per-step", type=int, metavar="N",
                   help="runs folded into the kernel per GEMM (default: planned)")
    p.add_argument("--topk", type=int, metavar="K",
                   help="save each row's K largest values and their columns instead of the "
                   "full matrix (a square kernel leaves out each row's own column)")
    p.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                   help="seconds between checkpoints")
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
    p.add_argument("--k", type=int, default=3, help="neighbours")
    p.add_argument("--weighting", default="none", choices=["none", "power", "softmax"],
                   help="vote weight of a neighbour with kernel value K: 1, max(K,0)^p or "
                        "exp(K/T)")
    p.add_argument("--power", type=float, help="p of --weighting power (default 8)")
    p.add_argument("--temperature", type=float,
                   help="T of --weighting softmax (default 0.02)")
    p.add_argument("--train-kernel", metavar="KERNEL",
                   help="a train-train kernel (`kernelscale kernel --pairs train-train`) of "
                        "the same store and runs, or hf://datasets/...: select by "
                        "leave-one-out (implies --select)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting halves")
    _read_threads(p)


def _read_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-threads", type=int, metavar="N",
                   help="threads reading kernel rows (default: cores, at most 4)")


def _sub(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter,
                       allow_abbrev=False)
    _global_options(s, top=False)
    s.set_defaults(func=func)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernelscale", description=DESCRIPTION,
                                formatter_class=_Formatter, allow_abbrev=False)
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = _sub(sub, "simulate", "write a synthetic ensemble in the Hub's file layout",
             c.cmd_simulate)
    s.add_argument("--out", required=True, help="directory of the simulated files")
    s.add_argument("--runs", type=int, default=200, help="runs to simulate")
    s.add_argument("--files", type=int, default=2, help="log.pt files they are split into")
    s.add_argument("--n-train", type=int, default=2000, help="train examples")
    s.add_argument("--n-test", type=int, default=500, help="test examples")
    s.add_argument("--classes", type=int, default=10,
                   help="classes, any count >= 2 (named sim-0 .. sim-<C-1> in labels.npz)")
    s.add_argument("--seed", type=int, default=0, help="random seed")

    s = _sub(sub, "ingest", "ingest logits files (log.pt, safetensors, .npz/.npy, Zarr) into "
             "a Zarr store", c.cmd_ingest)
    s.add_argument("source", help="a directory of files, "
                   "hf://datasets/OWNER/NAME[@REVISION][/PATH] (endpoint: HF_ENDPOINT, "
                   "token: HF_TOKEN or `hf auth login`), or a Zarr group")
    s.add_argument("--store", required=True, help="the store to create or extend")
    s.add_argument("--glob", default="**/log.pt",
                   help="which files under SOURCE (hf://: matched against the path in the "
                   "repo or below PATH), e.g. '**/*.safetensors'; not for a Zarr group")
    s.add_argument("--format", choices=("auto", "logpt", "safetensors", "npy", "zarr"),
                   default="auto",
                   help="how files are read: auto decides each file by its content (and "
                   "reads a SOURCE that is a Zarr group as one); npy: .npz files, or .npy "
                   "files paired by name (PREFIX.TEST.npy + PREFIX.TRAIN.npy)")
    s.add_argument("--keys", metavar="TEST,TRAIN",
                   help="names of the test and train arrays: safetensors tensors, .npz "
                   "members, .npy name suffixes, Zarr arrays (default: logits,logits_train; "
                   "log.pt keeps its own)")
    s.add_argument("--max-files", type=int, metavar="N", help="the first N matching files")
    s.add_argument("--max-runs", type=int, metavar="N",
                   help="stop before a file that would take the store past N runs")
    s.add_argument("--skip-bad", action="store_true",
                   help="record bad files as rejected and go on (still exits non-zero)")
    s.add_argument("--shape", metavar="N_TESTxN_TRAINxCLASSES",
                   help="every file must have this shape (e.g. 10000x50000x10)")
    s.add_argument("--run-chunk", type=int, metavar="N",
                   help="runs per store chunk, new stores only (default: ~32 MB chunks)")
    s.add_argument("--revision", help="hf://: branch, tag or commit (default: main)")
    s.add_argument("--download-workers", type=int, default=4, metavar="N",
                   help="hf://: parallel downloads")
    s.add_argument("--retries", type=int, default=5, metavar="N",
                   help="hf://: retries per request on 5xx, timeouts, dropped connections")
    s.add_argument("--keep-downloads", action="store_true",
                   help="hf://: keep downloaded files in the Hub cache after ingesting")
    s.add_argument("--cache-dir", help="hf://: download cache (default: the Hub's, "
                   "HF_HUB_CACHE)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="convert N files at once on a dask LocalCluster of N processes "
                   "(default 1: no dask)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="use the workers of a running dask scheduler (e.g. "
                   "tcp://host:8786) instead of a LocalCluster")
    s.add_argument("--converters", type=int, default=2, metavar="N",
                   help="threads converting files in this process, for every source "
                   "(default 2)")
    s.add_argument("--device", default="auto",
                   help="where the statistics are computed: auto (a GPU if there is one), "
                   "cpu, cuda, cuda:N")
    s.add_argument("--labels", help="record these labels and class names in the store "
                   "(later commands use them unless given --labels): " + LABELS_HELP)
    s.add_argument("--labels-replace", action="store_true",
                   help="replace other labels the store holds (else an error)")
    s.add_argument("--dry-run", action="store_true",
                   help="print what would be downloaded and stored, and the disk needed; "
                   "download, create and change nothing")
    s.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan as one JSON object")

    s = _sub(sub, "ls", "what a Hub dataset or folder holds, by folder: files, sizes and "
             "runs, without downloading the files", c.cmd_ls)
    s.add_argument("source", help="hf://datasets/OWNER/NAME[@REVISION][/PATH] (endpoint: "
                   "HF_ENDPOINT, token: HF_TOKEN or `hf auth login`), a directory, or a "
                   "Zarr group")
    s.add_argument("--glob", default="**/*", help="which files (hf://: matched against the "
                   "path in the repo or below PATH)")
    s.add_argument("--depth", type=int, default=1,
                   help="folders this many levels below SOURCE (0: one row for all)")
    s.add_argument("--shape", metavar="N_TESTxN_TRAINxCLASSES",
                   help="the files' shape (default: from the first file's header per folder)")
    s.add_argument("--probe", default="100", metavar="N",
                   help="read the headers of at most N files per folder (log.pt, "
                   "safetensors, .npz, .npy pairs, Zarr groups; a few ranged reads of "
                   "~8-16 KiB each; 'all'); the others' runs come from their sizes")
    s.add_argument("--revision", help="hf://: branch, tag or commit (default: main)")
    s.add_argument("--retries", type=int, default=5, metavar="N",
                   help="hf://: retries per request on 5xx, timeouts, dropped connections")
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = _sub(sub, "kernel", "compute the kernel from a store", c.cmd_kernel)
    add_kernel_options(s)
    s.add_argument("--create-only", action="store_true",
                   help="only create the output array and its metadata (before parallel "
                   "--rows/--cols tasks start)")

    s = _sub(sub, "evaluate", "baselines and k-NN accuracy from a saved kernel",
             c.cmd_evaluate)
    s.add_argument("--store", required=True, help="the store the kernel was computed from")
    s.add_argument("--kernel", required=True, help="the test-train kernel")
    s.add_argument("--labels", help="default: the labels recorded in the store "
                   "(`ingest --labels`); " + LABELS_HELP)
    add_knn_options(s)
    s.add_argument("--select", action="store_true",
                   help="choose k and the weighting without test labels: leave-one-out on "
                        "--train-kernel if given, else 2-fold cross-fitting over test halves")
    s.add_argument("--ablations", metavar="DIR",
                   help="compute (or reuse) the per-class and no-log-softmax kernels in DIR "
                        "and report their k-NN accuracy")
    s.add_argument("--device", default="auto", help="for --ablations kernels: auto, cpu, "
                   "cuda")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--per-run", action="store_true",
                   help="with --json: include every run's accuracy")

    s = _sub(sub, "curve", "ensemble and kernel k-NN accuracy against the number of runs",
             c.cmd_curve)
    add_kernel_options(s, out=False)
    s.add_argument("--labels", help="default: the labels recorded in the store "
                   "(`ingest --labels`); " + LABELS_HELP)
    s.add_argument("--runs", required=True, metavar="N,N,...",
                   help="run counts, e.g. 10,20,50,100,200,500,all")
    s.add_argument("--out", default="curve",
                   help="directory of curve.json and the per-point kernels")
    s.add_argument("--k", type=int, default=3, help="k of the majority-vote k-NN")
    s.add_argument("--keep-kernels", action="store_true",
                   help="keep each point's kernel (OUT/kernel-runs-N) after scoring it")
    s.add_argument("--topk", type=int, metavar="K",
                   help="compute each point's kernel as a top-K kernel (K >= --k): memory "
                   "and disk do not grow with the train examples")
    s.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting halves")
    _read_threads(s)
    s.add_argument("--json", action="store_true", help="print the curve as one JSON object")

    s = _sub(sub, "report", "one self-contained HTML report of a kernel", c.cmd_report)
    s.add_argument("--store", required=True, help="the store the kernel was computed from")
    s.add_argument("--kernel", required=True, help="the test-train kernel (or "
                   "hf://datasets/OWNER/NAME[@REV]/PATH, downloaded and verified)")
    s.add_argument("--labels", help="default: the labels recorded in the store "
                   "(`ingest --labels`); " + LABELS_HELP)
    s.add_argument("--out", required=True, help="report directory (index.html + figures)")
    add_knn_options(s)
    s.add_argument("--curve", metavar="JSON", help="curve.json of `kernelscale curve`")
    s.add_argument("--compare", metavar="JSON", help="compare.json of `kernelscale compare` "
                   "(or its --out folder): a section comparing the kernel with another")
    s.add_argument("--ablations", metavar="DIR",
                   help="compute (or reuse) the per-class and no-log-softmax kernels in DIR")
    s.add_argument("--images", metavar="cifar10:ROOT",
                   help="images for the views (default: --labels when it is cifar10:ROOT)")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="kernel value above which a train example counts as very similar")
    s.add_argument("--examples", type=int, default=8, help="rows of each example view")
    s.add_argument("--device", default="auto", help="for --ablations kernels: auto, cpu, "
                   "cuda")

    s = _sub(sub, "neighbours", "the top-K kernel of a full kernel (the format of "
             "`kernel --topk K`)", c.cmd_neighbours)
    s.add_argument("--kernel", required=True, help="a finished full kernel (or "
                   "hf://datasets/OWNER/NAME[@REV]/PATH, downloaded and verified)")
    s.add_argument("--k", type=int, required=True, help="neighbours kept per row")
    s.add_argument("--out", required=True, help="output Zarr group of the top-K kernel")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing kernel of different inputs")
    _read_threads(s)

    s = _sub(sub, "compare", "how alike two kernels over the same examples are: neighbour "
             "overlap, rank correlation of rows, k-NN agreement", c.cmd_compare)
    s.add_argument("kernel_a", metavar="KERNEL_A", help="a finished kernel, full or top-K; "
                   "either may be hf://datasets/OWNER/NAME[@REV]/PATH (downloaded and "
                   "verified)")
    s.add_argument("kernel_b", metavar="KERNEL_B",
                   help="a finished kernel of the same pairs and shape (its store may differ)")
    s.add_argument("--labels", help="with labels: k-NN agreement, both accuracies and the "
                   "rows where the predictions differ; " + LABELS_HELP)
    s.add_argument("--k", type=int, default=10,
                   help="k of the k-NN and of the per-row neighbour overlap")
    s.add_argument("--out", metavar="DIR",
                   help="write compare.json and compare.png to DIR (default: print only)")
    s.add_argument("--sample", type=int, metavar="N",
                   help="two full kernels: rank correlation on N random rows even where "
                   "the exact one fits (default: exact up to 5e7 values, else 1000 rows)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampled rows")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    _read_threads(s)

    s = _sub(sub, "publish", "upload a kernel, results, a report or a job's workdir to a "
             "Hugging Face Hub dataset repo, with a dataset card", c.cmd_publish)
    s.add_argument("path", metavar="PATH", help="a kernel (full or top-K), a results.json, a "
                   "report folder or a job's workdir (its store and hidden, lock and temp "
                   "files are never uploaded)")
    s.add_argument("target", metavar="hf://datasets/OWNER/NAME[@BRANCH][/FOLDER]",
                   help="where: a kernel, report or file keeps its name inside FOLDER; a "
                   "workdir's contents go into FOLDER (token: HF_TOKEN or `hf auth login`)")
    s.add_argument("--create", action="store_true", help="create the repo when it is missing")
    s.add_argument("--private", action="store_true",
                   help="create it private; refuse to publish into an existing public repo")
    s.add_argument("--revision", metavar="BRANCH",
                   help="commit to this branch (created from the default one when missing; "
                   "default: main)")
    s.add_argument("--message", metavar="M", help="commit message")
    s.add_argument("--license", default="other",
                   help="license id in the card's metadata, e.g. cc-by-4.0")
    s.add_argument("--dry-run", action="store_true",
                   help="list what would be uploaded; create and upload nothing")

    s = _sub(sub, "info", "what a store or kernel holds", c.cmd_info)
    s.add_argument("path", help="a store or a kernel")

    s = _sub(sub, "verify", "check every chunk, checksum and count of a store or kernel",
             c.cmd_verify)
    s.add_argument("path", help="a store or a kernel")
    s.add_argument("--repair", nargs="?", const="", metavar="SOURCE",
                   help="a store: rewrite damaged chunks from the source files under SOURCE; "
                   "a kernel: mark the tiles holding damaged chunks for recomputation")

    s = _sub(sub, "bench", "benchmark the kernel engine against the published method",
             c.cmd_bench)
    s.add_argument("--out", default="bench-out", help="directory of the data and bench.json")
    s.add_argument("--ingest", action="store_true",
                   help="benchmark ingest and files -> kernel instead (bench-ingest.json)")
    s.add_argument("--n-test", type=int, default=1000, help="test examples")
    s.add_argument("--n-train", type=int, default=5000, help="train examples")
    s.add_argument("--classes", type=int, default=10, help="classes")
    s.add_argument("--runs", type=int, default=2000, help="runs of the main measurement")
    s.add_argument("--scaling", default="500,1000,2000,4000",
                   help="run counts of the scaling series ('' for none)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--precision", default="fp32", choices=["fp32", "tf32"],
                   help="GEMM precision")
    s.add_argument("--skip-reference", action="store_true",
                   help="do not run the published method")
    s.add_argument("--keep", action="store_true", help="keep the generated data")

    s = _sub(sub, "submit", "run a job on a Slurm cluster (ingest, kernel array, gather); "
             "again later: submit only what is missing", c.cmd_submit)
    s.add_argument("job", help="job file with a [slurm] table (or a bundled job's name)")
    s.add_argument("--workdir", help="override the job's workdir")
    _set_option(s)
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan and the sbatch scripts; submit nothing")
    for key, typ in SLURM_OVERRIDES.items():
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=typ,
                       help=f"override [slurm] {key}")

    s = _sub(sub, "status", "what a job has done (on Slurm or by `kernelscale run`), is "
             "doing and has left", c.cmd_status)
    s.add_argument("job", help="the job file given to submit")
    s.add_argument("--workdir", help="override the job's workdir")
    _set_option(s, "the same as given to submit")

    s = _sub(sub, "gather", "check every tile of a submitted kernel, mark it complete, "
             "evaluate", c.cmd_gather)
    s.add_argument("job", help="the job file given to submit")
    s.add_argument("--workdir", help="override the job's workdir")
    _set_option(s, "the same as given to submit")
    s.add_argument("--no-evaluate", action="store_true", help="skip the [evaluate] stage")

    s = _sub(sub, "run", "run the stages a job file names", c.cmd_run)
    s.add_argument("job", nargs="?", help="job file or bundled job's name (default: the "
                   "bundled demo)")
    s.add_argument("--workdir", help="override the job's workdir (as --set job.workdir=DIR)")
    s.add_argument("--device", help="override the kernel device")
    _set_option(s)
    s.add_argument("--only", action="append", metavar="STAGE[,STAGE...]",
                   help="run only these stages (repeatable): simulate, ingest, kernel, "
                   "evaluate, compare, curve, report, publish; each must find what it "
                   "reads (a store, a finished kernel) there or made by an earlier one")
    s.add_argument("--dry-run", action="store_true",
                   help="print the resolved job (a job file run accepts) and the stages it "
                   "would run, in order; run nothing")
    return p


def _set_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--set", action="append", metavar="TABLE.FIELD=VALUE",
                   help="override a value of the job file, read and checked as the file's "
                   "own (repeatable), e.g. --set kernel.max_memory=40G --set "
                   "ingest.source=hf://datasets/OWNER/NAME/FOLDER"
                   + (f"; {note}" if note else ""))
