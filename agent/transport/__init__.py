"""The wires: each outside protocol library is imported by one module here.

| module | job |
|---|---|
| ``mqtt`` | the only module that imports paho: sessions, manual ack, PUBACK verdicts, failover |
| ``tls`` | the one TLS client context (TLS >= 1.2, server verified, client certificate) |
| ``broker_url`` | what a broker URL may be; loopback or not; a cluster's nodes in turn |
| ``hints`` | what to fix for a refused CONNECT, by reason code |
| ``topics`` | every MQTT topic, built and validated in one place |
| ``scan_receipts`` | the agent's ``accepted`` receipt: its body, reading it, the resend schedule |
"""
