"""``iomt-agent keys``: new key pairs for a rotation (0600 private halves, never replaced)
and the key id of any key file; nothing but key ids is printed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.cli import main
from agent.crypto import keys


def test_new_pairs_their_ids_and_refusals(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "recipient", str(tmp_path / "r"), "--kind", "x25519"]) == 0
    assert main(["keys", "signing", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    r_id = keys.load_recipient_public_key(tmp_path / "r.pub").key_id
    d_id = keys.signing_key_id(keys.load_verify_key(tmp_path / "d.pub"))
    assert f"x25519 key id {r_id}" in out and f"Ed25519 key id {d_id}" in out
    for name in ("r.key", "d.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        body = (tmp_path / name).read_text().splitlines()[1]
        assert body not in out
    for name, want in (("r.key", r_id), ("r.pub", r_id), ("d.key", d_id), ("d.pub", d_id)):
        assert main(["keys", "id", str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.strip().endswith(f"key id {want}")
    assert main(["keys", "signing", str(tmp_path / "d")]) == 1  # never replaced
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "d.key").chmod(0o644)
    assert main(["keys", "id", str(tmp_path / "d.key")]) == 1
    assert f"chmod 600 {tmp_path / 'd.key'}" in capsys.readouterr().err
    (tmp_path / "junk").write_text("hello\n")
    assert main(["keys", "id", str(tmp_path / "junk")]) == 1
    assert "not a key file of this project" in capsys.readouterr().err


def test_a_directory_is_refused_as_a_stem_and_as_a_key_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``keys signing DIR/`` wrote DIR.key beside DIR while naming DIR/.key; ``keys id DIR``
    was a traceback. Both now say what to give instead, and write nothing."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    for stem in (f"{keys_dir}/", str(keys_dir)):
        assert main(["keys", "signing", stem]) == 1
        assert f"e.g. {keys_dir / 'node-1'}" in capsys.readouterr().err
    assert main(["keys", "id", str(keys_dir)]) == 1
    assert "is a directory: give a key file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]
    assert list(keys_dir.iterdir()) == []
