"""iomt-edge-agent: DICOM scans in over MQTT, int8 image translation on the node, sealed
results out.

| package / module | job |
|---|---|
| ``cli`` | the ``iomt-agent`` subcommands (thin) |
| ``config`` | the one config schema; errors name the key path |
| ``config_io`` | reading TOML against a schema, one line per bad key path |
| ``config_delivery`` | the ``[delivery]`` section: end-to-end receipts before the outbox forgets |
| ``log`` | structlog: console on a TTY, JSON otherwise; PHI scrubbing |
| ``cpu`` | which CPU this is, its int8 features and estimated peak |
| ``daemon/`` | the running service: ingest, processing stages, outbox, status, store, systemd |
| ``dicom/`` | decode and validate scans, series geometry, the derived instance |
| ``model/`` | bundle and its schema, guard, preprocessing, runtime choice, serving |
| ``backends/`` | runtime adapters (onnxruntime, LiteRT) behind one interface |
| ``transport/`` | MQTT (the only paho importer) and topic names |
| ``crypto/`` | sealed envelopes and key files |
| ``cloud/`` | the cloud consumer |
| ``fleet/`` | signed model updates: TUF over retained MQTT, activation, rollback, rollout |
| ``ops/`` | ``init`` and ``doctor`` for the site engineer |
| ``quantize/`` | ``iomt-agent model quantize`` |
| ``bench/`` | ``iomt-agent bench`` |
| ``demo/`` | ``iomt-agent demo`` and its sample data helpers |
"""

__version__ = "0.1.0"
