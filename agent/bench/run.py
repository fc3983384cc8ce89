"""``iomt-agent bench``: every bundle x runtime x precision on this node.

For each bundle, one row per runtime (``agent.backends.RUNTIMES``) and precision: the fp32
reference (``bundle.reference_file(runtime)``) and the served file
(``bundle.backends[runtime]``, int8 in the shipped bundles). A row that cannot run (runtime
not installed, no file for it in ``bundle.json``, a file the runtime cannot load or run)
keeps its reason instead of figures. For the rows that run:

1. outputs on the bundle's golden inputs (random inputs of the contract's shape when it has
   none) give the fidelity against the fp32 reference outputs (``golden.npz``
   ``reference_output``, else the fp32 onnxruntime row's own outputs);
2. batch-1 latency at the largest thread count, the rows taking turns (``measure``);
3. throughput for each thread count x batch size, the rows taking turns again;
4. peak RSS, each row alone in a fresh process (``child``);
5. what ``backend = "auto"`` would choose (``agent.model.select.choose_runner``, no
   cache: it guards and times every runtime x {served, fp32} file itself), and why.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from agent.backends import (
    INSTALL_HINTS,
    RUNTIMES,
    BackendError,
    ModelRunner,
    RunnerOptions,
    open_runner,
    runtime_installed,
)
from agent.bench import measure
from agent.bench.child import measure_rss
from agent.bench.macs import MacCountError, count_macs
from agent.bench.results import (
    AutoChoice,
    BenchOptions,
    BenchResult,
    BundleResult,
    Machine,
    Row,
)
from agent.cpu import PeakEstimate, usable_cpus
from agent.model.bundle import BundleError, ModelBundle
from agent.model.guard import load_golden

RANDOM_INPUTS = 4  # items drawn for a bundle without a golden set


def _say(options: BenchOptions, text: str) -> None:
    if options.progress is not None:
        options.progress(text)


def plan_rows(bundle: ModelBundle, runtimes: tuple[str, ...]) -> list[Row]:
    """The rows of a bundle, with the reason for each one that cannot run."""
    rows = []
    for rt in runtimes:
        served = bundle.backends.get(rt)
        reference = bundle.reference_file(rt)
        for role, precision, file in (("reference", "fp32", reference),
                                      ("served", bundle.precision, served)):
            row = Row(rt, precision, role, file.path if file is not None else None)
            if file is None:
                where = (f"backends.{rt}" if role == "served" else
                         "reference" if rt == "onnxruntime" else f"references.{rt}")
                row.reason = f"bundle.json lists no {precision} file for {rt} ({where})"
            elif not runtime_installed(rt):
                row.reason = f"{rt} is not installed ({INSTALL_HINTS[rt]})"
            rows.append(row)
    return rows


def bundle_gmac(bundle: ModelBundle, item_shape: tuple[int, ...]) -> tuple[float | None, str]:
    """GMAC per item and where the figure comes from."""
    if bundle.gmac is not None:
        return bundle.gmac, "bundle.json compute.gmac"
    onnx_files = [f for f in (bundle.reference, bundle.backends.get("onnxruntime")) if f]
    if not onnx_files:
        return None, "unknown: no compute.gmac in bundle.json and no ONNX file to count"
    path = onnx_files[0].path
    try:
        macs = count_macs(path, bundle.input.input_name, item_shape)
    except ImportError:
        return None, "unknown: no compute.gmac in bundle.json, and counting needs `onnx`"
    except (MacCountError, OSError) as exc:
        return None, f"unknown: {exc}"
    return macs / 1e9, f"counted from {path.name}: Conv and MatMul MACs"


def _run_one(runner: ModelRunner, x: measure.Floats, r: int) -> object:
    i = r % len(x)
    return runner.run(x[i : i + 1])


def _run_batch(runner: ModelRunner, batch: measure.Floats, _r: int) -> object:
    return runner.run(batch)


def _open(bundle: ModelBundle, row: Row, threads: int) -> ModelRunner:
    assert row.path is not None
    return open_runner(row.runtime, str(row.path), RunnerOptions(
        intra_op_threads=threads, input_name=bundle.input.input_name,
        output_name=bundle.output.output_name))


def _first_pass(bundle: ModelBundle, rows: list[Row], x: measure.Floats,
                threads: int) -> tuple[dict[str, ModelRunner], dict[str, measure.Floats]]:
    """Open every runnable row and run the inputs through it once (batch 1)."""
    runners: dict[str, ModelRunner] = {}
    outputs: dict[str, measure.Floats] = {}
    for row in rows:
        if not row.ok:
            continue
        try:
            runner = _open(bundle, row, threads)
        except BackendError as exc:
            row.reason = f"cannot load: {exc}"
            continue
        try:
            outputs[row.key] = np.concatenate([runner.run(x[i : i + 1]) for i in range(len(x))])
        except Exception as exc:  # a runtime's own errors are untyped
            row.reason = f"fails on the inputs ({type(exc).__name__}: {exc})"
            runner.close()
            continue
        runners[row.key] = runner
    return runners, outputs


def _fidelity(rows: list[Row], outputs: dict[str, measure.Floats],
              golden_ref: measure.Floats | None) -> None:
    if golden_ref is not None:
        ref, label = golden_ref, "golden.npz reference_output"
    else:
        fp32 = [r for r in rows if r.role == "reference" and r.key in outputs]
        if not fp32:
            for row in rows:
                row.fidelity_note = "no golden set and no fp32 row ran: nothing to compare"
            return
        ref, label = outputs[fp32[0].key], f"the {fp32[0].runtime} fp32 row's outputs"
    for row in rows:
        if row.key in outputs:
            try:
                row.fidelity = measure.fidelity(outputs[row.key], ref, label)
            except ValueError as exc:
                row.fidelity_note = str(exc)


def _throughput(bundle: ModelBundle, rows: list[Row], runners: dict[str, ModelRunner],
                x: measure.Floats, options: BenchOptions) -> None:
    by_key = {r.key: r for r in rows}
    for threads in options.thread_counts:
        extra: dict[str, ModelRunner] = {}
        if threads == options.latency_threads:
            current = runners
        else:
            for key in runners:
                try:
                    extra[key] = _open(bundle, by_key[key], threads)
                except BackendError as exc:
                    by_key[key].notes.append(f"{threads} thread(s): cannot load ({exc})")
            current = extra
        try:
            for batch in options.batches:
                _say(options, f"{bundle.name}: throughput, {threads} thread(s), batch {batch}")
                xb = measure.items(x, batch)
                tasks = {}
                for key, runner in current.items():
                    # A model exported with a fixed batch size may refuse this one: that
                    # cell stays empty, the row keeps its other figures.
                    try:
                        runner.run(xb)
                    except Exception as exc:  # a runtime's own errors are untyped
                        note = f"batch {batch} fails ({type(exc).__name__}: {exc})"
                        if note not in by_key[key].notes:
                            by_key[key].notes.append(note)
                        continue
                    tasks[key] = functools.partial(_run_batch, runner, xb)
                for key, secs in measure.take_turns(tasks, options.throughput_runs).items():
                    by_key[key].throughput.append(measure.throughput(secs, threads, batch))
        finally:
            for runner in extra.values():
                runner.close()


def auto_choice(bundle: ModelBundle, threads: int, rounds: int,
                runtimes: tuple[str, ...] = RUNTIMES) -> AutoChoice:
    """What ``backend = "auto"`` would serve the bundle with (no cache), among
    ``runtimes`` (the agent itself considers them all)."""
    from agent.model.select import choose_runner
    from agent.model.serving import worker_plan

    # The agent's default config shares the cores out between two model workers when the
    # model is slow enough; its choice is then ranked as each worker runs it.
    plan = worker_plan() if threads >= usable_cpus() else None
    try:
        runner, choice = choose_runner(bundle, RunnerOptions(intra_op_threads=threads), None,
                                       runtimes=runtimes, rounds=rounds, plan=plan)
    except (BundleError, BackendError) as exc:  # GuardFailed is a BundleError
        return AutoChoice(None, str(exc))
    runner.close()
    return AutoChoice(choice.runtime, choice.reason,
                      tuple(c.as_dict() for c in choice.candidates), choice.precision)


def bench_bundle(bundle: ModelBundle, options: BenchOptions, peak: PeakEstimate) -> BundleResult:
    """Measure one bundle (see the module docstring)."""
    item_shape = (bundle.input_channels, *bundle.input.shape)
    golden_ref = None
    if bundle.golden is not None:
        x, golden_ref = load_golden(bundle)
        inputs = f"golden set, {len(x)} input(s)"
    else:
        x = np.random.default_rng(0).random((RANDOM_INPUTS, *item_shape), dtype=np.float32)
        inputs = f"{RANDOM_INPUTS} random inputs (no golden set)"
    gmac, gmac_source = bundle_gmac(bundle, item_shape)
    rows = plan_rows(bundle, options.runtimes)
    threads = options.latency_threads
    _say(options, f"{bundle.name}: loading {sum(r.ok for r in rows)} configuration(s)")
    runners, outputs = _first_pass(bundle, rows, x, threads)
    try:
        _fidelity(rows, outputs, golden_ref)
        _say(options, f"{bundle.name}: latency, {len(runners)} configuration(s) x "
             f"{options.runs} runs, taking turns")
        tasks = {k: functools.partial(_run_one, r, x) for k, r in runners.items()}
        by_key = {r.key: r for r in rows}
        for key, secs in measure.take_turns(tasks, options.runs).items():
            by_key[key].latency = measure.latency(secs, threads)
        _throughput(bundle, rows, runners, x, options)
    finally:
        for runner in runners.values():
            runner.close()
    for row in rows:
        if row.latency is None:
            continue
        row.peak_gmacs = peak.fp32_gmacs if row.precision == "fp32" else peak.int8_gmacs
        if gmac is not None:
            row.gmac_per_s = gmac / (row.latency.median_ms / 1000)
        _say(options, f"{bundle.name}: peak memory of {row.key} in a fresh process")
        assert row.path is not None
        try:
            row.rss = measure_rss(row.runtime, row.path, threads=threads,
                                  batch=max(options.batches), item_shape=item_shape,
                                  input_name=bundle.input.input_name,
                                  output_name=bundle.output.output_name)
        except RuntimeError as exc:
            row.rss_error = str(exc)
    _say(options, f"{bundle.name}: what backend = \"auto\" would choose")
    result = BundleResult(bundle, item_shape, inputs, gmac, gmac_source, rows)
    result.auto = auto_choice(bundle, threads, options.auto_rounds, options.runtimes)
    return result


def runtime_versions() -> dict[str, str]:
    """Installed runtimes and their versions."""
    from importlib import metadata

    found = {}
    for rt, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
                      ("litert", ("ai-edge-litert", "tflite-runtime"))):
        if not runtime_installed(rt):
            continue
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[rt] = f"{metadata.version(dist)} ({dist})" if rt == "litert" else (
                    metadata.version(dist))
                break
        found.setdefault(rt, "installed, version unknown")
    return found


def run_bench(bundles: list[ModelBundle], options: BenchOptions) -> BenchResult:
    """Identify the machine and measure every bundle in turn."""
    from datetime import UTC, datetime

    from agent.cpu import estimate_peak, read_cpu

    cpu = read_cpu()
    machine = Machine(cpu=cpu, peak=estimate_peak(cpu), runtimes=runtime_versions())
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    results = [bench_bundle(b, options, machine.peak) for b in bundles]
    return BenchResult(machine=machine, options=options, bundles=results, created=created)
