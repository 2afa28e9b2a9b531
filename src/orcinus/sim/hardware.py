"""Hardware descriptions: what one device does (peak flops, memory and its bandwidth), how devices
talk (inside a node, between nodes), how close to peak each operator class gets (efficiencies) and
what the engine's control plane costs per iteration. Data files with their sources live in
`hardware/*.json`; `orcinus bench calibrate` stores `this-machine` (see calibrate.py)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

HARDWARE_DIR = os.path.join(os.path.dirname(__file__), "hardware")
THIS_MACHINE = "this-machine"
EFFICIENCY_CLASSES = ("gemm", "memory", "attention", "comm")


class HardwareError(ValueError):
    """An unknown preset, a missing calibration or a malformed hardware file."""


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, each way, per device
    latency_s: float  # per message (a collective step, a stage-to-stage send)


@dataclass(frozen=True)
class Overhead:
    """The engine's own time per iteration (scheduling, the batch message, appending tokens):
    host work the device waits for."""

    iteration_s: float = 0.0
    per_row_s: float = 0.0
    per_token_s: float = 0.0

    def seconds(self, rows: int, tokens: int) -> float:
        return self.iteration_s + self.per_row_s * rows + self.per_token_s * tokens


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float  # per device
    peak_flops: float  # dense, in the serving dtype
    memory_bandwidth: float  # bytes/s
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    memory_utilization: float = 0.9  # fraction of memory weights + KV may take
    kind: str = "gpu"  # "cpu": memory_bytes is the KV pool itself (the engine's CPU default)
    efficiency: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EFFICIENCY_CLASSES, 1.0))
    overhead: Overhead = Overhead()
    peak_flops_by_dtype: dict[str, float] = field(default_factory=dict)
    description: str = ""
    sources: tuple[str, ...] = ()

    def flops_for(self, dtype: str) -> float:
        return self.peak_flops_by_dtype.get(dtype, self.peak_flops)

    def eff(self, cls: str) -> float:
        return self.efficiency.get(cls, 1.0)

    def with_efficiency(self, efficiency: dict[str, float], overhead: Overhead | None = None,
                        name: str | None = None) -> "Hardware":
        return dataclasses.replace(self, efficiency={**self.efficiency, **efficiency},
                                   overhead=overhead or self.overhead, name=name or self.name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        try:
            eff = {**dict.fromkeys(EFFICIENCY_CLASSES, 1.0), **d.get("efficiency", {})}
            bad = [k for k, v in eff.items() if not 0 < float(v) <= 10.0]
            if bad:
                raise HardwareError(f"hardware {d.get('name')!r}: efficiencies {bad} must be in (0, 10]")
            return cls(name=d["name"], memory_bytes=float(d["memory_bytes"]), peak_flops=float(d["peak_flops"]),
                       memory_bandwidth=float(d["memory_bandwidth"]), devices_per_node=int(d["devices_per_node"]),
                       intra_node=Link(**d["intra_node"]), inter_node=Link(**d["inter_node"]),
                       memory_utilization=float(d.get("memory_utilization", 0.9)), kind=d.get("kind", "gpu"),
                       efficiency={k: float(v) for k, v in eff.items()},
                       overhead=Overhead(**d.get("overhead", {})),
                       peak_flops_by_dtype={k: float(v) for k, v in d.get("peak_flops_by_dtype", {}).items()},
                       description=d.get("description", ""), sources=tuple(d.get("sources", ())))
        except (KeyError, TypeError) as exc:
            raise HardwareError(f"hardware description {d.get('name', '?')!r} is malformed: {exc!r}") from exc


def presets() -> list[str]:
    return sorted(f.removesuffix(".json") for f in os.listdir(HARDWARE_DIR) if f.endswith(".json"))


def load_hardware(spec: str) -> Hardware:
    """A preset name (`a100-40gb`, `h100`, ...), `this-machine` (the stored calibration) or a path
    to a JSON file in the presets' format."""
    if spec == THIS_MACHINE:
        return load_calibration()
    path = spec if spec.endswith(".json") or os.sep in spec else os.path.join(HARDWARE_DIR, f"{spec}.json")
    if not os.path.isfile(path):
        raise HardwareError(f"unknown hardware {spec!r}: give {THIS_MACHINE}, a JSON file, or one of {presets()}")
    with open(path) as f:
        try:
            return Hardware.from_dict(json.load(f))
        except json.JSONDecodeError as exc:
            raise HardwareError(f"{path} is not valid JSON: {exc}") from exc


def calibration_path() -> str:
    """Where `orcinus bench calibrate` stores this machine (sim/calibrate.py)."""
    root = os.environ.get("ORCINUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "orcinus"))
    return os.path.join(root, "sim", "this-machine.json")


def load_calibration(path: str | None = None) -> Hardware:
    path = path or calibration_path()
    try:
        with open(path) as f:
            return Hardware.from_dict(json.load(f))
    except FileNotFoundError:
        raise HardwareError(f"no calibration of this machine at {path}: run `orcinus bench calibrate` first, or "
                            "give a hardware preset (e.g. --simulate xeon-2core)") from None
