"""The one message format from the attack worker back to the harness: JSON + safetensors, no pickle.

A frame is `len(header) (8 bytes, big-endian) | header (UTF-8 JSON) | payload (safetensors)`.
The harness reads it as *data*: the JSON is parsed with a size limit and checked against a
schema, the tensors are loaded by safetensors (plain float32 tensors; no code runs), so nothing
the attack process sends can execute in the harness or smuggle a tensor subclass into it.
Pickle only ever travels the other way, to the worker (the untrusted side).
"""
from __future__ import annotations

import json
import struct
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spdbench.errors import AttackError

MAX_HEADER_BYTES = 4 << 20
MAX_ERROR_CHARS = 2000
#: tensor names of an amortized attack's network weights (any names, bounded in total size)
NETWORK_PREFIX = "network/"


class SplitReport(BaseModel):
    """Per-split numbers the worker reports (its own measurements of the attack)."""

    model_config = ConfigDict(extra="forbid")
    loss_curve: list[float] = Field(default_factory=list, max_length=1_000_000)
    wall_s: float = 0.0
    device_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    peak_rss_bytes: Optional[int] = Field(default=None, ge=0)  # off CUDA: the worker's peak resident set
    oom_events: list[dict[str, int]] = Field(default_factory=list, max_length=64)
    model_calls: dict[str, float] = Field(default_factory=dict, max_length=16)
    #: the same passes counted by the worker runtime's own hooks, installed when the model loaded
    #: (before any attack code was unpickled or constructed); see worker.RuntimeCounter
    runtime_model_calls: dict[str, float] = Field(default_factory=dict, max_length=16)
    #: why the runtime's count cannot be trusted (its hooks were removed or replaced), or None
    counter_tampered: Optional[str] = Field(default=None, max_length=500)


class PresetBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    norm: str = Field(pattern="^(linf|l2)$")
    eps: float = Field(gt=0, le=1e6)


class AttackDescription(BaseModel):
    """What the harness plans a plugin attack with, described by the worker that constructed it
    (the plugin's code never runs in the harness): plain JSON values, bounded, checked here."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    preset: Optional[str] = Field(default=None, max_length=200)
    kind: str = Field(pattern="^(per-image|universal|amortized)$")
    params: dict[str, Any] = Field(max_length=256)
    defaults: dict[str, Any] = Field(max_length=256)
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict, max_length=64)
    preset_budgets: dict[str, PresetBudget] = Field(default_factory=dict, max_length=64)
    max_network_params: Optional[int] = Field(default=None, ge=1, le=1 << 34)
    uses_masks: bool = False
    needs_inpainting: bool = False
    has_objective: bool = False
    stochastic: bool = False
    #: the class's docstring (what `spdbench list` shows): display text only, never planned with
    summary: str = Field(default="", max_length=4000)


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(ready|result|error|described|progress)$")
    error: Optional[str] = None
    fingerprint: Optional[str] = None
    load_s: Optional[float] = None
    splits: dict[str, SplitReport] = Field(default_factory=dict, max_length=4)
    #: the worker's confinement report (sandbox.confine), sent once with "ready"; checked by
    #: sandbox.check_report, which bounds every list it keeps
    sandbox: Optional[dict[str, Any]] = None
    #: answer to a "describe" request
    attack: Optional[AttackDescription] = None
    #: a "progress" frame, any number of them before a request's answer: step `step` of `steps`
    #: of the attack's current optimization (attacks/progress.py)
    step: Optional[int] = Field(default=None, ge=0, le=10**9)
    steps: Optional[int] = Field(default=None, ge=0, le=10**9)


def encode(reply: dict[str, Any], tensors: Optional[dict[str, torch.Tensor]] = None) -> bytes:
    """A frame; a value JSON cannot hold (e.g. a plugin parameter that is an object) is a TypeError."""
    header = json.dumps(reply, allow_nan=True).encode()
    payload = st_save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in (tensors or {}).items()}) \
        if tensors else b""
    return struct.pack(">Q", len(header)) + header + payload


def _read_header(frame: bytes) -> tuple[Reply, bytes]:
    """The JSON header (a validated Reply, its error text cut to size) and the payload after it."""
    if len(frame) < 8:
        raise AttackError("the attack worker sent a truncated message")
    (n,) = struct.unpack(">Q", frame[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(frame):
        raise AttackError(f"the attack worker sent a malformed message (header of {n} bytes)")
    try:
        reply = Reply.model_validate(json.loads(frame[8:8 + n].decode()))
    except (ValueError, UnicodeDecodeError, ValidationError) as exc:
        raise AttackError(f"the attack worker sent a message that is not a valid reply: {str(exc)[:200]}") from None
    if reply.error is not None:
        reply.error = reply.error[:MAX_ERROR_CHARS]
    return reply, frame[8 + n:]


def _split_network(tensors: dict[str, torch.Tensor], network_max_values: int) -> dict[str, torch.Tensor]:
    """An amortized attack's weights (names under NETWORK_PREFIX): present, float32, within the cap."""
    network = {k: v for k, v in tensors.items() if k.startswith(NETWORK_PREFIX)}
    if not network:
        raise AttackError("the amortized attack's worker sent no network weights")
    n = sum(v.numel() for v in network.values())
    if n > network_max_values or any(v.dtype != torch.float32 for v in network.values()):
        raise AttackError(f"the attack worker sent a network of {n:,} values (float32, at most "
                          f"{network_max_values:,} allowed)")
    return network


def _check_expected(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    if set(tensors) != set(expected):
        raise AttackError(f"the attack worker sent tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
            raise AttackError(f"the attack worker sent {name} as {t.dtype} {tuple(t.shape)}, "
                              f"expected float32 {tuple(shape)}")


def decode(frame: bytes, expected: dict[str, tuple[int, ...]],
           network_max_values: int = 0) -> tuple[Reply, dict[str, torch.Tensor]]:
    """Parse a frame; `expected` maps tensor names to shapes (exactly those, float32). With
    `network_max_values`, names under NETWORK_PREFIX are accepted too (float32, at most that many
    values in all): an amortized attack's weights."""
    reply, payload = _read_header(frame)
    if reply.kind != "result":
        return reply, {}
    try:
        tensors = st_load(payload) if payload else {}
    except Exception as exc:  # noqa: BLE001 - malformed payload from the untrusted side
        raise AttackError(f"the attack worker sent tensors that safetensors cannot read: {exc}") from None
    network = _split_network(tensors, network_max_values) if network_max_values else {}
    _check_expected({k: v for k, v in tensors.items() if k not in network}, expected)
    return reply, {**tensors, **network}


#: the worker's exit status when it used up its CPU time (128 + SIGXCPU, as a shell reports it)
CPU_LIMIT_EXIT = 128 + 24
