"""Extraction of result archives: our own member checks, on every Python the project claims.

Crafted tar streams are read the way ``Remote.download_results`` reads them (``r|``).
Debian 12's Python 3.11.2 has no extraction filters, so these checks are all that
stands between an HPC's tar stream and the workstation's disk there.
"""
from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from shared.errors import BadOutput
from shared.remote import HAS_TAR_FILTERS, UnsafeMember, check_member, extract_member


def member(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", linkname: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.size = kind, linkname, mode, len(data)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info, data


def archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
        for info, data in members:
            out.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def extract(stream: bytes, dest: Path) -> list[str]:
    names = []
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as tar:
        for info in tar:
            extract_member(tar, info, dest)
            names.append(info.name)
    return names


def everything_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "case" / "staging"
    folder.mkdir(parents=True)
    return folder


def test_plain_files_and_folders_are_extracted_tamed(dest):
    stream = archive(member("output", tarfile.DIRTYPE, mode=0o500),
                     member("output/dose.raw", data=b"\0" * 64, mode=0o4777),
                     member("Dose.mhd", data=b"hdr", mode=0o400),
                     member("./run.sh", data=b"#!/bin/sh\n", mode=0o700))
    assert extract(stream, dest) == ["output", "output/dose.raw", "Dose.mhd", "./run.sh"]
    assert (dest / "output" / "dose.raw").read_bytes() == b"\0" * 64
    dose = (dest / "output" / "dose.raw").stat()
    assert stat.S_IMODE(dose.st_mode) & 0o7000 == 0          # no setuid from an archive
    assert stat.S_IMODE(dose.st_mode) & 0o022 == 0           # nor writable by others
    assert stat.S_IMODE((dest / "Dose.mhd").stat().st_mode) & 0o600 == 0o600
    assert dose.st_uid == os.getuid()                        # ours, whatever the archive says
    assert everything_under(dest.parent) == {"staging", "staging/output", "staging/output/dose.raw",
                                             "staging/Dose.mhd", "staging/run.sh"}


@pytest.mark.parametrize("bad, name, why", [
    (member("/etc/mqic-pwned", data=b"x"), "/etc/mqic-pwned", "absolute path"),
    (member("../x", data=b"x"), "../x", "'..' in its path"),
    (member("output/../../x", data=b"x"), "output/../../x", "'..' in its path"),
    (member("etc", tarfile.SYMTYPE, linkname="/etc"), "etc", "symbolic link to '/etc'"),
    (member("inside", tarfile.SYMTYPE, linkname="output/dose.raw"), "inside", "symbolic link"),
    (member("hard", tarfile.LNKTYPE, linkname="output/dose.raw"), "hard", "hard link to 'output/dose.raw'"),
    (member("hard_out", tarfile.LNKTYPE, linkname="/etc/passwd"), "hard_out", "hard link"),
    (member("null", tarfile.CHRTYPE), "null", "device, fifo or other special file"),
    (member("disk", tarfile.BLKTYPE), "disk", "device, fifo or other special file"),
    (member("pipe", tarfile.FIFOTYPE), "pipe", "device, fifo or other special file"),
], ids=["absolute", "dotdot", "dotdot-inside", "symlink-etc", "symlink-inside", "hardlink",
        "hardlink-outside", "chardev", "blockdev", "fifo"])
def test_a_hostile_member_is_refused_by_name_and_nothing_lands_outside(dest, bad, name, why):
    stream = archive(member("output", tarfile.DIRTYPE), member("output/dose.raw", data=b"ok"), bad,
                     member("after", data=b"never"))
    with pytest.raises(UnsafeMember) as caught:
        extract(stream, dest)
    assert isinstance(caught.value, BadOutput)  # "garbage from the HPC": could not tell, never failed
    assert caught.value.member == name and repr(name) in str(caught.value) and why in str(caught.value)
    assert everything_under(dest.parent) == {"staging", "staging/output", "staging/output/dose.raw"}
    assert not Path("/etc/mqic-pwned").exists()


def test_a_path_through_a_link_already_in_the_destination_is_refused(dest, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (dest / "output").symlink_to(victim)
    with pytest.raises(UnsafeMember, match="leads outside"):
        extract(archive(member("output/planted", data=b"x")), dest)
    assert list(victim.iterdir()) == []


def test_the_checker_alone_needs_no_archive(dest):
    check_member(tarfile.TarInfo("output/dose.raw"), dest)
    with pytest.raises(UnsafeMember):
        check_member(tarfile.TarInfo("/abs"), dest)


def test_filters_are_used_exactly_where_python_has_them():
    assert HAS_TAR_FILTERS == (sys.version_info >= (3, 11, 4))
