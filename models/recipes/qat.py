"""Quantization-aware fine-tuning: a trained float U-Net learns weights that survive the
int8 file onnxruntime's quantizer will make of it (``recipes.quantize``, ``u8s8_rr``).

Post-training quantization of lite 1.1.0 with every conv in int8 lost 0.23 dB on the
training slices (0.1 dB is what the recipe allows), and keeping its first and last conv in
float to save 0.13 of it cost int8 part of its lead over fp32 on CPUs without a dot product
(1.18-1.32x against 1.26-1.39x; models/README.md). So the float model is fine-tuned for a
few hundred steps with the quantizer's rounding in its forward pass, at the places the
quantizer puts it:

- every conv's weights, per output channel, symmetric, recomputed from the current weights
  at every step, as the quantizers compute them from the final ones; on alternate steps
  onnxruntime's 7 bits (``reduce_range``: scale = max |w| / 64, integers -64..64) and
  LiteRT's 8 bits (ai-edge-quantizer: max |w| / 127, -127..127). The two grids do not nest,
  so the weights must hold under both. Tried on lite-s2h32 (held-out slab, int8 against
  fp32): the 7-bit grid alone, onnxruntime -0.12 dB and LiteRT -0.31 (-0.52 with the
  weights snapped to that grid); 7 bits on two steps of three, onnxruntime -0.30 and LiteRT
  +0.05; alternate steps (pilot lite-s2h32q), onnxruntime -0.02 (``u8s8_rr_fl``; its
  all-int8 ``u8s8_rr`` lost 0.13 dB on the training slices, where the recipe allows 0.1)
  and LiteRT -0.23;
- every tensor that a QuantizeLinear follows in the int8 graph: the conv input after the
  stem, each conv's output after its ReLU, each concat, the head's output; unsigned 8 bits
  over [min(0, lo), max(0, hi)] (asymmetric), lo and hi the min and max over the
  quantizer's own calibration slices (its MinMax calibration), measured again every
  ``RECALIBRATE_EVERY`` steps as the weights move. Max-pool and nearest resize keep their
  input's scale in the int8 graph, so they get no rounding of their own.

Gradients pass the rounding straight through (torch's fake-quantize ops). The exported
file holds the fine-tuned float weights, which each quantizer then rounds to its grid as the
forward pass did. Only what ``UNetLite`` builds is covered (no ``edge``, no ``refine``).

    python -m recipes.qat --model NAME     (after recipes.train; also run by it when the
                                             model's ``qat_steps`` > 0)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from recipes import config
from recipes.augment import BatchSampler
from recipes.context import context_stack, model_inputs
from recipes.losses import l1_ssim_loss
from recipes.unet import UNetLite

# (qmin, qmax) of onnxruntime's int8 reduce_range and of LiteRT's symmetric int8 weights,
# and which of them each step of a cycle rounds to.
WEIGHT_GRIDS = ((-64, 64), (-127, 127))
GRID_CYCLE = (0, 1)
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
QAT_LR = 1e-4
RECALIBRATE_EVERY = 50
CALIBRATION_BATCH = 8


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric rounding of a conv's weight to ``WEIGHT_GRIDS[grid]``
    (a parametrization); off while the activation ranges are measured (the quantizers
    calibrate the float model)."""

    enabled = True
    grid = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not WeightFakeQuant.enabled:
            return w
        absmax = w.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-12)
        qmin, qmax = WEIGHT_GRIDS[WeightFakeQuant.grid]
        scale = (absmax / qmax).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        out: torch.Tensor = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax)
        return out


class ActivationPoints:
    """The activation tensors the int8 graph quantizes, as forward hooks on the model's
    modules; each observes its min and max (``observing``) or rounds to uint8 over the
    range last observed."""

    def __init__(self, model: UNetLite) -> None:
        if model.edge or model.refine is not None:
            raise SystemExit("recipes.qat covers UNetLite without edge or refine")
        self.observing = False
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self._handles: list[Any] = []
        self._on_output(model.unshuffle, "input")
        for name, module in model.named_modules():
            if isinstance(module, nn.ReLU):
                self._on_output(module, name)
        for i, up in enumerate(model.up):
            self._on_input(up.fuse[0], f"up.{i}.concat")
        self._on_output(model.head, "head")

    def _round(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.lo[name] = min(self.lo.get(name, lo), lo)
            self.hi[name] = max(self.hi.get(name, hi), hi)
            return x
        lo, hi = min(0.0, self.lo[name]), max(0.0, self.hi[name])
        scale = max((hi - lo) / (ACT_QMAX - ACT_QMIN), 1e-12)
        zero = round(ACT_QMIN - lo / scale)
        out: torch.Tensor = torch.fake_quantize_per_tensor_affine(
            x, scale, zero, ACT_QMIN, ACT_QMAX)
        return out

    def _on_output(self, module: nn.Module, name: str) -> None:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return self._round(name, out)
        self._handles.append(module.register_forward_hook(hook))

    def _on_input(self, module: nn.Module, name: str) -> None:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (self._round(name, args[0]), *args[1:])
        self._handles.append(module.register_forward_pre_hook(hook))

    def calibrate(self, model: nn.Module, inputs: Iterator[torch.Tensor]) -> None:
        """Min and max of every point over ``inputs``, in float (as the quantizer's
        calibration runs the float model)."""
        was_training = model.training
        self.observing, self.lo, self.hi = True, {}, {}
        WeightFakeQuant.enabled = False
        model.eval()
        with torch.no_grad():
            for x in inputs:
                model(x)
        self.observing = False
        WeightFakeQuant.enabled = True
        model.train(was_training)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def calibration_inputs(spec: config.ModelSpec) -> np.ndarray:
    """The slices the quantizer calibrates on (recipes.quantize.calibration_subset)."""
    from recipes.quantize import calibration_subset  # onnxruntime: only when run

    data = np.load(config.DATA_NPZ)
    return calibration_subset(model_inputs(data["t1"], data["train_idx"], spec.context))


def _batches(x: np.ndarray) -> Callable[[], Iterator[torch.Tensor]]:
    def it() -> Iterator[torch.Tensor]:
        for i in range(0, len(x), CALIBRATION_BATCH):
            yield torch.from_numpy(x[i:i + CALIBRATION_BATCH].astype(np.float32))
    return it


def fine_tune(spec: config.ModelSpec, model: UNetLite, steps: int) -> dict[str, object]:
    """Fine-tune ``model`` in place for ``steps`` with int8 rounding in its forward pass;
    on return its weights are plain float parameters again (the rounding removed). The
    crops come from recipes.train's sampler, seeded afresh, so that fine-tuning a saved
    model (``main``) and fine-tuning at the end of training give the same weights."""
    from recipes import train  # its seeding, sampler settings, batch and loss weights

    gen = train.seed_everything(config.SEED + 1)
    data = np.load(config.DATA_NPZ)
    idx = data["train_idx"]
    sampler = BatchSampler(context_stack(data["t1"], idx, spec.context), data["t2"][idx],
                           train.AUGMENT, gen)
    batch, ssim_weight = train.BATCH, train.SSIM_WEIGHT
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        parametrize.register_parametrization(conv, "weight", WeightFakeQuant())
    points = ActivationPoints(model)
    calib = _batches(calibration_inputs(spec))
    opt = torch.optim.AdamW(model.parameters(), lr=QAT_LR, weight_decay=1e-4)
    history: list[dict[str, float]] = []
    running, start = 0.0, time.perf_counter()
    model.train()
    for step in range(steps):
        if step % RECALIBRATE_EVERY == 0:
            points.calibrate(model, calib())
        for group in opt.param_groups:  # cosine from QAT_LR to 1 % of it
            group["lr"] = QAT_LR * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        WeightFakeQuant.grid = GRID_CYCLE[step % len(GRID_CYCLE)]
        x, y = sampler.sample(batch)
        loss = l1_ssim_loss(model(x), y, ssim_weight, spec.mse_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": running / 100,
                            "elapsed_s": round(elapsed, 1)})
            print(f"qat step {step + 1:5d}/{steps}  loss {running / 100:.4f}  "
                  f"{elapsed:6.0f} s", flush=True)
            running = 0.0
    points.remove()
    for conv in convs:
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
    model.eval()
    return {"steps": steps, "lr": QAT_LR,
            "weights": "per channel, symmetric, 7 bits (-64..64) and 8 bits (-127..127) on "
                       "alternate steps",
            "activations": "uint8 over the calibration slices' min and max, every "
                           f"{RECALIBRATE_EVERY} steps",
            "wall_s": round(time.perf_counter() - start, 1), "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_model_argument(parser)
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = config.spec(args.model)
    steps = args.steps or spec.qat_steps
    if steps <= 0:
        raise SystemExit(f"{spec.name}: qat_steps is 0 in recipes/config.py; pass --steps")
    torch.set_num_threads(args.threads)
    ckpt = torch.load(spec.build("model.pt"), map_location="cpu", weights_only=True)
    if "qat" in ckpt:
        raise SystemExit(f"{spec.build('model.pt')} is fine-tuned already; train again first")
    model = UNetLite(spec.widths, spec.in_channels, spec.stem, spec.refine, spec.head,
                     spec.edge)
    model.load_state_dict(ckpt["state_dict"])
    summary = fine_tune(spec, model, steps)
    torch.save(ckpt, spec.build("model.float.pt"))
    torch.save(ckpt | {"state_dict": model.state_dict(), "qat": summary}, spec.build("model.pt"))
    record = json.loads(spec.build("train.json").read_text(encoding="utf-8"))
    record["qat"] = summary
    spec.build("train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
