"""The RFC 9180 test vectors that ``cryptography_vectors`` ships, through the project's
HPKE layer: recipient keys built by ``agent.crypto.keys`` from the vectors' private keys,
and the suite ``agent.crypto.seal.hpke_suite`` gives the envelope.

What runs, and why not the rest:

* KEMs: the two the project seals with, DHKEM(X25519, HKDF-SHA256) (0x0020, RFC 9180
  ``test-vectors.json``) and ML-KEM-768+X25519 (0x647a, ``hpke-pq-test-vectors.json``);
  P-256, P-521, X448 and the other PQ KEMs are not the project's (no key type for them).
* Mode: base (0) only. cryptography offers no PSK or auth mode, so modes 1-3 cannot run.
* Each KDF/AEAD the vectors pair with those KEMs (HKDF-SHA256/-SHA512, SHAKE256; AES-128-GCM,
  AES-256-GCM, ChaCha20-Poly1305); the envelope's own suites (either KEM with HKDF-SHA256
  and AES-256-GCM or ChaCha20-Poly1305) run through the suite objects of ``seal`` itself:
  X25519 with both AEADs, ML-KEM-768+X25519 with ChaCha20-Poly1305 (no vector ships for it
  with AES-256-GCM). Export-only vectors (AEAD 0xFFFF) and the ``exports`` have no API.
* Only the first encryption of each vector (sequence number 0): the API is single-shot, one
  message per context; later encryptions need the context's nonce sequence.
* Decryption only: encryption draws its ephemeral key at random (no deterministic
  ``ikmE`` API), so sealing is checked by round trips in ``test_seal.py``.
* The vectors carry AAD and the public ``Suite.decrypt`` takes none (the envelope binds its
  header through ``info``), so the vectors' ciphertexts are opened through cryptography's
  AAD hook ``_decrypt_with_aad``, the one its own vector tests use, with the project's keys
  and suite objects.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import cryptography_vectors
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke

from agent.crypto.keys import RecipientKind, RecipientPrivateKey
from agent.crypto.seal import Aead, hpke_suite

KEMS: dict[int, tuple[RecipientKind, Any]] = {
    0x0020: ("x25519", hpke.KEM.X25519),
    0x647A: ("mlkem768-x25519", hpke.KEM.MLKEM768_X25519),
}
KDFS = {0x0001: hpke.KDF.HKDF_SHA256, 0x0002: hpke.KDF.HKDF_SHA384,
        0x0003: hpke.KDF.HKDF_SHA512, 0x0010: hpke.KDF.SHAKE128, 0x0011: hpke.KDF.SHAKE256}
AEADS = {0x0001: hpke.AEAD.AES_128_GCM, 0x0002: hpke.AEAD.AES_256_GCM,
         0x0003: hpke.AEAD.CHACHA20_POLY1305}
# The envelope's own suites (KEM, HKDF-SHA256, AEAD) -> the AEAD's name in agent.crypto.seal.
PROJECT: dict[tuple[RecipientKind, int, int], Aead] = {
    (kind, 0x0001, aead_id): aead for kind in ("x25519", "mlkem768-x25519")
    for aead_id, aead in ((0x0002, "aes-256-gcm"), (0x0003, "chacha20-poly1305"))}


def _vectors() -> list[dict[str, Any]]:
    out = []
    for name in ("HPKE/test-vectors.json", "HPKE/hpke-pq-test-vectors.json"):
        with cryptography_vectors.open_vector_file(name, "r") as f:
            out += json.load(f)
    return [v for v in out if v["mode"] == 0 and v["kem_id"] in KEMS
            and v["kdf_id"] in KDFS and v["aead_id"] in AEADS]


VECTORS = _vectors()


def _private(v: dict[str, Any]) -> RecipientPrivateKey:
    kind = KEMS[v["kem_id"]][0]
    sk = bytes.fromhex(v["skRm"])
    if kind == "mlkem768-x25519":
        # The hybrid's 32-byte private seed expands (SHAKE256) to the ML-KEM-768 seed d||z
        # and the X25519 private key: the 96 bytes the project's key files hold.
        sk = hashlib.shake_256(sk).digest(96)
    return RecipientPrivateKey(kind, sk)


def _suite(v: dict[str, Any]) -> hpke.Suite:
    kind, kem = KEMS[v["kem_id"]]
    aead = PROJECT.get((kind, v["kdf_id"], v["aead_id"]))
    if aead is not None:
        return hpke_suite(kind, aead)  # the envelope's own suite object
    return hpke.Suite(kem, KDFS[v["kdf_id"]], AEADS[v["aead_id"]])


def _id(v: dict[str, Any]) -> str:
    return f"kem{v['kem_id']:#06x}-kdf{v['kdf_id']:#06x}-aead{v['aead_id']:#06x}"


def test_the_vectors_cover_both_project_kems_and_the_envelope_suite() -> None:
    combos = {(KEMS[v["kem_id"]][0], v["kdf_id"], v["aead_id"]) for v in VECTORS}
    assert ("x25519", 0x0001, 0x0002) in combos  # X25519 / HKDF-SHA256 / AES-256-GCM
    # ... and with ChaCha20-Poly1305, for both KEMs (seal.aead on a CPU without AES)
    assert {("x25519", 0x0001, 0x0003), ("mlkem768-x25519", 0x0001, 0x0003)} <= combos
    assert {kind for kind, _, _ in combos} == {"x25519", "mlkem768-x25519"}
    assert len(VECTORS) == 8, [_id(v) for v in VECTORS]


@pytest.mark.parametrize("v", VECTORS, ids=_id)
def test_vector_opens_with_the_projects_key_and_suite(v: dict[str, Any]) -> None:
    key = _private(v)
    assert key.public.raw.hex() == v["pkRm"]  # the key files' public half and key id
    enc, first = bytes.fromhex(v["enc"]), v["encryptions"][0]
    assert first["nonce"] == v["base_nonce"]  # sequence number 0: single shot
    ct, aad, info = (bytes.fromhex(first["ct"]), bytes.fromhex(first["aad"]),
                     bytes.fromhex(v["info"]))
    suite = _suite(v)
    plain = rust_openssl.hpke._decrypt_with_aad(suite, enc + ct, key.hpke_key(), info=info,
                                                aad=aad)
    assert plain.hex() == first["pt"]
    for bad_info, bad in ((info, bytearray(enc + ct)), (info + b"x", bytearray(enc + ct))):
        if bad_info == info:
            bad[len(enc) + 3] ^= 1  # one ciphertext bit
        with pytest.raises(InvalidTag):
            rust_openssl.hpke._decrypt_with_aad(suite, bytes(bad), key.hpke_key(),
                                                info=bad_info, aad=aad)
