"""``iomt-agent demo`` and its helpers, apart from the production path.

| module | job |
|---|---|
| ``run`` | the demo: embedded brokers, the agent as a subprocess, a consumer, a summary |
| ``dicom_chain`` | ``demo --dicom``: storescu -> gateway -> agent -> STOW-RS -> Orthanc |
| ``embedded_broker`` | an amqtt broker in a thread (MQTT 3.1.1) |
| ``sample_series`` | DICOM series from the shipped MNI slab, for the demo, ``send`` and tests |
| ``png`` | a minimal PNG writer and the montage |
"""
