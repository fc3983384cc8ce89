"""What leaves the node sealed: the envelope and its keys.

| module | job |
|---|---|
| ``seal`` | the sealed envelope: HPKE-encrypted, Ed25519-signed |
| ``aead_choice`` | which AEAD seals on this CPU (``seal.aead``) |
| ``keys`` | key files: generation, key ids, permissions |
| ``keyring`` | several keys at once while keys rotate: recipient keys, device keys |
| ``site_secret`` | the site's de-identification secret (0600) |
"""
