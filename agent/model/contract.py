"""The model contract an operator writes for ``iomt-agent model quantize`` (CONTRACT.toml).

It holds what ``bundle.json`` says besides its files: name, version and task, the input
contract (what scans the model takes and how they become model input), the output contract
(how model output becomes a stored DICOM value) and the fidelity floor that gates activation
(the int8 model's golden PSNR against its fp32 reference). ``docs/quantize.md`` has an
example. Unknown keys are errors, and every problem is reported with its key path, as in
``agent/config.py``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.config import ConfigError, Strict, read_text, validate_toml
from agent.model.bundle import InputContract, OutputContract, input_contract, output_contract
from agent.model.manifest import _NAME, NOT_FOR_DIAGNOSTIC_USE, InputSpec, OutputSpec

__all__ = ["NOT_FOR_DIAGNOSTIC_USE", "Contract", "ContractError", "load_contract",
           "parse_contract"]


class ContractError(ConfigError):
    """CONTRACT.toml cannot be used. ``problems`` holds one line per bad key."""

    what = "model contract"


class FidelitySpec(Strict):
    """The floor that gates activation on every node (``agent.model.guard``)."""

    min_psnr_db: float = Field(
        gt=0, le=150, title="Fidelity floor",
        description="int8-vs-fp32 PSNR (dB) on the golden set, worst of pooled and per input")


class Contract(Strict):
    """CONTRACT.toml: everything bundle.json holds besides its files."""

    name: str = Field(pattern=_NAME, title="Bundle name", description="letters, digits, . _ -")
    version: str = Field(min_length=1, max_length=64, title="Version", description="e.g. 1.0.0")
    task: str = Field(min_length=1, title="Task", description="what the model does, one line")
    input: InputSpec = Field(title="Input contract", description="what the model takes")
    output: OutputSpec = Field(title="Output contract", description="what the model produces")
    fidelity: FidelitySpec = Field(title="Fidelity floor", description="the activation gate")

    @property
    def input_channels(self) -> int:
        """Channels of the model input tensor: one per slice of the 2.5D stack."""
        return self.input.channels * (2 * self.input.context_slices + 1)

    def input_contract(self) -> InputContract:
        """The contract as the agent reads it back from bundle.json."""
        return input_contract(self.input)

    def output_contract(self) -> OutputContract:
        return output_contract(self.output)


def parse_contract(text: str, source: str = "<string>") -> Contract:
    """Parse TOML text into a Contract, or raise ContractError listing every bad key path."""
    return validate_toml(text, source, Contract, ContractError, "docs/quantize.md")


def load_contract(path: str | Path) -> Contract:
    """Read and validate CONTRACT.toml."""
    path = Path(path)
    return parse_contract(read_text(path, ContractError), str(path))
