"""Benchmarks that need a broker (``make bench``): the agent end to end through Mosquitto
against the raw backend and against a naive script (``bench/naive_script.py``)."""
