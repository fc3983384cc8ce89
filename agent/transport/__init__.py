"""The wires: each outside protocol library is imported by one module here.

| module | job |
|---|---|
| ``mqtt`` | the only module that imports paho: persistent sessions, manual ack, PUBACK verdicts |
| ``topics`` | every MQTT topic, built and validated in one place |
"""
