"""Khronos glTF validator (npm `gltf-validator`) run through node.

Install it with `tools/install_validator.sh` (project-local `.tools/node_modules`);
`$P3D_GLTF_VALIDATOR` may name another folder that holds `node_modules/gltf-validator`
(or the package folder itself).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import InputError, MissingError

REPO = Path(__file__).resolve().parents[2]

# Reads the GLB, validates it (external resources refused: a GLB is self-contained),
# prints the report JSON on stdout.
_SCRIPT = r"""
const fs = require('fs');
const [pkg, file] = process.argv.slice(-2);   // `node -e` puts the script's arguments last
const validator = require(pkg);
const data = new Uint8Array(fs.readFileSync(file));
validator.validateBytes(data, {
  uri: file,
  maxIssues: 1000,
  externalResourceFunction: (uri) => Promise.reject(new Error('external resource ' + uri + ' refused')),
}).then((report) => { process.stdout.write(JSON.stringify(report)); })
  .catch((err) => { process.stderr.write(String(err)); process.exit(2); });
"""


def find_validator() -> Path | None:
    """The gltf-validator package folder, or None."""
    candidates = []
    env = os.environ.get("P3D_GLTF_VALIDATOR")
    if env:
        candidates += [Path(env), Path(env) / "node_modules" / "gltf-validator"]
    candidates.append(REPO / ".tools" / "node_modules" / "gltf-validator")
    for c in candidates:
        if (c / "package.json").is_file():
            return c.resolve()
    return None


def validate_glb(path: str | os.PathLike, timeout: float = 120.0) -> dict:
    """Khronos validator report for a .glb: {"issues": {"numErrors", "numWarnings", ...,
    "messages": [...]}, "info": {...}, ...}. Raises MissingError when node or the
    validator is absent, InputError when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no glTF file at {path}", hint="export the mesh first")
    node = shutil.which("node")
    if node is None:
        raise MissingError("node is not installed: cannot run the Khronos glTF validator",
                           hint="install Node.js (apt-get install nodejs npm), then tools/install_validator.sh")
    pkg = find_validator()
    if pkg is None:
        raise MissingError("gltf-validator is not installed",
                           hint="run tools/install_validator.sh (npm install into .tools/) or set P3D_GLTF_VALIDATOR")
    try:
        proc = subprocess.run([node, "-e", _SCRIPT, str(pkg), str(path.resolve())], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MissingError(f"the glTF validator did not finish within {timeout:.0f} s", hint="is node working?") from None
    if proc.returncode != 0:
        raise MissingError(f"the glTF validator failed to run (exit {proc.returncode}): {proc.stderr.strip()[:300]}",
                           hint="reinstall it with tools/install_validator.sh")
    return json.loads(proc.stdout)


def summary(report: dict) -> dict:
    """The counts worth recording in assets.json."""
    issues = report.get("issues", {})
    return {"validator": report.get("validatorVersion"), "errors": issues.get("numErrors"),
            "warnings": issues.get("numWarnings"), "infos": issues.get("numInfos"),
            "messages": [f"{m.get('code')}: {m.get('message')}" for m in issues.get("messages", [])
                         if m.get("severity", 3) <= 1][:20]}
