"""The Databricks ML runtimes a job cluster may use (``ml_runtimes.yaml``) and the checks
``bundle validate`` makes with them: a listed ``spark_version`` whose runtime has what the code
needs, a GPU runtime on GPU driver and worker types, a CPU runtime on CPU types."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

TABLE_FILE = Path(__file__).with_name("ml_runtimes.yaml")


@dataclass(frozen=True)
class Runtime:
    name: str
    spark: str
    libraries: dict[str, str]
    gpu: bool

    def version_of(self, package: str) -> str | None:
        return self.spark if package == "spark" else self.libraries.get(package)


@dataclass(frozen=True)
class RuntimeTable:
    runtimes: dict[str, Runtime]  # runtime key (spark_version) -> runtime
    requires: dict[str, tuple[SpecifierSet, str]]  # package -> (versions, why)
    gpu_node_types: tuple[re.Pattern, ...]
    not_in_runtimes: tuple[str, ...]

    def is_gpu_node(self, node_type: str) -> bool:
        return any(p.search(node_type) for p in self.gpu_node_types)

    def missing(self, runtime: Runtime) -> list[str]:
        """What ``runtime`` lacks of ``requires``, one sentence each."""
        out = []
        for package, (spec, why) in self.requires.items():
            have = runtime.version_of(package)
            if have is None or Version(have) not in spec:
                shipped = f"ships {package} {have}" if have else f"does not ship {package}"
                out.append(f"{runtime.name} {shipped}; the code needs {package}{spec} ({why})")
        return out


@lru_cache(maxsize=1)
def runtime_table(path: Path = TABLE_FILE) -> RuntimeTable:
    doc = yaml.safe_load(path.read_text())
    runtimes = {}
    for name, spec in doc["runtimes"].items():
        for kind in ("cpu", "gpu"):
            for key in spec["keys"].get(kind, []):
                runtimes[key] = Runtime(name, spec["spark"], dict(spec["libraries"]), gpu=kind == "gpu")
    requires = {pkg: (SpecifierSet(r["spec"]), r["why"]) for pkg, r in doc["requires"].items()}
    patterns = tuple(re.compile(p) for p in doc["gpu_node_types"].values())
    return RuntimeTable(runtimes, requires, patterns, tuple(doc["not_in_runtimes"]))


def check_cluster(cluster: dict) -> list[tuple[str, str]]:
    """(field, message) for each way ``cluster`` (a ``new_cluster``) would not give the jobs a
    runtime that runs them. Values still holding a deploy-time reference are not judged."""
    table = runtime_table()
    key = str(cluster.get("spark_version") or "")
    if not key or "${" in key:
        return []
    runtime = table.runtimes.get(key)
    if runtime is None:
        known = ", ".join(sorted(table.runtimes))
        return [("spark_version", f"{key!r} is not a supported Databricks ML runtime; supported: {known} "
                                  f"(src/lakevision/local/ml_runtimes.yaml)")]
    problems = [("spark_version", m) for m in table.missing(runtime)]
    for field in ("node_type_id", "driver_node_type_id"):
        node = str(cluster.get(field) or "")
        if not node or "${" in node:
            continue
        if runtime.gpu and not table.is_gpu_node(node):
            problems.append((field, f"{node!r} is not a GPU node type, but {key} is a GPU runtime: "
                                    "the driver and the workers of a GPU cluster must both be GPU types"))
        elif not runtime.gpu and table.is_gpu_node(node):
            problems.append((field, f"{node!r} is a GPU node type, but {key} is a CPU runtime: "
                                    "use the -gpu-ml- runtime of the same version, or a CPU node type"))
    return problems
