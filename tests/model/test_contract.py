"""CONTRACT.toml: the schema ``model quantize`` reads; errors name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.model.bundle import InputContract
from agent.model.contract import ContractError, load_contract, parse_contract

GOOD = """
name = "my-model"
version = "2.1.0"
task = "CT denoising"

[input]
modality = "CT"
shape = [128, 128]
pixel_spacing_mm = [0.8, 0.8]
context_slices = 2
slice_spacing_mm = 1.25
series_description_pattern = "(?i)low.?dose"
bits_allocated = [16]

[input.normalisation]
percentile = 99.0
clip_max = 2.0

[output]
modality = "CT"
scale = 1000.0
rescale_intercept = -1024.0
units = "HU"
series_description = "SYNTHETIC denoised - NOT FOR DIAGNOSTIC USE"

[fidelity]
min_psnr_db = 38.5
"""


def test_a_good_contract_maps_onto_the_bundle_contract() -> None:
    c = parse_contract(GOOD)
    ic = c.input_contract()
    assert isinstance(ic, InputContract)
    assert ic.shape == (128, 128) and ic.context_slices == 2 and ic.slice_spacing_mm == 1.25
    assert ic.normalisation.percentile == 99.0 and ic.bits_allocated == (16,)
    assert c.input_channels == 5
    assert c.output_contract().rescale_intercept == -1024.0
    assert c.input.shape == (128, 128) and c.output.tensor_name == "output"
    assert c.fidelity.min_psnr_db == 38.5


@pytest.mark.parametrize(("change", "problem"), [
    (("shape = [128, 128]", "shapes = [128, 128]"), "input.shapes: unknown key"),
    (("[fidelity]\nmin_psnr_db = 38.5", "[fidelity]"), "fidelity.min_psnr_db: required key"),
    (("SYNTHETIC denoised - NOT FOR DIAGNOSTIC USE", "denoised"),
     "output.series_description: must contain 'NOT FOR DIAGNOSTIC USE'"),
    (("context_slices = 2", "context_slices = 9"), "input.context_slices:"),
    (('"(?i)low.?dose"', '"low(dose"'), "input.series_description_pattern: not a regular"),
    (("shape = [128, 128]", "shape = [128, 0]"), "input.shape: rows and columns"),
    (("percentile = 99.0", "percentile = 0"), "input.normalisation.percentile:"),
    (('name = "my-model"', 'name = "my model/1"'), "name:"),
])
def test_problems_name_their_key_path(change: tuple[str, str], problem: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_contract(GOOD.replace(*change), "CONTRACT.toml")
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
    assert info.value.render().startswith("invalid model contract in CONTRACT.toml:")


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="cannot read file"):
        load_contract(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(ContractError, match="not valid TOML"):
        load_contract(tmp_path / "bad.toml")
