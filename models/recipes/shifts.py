"""Scanner variations of the MNI T1 input, in numpy: the in-distribution ones the model was
trained with (``augment_in_distribution``, as ``recipes.augment`` draws them) and simulated
scanner shifts (``SHIFTS``) for the domain-shift evaluation (``recipes.domain_eval``).

Contrast shifts go through the signal equation: the template is multiplied by the ratio of
the tissue-mixed signal under the shifted protocol (or field strength) to that under the
nominal T1-weighted protocol, so the template's own texture stays and only its tissue
contrast moves. Tissue maps: the template's GM/WM probabilities, CSF = brain - GM - WM, and
"other" (scalp, fat, muscle) = 1 - brain. Relaxation times: BrainWeb 1.5 T (config.TISSUES)
and literature values at 0.5 T and 3 T (approximate). All values are SIMULATED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (T1 ms, T2 ms, PD) per tissue and field strength; "other" is fat-like soft tissue.
FIELDS: dict[str, dict[str, tuple[float, float, float]]] = {
    "1.5T": {"csf": (2569, 329, 1.0), "gm": (833, 83, 0.86), "wm": (500, 70, 0.77),
             "other": (260, 80, 0.9)},
    "3T": {"csf": (3700, 300, 1.0), "gm": (1330, 80, 0.86), "wm": (830, 65, 0.77),
           "other": (380, 70, 0.9)},
    "0.5T": {"csf": (2400, 340, 1.0), "gm": (650, 90, 0.86), "wm": (400, 75, 0.77),
             "other": (215, 85, 0.9)},
}  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """A spin-echo (ti_ms None) or inversion-recovery acquisition."""

    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    field: str = "1.5T"

    def signal(self, tissue: str) -> float:
        t1, t2, pd = FIELDS[self.field][tissue]
        e_tr = np.exp(-self.tr_ms / t1)
        longitudinal = 1 - e_tr if self.ti_ms is None else abs(
            1 - 2 * np.exp(-self.ti_ms / t1) + e_tr)
        return float(pd * longitudinal * np.exp(-self.te_ms / t2))


NOMINAL = Protocol(tr_ms=500, te_ms=15)  # the T1-weighted contrast the template stands for


@dataclass
class Tissues:
    """Axial tissue probability slices [Z, H, W] on the model grid."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    other: np.ndarray

    def sub(self, lo: int, hi: int) -> Tissues:
        """Slices ``lo`` .. ``hi - 1``."""
        return Tissues(self.gm[lo:hi], self.wm[lo:hi], self.csf[lo:hi], self.other[lo:hi])

    def mix(self, protocol: Protocol) -> np.ndarray:
        return (protocol.signal("gm") * self.gm + protocol.signal("wm") * self.wm
                + protocol.signal("csf") * self.csf + protocol.signal("other") * self.other)


def load_tissues() -> Tissues:
    """The template's tissue maps as axial slices, as ``recipes.simulate`` lays them out."""
    from nilearn import datasets

    from recipes.simulate import to_axial_slices

    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    csf = np.clip(brain - gm - wm, 0, None)
    return Tissues(*(to_axial_slices(v) for v in (gm, wm, csf, 1 - brain)))


def reweight(t1: np.ndarray, tissues: Tissues, protocol: Protocol) -> np.ndarray:
    """The T1 slices [Z, H, W] as ``protocol`` would have weighted them."""
    ratio = (tissues.mix(protocol) + 1e-3) / (tissues.mix(NOMINAL) + 1e-3)
    out: np.ndarray = (t1 * ratio).astype(np.float32)
    return out


def bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(strength * quadratic), as recipes.augment draws it."""
    h, w = shape
    y = np.linspace(-1, 1, h)[:, None]
    x = np.linspace(-1, 1, w)[None, :]
    basis = [x + 0 * y, y + 0 * x, x * y, x**2 - 1 / 3 + 0 * y, y**2 - 1 / 3 + 0 * x]
    log_field = sum(c * b for c, b in zip(rng.uniform(-1, 1, 5), basis, strict=True))
    log_field = log_field / max(float(np.abs(log_field).max()), 1e-6)
    return np.exp(strength * log_field).astype(np.float32)


def rician(image: np.ndarray, sigma_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise with sigma = ``sigma_frac`` x the image maximum."""
    sigma = sigma_frac * float(image.max())
    real = image + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def augment_in_distribution(stack: np.ndarray, rng: np.random.Generator, *,
                            geometry: bool = True) -> np.ndarray:
    """One draw of the training augmentation's scanner variations ([C, H, W] or [H, W]):
    global scale 0.7-1.3, bias field up to 0.2 (p 0.6), Rician noise up to 0.02 (p 0.5),
    and (``geometry``) one of the 8 in-plane orientations."""
    out = stack * np.float32(rng.uniform(0.7, 1.3))
    if rng.random() < 0.6:
        out = out * bias_field(out.shape[-2:], rng.uniform(0, 0.2), rng)
    if rng.random() < 0.5:
        out = rician(out, rng.uniform(0, 0.02), rng)
    if geometry:
        out = np.rot90(out, int(rng.integers(4)), axes=(-2, -1))
        if rng.random() < 0.5:
            out = out[..., ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _blur_1d(image: np.ndarray, length: int, axis: int) -> np.ndarray:
    kernel = np.ones(length, dtype=np.float32) / length
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, image)


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block average then nearest-neighbour back (a coarser in-plane matrix)."""
    h, w = image.shape[-2:]
    hh, ww = h // factor * factor, w // factor * factor
    lead = image.shape[:-2]
    blocks = image[..., :hh, :ww].reshape(*lead, hh // factor, factor, ww // factor, factor)
    coarse = blocks.mean(axis=(-3, -1))
    up = np.repeat(np.repeat(coarse, factor, axis=-2), factor, axis=-1)
    out = np.zeros_like(image)
    out[..., :hh, :ww] = up
    return out


def _window(image: np.ndarray, upper_pct: float, lift: float = 0.0) -> np.ndarray:
    """A vendor-style window: values above the ``upper_pct`` percentile of the head
    saturate; ``lift`` raises everything (air included) by that share of the window."""
    top = float(np.percentile(image[image > 0], upper_pct))
    out = np.clip(image, 0, top) + lift * top
    return out.astype(np.float32)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    top = float(image.max()) or 1.0
    return (top * (image / top) ** gamma).astype(np.float32)


def _ct(tissues: Tissues, head: np.ndarray) -> np.ndarray:
    """A CT-like slice set: stored value 1024 + HU (GM 40, WM 25, CSF 8, soft tissue and
    bone outside the brain 60 .. 700), air 0."""
    hu = 40 * tissues.gm + 25 * tissues.wm + 8 * tissues.csf
    outside = tissues.other * head
    rim = np.where(outside > 0.5, 700.0, 60.0)  # the template's skull/scalp, roughly
    return ((1024 + hu + rim * outside) * head).astype(np.float32)


@dataclass(frozen=True)
class Shift:
    """One simulated shift: a family, a name and what it does to the T1 volume [Z, H, W]."""

    family: str
    name: str
    apply: Callable[[np.ndarray, Tissues, np.random.Generator], np.ndarray]


def _per_slice(fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]
               ) -> Callable[[np.ndarray, Tissues, np.random.Generator], np.ndarray]:
    return lambda vol, _t, rng: np.stack([fn(s, rng) for s in vol])


def _protocol(p: Protocol) -> Callable[[np.ndarray, Tissues, np.random.Generator], np.ndarray]:
    return lambda vol, t, _rng: reweight(vol, t, p)


def _thick(n: int) -> Callable[[np.ndarray, Tissues, np.random.Generator], np.ndarray]:
    return lambda vol, _t, _rng: _blur_1d(vol, n, 0)


SHIFTS: tuple[Shift, ...] = (
    Shift("protocol", "SE TR 300 TE 15", _protocol(Protocol(300, 15))),
    Shift("protocol", "SE TR 1000 TE 15", _protocol(Protocol(1000, 15))),
    Shift("protocol", "SE TR 2000 TE 15", _protocol(Protocol(2000, 15))),
    Shift("protocol", "SE TR 500 TE 40", _protocol(Protocol(500, 40))),
    Shift("protocol", "SE TR 500 TE 80", _protocol(Protocol(500, 80))),
    Shift("protocol", "IR TR 2000 TI 800 (MPRAGE-like)", _protocol(Protocol(2000, 4, 800))),
    Shift("protocol", "IR TR 2000 TI 400", _protocol(Protocol(2000, 4, 400))),
    Shift("field", "3 T, same protocol", _protocol(Protocol(500, 15, None, "3T"))),
    Shift("field", "0.5 T, same protocol", _protocol(Protocol(500, 15, None, "0.5T"))),
    Shift("bias", "bias field 0.4", _per_slice(lambda s, r: s * bias_field(s.shape, 0.4, r))),
    Shift("bias", "bias field 0.7", _per_slice(lambda s, r: s * bias_field(s.shape, 0.7, r))),
    Shift("bias", "bias field 1.0", _per_slice(lambda s, r: s * bias_field(s.shape, 1.0, r))),
    Shift("noise", "Rician noise 0.03", _per_slice(lambda s, r: rician(s, 0.03, r))),
    Shift("noise", "Rician noise 0.05", _per_slice(lambda s, r: rician(s, 0.05, r))),
    Shift("noise", "Rician noise 0.08", _per_slice(lambda s, r: rician(s, 0.08, r))),
    Shift("noise", "Rician noise 0.12", _per_slice(lambda s, r: rician(s, 0.12, r))),
    Shift("resolution", "in-plane 2 mm", _per_slice(lambda s, _r: _downsample(s, 2))),
    Shift("resolution", "in-plane 3 mm", _per_slice(lambda s, _r: _downsample(s, 3))),
    Shift("resolution", "slice thickness 3 mm", _thick(3)),
    Shift("resolution", "slice thickness 6 mm", _thick(6)),
    Shift("scaling", "intensity x 0.25", _per_slice(lambda s, _r: s * 0.25)),
    Shift("scaling", "intensity x 4", _per_slice(lambda s, _r: s * 4.0)),
    Shift("windowing", "window saturating at p90", _per_slice(lambda s, _r: _window(s, 90))),
    Shift("windowing", "window saturating at p70", _per_slice(lambda s, _r: _window(s, 70))),
    Shift("windowing", "window lifting air by 5 %",
          _per_slice(lambda s, _r: _window(s, 100, 0.05))),
    Shift("windowing", "gamma 0.6", _per_slice(lambda s, _r: _gamma(s, 0.6))),
    Shift("windowing", "gamma 1.6", _per_slice(lambda s, _r: _gamma(s, 1.6))),
    Shift("motion", "motion blur 3 px", _per_slice(lambda s, _r: _blur_1d(s, 3, 1))),
    Shift("motion", "motion blur 7 px", _per_slice(lambda s, _r: _blur_1d(s, 7, 1))),
    Shift("motion", "motion ghost 25 %",
          _per_slice(lambda s, _r: s + 0.25 * np.roll(s, 24, axis=0))),
    Shift("contrast", "T2w fed as T1w", lambda vol, t, _r: vol * 0),  # replaced in apply()
    Shift("contrast", "PD-weighted (SE TR 3000 TE 15)", _protocol(Protocol(3000, 15))),
    Shift("contrast", "FLAIR (IR TR 9000 TI 2500 TE 100)",
          _protocol(Protocol(9000, 100, 2500))),
    Shift("contrast", "CT fed as T1w", lambda vol, t, _r: _ct(t, (vol > 0).astype(np.float32))),
)


def apply(shift: Shift, t1: np.ndarray, t2: np.ndarray, tissues: Tissues,
          rng: np.random.Generator) -> np.ndarray:
    """The shifted T1 volume [Z, H, W] (``t2``: the simulated T2w, for "T2w fed as T1w")."""
    if shift.name == "T2w fed as T1w":
        return (t2 * 1000.0).astype(np.float32)
    out: np.ndarray = np.clip(shift.apply(t1, tissues, rng), 0, None).astype(np.float32)
    return out
