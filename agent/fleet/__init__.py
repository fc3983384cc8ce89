"""Fleet model updates: TUF (python-tuf) over retained MQTT messages on the cloud broker.

The operator signs releases in a TUF repository and publishes them under
``iomt/fleet/{group}/``; a node with a ``[fleet]`` section follows its group, verifies every
release with ``ngclient`` against its trusted root, and activates it through the daemon's
guarded reload. Topics and payloads: docs/protocol.md, "Fleet updates".

| module | job |
|---|---|
| ``repo`` | the operator's repository on disk: keys, root chain, signing a group's release |
| ``archive`` | a bundle as a deterministic tar; safe unpacking (no escape, no links, caps) |
| ``publish`` | ``fleet publish``: the retained messages of a release, sent and acked |
| ``fetcher`` | ngclient's ``FetcherInterface`` over retained messages, length-capped, deadlined |
| ``updater`` | the node's update thread: refresh, download, unpack, check, hand to the guard |
| ``activation`` | the node's fleet directory and the atomic ``current`` / ``previous`` switch |
| ``trusted_root`` | the node's trusted root checked before it is installed or relied on |
| ``clock`` | the clock floor: no expiry judged while the clock is behind what was verified |
| ``verdict`` | ``UpdateRejected`` and the reason code of each TUF failure |
| ``cli`` | the ``iomt-agent fleet`` subcommands |
"""
