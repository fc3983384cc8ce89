"""The ``[delivery]`` section of the config: end-to-end receipts from the cloud consumer
(docs/reliability.md). Kept apart from ``agent.config`` only for its size."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DeliverySection(BaseModel):
    """How long the outbox keeps a result: until the broker's PUBACK, or until the
    consumer's receipt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    receipts: bool = Field(
        False, title="Wait for receipts",
        description="Keep each result and error report in the outbox until the cloud "
        "consumer (`iomt-agent receive`) confirms it on the receipts topic, not only until "
        "the broker's PUBACK: a broker that acks and then crashes before its next "
        "persistence snapshot loses nothing (recommended with `iomt-agent receive`, which "
        "sends them). false (the default, for consumers that send no receipts): delete on "
        "the PUBACK",
    )
    receipt_timeout_s: float = Field(
        300.0, ge=1, le=86400, title="Receipt timeout",
        description="Seconds after the PUBACK without a receipt before a row is published "
        "again (doubling per try, up to 1 h); after every reconnect to the cloud broker "
        "such rows go out again at once",
    )
