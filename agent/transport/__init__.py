"""The wires: each outside protocol library is imported by one module here.

| module | job |
|---|---|
| ``mqtt`` | the only module that imports paho: persistent sessions, manual ack, PUBACK verdicts |
| ``tls`` | the one TLS client context (TLS >= 1.2, server verified, client certificate) |
| ``broker_url`` | what a broker URL may be; whether its host is loopback |
| ``topics`` | every MQTT topic, built and validated in one place |
"""
