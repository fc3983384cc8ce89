"""The running service: ingest, processing, outbox, status, signals, reload.

| module | job |
|---|---|
| ``service`` | the daemon: brokers, store and stage threads; status, signals, reload |
| ``status`` | the retained status document the daemon publishes |
| ``pipeline`` | the processing stages of one scan, wired in one place |
| ``domain_check`` | the domain-shift verdict per slice and series, the policy, the status |
| ``stacking`` | the 2.5D path: series admission, neighbour stacks, release |
| ``store`` | the durable inbox and outbox (SQLite WAL) |
| ``store_rows`` | the store's tables, the rows it hands out, its errors |
| ``state_dir`` | the state directory: created 0700, or refused when it cannot be used |
| ``pressure`` | backpressure: why scans are not taken now (the status's ``backpressure``) |
| ``reload`` | the guarded reload: load and guard on a loader thread, swap or refuse |
| ``updates`` | fleet updates into the guarded reload; the post-activation rollback watch |
| ``sdnotify`` | systemd: READY, STATUS, WATCHDOG, STOPPING; credentials |
| ``sealing`` | the seal keys: swapped by a reload, open secret files refused at start |
"""
