"""Regenerate the Python stubs in mailgrid/v1 from protos/ (``make protos``).

With ``--check`` nothing is written: it exits 1 if the committed stubs differ from
what the protos generate, so CI catches stale stubs.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "mailgrid/v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    sources = sorted(str(p) for p in (PROTOS / PACKAGE).glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    bindir = Path(sys.executable).parent  # the plugins live beside this interpreter
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(directory: Path) -> list[str]:
    return sorted(
        p.name for p in (directory / PACKAGE).iterdir() if p.name.endswith(GENERATED)
    )


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh, committed = generated_files(out), generated_files(ROOT)
        if check:
            stale = fresh != committed or any(
                not filecmp.cmp(out / PACKAGE / n, ROOT / PACKAGE / n, shallow=False)
                for n in fresh
            )
            if stale:
                print("mailgrid/v1 stubs are stale: run `make protos` and commit them")
                return 1
            print(f"mailgrid/v1 stubs are up to date ({len(fresh)} files)")
            return 0
        for name in committed:
            (ROOT / PACKAGE / name).unlink()
        for name in fresh:
            shutil.copyfile(out / PACKAGE / name, ROOT / PACKAGE / name)
        print(f"wrote {len(fresh)} files to {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
