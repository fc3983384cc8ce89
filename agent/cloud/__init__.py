"""The cloud side.

| module | job |
|---|---|
| ``consumer`` | ``iomt-agent receive``: the MQTT loop around the receiver |
| ``receiver`` | the cloud consumer: verify, decrypt, de-duplicate, file results |
| ``stow`` | ``receive --stow-url``: filed results to a DICOMweb archive (STOW-RS; the only HTTP importer) |
| ``export`` | the export queue: a ledger of stored / refused results, retries with backoff |
"""
