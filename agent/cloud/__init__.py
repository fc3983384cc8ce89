"""The cloud side.

| module | job |
|---|---|
| ``consumer`` | ``iomt-agent receive``: the MQTT loop around the receiver |
| ``receiver`` | the cloud consumer: verify, decrypt, de-duplicate, file results |
| ``stow`` | STOW-RS and QIDO-RS through dicomweb-client (the only HTTP importer) |
| ``export`` | the export queue: a ledger of stored / refused results, retries with backoff |
"""
