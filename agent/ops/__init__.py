"""Tools for the site engineer.

| module | job |
|---|---|
| ``certs`` | ``iomt-agent certs init``: the development PKI (CA, broker and client certificates) |
| ``mosquitto_conf`` | the brokers' Mosquitto configs and least-privilege ACLs |
| ``scaffold`` | ``iomt-agent init``: a ready-to-run directory with a config and keys |
| ``sender`` | ``iomt-agent send``: publish DICOM files as a scanner gateway would |
| ``confirming_sender`` | ``send --confirm``: keep each scan until the agent's receipt |
| ``doctor`` | ``iomt-agent doctor``: is this node ready to serve? |
| ``check_files``, ``check_broker``, ``check_node``, ``check_fleet`` | the doctor's checks |
| ``check_security`` | the doctor's security posture: de-identification, receiver keys, links |
| ``preflight`` | ``iomt-agent config check``: what ``run`` would refuse |
"""
