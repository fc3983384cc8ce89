"""Measure the domain-shift score against what shifts do to the output.

Every shift of ``recipes.shifts.SHIFTS`` is applied to the held-out slab of the MNI T1
template (with its neighbours for a 2.5D model); the bundle's fp32 model translates it, and
per slice we record the PSNR drop of the output against the simulated T2w reference (the
same anatomy, so the reference does not move with the shift) relative to the unshifted input,
and the score of the bundle's domain reference. Then:

* AUROC of the score for "the output loses >= 2 dB", pooled over every shifted slice and
  the in-distribution held-out draws, and per shift where both classes occur;
* the false-alarm rate (score >= 1.0) on held-out in-distribution slices (the training
  augmentation's variations, draws never used for the threshold);
* a plot of score against PSNR drop (PNG, drawn with numpy and the demo's bitmap font).

Writes ``records/<model>-domain.json`` and ``records/<model>-domain.png`` and the section
between the domain-shift markers of the model card.

    python -m recipes.domain_eval --model t1w-to-t2w-lite
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from recipes import config
from recipes.context import context_stack
from recipes.domain_plot import scatter_png
from recipes.domain_reference import HELD_DRAWS, NORM, SEED_TEST, run_model
from recipes.metrics import psnr
from recipes.runtime import make_session
from recipes.shifts import SHIFTS, Shift, Tissues, apply, augment_in_distribution, load_tissues

sys.path.insert(0, str(config.MODELS_DIR.parent))
from agent.model.bundle import load_bundle
from agent.model.domain_reference import DomainReference
from agent.model.preprocess import normalise

LOSS_DB = 2.0
MARGIN = 8  # slices each side of the slab the shifts also see (2.5D neighbours, thickness)
BEGIN, END = "<!-- domain-shift:begin -->", "<!-- domain-shift:end -->"


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both
    classes."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return round(float(greater / (len(pos) * len(neg))), 4)


class Bench:
    """The slab, its reference, the model and the score, for one bundle."""

    def __init__(self, spec: config.ModelSpec) -> None:
        data = np.load(config.DATA_NPZ)
        hold = data["holdout_idx"]
        self.lo, hi = int(hold[0]) - MARGIN, int(hold[-1]) + MARGIN + 1
        self.t1 = data["t1"][self.lo:hi]
        self.t2 = data["t2"][self.lo:hi]
        self.local = hold - self.lo
        self.target = data["t2"][hold]
        self.region = data["region"][hold]
        self.range = float(self.target.max())
        self.k = spec.context
        self.sess = make_session(spec.bundle("model.fp32.onnx"))
        bundle = load_bundle(spec.bundle_dir)
        if bundle.domain is None:
            raise SystemExit(f"{spec.name} has no domain.json: run recipes.domain_reference")
        self.reference: DomainReference = bundle.domain

    def run(self, volume: np.ndarray) -> tuple[list[float], list[float | None]]:
        """Per slab slice: PSNR (dB, brain region) and score of a T1 volume [Z, H, W]."""
        stacks = context_stack(volume, self.local, self.k)
        x = np.stack([normalise(s, NORM) for s in stacks]).astype(np.float32)
        return self.judge(x)

    def judge(self, x: np.ndarray, repeat: int = 1) -> tuple[list[float], list[float | None]]:
        y = run_model(self.sess, x)
        target, region = np.tile(self.target, (repeat, 1, 1)), np.tile(self.region, (repeat, 1, 1))
        db = [psnr(p, r, self.range, m) for p, r, m in zip(y, target, region, strict=True)]
        scores = [self.reference.score(xi[self.k], yi).score for xi, yi in zip(x, y, strict=True)]
        return db, scores

    def in_distribution(self) -> tuple[list[float], list[float | None]]:
        """The false-alarm set: the slab under draws of the training augmentation's
        intensity variations from a seed the threshold never saw (no turns or flips, so the
        output still lies on its reference)."""
        rng = np.random.default_rng(SEED_TEST + 1)
        stacks = context_stack(self.t1, self.local, self.k)
        x = np.stack([normalise(augment_in_distribution(s, rng, geometry=False), NORM)
                      for _ in range(HELD_DRAWS) for s in stacks]).astype(np.float32)
        db, scores = self.judge(x, HELD_DRAWS)
        return db, scores


def row(shift: Shift | None, drops: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    harmful = drops >= LOSS_DB
    flagged = scores >= 1.0
    return {
        "family": shift.family if shift else "in-distribution",
        "shift": shift.name if shift else "training augmentation, held-out draws",
        "slices": len(drops),
        "psnr_drop_median_db": round(float(np.median(drops)), 2),
        "harmful_share": round(float(harmful.mean()), 3),
        "score_median": round(float(np.median(scores)), 2),
        "flagged_share": round(float(flagged.mean()), 3),
        "false_alarm_rate": (round(float(flagged[~harmful].mean()), 3)
                             if (~harmful).any() else None),
        "missed_rate": round(float((~flagged[harmful]).mean()), 3) if harmful.any() else None,
        "auroc": auroc(scores, harmful),
        "series_flagged": bool(np.median(scores) >= 1.0),
    }


def evaluate(spec: config.ModelSpec) -> dict[str, Any]:
    bench = Bench(spec)
    tissues: Tissues = load_tissues().sub(bench.lo, bench.lo + len(bench.t1))
    base_db, base_scores = bench.run(bench.t1)
    base = np.array(base_db)
    rows, all_drops, all_scores = [], [], []
    id_db, id_scores = bench.in_distribution()
    id_drop = np.tile(base, HELD_DRAWS) - np.array(id_db)
    id_s = np.array([np.nan if s is None else s for s in id_scores])
    rows.append(row(None, id_drop, id_s))
    all_drops.append(id_drop)
    all_scores.append(id_s)
    for i, shift in enumerate(SHIFTS):
        rng = np.random.default_rng(1000 + i)
        db, scores = bench.run(apply(shift, bench.t1, bench.t2 / max(bench.range, 1e-6),
                                     tissues, rng))
        drops = base - np.array(db)
        s = np.array([np.nan if v is None else v for v in scores])
        rows.append(row(shift, drops, s))
        all_drops.append(drops)
        all_scores.append(s)
        print(f"{shift.name:40s} drop {rows[-1]['psnr_drop_median_db']:6.2f} dB  "
              f"score {rows[-1]['score_median']:6.2f}  flagged {rows[-1]['flagged_share']:.2f}",
              flush=True)
    drops, scores = np.concatenate(all_drops), np.concatenate(all_scores)
    scored = np.isfinite(scores)
    shifted = np.concatenate([np.zeros(len(id_drop), bool), np.ones(len(drops) - len(id_drop),
                                                                      bool)])
    harmless = scored & (drops < LOSS_DB)
    return {
        "model": spec.name,
        "loss_db": LOSS_DB,
        "threshold_distance": round(bench.reference.threshold, 3),
        "clean_psnr_median_db": round(float(np.median(base)), 2),
        "clean_score_max": round(float(np.nanmax(np.array(base_scores, dtype=float))), 3),
        "auroc": auroc(scores[scored], drops[scored] >= LOSS_DB),
        "auroc_shifted_only": auroc(scores[scored & shifted], drops[scored & shifted] >= LOSS_DB),
        "false_alarm_in_distribution": rows[0]["flagged_share"],
        "false_alarm_harmless_shifted": round(float((scores[harmless & shifted] >= 1).mean()), 3),
        "unscored_slices": int((~scored).sum()),
        "rows": rows,
        "points": {"drop_db": np.round(drops[scored], 2).tolist(),
                   "score": np.round(scores[scored], 3).tolist(),
                   "shifted": shifted[scored].tolist()},
    }


def card_section(result: dict[str, Any]) -> str:
    lines = [
        BEGIN, "## Domain-shift score (measured)", "",
        "The agent scores every input slice against `domain.json` (statistics of the training "
        "inputs; docs/bundle.md). **The score is a warning about the input, not a diagnosis "
        "of the output**: a score >= 1.0 says the slice lies outside what the model was "
        "built on, not that this output is wrong, and a score < 1.0 does not prove it right.",
        "",
        f"Simulated scanner shifts of the held-out slab (`python -m recipes.domain_eval`, "
        f"fp32 model; all SIMULATED from the MNI152 template): AUROC of the score for "
        f"\"the output loses >= {LOSS_DB:g} dB PSNR\" **{result['auroc']}** pooled "
        f"({result['auroc_shifted_only']} over the shifted slices alone); false alarms "
        f"(score >= 1.0) on held-out in-distribution slices "
        f"**{result['false_alarm_in_distribution'] * 100:.1f} %**; on shifted slices that "
        f"lose < {LOSS_DB:g} dB {result['false_alarm_harmless_shifted'] * 100:.1f} %. "
        f"Clean slab: {result['clean_psnr_median_db']} dB median, highest score "
        f"{result['clean_score_max']}.", "",
        "| shift | slices | median PSNR drop dB | lose >= 2 dB | median score | flagged | "
        "false alarms | missed | AUROC | series flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v * 100:.0f} %"
        lines.append(
            f"| {r['shift']} | {r['slices']} | {r['psnr_drop_median_db']} | "
            f"{pct(r['harmful_share'])} | {r['score_median']} | {pct(r['flagged_share'])} | "
            f"{pct(r['false_alarm_rate'])} | {pct(r['missed_rate'])} | "
            f"{'-' if r['auroc'] is None else r['auroc']} | "
            f"{'yes' if r['series_flagged'] else 'no'} |")
    lines += ["", f"Plot: `models/records/{result['model']}-domain.png` (score, log scale, "
              "against PSNR drop; dashed: score 1.0 and 2 dB).", END]
    return "\n".join(lines) + "\n"


def put_section(path: Any, section: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config.add_model_argument(parser)
    args = parser.parse_args()
    spec = config.spec(args.model)
    result = evaluate(spec)
    records = config.MODELS_DIR / "records"
    (records / f"{spec.name}-domain.json").write_text(json.dumps(result, indent=1) + "\n")
    p = result["points"]
    scatter_png(records / f"{spec.name}-domain.png", np.array(p["drop_db"]),
                np.array(p["score"]), np.array(p["shifted"]),
                title=f"{spec.name}: domain score vs PSNR drop")
    put_section(spec.bundle("MODEL_CARD.md"), card_section(result))
    print(f"AUROC {result['auroc']} (shifted only {result['auroc_shifted_only']}), "
          f"false alarms in distribution {result['false_alarm_in_distribution']}")


if __name__ == "__main__":
    main()
