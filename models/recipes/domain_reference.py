"""The bundle's domain reference (``domain.json``) from the recipe's own data, and its entry
in bundle.json. Touches no model file: the served and reference models stay byte-identical
(their digests in bundle.json too), so a shipped bundle gains the reference without being
rebuilt.

* fit set: every training slice under 3 draws of the training augmentation's scanner
  variations (``recipes.shifts.augment_in_distribution``), through the fp32 model;
* threshold: the 99.9th percentile of the distances of the held-out slab under 30 draws
  (seed A); how it fares across the whole head: the share of training slices over it out
  of fold (4 interleaved folds, every 4th slice, each scored by the metric fitted on the
  other three);
* false-alarm rate: the held-out slab under 30 other draws (seed B), never used above.

    python -m recipes.domain_reference --model t1w-to-t2w-lite
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from recipes import config
from recipes.context import context_stack
from recipes.runtime import make_session
from recipes.shifts import augment_in_distribution

sys.path.insert(0, str(config.MODELS_DIR.parent))
from agent.model.bundle import Normalisation
from agent.model.domain_reference import DomainReference, build_reference, install_reference
from agent.model.preprocess import normalise

FILE = "domain.json"
FIT_DRAWS = 3
HELD_DRAWS = 30
SEED_FIT, SEED_HELD, SEED_TEST = 101, 202, 303

NORM = Normalisation("robust_max", config.NORM_PERCENTILE, config.NORM_CLIP_MAX)
Pairs = list[tuple[np.ndarray, np.ndarray]]


def run_model(sess: object, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """[N, C, H, W] normalised inputs -> [N, H, W] outputs."""
    outs = [sess.run(["output"], {"input": x[i:i + batch]})[0]  # type: ignore[attr-defined]
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)[:, 0]


def pairs(sess: object, t1: np.ndarray, idx: np.ndarray, k: int, draws: int,
          seed: int) -> Pairs:
    """(normalised centre input, model output) of ``draws`` augmented copies of each slice."""
    rng = np.random.default_rng(seed)
    stacks = context_stack(t1, idx, k)
    x = np.stack([normalise(augment_in_distribution(s, rng), NORM)
                  for _ in range(draws) for s in stacks]).astype(np.float32)
    y = run_model(sess, x)
    return [(xi[k], yi) for xi, yi in zip(x, y, strict=True)]


def build(spec: config.ModelSpec) -> DomainReference:
    data = np.load(config.DATA_NPZ)
    sess = make_session(spec.bundle("model.fp32.onnx"))
    t1, k = data["t1"], spec.context
    train, hold = np.sort(data["train_idx"]), data["holdout_idx"]
    fit = pairs(sess, t1, train, k, FIT_DRAWS, SEED_FIT)
    # Interleaved folds by slice: every 4th slice of the head (all its draws) is out of fold.
    fold_of = np.tile(np.arange(len(train)), FIT_DRAWS).tolist()
    held = pairs(sess, t1, hold, k, HELD_DRAWS, SEED_HELD)
    test = pairs(sess, t1, hold, k, HELD_DRAWS, SEED_TEST)
    return build_reference(
        fit, held, folds=4, fold_of=fold_of, test=test,
        fit_source=f"{len(train)} MNI152 training slices x {FIT_DRAWS} draws of the training "
        "augmentation (scale 0.7-1.3, bias <= 0.2, Rician noise <= 0.02), fp32 model",
        held_out_source=f"held-out slab (MNI z index {hold[0]}..{hold[-1]}) x {HELD_DRAWS} "
        "draws of the same augmentation")


def install(spec: config.ModelSpec, reference: DomainReference) -> Path:
    """Write domain.json and add its entry to bundle.json (nothing else changes)."""
    install_reference(spec.bundle_dir, reference)
    return spec.bundle(FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config.add_model_argument(parser)
    args = parser.parse_args()
    spec = config.spec(args.model)
    reference = build(spec)
    path = install(spec, reference)
    held = reference.spec.held_out
    print(f"{path}: threshold {reference.threshold:.3f} on {held.slices} held-out slices, "
          f"false alarms on the second held-out set {held.false_alarm_rate}, out of fold "
          f"{held.out_of_fold_alarm_rate}")


if __name__ == "__main__":
    main()
