"""Command line: merge safetensors checkpoints tensor by tensor.

    python -m merging_kernels merge --base base.safetensors \\
        --experts math.safetensors code.safetensors --method ties --density 0.2 \\
        --out merged.safetensors

(also installed as the ``merging-kernels`` console script). The merge streams:
it holds one tensor per model at a time (the base's, each expert's and the
merged one), never a whole model, and writes the output through an atomic
:class:`~merging_kernels.safetensors_io.SafetensorsWriter`, so a failed or
refused merge leaves no output file. The result equals the in-memory
:func:`~merging_kernels.task_arithmetic` / :func:`~merging_kernels.ties_merging`
/ :func:`~merging_kernels.dare_merging` on the whole state dicts: DARE masks
are keyed by tensor name, and ``--trim-scope model`` first finds the
per-task thresholds over the whole model in three streamed radix-select
passes (:func:`~merging_kernels.streamed_magnitude_thresholds`).

Exit status: 0 on success, 2 when the input is refused (bad options,
unreadable or mismatched checkpoints, non-finite task vectors; one line on
stderr says why), 1 when the output cannot be written, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from .errors import BackendUnavailableError, MergeOverflowError
from .ops.philox import tensor_key
from .ops.task_vectors import merge_task_vectors, streamed_magnitude_thresholds, task_vector_torch
from .safetensors_io import SafetensorsReader, SafetensorsWriter

PROG = "merging-kernels"
METHODS = {"ta": "task arithmetic", "ties": "TIES", "dare": "DARE"}
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_DENSITY = 0.2

EXIT_OK, EXIT_WRITE_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """Input the command refuses; ``main`` prints it on one line and returns ``code``."""

    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become one-line :class:`CLIError` s instead of usage dumps and SystemExit."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Model merging with fused task-vector kernels.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    merge = commands.add_parser(
        "merge", help="merge expert checkpoints (.safetensors) into one, streaming tensor by tensor",
        description="Merge K fine-tuned experts of one base model (.safetensors files with the same tensor\n"
                    "names, shapes and dtypes) into one checkpoint, streaming tensor by tensor. Floating-point\n"
                    "tensors are merged; others (integer buffers, masks) are copied from the base.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n"
               "  ta    task arithmetic: base + sum_k w_k (expert_k - base); with --drop-rate p: DARE + TA\n"
               "  ties  TIES: keep the top --density of each task vector, elect signs, average the agreeing\n"
               "        entries, times --scale (with --drop-rate: DARE-TIES)\n"
               "  dare  DARE: drop each task-vector entry with probability --drop-rate, rescale by 1/(1-p),\n"
               "        then task arithmetic\n\n"
               "example:\n"
               f"  {PROG} merge --base base.safetensors --experts a.safetensors b.safetensors \\\n"
               "      --method ties --density 0.2 --scale 1.0 --out merged.safetensors")
    merge.add_argument("--base", required=True, metavar="BASE", help="the pretrained checkpoint (.safetensors)")
    merge.add_argument("--experts", required=True, nargs="+", metavar="EXPERT",
                       help="fine-tuned checkpoints of the same architecture (.safetensors), one per task")
    merge.add_argument("--method", required=True, choices=sorted(METHODS), help="merging method (see below)")
    merge.add_argument("--out", required=True, metavar="OUT", help="where to write the merged .safetensors")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W",
                       help="task coefficients: one number for all experts or one per expert (default 1; for "
                            "ta/dare this is lambda)")
    merge.add_argument("--density", type=float, metavar="RHO",
                       help=f"ties: fraction of each task vector kept, in (0, 1] (default {DEFAULT_DENSITY})")
    merge.add_argument("--scale", type=float, metavar="LAMBDA", help="ties: multiplier of the merged task vector "
                                                                     "(default 1)")
    merge.add_argument("--trim-scope", choices=("tensor", "model"),
                       help="ties: trim per tensor (mergekit, default) or over the whole model (FusionBench)")
    merge.add_argument("--drop-rate", type=float, metavar="P",
                       help="DARE drop probability in [0, 1) (required for dare; optional for ta and ties)")
    merge.add_argument("--seed", type=int, default=0, help="DARE seed, 0 <= seed < 2**64 (default 0)")
    merge.add_argument("--dtype", choices=sorted(OUT_DTYPES),
                       help="dtype of the merged tensors (default: each base tensor's dtype)")
    merge.add_argument("--backend", choices=("torch", "triton", "native"),
                       help="kernel backend (default: the fastest available)")
    merge.add_argument("--device", help="device to merge on, e.g. cpu or cuda (default: cuda for the triton "
                                        "backend, or when CUDA is available and no backend is named; else cpu)")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    merge.set_defaults(handler=merge_command)

    info = commands.add_parser("info", help="list the tensors of a .safetensors file",
                               description="Print the metadata and each tensor's name, dtype and shape.")
    info.add_argument("file", metavar="FILE")
    info.set_defaults(handler=info_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args)
    except CLIError as exc:
        _error(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _error("interrupted; no output was written")
        return EXIT_INTERRUPTED


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


# --------------------------------------------------------------------------- merge


class MergeSettings:
    """The validated options of one merge."""

    def __init__(self, args: argparse.Namespace):
        method = args.method
        num_experts = len(args.experts)
        for option, value in (("--density", args.density), ("--scale", args.scale),
                              ("--trim-scope", args.trim_scope)):
            if value is not None and method != "ties":
                raise CLIError(f"{option} applies to --method ties only"
                               + (" (for ta and dare, --weights are the coefficients)" if option == "--scale" else ""))
        if method == "dare" and args.drop_rate is None:
            raise CLIError("--method dare needs --drop-rate P, the drop probability in [0, 1) (e.g. 0.9)")
        self.method = method
        self.weights = [1.0] if args.weights is None else list(args.weights)
        if len(self.weights) not in (1, num_experts):
            raise CLIError(f"--weights takes one number or one per expert ({num_experts}), got {len(self.weights)}")
        if not all(math.isfinite(w) for w in self.weights):
            raise CLIError(f"--weights must be finite numbers, got {self.weights}")
        if len(self.weights) == 1:
            self.weights = self.weights * num_experts
        self.density = None
        if method == "ties":
            self.density = DEFAULT_DENSITY if args.density is None else args.density
            if not (0.0 < self.density <= 1.0):  # False for NaN too
                raise CLIError(f"--density must be in (0, 1], got {self.density}")
        self.scale = 1.0 if args.scale is None else args.scale
        if not math.isfinite(self.scale):
            raise CLIError(f"--scale must be a finite number, got {self.scale}")
        self.trim_scope = args.trim_scope or "tensor"
        self.drop_rate = 0.0 if args.drop_rate is None else args.drop_rate
        if not (0.0 <= self.drop_rate < 1.0):
            raise CLIError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
        if not (0 <= args.seed < 2**64):
            raise CLIError(f"--seed must be in [0, 2**64), got {args.seed}")
        self.seed = args.seed
        self.out_dtype = OUT_DTYPES[args.dtype] if args.dtype else None
        self.backend = args.backend
        if args.device is not None:
            try:
                self.device = torch.device(args.device)
            except (RuntimeError, ValueError):
                raise CLIError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        elif args.backend == "triton" or (args.backend is None and torch.cuda.is_available()):
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
        if self.device.type == "meta":  # shapes only: nothing to merge (other devices run the torch reference)
            raise CLIError(f"--device {args.device!r} holds no data; merge on cpu, cuda or another real device")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"device {self.device} is not available (no CUDA device)"
                           + ("; the triton backend needs one" if args.backend == "triton" else ""))
        try:  # another device type (mps, xla, ...) may name no backend this torch has: ask it for memory once
            torch.empty(0, device=self.device)
        except Exception as exc:  # RuntimeError, or an ImportError from a backend torch loads lazily
            reason = str(exc).splitlines()[0].split(". ")[0]  # torch's first sentence, not its list of backends
            raise CLIError(f"device {self.device} is not available here ({reason})") from None

    @property
    def trims_model(self) -> bool:
        return self.method == "ties" and self.trim_scope == "model" and self.density < 1.0

    def op_options(self) -> dict:
        """Keyword arguments of merge_task_vectors, as the in-memory method would pass them."""
        options = dict(drop_rate=self.drop_rate, seed=self.seed, out_dtype=self.out_dtype, backend=self.backend)
        if self.method == "ties":
            options.update(scale=self.scale, density=self.density, trim_scope=self.trim_scope, elect_sign=True,
                           normalize=True)
        return options

    def describe(self, experts: Sequence[str]) -> dict:
        config = {"method": self.method, "weights": self.weights, "experts": [os.path.basename(e) for e in experts]}
        if self.method == "ties":
            config.update(density=self.density, scale=self.scale, trim_scope=self.trim_scope)
        if self.drop_rate > 0:
            config.update(drop_rate=self.drop_rate, seed=self.seed)
        return config


def _open(path: str, role: str) -> SafetensorsReader:
    try:
        return SafetensorsReader(path)
    except FileNotFoundError:
        raise CLIError(f"{role} {path} does not exist") from None
    except IsADirectoryError:
        raise CLIError(f"{role} {path} is a directory, not a .safetensors file") from None
    except OSError as exc:
        raise CLIError(f"cannot read {role} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(f"{role}: {exc}") from None


def _read(reader: SafetensorsReader, name: str, device: torch.device) -> torch.Tensor:
    try:
        tensor = reader.get_tensor(name)
    except OSError as exc:
        raise CLIError(f"cannot read tensor {name!r} from {reader.path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return tensor.to(device) if device.type != "cpu" else tensor


def _check_same_architecture(base: SafetensorsReader, experts: Sequence[SafetensorsReader]) -> None:
    for expert in experts:
        for name in base.names:
            if name not in expert:
                raise CLIError(f"expert {expert.path} has no tensor {name!r} (the base {base.path} has it)")
        for name in expert.names:
            if name not in base:
                raise CLIError(f"expert {expert.path} has tensor {name!r}, which the base {base.path} lacks")
        for name in base.names:
            b, e = base.info(name), expert.info(name)
            if b.shape != e.shape:
                raise CLIError(f"tensor {name!r} has shape {list(e.shape)} in expert {expert.path} but "
                               f"{list(b.shape)} in the base {base.path}")
            if b.dtype != e.dtype:
                raise CLIError(f"tensor {name!r} has dtype {_dtype_name(e.dtype)} in expert {expert.path} but "
                               f"{_dtype_name(b.dtype)} in the base {base.path}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output(out: str, inputs: Sequence[str]) -> None:
    if not out or not os.path.basename(out):  # "" or "dir/": no file name to write
        raise CLIError(f"--out {out!r} names no file; give a file name")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CLIError(f"the output directory {directory} does not exist")
    if os.path.isdir(out):
        raise CLIError(f"--out {out} is a directory; give a file name")
    for path in inputs:
        if os.path.exists(out) and _same_file(out, path):
            raise CLIError(f"--out {out} is one of the inputs ({path}); write the merge to a new file")


def _progress(total: int, desc: str, disabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(_NoProgress())
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=True if disabled else None,
                leave=False, dynamic_ncols=True)


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


def _nonfinite_experts(base: torch.Tensor, experts: Sequence[torch.Tensor], paths: Sequence[str]) -> list[str]:
    """The experts whose task vector, as the merge computes it, holds NaN or inf."""
    return [p for e, p in zip(experts, paths) if not torch.isfinite(task_vector_torch(e, base)).all()]


def merge_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = MergeSettings(args)
    _check_output(args.out, [args.base, *args.experts])
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(_open(args.base, "base"))
        experts = [stack.enter_context(_open(path, "expert")) for path in args.experts]
        _check_same_architecture(base, experts)

        merged_names = []
        for name in base.names:
            dtype = base.dtype(name)
            if dtype.is_floating_point:
                if dtype not in MERGEABLE_DTYPES:
                    raise CLIError(f"tensor {name!r} in {base.path} has dtype {_dtype_name(dtype)}; merging supports "
                                   "float32, float16, bfloat16 and float64")
                merged_names.append(name)
        if settings.trims_model:
            wide = [n for n in merged_names if base.dtype(n) == torch.float64]
            if wide:
                raise CLIError(f"--trim-scope model selects thresholds on float32 magnitudes; tensor {wide[0]!r} in "
                               f"{base.path} is float64 (use --trim-scope tensor)")
        merged_set = set(merged_names)
        options = settings.op_options()
        weights = torch.tensor(settings.weights, dtype=torch.float64)
        device = settings.device

        try:
            thresholds = None
            if settings.trims_model:
                thresholds = _model_thresholds(base, experts, merged_names, settings, args.no_progress)

            specs = [(name, (settings.out_dtype or base.dtype(name)) if name in merged_set else base.dtype(name),
                      base.shape(name)) for name in base.names]
            metadata = dict(base.metadata or {})
            metadata["merging_kernels"] = json.dumps(settings.describe(args.experts), separators=(",", ":"))
            num_params = 0
            try:
                writer = SafetensorsWriter(args.out, specs, metadata=metadata)
            except OSError as exc:
                raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}", EXIT_WRITE_FAILED) from None
            with writer, _progress(len(specs), "merging", args.no_progress) as bar:
                for name in base.names:
                    base_tensor = _read(base, name, device)
                    if name in merged_set:
                        expert_tensors = [_read(e, name, device) for e in experts]
                        try:
                            (result,) = merge_task_vectors(
                                [base_tensor], [[e] for e in expert_tensors], weights,
                                tensor_keys=[tensor_key(name)], names=[name], thresholds=thresholds, **options)
                        except MergeOverflowError:  # finite in float32, beyond the output dtype: written as inf
                            out_dtype = settings.out_dtype or base_tensor.dtype
                            raise CLIError(f"tensor {name!r}: the merge overflows {_dtype_name(out_dtype)} (|value| > "
                                           f"{torch.finfo(out_dtype).max:.4g}); write a wider --dtype or use smaller "
                                           "--weights/--scale") from None
                        except (ValueError, TypeError) as exc:
                            bad = _nonfinite_experts(base_tensor, expert_tensors, [e.path for e in experts])
                            if bad:
                                raise CLIError(f"tensor {name!r}: NaN or inf in expert - base for expert(s) "
                                               f"{', '.join(bad)}") from None
                            raise CLIError(f"cannot merge tensor {name!r}: {exc}") from None
                        del expert_tensors
                    else:
                        result = base_tensor  # integer buffers, masks: the base's
                    num_params += result.numel()
                    try:
                        writer.write(name, result)
                    except OSError as exc:
                        raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}", EXIT_WRITE_FAILED) \
                            from None
                    del base_tensor, result
                    bar.update(1)
        except BackendUnavailableError as exc:
            raise CLIError(str(exc)) from None
        except OSError as exc:  # fsync / rename at close
            raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}", EXIT_WRITE_FAILED) from None

    seconds = time.perf_counter() - start
    copied = len(specs) - len(merged_names)
    print(f"{METHODS[settings.method]}: merged {len(merged_names)} tensor(s)"
          + (f", copied {copied} from the base" if copied else "")
          + f" ({num_params:,} parameters) from {len(experts)} expert(s) in {seconds:.2f} s -> {args.out}")
    return EXIT_OK


def _model_thresholds(base, experts, names, settings: MergeSettings, no_progress: bool) -> torch.Tensor:
    """(1, K) model-scope trim thresholds, streaming the checkpoints once per radix pass."""
    device = settings.device
    total = sum(math.prod(base.shape(n)) for n in names)
    with _progress(3 * len(names), "thresholds", no_progress) as bar:
        def chunks():
            for name in names:
                b = _read(base, name, device)
                yield [b], [[_read(e, name, device)] for e in experts], [tensor_key(name)]
                bar.update(1)

        try:
            return streamed_magnitude_thresholds(
                chunks, num_tasks=len(experts), total_numel=total, density=settings.density,
                drop_rate=settings.drop_rate, seed=settings.seed, device=device, backend=settings.backend)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"cannot select the model-scope thresholds: {exc}") from None


# --------------------------------------------------------------------------- info


def info_command(args: argparse.Namespace) -> int:
    with _open(args.file, "file") as reader:
        infos = reader.infos()
        if reader.metadata:
            for key, value in reader.metadata.items():
                print(f"# {key}: {value}")
        width = max([len(i.name) for i in infos] + [4])
        for i in infos:
            print(f"{i.name:<{width}}  {_dtype_name(i.dtype):<9} {list(i.shape)}")
        print(f"{len(infos)} tensor(s), {sum(i.numel for i in infos):,} parameters, "
              f"{sum(i.nbytes for i in infos):,} bytes")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
