"""FlowId round trips, and the public surface is what the docs say."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tether
from tether import FlowId

_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # typed: hypothesis takes category literals
names = st.text(st.characters(blacklist_characters="@", blacklist_categories=_SURROGATES),
                min_size=1, max_size=30)


@given(node=names, serial=st.integers(0, 2**48 - 1), worker=st.integers(0, 0xFFFF))
def test_flow_id_round_trips_through_str_and_int(node: str, serial: int, worker: int) -> None:
    fid = FlowId(node=node, serial=serial, worker=worker)
    assert FlowId.parse(str(fid)) == fid
    assert FlowId.from_int(int(fid), node) == fid
    assert hash(FlowId.parse(str(fid))) == hash(fid)


def test_flow_id_text_form() -> None:
    assert str(FlowId(node="gw1", serial=0x1F)) == "1f@gw1"
    assert str(FlowId(node="gw1", serial=0x1F, worker=3)) == "3:1f@gw1"


@pytest.mark.parametrize("bad", ["", "x", "@gw", "zz@gw", "1f@", "-1@gw",
                                 "01f@gw", "0:1f@gw", "03:1f@gw", "1F@gw"])
def test_flow_id_parse_rejects_garbage_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match=r"flow id|node name"):
        FlowId.parse(bad)



@pytest.mark.parametrize(("node", "serial", "worker"), [
    ("gw", 1.5, 0), ("gw", 1, 2.0), ("gw", "1f", 0), (5, 1, 0), (b"gw", 1, 0),
    ("gw", 1, None)])
def test_flow_id_of_the_wrong_types_is_refused_when_made(node: object, serial: object,
                                                          worker: object) -> None:
    """An id is made to be serialized: one of the wrong types was accepted (a float
    serial, a bytes node name), then failed in `str()` or `int()`, far from its cause,
    with a message that did not say what was wrong ("Unknown format code 'x' for
    object of type 'float'")."""
    with pytest.raises(TypeError, match=r"node|serial|worker"):
        FlowId(node=node, serial=serial, worker=worker)  # type: ignore[arg-type]

def test_public_names_match_the_design() -> None:
    expected = {"Node", "Gateway", "Flow", "FlowId", "FlowState", "TetherError", "FlowClosed",
                "FlowDown", "PeerDown", "FlowReset", "ProtocolError", "LocalProtocolError",
                "RemoteProtocolError", "NoSuchService", "PeerUnreachable", "HandshakeError",
                "Mesh", "Message", "Failure", "Hub", "Opened", "Data", "Closed"}
    assert expected <= set(tether.__all__)
    for name in tether.__all__:
        obj = getattr(tether, name)
        assert obj.__doc__ or _source_docstring(obj), f"tether.{name} has no docstring"


def _source_docstring(obj: object) -> str | None:
    """The docstring in the source of a class or function compiled by mypyc (a
    `TETHER_COMPILE=1` build), which has none at run time."""
    module = sys.modules[getattr(obj, "__module__", "")]
    origin = Path(module.__file__ or "")
    if origin.suffix != ".so":
        return None
    tree = ast.parse(origin.with_name(module.__name__.rpartition(".")[2] + ".py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.name == getattr(obj, "__name__", None):
            return ast.get_docstring(node)
    return None


def test_error_hierarchy() -> None:
    for cls in (tether.FlowClosed, tether.FlowDown, tether.FlowReset, tether.ProtocolError,
                tether.NoSuchService, tether.PeerUnreachable, tether.HandshakeError):
        assert issubclass(cls, tether.TetherError)
    assert issubclass(tether.PeerDown, tether.FlowDown)
    assert tether.PeerDown("x").code != tether.FlowDown("x").code
    assert issubclass(tether.LocalProtocolError, tether.ProtocolError)
    assert issubclass(tether.RemoteProtocolError, tether.ProtocolError)


@pytest.mark.parametrize("name", ["", "a@b", "x" * 256, "é" * 128])
def test_a_node_or_gateway_cannot_be_made_with_a_name_no_flow_id_can_carry(name: str) -> None:
    """A name a flow id or a HELLO cannot carry is refused where the node is made, not
    at its first flow (an empty name started a daemon whose every flow then failed)."""
    with pytest.raises(ValueError, match="node name"):
        tether.Node(name, gateway="127.0.0.1:1")
    with pytest.raises(ValueError, match="node name"):
        tether.Gateway(name=name)
    assert tether.ids.check_node_name("é" * 127) == "é" * 127
