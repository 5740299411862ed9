"""The Software Bill of Materials of a build: what is in each image, overlay and system bundle.

debsbom reads the rootfs's dpkg database: every Debian package with its source package (the
names Debian's security advisories use), as SPDX 2.3 and CycloneDX. To the SPDX document
this adds the wheels (by their locked sha256), the model (with its card's sha256) and
edgebake itself, then spdx-tools validates it before it is written. The CycloneDX copy holds
the Debian part as debsbom gives it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spdx_tools.spdx.model.actor import Actor, ActorType
from spdx_tools.spdx.model.checksum import Checksum, ChecksumAlgorithm
from spdx_tools.spdx.model.package import (
    ExternalPackageRef,
    ExternalPackageRefCategory,
    Package,
    PackagePurpose,
)
from spdx_tools.spdx.model.relationship import Relationship, RelationshipType
from spdx_tools.spdx.model.spdx_no_assertion import SpdxNoAssertion
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
from spdx_tools.spdx.writer.write_anything import write_file

from . import __version__
from .errors import BuildError
from .hostcmd import run
from .progress import Progress

SPDX_NAME = "sbom.spdx.json"
CDX_NAME = "sbom.cdx.json"
IN_IMAGE = "/usr/share/edgebake"  # the SBOM and its sha256, for the unit's /health


@dataclass(frozen=True)
class Extra:
    """A component dpkg does not know: a wheel, the model, edgebake."""

    name: str
    version: str
    sha256: str
    purl: str
    purpose: PackagePurpose


def extras(wheels: list[Any], model_name: str, model_version: str, model_sha256: str
           ) -> list[Extra]:
    found = [Extra(w.name, w.version, w.sha256, f"pkg:pypi/{w.name.lower()}@{w.version}",
                   PackagePurpose.LIBRARY) for w in wheels]
    found.append(Extra(model_name, model_version, model_sha256,
                       f"pkg:generic/{model_name}@{model_version}", PackagePurpose.FILE))
    found.append(Extra("edgebake", __version__, "", f"pkg:generic/edgebake@{__version__}",
                       PackagePurpose.APPLICATION))
    return found


def _spdx_id(name: str) -> str:
    return "SPDXRef-edgebake-" + "".join(c if c.isalnum() or c in ".-" else "-" for c in name)


def make_sbom(rootfs: Path, name: str, version: str, components: list[Extra], dest: Path,
              epoch: int, progress: Progress) -> tuple[Path, Path]:
    """`dest/sbom.spdx.json` and `dest/sbom.cdx.json` for the tree at `rootfs`; the same
    bytes for the same inputs (SOURCE_DATE_EPOCH is their time)."""
    dest.mkdir(parents=True, exist_ok=True)
    tool = Path(sys.executable).with_name("debsbom")
    if not tool.is_file():
        found = shutil.which("debsbom")
        if found is None:
            raise BuildError("debsbom is missing from the build's Python environment; run "
                             "bash .ci/bootstrap")
        tool = Path(found)
    stem = dest / "sbom"
    scanned = rootfs
    if not (rootfs / "var/lib/dpkg/status").is_file():  # an overlay: no Debian packages
        scanned = dest / "no-packages"
        (scanned / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
        (scanned / "var/lib/dpkg/status").write_text("")
    space = hashlib.sha256(f"{name}:{version}:{[c.sha256 for c in components]}".encode())
    run([tool, "generate", "-r", scanned, "--distro-arch", "arm64", "-t", "spdx", "-t", "cdx",
         "-o", stem,
         "--timestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
         "--cdx-serialnumber", str(uuid.UUID(space.hexdigest()[:32])),
         "--distro-name", name, "--distro-version", version, "--distro-supplier", "edgebake",
         "--spdx-namespace", f"https://edgebake.invalid/sbom/{name}/{version}/"
         f"{space.hexdigest()[:16]}"], progress, what="debsbom")
    spdx = stem.with_name(SPDX_NAME)
    document = parse_file(str(spdx))
    described = next((r.related_spdx_element_id for r in document.relationships
                      if r.relationship_type == RelationshipType.DESCRIBES), None)
    if not isinstance(described, str):
        raise BuildError(f"{spdx}: debsbom's document describes nothing")
    for extra in components:
        spdx_id = _spdx_id(extra.name)
        document.packages.append(Package(
            spdx_id=spdx_id, name=extra.name, version=extra.version,
            download_location=SpdxNoAssertion(), files_analyzed=False,
            supplier=Actor(ActorType.ORGANIZATION, "edgebake build")
            if extra.purpose != PackagePurpose.LIBRARY else SpdxNoAssertion(),
            checksums=[Checksum(ChecksumAlgorithm.SHA256, extra.sha256)] if extra.sha256
            else [],
            external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER,
                                                    "purl", extra.purl)],
            primary_package_purpose=extra.purpose))
        document.relationships.append(Relationship(described, RelationshipType.CONTAINS,
                                                   spdx_id))
    # debsbom lists packages in no fixed order: sorted, the same tree gives the same bytes
    document.packages.sort(key=lambda p: p.spdx_id)
    document.relationships.sort(key=lambda r: (r.spdx_element_id, r.relationship_type.name,
                                               str(r.related_spdx_element_id)))
    problems = validate_full_spdx_document(document)
    if problems:
        raise BuildError(f"{spdx}: the SBOM is not valid SPDX: "
                         f"{problems[0].validation_message}")
    write_file(document, str(spdx), validate=False)
    wheels = sum(1 for c in components if c.purpose == PackagePurpose.LIBRARY)
    progress.say(f"      SBOM: {len(document.packages)} packages (Debian packages with their "
                 f"sources, {wheels} wheels, {len(components) - wheels} more); SPDX 2.3 and "
                 "CycloneDX")
    return spdx, stem.with_name(CDX_NAME)


def packages_of(path: Path) -> dict[str, str]:
    """name (purl without version, so source and binary packages stay apart) -> version."""
    try:
        document = parse_file(str(path))
    except Exception as exc:  # spdx-tools raises its own kinds for every bad input
        raise BuildError(f"{path}: not an SPDX JSON document ({str(exc)[:200]})") from None
    found: dict[str, str] = {}
    for package in document.packages:
        purl = next((r.locator for r in package.external_references if r.reference_type ==
                     "purl"), f"pkg:generic/{package.name}")
        key = purl.split("@", 1)[0] + ("?" + purl.split("?", 1)[1] if "?" in purl else "")
        found[key] = package.version or ""
    return found


def diff(before: Path, after: Path) -> tuple[list[str], str]:
    """Lines saying what changed from one SBOM to the other, and a one-line summary."""
    old, new = packages_of(before), packages_of(after)
    lines = []
    for key in sorted(set(old) | set(new)):
        label = key.removeprefix("pkg:")
        if key not in old:
            lines.append(f"+ {label} {new[key]}")
        elif key not in new:
            lines.append(f"- {label} {old[key]}")
        elif old[key] != new[key]:
            lines.append(f"~ {label} {old[key]} -> {new[key]}")
    counts = {sign: sum(1 for x in lines if x.startswith(sign)) for sign in "+-~"}
    return lines, (f"sbom-diff: {counts['~']} changed, {counts['+']} added, {counts['-']} "
                   f"removed, {len(set(old) & set(new)) - counts['~']} unchanged")
