"""The ``model`` and ``bench`` subcommands of ``iomt-agent`` (``agent.cli`` builds the parser).

As in ``agent.cli``, only the standard library is imported up front.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.cli_types import non_negative_int, positive_int

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def cmd_model_verify(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.model.guard import report_json, verify_bundle

    try:
        report = verify_bundle(args.bundle, runtime=args.runtime, intra_op_threads=args.threads)
    except AgentError as exc:  # the bundle or the runtime
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(report_json(report) if args.json else report.render())
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.bench import BenchOptions, main
    from agent.log import configure

    configure("warning", "console")  # choose_runner's info lines would break up the table
    options = BenchOptions(
        runs=10 if args.quick else args.runs,
        throughput_runs=3 if args.quick else args.throughput_runs,
        auto_rounds=1 if args.quick else 3,
        threads=tuple(args.threads or ()), batches=tuple(args.batch or (1, 4)),
        runtimes=tuple(args.runtime or ("onnxruntime", "litert")),
        progress=None if args.quiet else lambda text: print(f"... {text}", file=sys.stderr,
                                                            flush=True))
    return main([Path(b) for b in args.bundle or ()],
                Path(args.json) if args.json else None, options)


def count_list(text: str) -> list[int]:
    """'1,4' -> [1, 4]; each a positive integer (argparse turns ValueError into exit 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v > 256 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers from 1 to 256, got {text!r}")
    return sorted(set(values))


def runs_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 3:
        raise argparse.ArgumentTypeError("at least 3 (a p95 needs a few runs)")
    return value


def cmd_model_quantize(args: argparse.Namespace) -> int:
    from agent.model.contract import ContractError
    from agent.quantize import QuantizeError
    from agent.quantize.run import QuantizeOptions, quantize_bundle, render_table

    options = QuantizeOptions(
        fp32=Path(args.fp32), calibration_dir=Path(args.calibration), contract=Path(args.contract),
        out=Path(args.out), tflite=args.tflite, target_cpu=args.target_cpu,
        margin_db=args.margin_db, golden=args.golden, calibration=args.calibration_count,
        max_float_nodes=args.max_float_nodes, per_layer=args.per_layer, threads=args.threads,
        force=args.force)
    try:
        report = quantize_bundle(options)
    except ContractError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render_table(report))
    print(f"wrote {args.out} (report: {args.out}/quantize-report.json)")
    return EXIT_OK


def add_quantize_parser(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = msub.add_parser("quantize", help="int8-quantize a float ONNX model on your DICOMs into "
                        "a guarded bundle (exit 0 ok, 1 floor not reachable, 2 bad input)")
    m.add_argument("--fp32", required=True, metavar="MODEL.onnx", help="the float model")
    m.add_argument("--calibration", required=True, metavar="DICOM_DIR",
                   help="DICOM files (searched recursively) for calibration and the golden set")
    m.add_argument("--contract", required=True, metavar="CONTRACT.toml",
                   help="name, version, input/output contract, fidelity floor")
    m.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle to write")
    m.add_argument("--tflite", action="store_true",
                   help="also write model.int8.tflite (needs the convert extra)")
    m.add_argument("--target-cpu", choices=["host", "no-dot-product", "dot-product"],
                   default="host", help="the CPUs that will serve it: without int8 dot product "
                   "the weights must be saturation-safe (default: this host's /proc/cpuinfo)")
    m.add_argument("--margin-db", type=float, default=3.0,
                   help="safety margin above the floor the build must reach (default 3)")
    m.add_argument("--golden", type=positive_int, default=4,
                   help="golden inputs held out (default 4)")
    m.add_argument("--calibration-count", type=positive_int, default=64,
                   help="at most this many calibration inputs (default 64)")
    m.add_argument("--max-float-nodes", type=non_negative_int, default=None,
                   help="most nodes the sensitivity pass may keep in float (default: a quarter)")
    m.add_argument("--per-layer", action="store_true", help="report per-layer SQNR")
    m.add_argument("--threads", type=non_negative_int, default=0,
                   help="intra-op threads (0 = one per core)")
    m.add_argument("--force", action="store_true", help="replace a non-empty BUNDLE_DIR")
    m.set_defaults(func=cmd_model_quantize)
