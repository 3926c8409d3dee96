"""FlowId: the serializable name of one flow or connection.

An id names the node that holds the flow, the worker process inside that node, and
a serial number never reused within the node's lifetime, so any part of a cluster
can keep ids in an external store and route back to them. It round-trips through a
short string (``"7f@gw1"``, ``"3:7f@gw1"`` with a worker) and, within one node,
through an int (worker in the high bits, serial in the low 48).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["FlowId", "check_node_name", "check_service_name"]

_SERIAL_BITS: Final = 48
_SERIAL_MASK: Final = (1 << _SERIAL_BITS) - 1
_MAX_WORKER: Final = 0xFFFF
_PATTERN: Final = re.compile(r"(?:(?P<worker>[0-9]+):)?(?P<serial>[0-9a-f]+)@(?P<node>.+)",
                             re.DOTALL)


def check_node_name(name: str) -> str:
    """`name` if it can name a node (a gateway, an agent, a connector): 1 to 255 bytes
    of UTF-8 (what a HELLO carries), without '@' (the separator of its flows' ids);
    else `ValueError`. Checked where the node is made: an empty name used to start a
    daemon whose every flow then failed on its id."""
    if not isinstance(name, str):
        raise TypeError(f"node name must be a str, not {type(name).__name__}")
    if not name or "@" in name or len(name.encode()) > 255:
        raise ValueError(f"node name {name!r} must be 1 to 255 bytes, without '@'")
    return name


def check_service_name(service: str) -> str:
    """`service` if it can name a service: 1 to 255 bytes of UTF-8 (what a REGISTER
    and an OPEN carry); else `ValueError`."""
    if not service or len(service.encode()) > 255:
        raise ValueError(f"service name {service!r} must be 1 to 255 bytes")
    return service


@dataclass(frozen=True, slots=True, order=True)
class FlowId:
    """The id of a flow: `node` name, `worker` index, `serial` number."""

    node: str
    serial: int
    worker: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node, str):
            raise TypeError(f"node name must be a str, not {type(self.node).__name__}")
        if not isinstance(self.serial, int) or not isinstance(self.worker, int):
            raise TypeError(f"serial and worker must be ints, not "
                            f"{type(self.serial).__name__} and {type(self.worker).__name__}")
        if not self.node or "@" in self.node:
            raise ValueError(f"node name {self.node!r} must be non-empty and without '@'")
        if not 0 <= self.serial <= _SERIAL_MASK:
            raise ValueError(f"serial {self.serial} out of range [0, 2**48)")
        if not 0 <= self.worker <= _MAX_WORKER:
            raise ValueError(f"worker {self.worker} out of range [0, {_MAX_WORKER}]")

    def __str__(self) -> str:
        if self.worker:
            return f"{self.worker}:{self.serial:x}@{self.node}"
        return f"{self.serial:x}@{self.node}"

    def __int__(self) -> int:
        return (self.worker << _SERIAL_BITS) | self.serial

    @classmethod
    def parse(cls, text: str) -> FlowId:
        """The id whose `str()` is `text`; `ValueError` if it is not one."""
        m = _PATTERN.fullmatch(text)
        if m is None:
            raise ValueError(f"not a flow id: {text!r} (expected 'SERIAL@NODE' or "
                             "'WORKER:SERIAL@NODE', serial in hex)")
        worker = int(m["worker"]) if m["worker"] else 0
        fid = cls(node=m["node"], serial=int(m["serial"], 16), worker=worker)
        if str(fid) != text:  # one id, one string: a key in an external store finds it
            raise ValueError(f"not a flow id as written: {text!r} (leading zeros, or worker "
                             f"0 spelled out): it is written {str(fid)!r}")
        return fid

    @classmethod
    def from_int(cls, value: int, node: str) -> FlowId:
        """The id whose `int()` is `value`, on node `node`."""
        if value < 0:
            raise ValueError(f"flow id int {value} is negative")
        return cls(node=node, serial=value & _SERIAL_MASK, worker=value >> _SERIAL_BITS)
