"""The pins that committed files depend on are exact, and agree with those files.

The gRPC stubs in server/generated/ are compared byte for byte with a fresh protoc run
(tests/server/test_stubs_and_cli.py), so the grpcio-tools that generated them must be the one a fresh
install gets; the stubs also check at import time that grpcio and protobuf are at least the versions
they were generated for, so the runtime ranges must start there.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "server" / "generated"


def _requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [line for extra in project["optional-dependencies"].values()
                                        for line in extra]
    requirements = {}
    for line in listed:
        name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", line.strip()).groups()
        requirements[name.lower()] = spec.strip()
    return requirements


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_grpcio_tools_is_pinned_exactly_to_the_version_that_generated_the_stubs():
    generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                          (GENERATED / "generation_pb2_grpc.py").read_text()).group(1)
    assert _requirements()["grpcio-tools"] == f"=={generated}"


def test_runtime_ranges_admit_no_version_older_than_the_stubs():
    requirements = _requirements()
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                               (GENERATED / "generation_pb2_grpc.py").read_text()).group(1)
    protobuf_generated = re.search(r"# Protobuf Python Version: ([\d.]+)",
                                   (GENERATED / "generation_pb2.py").read_text()).group(1)
    grpc_floor = re.search(r">=([\d.]+)", requirements["grpcio"]).group(1)
    protobuf_floor = re.search(r">=([\d.]+)", requirements["protobuf"]).group(1)
    assert _version(grpc_floor) >= _version(grpc_generated)
    assert _version(protobuf_floor) >= _version(protobuf_generated)
    protobuf_major = _version(protobuf_generated)[0]  # the runtime refuses gencode of another major
    assert f"<{protobuf_major + 1}" in requirements["protobuf"]
