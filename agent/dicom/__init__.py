"""DICOM in and out: decode and validate scans, series geometry, the derived instance and
its de-identification.

| module | job |
|---|---|
| ``decode`` | decode a scan under a budget and check it against the model contract (one parse) |
| ``sandbox`` | decoding in a child process under a memory and a time budget |
| ``header_values`` | the header values decode checks, read from the raw element bytes |
| ``native_pixels`` | uncompressed pixel data straight from its bytes |
| ``codestream`` | compressed frames checked against the header before any decoder sees them |
| ``quantiles`` | percentiles of one image, cheaply |
| ``series`` | series assembly for 2.5D models (pure: geometry, neighbours, clock passed in) |
| ``derive`` | the derived instance's content: new UIDs, provenance, labels |
| ``derived_writer`` | the derived instance written per slice from a per-series template |
| ``deid`` | PS3.15 Annex E de-identification, keyed by the site secret |
| ``deid_table`` | Table E.1-1 (the subset applied) as data |
"""
