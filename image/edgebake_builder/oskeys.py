"""`invoke make-os-key`: the X.509 keys RAUC needs to sign system bundles.

A CA (`os-ca.crt`, baked into images as their keyring; its key `os-ca.key` stays offline)
issues the signing certificate (`os.crt`, key `os.key`). A leaked or expired signing key is
replaced by issuing another from the same CA: units need no reflash.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError
from .steps.osbundle import CA_NAME, CERT_NAME, KEY_NAME

CA_KEY_NAME = "os-ca.key"
CA_DAYS = 7300
SIGNING_DAYS = 3650


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise BuildError(f"openssl {args[0]} failed: {result.stderr.strip()[-300:]}")


def make_os_keys(out: Path, organisation: str = "edgebake") -> list[Path]:
    """Write the four files into `out` (made if missing); never overwrite a key."""
    if shutil.which("openssl") is None:
        raise BuildError("missing host tool openssl; apt-get install openssl")
    names = (CA_NAME, CA_KEY_NAME, CERT_NAME, KEY_NAME)
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise BuildError(f"{out}: already holds {', '.join(existing)}; keys are never "
                         "overwritten (move them away first)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".os-keys-", dir=out) as tmp:
        work = Path(tmp)
        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl("req", "-x509", *curve, "-keyout", CA_KEY_NAME, "-out", CA_NAME,
                 "-days", str(CA_DAYS), "-subj", f"/O={organisation}/CN={organisation} OS CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)
        _openssl("req", "-new", *curve, "-keyout", KEY_NAME, "-out", "os.csr",
                 "-subj", f"/O={organisation}/CN={organisation} OS signing", cwd=work)
        (work / "ext.cnf").write_text("basicConstraints=critical,CA:FALSE\n"
                                      "keyUsage=critical,digitalSignature\n"
                                      "subjectKeyIdentifier=hash\n"
                                      "authorityKeyIdentifier=keyid\n")
        _openssl("x509", "-req", "-in", "os.csr", "-CA", CA_NAME, "-CAkey", CA_KEY_NAME,
                 "-CAcreateserial", "-out", CERT_NAME, "-days", str(SIGNING_DAYS),
                 "-extfile", "ext.cnf", cwd=work)
        for name in names:
            (work / name).chmod(0o600 if name.endswith(".key") else 0o644)
            (work / name).replace(out / name)
    return [out / n for n in names]
