"""iomt-edge-agent: DICOM scans in over MQTT, int8 image translation on the node, sealed
results out.

| package / module | job |
|---|---|
| ``cli`` | the ``iomt-agent`` subcommands (thin) |
| ``cli_init``, ``cli_certs`` | the ``init`` and ``certs`` subcommands |
| ``cli_keys``, ``cli_model`` | the ``keys`` and ``model`` subcommands |
| ``config`` | the one config schema; errors name the key path |
| ``config_model`` | the ``[model]`` section: bundle, runtime or ``auto``, sessions |
| ``config_deid``, ``config_receiver`` | the ``[deid]`` and ``[receiver]`` sections |
| ``config_gateway`` | the ``[gateway]`` section (the DICOM C-STORE gateway) |
| ``config_budgets`` | the ``[storage]`` and ``[decode]`` sections: full stores, decoder budget |
| ``config_domain`` | the ``[domain]`` section: the domain-shift policy |
| ``config_io`` | reading TOML against a schema, one line per bad key path |
| ``config_delivery`` | the ``[delivery]`` section: end-to-end receipts before the outbox forgets |
| ``log`` | structlog: console on a TTY, JSON otherwise; PHI scrubbing |
| ``cpu`` | which CPU this is, its int8 features and estimated peak |
| ``thread_names`` | OS names for the agent's threads (``top -H``, per-thread CPU) |
| ``daemon/`` | the running service: ingest, processing stages, outbox, status, store, systemd |
| ``dicom/`` | decode and validate scans, series geometry, the derived instance |
| ``model/`` | bundle and its schema, guard, preprocessing, runtime choice, serving |
| ``backends/`` | runtime adapters (onnxruntime, LiteRT) behind one interface |
| ``transport/`` | MQTT (the only paho importer) and topic names |
| ``crypto/`` | sealed envelopes and key files |
| ``cloud/`` | the cloud consumer; DICOMweb (STOW-RS) export of results |
| ``gateway/`` | ``iomt-agent gateway``: DICOM C-STORE into MQTT, with a durable spool |
| ``fleet/`` | signed model updates: TUF over retained MQTT, activation, rollback, rollout |
| ``ops/`` | ``init`` and ``doctor`` for the site engineer |
| ``quantize/`` | ``iomt-agent model quantize`` |
| ``bench/`` | ``iomt-agent bench`` |
| ``demo/`` | ``iomt-agent demo`` and its sample data helpers |
"""

__version__ = "0.1.0"
