"""Realistic guest output for the SBOM tests: what dpkg-query, modinfo, dkms and a Packages index of trixie say
on a provisioned GPU worker (versions as trixie has them; digests made up)."""

from __future__ import annotations

KERNEL = "6.12.94+deb13-amd64"

# dpkg-query -W -f "$(sbom.DPKG_FORMAT)": package, version, arch, source, source version, status, homepage
PACKAGES_TSV = "".join("\t".join(cols) + "\n" for cols in [
    ("adduser", "3.152", "all", "adduser", "3.152", "ii ", ""),
    ("bash", "5.2.37-2+b10", "amd64", "bash", "5.2.37-2", "ii ", "https://www.gnu.org/software/bash/"),
    ("libc6", "2.41-12", "amd64", "glibc", "2.41-12", "ii ", "https://www.gnu.org/software/libc/libc.html"),
    ("libstdc++6", "14.2.0-19", "amd64", "gcc-14", "14.2.0-19", "ii ", "https://gcc.gnu.org/"),
    ("openssh-server", "1:10.0p1-7", "amd64", "openssh", "1:10.0p1-7", "ii ", "https://www.openssh.com/"),
    ("nvidia-kernel-dkms", "550.163.01-2", "amd64", "nvidia-graphics-drivers", "550.163.01-2", "ii ",
     "https://www.nvidia.com"),
    ("firmware-nvidia-gsp", "550.163.01-2", "amd64", "nvidia-graphics-drivers", "550.163.01-2", "ii ", ""),
    (f"linux-headers-{KERNEL}", "6.12.94-1", "amd64", "linux", "6.12.94-1", "ii ", "https://www.kernel.org/"),
    ("linux-image-6.12.90+deb13-amd64", "6.12.90-1", "amd64", "linux-signed-amd64", "6.12.90+1", "rc ", ""),
])

SHA = {name: f"{i:02x}" * 32 for i, name in enumerate(["adduser", "bash", "libc6", "openssh-server",
                                                        "nvidia-kernel-dkms", "libstdc++6-old"], start=1)}

# trixie's main/binary-amd64/Packages, the stanzas that matter (libstdc++6 at an older version: not installed)
PACKAGES_INDEX = f"""Package: adduser
Version: 3.152
Installed-Size: 849
Maintainer: Debian Adduser Developers <adduser@packages.debian.org>
Architecture: all
Multi-Arch: foreign
Depends: passwd (>= 1:4.17.2-5)
Description: add and remove users and groups
Filename: pool/main/a/adduser/adduser_3.152_all.deb
Size: 200828
SHA256: {SHA["adduser"]}

Package: bash
Source: bash (5.2.37-2)
Version: 5.2.37-2+b10
Architecture: amd64
Essential: yes
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.
Filename: pool/main/b/bash/bash_5.2.37-2+b10_amd64.deb
Size: 1503080
SHA256: {SHA["bash"]}

Package: libc6
Source: glibc
Version: 2.41-12
Architecture: amd64
Filename: pool/main/g/glibc/libc6_2.41-12_amd64.deb
Size: 2850612
SHA256: {SHA["libc6"]}

Package: libstdc++6
Source: gcc-14
Version: 14.2.0-18
Architecture: amd64
Filename: pool/main/g/gcc-14/libstdc++6_14.2.0-18_amd64.deb
Size: 713476
SHA256: {SHA["libstdc++6-old"]}

Package: openssh-server
Source: openssh
Version: 1:10.0p1-7
Architecture: amd64
Filename: pool/main/o/openssh/openssh-server_10.0p1-7_amd64.deb
Size: 631340
SHA256: {SHA["openssh-server"]}
"""

NONFREE_INDEX = f"""Package: nvidia-kernel-dkms
Source: nvidia-graphics-drivers
Version: 550.163.01-2
Architecture: amd64
Filename: pool/non-free/n/nvidia-graphics-drivers/nvidia-kernel-dkms_550.163.01-2_amd64.deb
Size: 41602044
SHA256: {SHA["nvidia-kernel-dkms"]}
"""

LICENSES = {
    "adduser": ["GPL-2+"],
    "bash": ["GPL-3+", "GPL-3+ with Bison exception", "GFDL-NIV-1.3"],
    "libc6": ["LGPL-2.1+", "GPL-2+", "BSD-3-clause", "public-domain"],
    "openssh-server": ["OpenSSH", "BSD-3-clause", "Expat"],
    "nvidia-kernel-dkms": ["NVIDIA", "MIT or GPL-2", "Expat"],
}

MODULES = [
    {"name": "nvidia", "version": "550.163.01", "license": "NVIDIA", "kernel": KERNEL,
     "path": f"/lib/modules/{KERNEL}/updates/dkms/nvidia-current.ko.xz", "sha256": "a1" * 32,
     "description": "", "srcversion": "2E1F7A6B7B4BFD1B6B3C7D8", "depends": "",
     "vermagic": f"{KERNEL} SMP preempt mod_unload modversions"},
    {"name": "nvidia_uvm", "version": "550.163.01", "license": "Dual MIT/GPL", "kernel": KERNEL,
     "path": f"/lib/modules/{KERNEL}/updates/dkms/nvidia-current-uvm.ko.xz", "sha256": "a2" * 32,
     "srcversion": "5A8E0B1C2D3E4F5061728394", "depends": "nvidia",
     "vermagic": f"{KERNEL} SMP preempt mod_unload modversions"},
]
DKMS = [{"module": "nvidia-current", "version": "550.163.01", "kernel": KERNEL, "arch": "x86_64",
         "status": "installed", "source_package": "nvidia-kernel-dkms"}]

MODINFO = f"""filename:       /lib/modules/{KERNEL}/updates/dkms/nvidia-current.ko.xz
alias:          char-major-195-*
version:        550.163.01
supported:      external
license:        NVIDIA
firmware:       nvidia/550.163.01/gsp_tu10x.bin
srcversion:     2E1F7A6B7B4BFD1B6B3C7D8
alias:          pci:v000010DEd*sv*sd*bc06sc80i00*
depends:{' ' * 8}
retpoline:      Y
name:           nvidia
vermagic:       {KERNEL} SMP preempt mod_unload modversions{' '}
sig_id:         PKCS#7
signer:         DKMS module signing key
sig_key:        3C:6B:1A:7E:22:90:0D:4F:8B:61:0A:95:C4:2E:77:1B:D0:5F:3E:A9
sig_hashalgo:   sha256
signature:      30:64:02:30:4B:7C:0A:55:2E:9A:61:3D:88:1F:C2:47:0B:9E:6D:14:
\t\t58:AF:21:03:9C:44:7E:12:B5:60:DA:3F:81:2C:99:47:E0:1D:6B:22
parm:           NvSwitchRegDwords:NvSwitch regkey (charp)
"""

DKMS_STATUS = f"""nvidia-current/550.163.01, {KERNEL}, x86_64: installed
nvidia-current/550.163.01, 6.12.90+deb13-amd64, x86_64: installed (WARNING! Missing some built modules!)
Error! Could not locate dkms.conf file.
"""

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bash
Source: https://www.gnu.org/software/bash/

Files: *
Copyright: (C) 1987-2022 Free Software Foundation, Inc.
License: GPL-3+

Files: lib/intl/*
Copyright: 1995-2010 Free Software Foundation, Inc.
License: LGPL-2.1+ or GPL-2+

Files: y.tab.*
Copyright: 1984-2022 Free Software Foundation, Inc.
License: GPL-3+ with Bison exception

Files: doc/*
Copyright: 1988-2022 Free Software Foundation, Inc.
License: Permission is granted to make and distribute verbatim copies of
 this manual provided the copyright notice and this permission notice are preserved.

Files: examples/loadables/*
Copyright: 2004 Free Software Foundation
License:  GPL-3+

License: GPL-3+
 This program is free software; you can redistribute it and/or modify
 it under the terms of the GNU General Public License as published by
 .
 On Debian systems, the complete text of the GNU General Public License
 version 3 can be found in /usr/share/common-licenses/GPL-3.

License: Unused-Standalone
 Only a standalone paragraph names this one.
"""

OLD_STYLE_COPYRIGHT = """This is the Debian prepackaged version of the FooBar utilities.

Copyright (C) 1999 Someone. License: GPL, see /usr/share/common-licenses/GPL-2.
"""
