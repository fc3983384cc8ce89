"""Benchmarks: separate scripts that print a table and write JSON; no test asserts a timing.

| module | job |
|---|---|
| ``e2e`` | the agent end to end through Mosquitto, against a naive script and the raw backend |
| ``brokers`` | the benchmark's Mosquitto brokers on free loopback ports |
| ``contestants`` | each contestant's topics and config |
| ``naive_script`` | the script the agent is compared with |
| ``procs`` | the contestants as subprocesses, their CPU and RSS |
| ``rounds`` | one timed round: flood a contestant, time its results |
| ``slices`` | the DICOM series the benchmark sends |
| ``report`` | medians over rounds, ratios, the printed table |
| ``stages`` | the agent's own work per slice, stage by stage |
| ``seal`` | sealing one result: AES-256-GCM against ChaCha20-Poly1305, with and without AES-NI |
| ``soak`` | the agent under a sustained rate: RSS, files, threads, store size |
| ``gateway`` | the DICOM gateway's cost per instance, broker up and away |
| ``fleet_scale`` | N nodes on one broker taking one published bundle |
| ``domain_score`` | what the domain-shift score costs per slice |
| ``avx2_kernels`` | any command with onnxruntime and LiteRT on their AVX2 kernels |
| ``avx2_instructions`` | instructions of one inference on the AVX2 kernels (valgrind) |
| ``conv_widths`` | one conv per channel pair, fp32 against int8 |
| ``slow_sync`` | any command as if its disk took N ms per fsync (an SD card, eMMC) |
"""
