import gzip
import hashlib
import lzma

import pytest

from builder.gateway import udeb

INDEX = (b"Package: anna\nVersion: 1.99\nArchitecture: amd64\nFilename: pool/main/a/anna/anna_1.99_amd64.udeb\n"
         b"Size: 10\nSHA256: aa\nDescription: retrieve\n continuation line\n\n"
         b"Package: util-linux-udeb\nVersion: 2.41.5-0+deb13u1\nFilename: pool/main/u/util-linux/x.udeb\n"
         b"Size: 20\nMD5sum: m\nSHA256: bb\n\n"
         b"Package: libssl3-udeb\nVersion: 3.5.7\nFilename: pool/main/o/openssl/y.udeb\nSize: 1\nSHA256: cc\n")


def test_rewrite_index_overrides_and_removes():
    out = udeb.rewrite_index(INDEX, {"util-linux-udeb": {"Version": "2.41-5", "SHA256": "dd", "Size": "21"}},
                             ["libssl3-udeb"])
    text = out.decode()
    assert "libssl3-udeb" not in text
    assert "Version: 2.41-5\n" in text and "SHA256: dd" in text and "SHA256: bb" not in text
    assert " continuation line" in text  # folded fields survive


def test_rewrite_index_unknown_override():
    with pytest.raises(KeyError):
        udeb.rewrite_index(INDEX, {"nope": {"Version": "1"}}, [])


def test_suite_files_hashes_match():
    files = udeb.suite_files(INDEX, suite="s", codename="s", date=0)
    rel = files["Release"].decode()
    assert "Components: main" in rel and "Codename: s" in rel
    for path in ("main/debian-installer/binary-amd64/Packages", "main/debian-installer/binary-amd64/Packages.gz",
                 "main/debian-installer/binary-amd64/Packages.xz"):
        data = files[path]
        assert f" {hashlib.sha256(data).hexdigest()} " in rel
        assert sum(line.endswith(" " + path) for line in rel.splitlines()) == 1
    assert gzip.decompress(files["main/debian-installer/binary-amd64/Packages.gz"]) == INDEX
    assert lzma.decompress(files["main/debian-installer/binary-amd64/Packages.xz"]) == INDEX
