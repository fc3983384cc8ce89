"""What leaves the node sealed: the envelope and its keys.

| module | job |
|---|---|
| ``seal`` | the sealed envelope: HPKE-encrypted, Ed25519-signed |
| ``keys`` | key files: generation, key ids, permissions |
"""
