"""``iomt-agent``: thin subcommands over the library. Exit codes: 0 ok, 1 failure, 2 bad
configuration or usage.

Only the standard library is imported up front, so that ``run`` and ``receive`` have their
stop-signal handlers (``agent.signals``) in place before anything slow is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.cli_bridges import add_gateway_parser, add_stow_flags, stow_settings
from agent.cli_certs import add_certs_parser
from agent.cli_init import add_init_parser
from agent.cli_keys import add_keys_parser
from agent.cli_model import (
    add_quantize_parser,
    cmd_bench,
    cmd_model_verify,
    count_list,
    runs_count,
)
from agent.cli_types import non_negative_int, positive_float, positive_int
from agent.fleet.cli import add_fleet_parser
from agent.signals import StopRequested, StopSignals

if TYPE_CHECKING:
    from agent.config import Config

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _load(path: str) -> Config:
    from agent.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _with_identity(config: Config, role: str, args: argparse.Namespace) -> Config:
    """The config with ``--cert``/``--key`` as ``role``'s client certificate: ``send`` as the
    scanner gateway, ``receive`` as the cloud consumer, where the brokers' ACLs say who may
    publish scans and read results."""
    if args.key and not args.cert:
        print("error: --key needs --cert (the certificate it belongs to)", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    if not args.cert:
        return config
    if not getattr(config, role).tls:
        print(f"error: --cert needs TLS: {role}.url is not mqtts://", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    broker = getattr(config, role).model_copy(update={
        "cert_file": Path(args.cert).resolve(),
        "key_file": Path(args.key).resolve() if args.key else None})
    return config.model_copy(update={role: broker})


def _identity_flags(s: argparse.ArgumentParser, who: str) -> None:
    s.add_argument("--cert", help=f"client certificate (PEM) for mutual TLS, e.g. {who}'s; "
                   "default: the config's")
    s.add_argument("--key", help="its private key (default: in the --cert file)")


def cmd_config_check(args: argparse.Namespace) -> int:
    args.path = args.path or args.config_path
    config = _load(args.path)
    from agent.config import ConfigError
    from agent.log import configure
    from agent.ops.preflight import check

    configure("error", "json")  # --guard: the load's own lines, and the runtimes' native
    # output as events (agent.backends.native_stderr), stay below this level
    found = check(config, guard=args.guard)
    for warning in found.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if found.problems:
        print(ConfigError(args.path, found.problems).render(), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.path}: ok")
    for note in found.notes:
        print(f"  {note}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    with StopSignals() as stop:  # SIGTERM / SIGINT while starting: a clean exit 0
        try:
            return _run(args, stop)
        except StopRequested as exc:
            from agent.log import ensure_configured, get_logger

            ensure_configured()  # the signal may have come before the config was read
            get_logger("agent.cli").info("agent_stopped", signal=exc.signal_name,
                                         during="start-up")
            return EXIT_OK


def _run(args: argparse.Namespace, stop: StopSignals) -> int:
    from agent.log import configure, get_logger

    configure()  # until the config says otherwise: a stop while loading it is logged
    config = _load(args.config)
    configure(config.log.level, config.log.format)
    from agent.daemon.service import Agent
    from agent.errors import AgentError
    from agent.model.guard import GuardFailed

    log = get_logger("agent.cli")
    try:
        agent = Agent(config, args.config)
    except GuardFailed as exc:  # a BundleError: caught first, for its own event and figures
        summary = exc.report.summary()
        summary["fix"] = (f"{exc.report.fix or 'rebuild the bundle'}; `iomt-agent model "
                          "verify BUNDLE --runtime R` prints the figures")
        log.error("model_refused", model=exc.report.bundle, **summary)
        return EXIT_CONFIG
    except AgentError as exc:  # a bundle, key file or runtime that cannot serve
        log.error("cannot_start", error=str(exc))
        return EXIT_CONFIG
    agent.install_signal_handlers()  # from here on a stop signal is the agent's clean stop
    if stop.reload_requested:  # a SIGHUP while starting: the file may have changed since
        agent.request_reload()
    stop.ready()
    if stop.signal_name is not None:
        # A stop while starting whose StopRequested never reached this frame: Python drops an
        # exception raised where it cannot propagate (a weakref callback, such as the import
        # system's module-lock cleanup, or a __del__), printing "Exception ignored".
        raise StopRequested(stop.signal_name)
    return agent.run()


def cmd_send(args: argparse.Namespace) -> int:
    from agent.log import configure
    from agent.ops.sender import send_files

    config = _with_identity(_load(args.config), "edge", args)
    configure(config.log.level, config.log.format)
    paths = [Path(item) for item in args.paths]
    for p in paths:
        if not (p.is_dir() or p.is_file()):
            print(f"error: {p} does not exist", file=sys.stderr)
            return EXIT_FAIL
    from agent.ops.sender import collect
    from agent.transport.tls import TLSFilesError
    from agent.transport.topics import TopicError, Topics

    try:
        Topics(config.agent.site, config.agent.device_id).scan(args.source)
    except TopicError as exc:
        print(f"error: --source {args.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not collect(paths):
        print(f"error: no files in {', '.join(map(str, paths))}: give DICOM files or "
              "directories that hold them", file=sys.stderr)
        return EXIT_FAIL

    try:
        if args.confirm:
            from agent.ops.sender import send_confirmed

            ok = send_confirmed(config, paths, args.source, args.timeout)
            return EXIT_OK if ok else EXIT_FAIL
        return EXIT_OK if send_files(config, paths, args.source, args.timeout) else EXIT_FAIL
    except TLSFilesError as exc:  # --cert / --key or the config's edge files
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_receive(args: argparse.Namespace) -> int:
    with StopSignals() as stop:
        try:
            from agent.cloud.consumer import receive, report
            from agent.errors import AgentError
            from agent.log import configure, get_logger

            config = _with_identity(_load(args.config), "cloud", args)
            configure(config.log.level, config.log.format)
            stow = stow_settings(args)
            if (problem := _out_dir_problem(Path(args.out))) is not None:
                print(f"error: --out {args.out}: {problem}: give a directory for the results",
                      file=sys.stderr)
                return EXIT_CONFIG
            stop.ready()
            try:
                summary = receive(config, Path(args.out), count=args.count,
                                  timeout=args.timeout, errors=args.errors, stop=stop.event,
                                  stow=stow)
            except AgentError as exc:  # key files, the receiver section
                get_logger("agent.receive").error("cannot_receive", error=str(exc))
                return EXIT_CONFIG
            summary.signal_name = stop.signal_name
            return report(summary, args.count)
        except StopRequested as exc:  # before receiving began
            from agent.log import ensure_configured, get_logger

            ensure_configured()
            get_logger("agent.receive").info("receive_stopped", signal=exc.signal_name,
                                             filed=0, during="start-up")
            return EXIT_INTERRUPTED if exc.signal_name == "SIGINT" else EXIT_OK


def _out_dir_problem(out: Path) -> str | None:
    """Why results cannot be filed in ``out`` (created if missing), or None."""
    import os

    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return "a file is in the way"
    except OSError as exc:
        return f"cannot create it ({exc.strerror})"
    return None if os.access(out, os.W_OK | os.X_OK) else "not writable by this user"


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.ops.doctor import main as doctor

    return doctor(args.config, timeout=args.timeout)


def cmd_sample(args: argparse.Namespace) -> int:
    from agent.demo.mni_sample import write_sample

    try:
        paths = write_sample(Path(args.dir), args.count)
    except ValueError as exc:  # --count out of range
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # DIR not empty, or not writable
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"wrote {len(paths)} T1w slices of the MNI152 template to {args.dir} (not for "
          "diagnostic use; the template's copyright notice is in each file's ImageComments)")
    print(f"next: iomt-agent send --config CONFIG {args.dir}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo.run import DemoError, run_demo
    from agent.log import configure
    from agent.model.bundle import BundleError

    configure("warning", "console")
    try:
        if args.dicom:
            from agent.demo.dicom_chain import run_dicom_demo

            return run_dicom_demo(Path(args.workdir), slices=args.slices)
        return run_demo(Path(args.workdir), slices=args.slices,
                        bundle=Path(args.bundle) if args.bundle else None)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iomt-agent",
        description="Edge inference agent: DICOM scans in over MQTT, int8 translation on the "
        "node, sealed results out.",
    )
    p.add_argument("--version", action="version", version=f"iomt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_init_parser(sub)

    s = sub.add_parser("run", help="run the agent (the daemon)")
    s.add_argument("--config", required=True, help="path to agent.toml")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("send", help="publish DICOM files to the site's scan topic")
    s.add_argument("--config", required=True, help="path to agent.toml")
    s.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="DICOM files or directories")
    s.add_argument("--source", default="gateway", help="last topic level (scanner/gateway name)")
    s.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for acks")
    s.add_argument("--confirm", action="store_true", help="wait for the agent's receipt of "
                   "each scan, resending unconfirmed ones (docs/reliability.md)")
    _identity_flags(s, "the scanner gateway")
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("receive", help="the cloud consumer: verify, decrypt and file results")
    s.add_argument("--config", required=True, help="path to agent.toml (needs [receiver])")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--count", type=positive_int,
                   help="stop once this many scans are accounted for: results (filed now, "
                   "or redelivered and found filed by an earlier run) and error reports; exit "
                   "0 when all were results. What arrives meanwhile is filed too, not left")
    s.add_argument("--timeout", type=positive_float,
                   help="stop after this many seconds (exit 1 when --count was not reached)")
    s.add_argument("--no-errors", dest="errors", action="store_false",
                   help="do not take the agents' error reports (shown by default); a session "
                   "that took them before stops, and skips those queued for it")
    _identity_flags(s, "the cloud consumer")
    add_stow_flags(s)
    s.set_defaults(func=cmd_receive)

    add_gateway_parser(sub)

    s = sub.add_parser("config", help="configuration tools")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    c = csub.add_parser("check", help="validate what `run` would refuse (file, keys, bundle, "
                        "runtime) without loading the model; exit 2 when it would",
                        description="Checks the file, every key file (private ones 0600), "
                        "the broker files, the bundle (every sha256) and the runtime. The int8 "
                        "accuracy guard runs the model: only with --guard. No broker is contacted.")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("path", nargs="?", help="path to agent.toml")
    where.add_argument("--config", dest="config_path", metavar="PATH",
                       help="the same, as run and doctor take it")
    c.add_argument("--guard", action="store_true",
                   help="also load the model as `run` does and run the int8 accuracy guard")
    c.set_defaults(func=cmd_config_check)

    s = sub.add_parser("doctor", help="check this node: config, keys, certificates, brokers, "
                       "model, disk (exit 0 ok, 1 a check failed, 2 the config is invalid)")
    s.add_argument("--config", required=True, help="path to agent.toml")
    s.add_argument("--timeout", type=positive_float, default=5.0, help="seconds per network check")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("model", help="model bundle tools")
    msub = s.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    m = msub.add_parser("verify", help="run the int8 accuracy guard on a bundle's golden set "
                        "and print the figures (exit 0 pass, 1 fail, 2 bad bundle)")
    m.add_argument("bundle", help="model bundle directory")
    m.add_argument("--runtime", default="onnxruntime", help="runtime to verify on")
    m.add_argument("--threads", type=non_negative_int, default=0,
                   help="intra-op threads (0 = one per core)")
    m.add_argument("--json", action="store_true", help="print the full report as JSON")
    m.set_defaults(func=cmd_model_verify)
    add_quantize_parser(msub)

    s = sub.add_parser(
        "bench", help="time every bundle x runtime x precision on this node: latency, "
        "throughput, peak memory, fidelity, GMAC/s vs the CPU's estimated peak",
        description="Benchmark model bundles on this node. Rows: each bundle x installed "
        "runtime x precision (fp32 reference, served int8); rows take turns so machine noise "
        "hits them alike. Exit 0 when it ran, 1 when nothing could be measured, 2 for a bad "
        "argument or bundle.")
    s.add_argument("--bundle", action="append", metavar="DIR",
                   help="a model bundle (repeatable; default: every bundle under models/)")
    s.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    s.add_argument("--runtime", action="append", choices=["onnxruntime", "litert"],
                   help="only this runtime (repeatable; default: both)")
    s.add_argument("--runs", type=runs_count, default=40, metavar="N",
                   help="timed batch-1 runs per row for the latency (default 40)")
    s.add_argument("--threads", type=count_list, metavar="N[,N...]",
                   help="thread counts for the throughput (default: 1 and every core); the "
                   "latency uses the largest")
    s.add_argument("--batch", type=count_list, metavar="N[,N...]",
                   help="batch sizes for the throughput (default 1,4)")
    s.add_argument("--throughput-runs", type=runs_count, default=8, metavar="N",
                   help="timed batches per throughput cell (default 8)")
    s.add_argument("--quick", action="store_true",
                   help="a fast pass: 10 latency runs, 3 per throughput cell "
                   "(overrides --runs and --throughput-runs)")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=cmd_bench)

    add_certs_parser(sub)
    add_keys_parser(sub)

    s = sub.add_parser("demo", help="the main job on one machine with an embedded broker")
    s.add_argument("--workdir", default="demo-work", help="where to put config, keys, results")
    s.add_argument("--slices", type=positive_int, default=24,
                   help="number of slices to send (1-24)")
    s.add_argument("--bundle", help="model bundle (default: models/t1w-to-t2w-lite)")
    s.add_argument("--dicom", action="store_true", help="scanner -> archive instead: storescu "
                   "-> gateway -> Mosquitto -> agent -> receive --stow-url -> Orthanc (needs "
                   "dcmtk, mosquitto, orthanc, orthanc-dicomweb; files in WORKDIR/dicom-chain)")
    s.set_defaults(func=cmd_demo)

    add_fleet_parser(sub)

    s = sub.add_parser("sample", help="write the sample T1w series (MNI152 template) for send")
    s.add_argument("dir", help="directory to write slice001.dcm... into (new or empty)")
    s.add_argument("--count", type=int, default=24,
                   help="number of slices (1-24, default 24)")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C in a short command: one line, not a traceback
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
