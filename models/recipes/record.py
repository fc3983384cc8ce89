"""The training record of the committed weights: ``models/records/<model>.json``.

Training is the one slow step of the recipe (18 and 38 min on 2 cores), and everything after
it (quantization, evaluation, the bundle and its model card) only needs the committed fp32
files plus what the training run reported: the summary ``train.py`` writes to
``build/<model>/train.json`` and the wall times of the steps that made the committed files
(train, export, export_tflite). ``build_bundle`` saves both here after every full build, so
that a fresh clone can redo the later steps without retraining (``make -C models
requantize``):

    python -m recipes.record --model NAME --restore   # build/<model>/train.json + timings

A restored build uses the committed ``model.fp32.onnx`` and TFLite files as they are; the
record says so in the bundle's model card (``restored``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recipes import config
from recipes.timing import load_timings, record_timing

RECORDS_DIR = config.MODELS_DIR / "records"
# Steps whose outputs are the committed training artefacts (the rest is redone).
TRAINING_STEPS = ("train", "export", "export_tflite")


def record_path(spec: config.ModelSpec) -> Path:
    return RECORDS_DIR / f"{spec.name}.json"


def save_record(spec: config.ModelSpec) -> None:
    """Store build/<model>/train.json and the training steps' wall times (after a build)."""
    train = json.loads(spec.build("train.json").read_text(encoding="utf-8"))
    timings = load_timings(spec.name)
    record = {
        "train": train,
        "timings_s": {k: timings[k] for k in TRAINING_STEPS if k in timings},
    }
    previous = _load(spec)
    if previous is not None and "restored" in previous and train == previous["train"]:
        record["restored"] = previous["restored"]  # still the same recovered training run
    RECORDS_DIR.mkdir(parents=True, exist_ok=True)
    record_path(spec).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _load(spec: config.ModelSpec) -> dict[str, Any] | None:
    path = record_path(spec)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def restore_record(spec: config.ModelSpec) -> None:
    """Write build/<model>/train.json and the training steps' timings from the record."""
    record = _load(spec)
    if record is None:
        raise SystemExit(f"{record_path(spec)} is missing: train the model first "
                         f"(make -C models {spec.name})")
    spec.build_dir.mkdir(parents=True, exist_ok=True)
    spec.build("train.json").write_text(json.dumps(record["train"], indent=2) + "\n",
                                        encoding="utf-8")
    for step, seconds in record["timings_s"].items():
        record_timing(step, float(seconds), spec.name)
    print(f"{spec.name}: training record restored from {record_path(spec).name}")


def restored_note(spec: config.ModelSpec) -> str | None:
    """Where the record was recovered from, when it was not written by a training run."""
    record = _load(spec)
    note = None if record is None else record.get("restored")
    return str(note) if note else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", action="store_true", help="build/ -> models/records/")
    group.add_argument("--restore", action="store_true", help="models/records/ -> build/")
    args = parser.parse_args()
    spec = config.spec(args.model)
    if args.save:
        save_record(spec)
    else:
        restore_record(spec)


if __name__ == "__main__":
    main()
