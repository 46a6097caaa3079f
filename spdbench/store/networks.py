"""An amortized attack's trained network on disk: safetensors weights + JSON config, never pickle.

Why its own file: the network *is* the method's output (it protects any photo in one forward
pass), so a record points to it by path and sha256, and `verify` can rebuild it from the attack's
class and params (the config) and load these weights. Loading reads tensors only; no code runs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from spdbench.errors import RecordError
from spdbench.store.perturbations import parse_header
from spdbench.store.records import atomic_write_bytes

FORMAT = "spdbench-network-v1"
#: the most values a network file may hold, whatever the attack (the attack's own cap is lower)
MAX_VALUES = 16_000_000


def check_header(header: dict, name: str) -> int:
    """A network header (already parsed by `parse_header`): float32 tensors only, at most
    MAX_VALUES values, our format tag, an attack name and a JSON config. Returns the value count."""
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise RecordError(f"{name} is not an spdbench network file (format {meta.get('format')!r})")
    if not isinstance(meta.get("attack"), str) or not isinstance(meta.get("config"), str):
        raise RecordError(f"{name}: a network file names its attack and its config in the metadata")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    bad = sorted(k for k, v in tensors.items() if v["dtype"] != "F32")
    if bad or not tensors:
        raise RecordError(f"{name}: a network file holds float32 tensors only "
                          f"({'none found' if not tensors else f'{bad[0]!r} is not F32'})")
    count = 0
    for v in tensors.values():
        n = 1
        for d in v["shape"]:
            n *= d
        count += n
    if count > MAX_VALUES:
        raise RecordError(f"{name}: {count:,} values, more than the {MAX_VALUES:,} a network file may hold")
    return count


def save_network(out: Path, rel: str, attack_name: str, config: dict[str, Any], state: dict[str, torch.Tensor],
                 apply_batch_size: int) -> dict[str, Any]:
    """Write the weights to `out/rel` (atomically) with `config` (the record's attack_params); the
    record's `network` entry (file, sha256, size, apply batch size)."""
    data = save({k: v.contiguous() for k, v in state.items()},
                metadata={"format": FORMAT, "attack": attack_name, "config": json.dumps(config, sort_keys=True)})
    atomic_write_bytes(Path(out) / rel, data)
    return {"file": rel, "sha256": hashlib.sha256(data).hexdigest(),
            "values": int(sum(v.numel() for v in state.values())), "bytes": len(data),
            "apply_batch_size": int(apply_batch_size)}


def load_network(path: Path, sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, {"attack", "config"}) from a network file (read once; header checked as for any
    untrusted safetensors file), its hash checked when given."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"network file {str(path)!r} is missing")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise RecordError(f"network file {str(path)!r} does not match its recorded sha256")
    name = f"network file {str(path)!r}"
    header = parse_header(data, name)
    check_header(header, name)
    meta = header["__metadata__"]
    try:
        config = json.loads(meta["config"])
    except (ValueError, RecursionError):
        raise RecordError(f"{name}: its config is not JSON") from None
    return load_bytes(data), {"attack": meta["attack"], "config": config}


def load_into(attack, state: dict[str, torch.Tensor], name: str):
    """The network `attack`'s class builds from its params, with `state` loaded (strict: every name
    and shape must match), set as `attack.network` (eval mode) and returned. Runs the attack's
    network code, so it is called only where attack code may run."""
    network = attack.build_network()
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RecordError(f"{name} does not fit {attack.name!r}'s network: {str(exc).splitlines()[0]}") from None
    attack.network = network.eval()
    return attack.network


def rebuild(attack, path: Path, sha256: Optional[str] = None):
    """`attack` with its fitted network loaded from a network file: the class builds the network from
    its params (the config), the weights come from the file."""
    state, meta = load_network(path, sha256)
    if meta["attack"] != attack.name:
        raise RecordError(f"network file {str(path)!r} was fit by {meta['attack']!r}, not {attack.name!r}")
    load_into(attack, state, f"network file {str(path)!r}")
    return attack
