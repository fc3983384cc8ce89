"""Tools for the site engineer.

| module | job |
|---|---|
| ``scaffold`` | ``iomt-agent init``: a ready-to-run directory with a config and keys |
| ``doctor`` | ``iomt-agent doctor``: is this node ready to serve? |
"""
