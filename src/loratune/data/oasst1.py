"""OpenAssistant OASST1 message trees -> conversations.

Two layouts are read, detected from the first record:
- flat message rows (the Hugging Face `OpenAssistant/oasst1` rows): one message per line, linked by `parent_id`;
- the nested tree export (`{"message_tree_id", "prompt": {message..., "replies": [...]}}`).

Both become the same `Node` tree. Then, in this order:
- a deleted message is dropped with everything below it (a reply to a deleted message answers nothing we keep);
- a message outside `lang` (when set) or a `synthetic` one (unless `include_synthetic`) is dropped the same way;
- a message whose parent is not in the data (e.g. the root was in another language and a language filter made the
  export) is skipped with its subtree: its conversation would start mid-thread, with the question missing;
- a parent chain that loops is an error naming the file, line and message id.

Modes: `best_path` follows the best-ranked assistant reply (rank 0) and the first prompter follow-up from each root,
as one multi-turn conversation (or only the first exchange); `pairs` makes one conversation for every
prompter -> assistant pair, with the thread before it as context that is shown but not trained on again.
Everything skipped is counted in `dropped` (reason -> origins) for the data report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratune.config import Oasst1Options
from loratune.data.conversation import Conversation, Message
from loratune.data.sources import Row, read_jsonl
from loratune.errors import LoratuneError

ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Node:
    message_id: str
    parent_id: str | None
    role: str  # user | assistant
    text: str
    origin: str  # "file:line" of the message (flat) or of its tree (nested)
    lang: str | None = None
    rank: int | None = None
    deleted: bool = False
    synthetic: bool = False
    children: list[Node] = field(default_factory=list)


def is_nested(record: dict[str, Any]) -> bool:
    return isinstance(record.get("prompt"), dict)


def is_oasst1_record(record: dict[str, Any]) -> bool:
    """True for a flat OASST1 message row or a nested tree (used to route hub rows by schema)."""
    return is_nested(record) or {"message_id", "parent_id", "role", "text"} <= set(record)


def oasst1_conversations(path: Path, opts: Oasst1Options,
                         dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    """Read an OASST1 file (flat rows or nested trees) and turn its trees into conversations."""
    if not path.is_file():
        raise LoratuneError("OASST1 file not found", file=path, key="data.path", hint="check the path")
    return oasst1_from_rows(list(read_jsonl(path)), opts, dropped)


def oasst1_from_rows(rows: list[Row], opts: Oasst1Options,
                     dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    dropped = dropped if dropped is not None else {}
    if not rows:
        return []
    roots = _nested_roots(rows) if is_nested(rows[0][1]) else _flat_roots(rows, dropped)
    kept = [root for root in (_filter(r, opts, dropped) for r in roots) if root is not None]
    out: list[Conversation] = []
    for root in kept:
        if root.role != "user":
            dropped.setdefault("tree starts with an assistant message", []).append(root.origin)
            continue
        out.extend(_best_path(root, opts.multi_turn, dropped) if opts.mode == "best_path" else _pairs(root))
    return out


# --- building trees ----------------------------------------------------------------------------------------------------
def _node(record: dict[str, Any], origin: str, parent_id: str | None) -> Node:
    missing = [k for k in ("message_id", "role", "text") if record.get(k) is None]
    if missing:
        file, _, line = origin.rpartition(":")
        raise LoratuneError(f'OASST1 message has no "{missing[0]}"', file=file or origin,
                            line=int(line) if line.isdigit() else None, key=missing[0],
                            hint="is this an OASST1 export? set data.source to match the file")
    role = ROLES.get(str(record["role"]))
    if role is None:
        file, _, line = origin.rpartition(":")
        raise LoratuneError(f'message {record["message_id"]} has role "{record["role"]}"', key="role",
                            file=file or origin, line=int(line) if line.isdigit() else None,
                            hint="OASST1 roles are prompter and assistant")
    return Node(str(record["message_id"]), parent_id, role, str(record["text"]), origin, record.get("lang"),
                record.get("rank"), bool(record.get("deleted")), bool(record.get("synthetic")))


def _nested_roots(rows: list[Row]) -> list[Node]:
    roots = []
    for origin, record in rows:
        if not is_nested(record):
            file, _, line = origin.rpartition(":")
            raise LoratuneError('expected a nested OASST1 tree with a "prompt" (the first line was one)', key="prompt",
                                file=file or origin, line=int(line) if line.isdigit() else None,
                                hint="do not mix flat message rows and tree exports in one file")

        roots.append(_build_nested(record["prompt"], origin, None))
    return roots


def _build_nested(message: dict[str, Any], origin: str, parent: str | None) -> Node:
    node = _node(message, origin, parent)
    node.children = [_build_nested(reply, origin, node.message_id) for reply in message.get("replies") or []]
    return node


def _flat_roots(rows: list[Row], dropped: dict[str, list[str]]) -> list[Node]:
    nodes: dict[str, Node] = {}
    for origin, record in rows:
        if is_nested(record):
            file, _, line = origin.rpartition(":")
            raise LoratuneError("found a nested OASST1 tree among flat message rows", file=file or origin,
                                line=int(line) if line.isdigit() else None,
                                hint="do not mix flat message rows and tree exports in one file")
        parent = record.get("parent_id")
        node = _node(record, origin, str(parent) if parent is not None else None)
        if node.message_id in nodes:
            file, _, line = origin.rpartition(":")
            raise LoratuneError(f"message {node.message_id} appears twice (first at {nodes[node.message_id].origin})",
                                file=file or origin, line=int(line) if line.isdigit() else None, key="message_id",
                                hint="remove the duplicate row")
        nodes[node.message_id] = node
    _check_cycles(nodes)
    roots = []
    for node in nodes.values():  # file order, so conversations keep the order of the file
        if node.parent_id is None:
            roots.append(node)
        elif node.parent_id in nodes:
            nodes[node.parent_id].children.append(node)
        else:
            dropped.setdefault("parent message not in the data (subtree skipped: its question is missing)",
                               []).append(node.origin)
    return roots


def _check_cycles(nodes: dict[str, Node]) -> None:
    """Walk each parent chain once (nodes already known to reach a root are not walked again)."""
    reaches_root: set[str] = set()
    for start in nodes.values():
        chain: list[str] = []
        on_chain: set[str] = set()
        current: Node | None = start
        while current is not None and current.message_id not in reaches_root:
            if current.message_id in on_chain:
                file, _, line = current.origin.rpartition(":")
                raise LoratuneError(f"message {current.message_id} is its own ancestor (the parent_id chain loops)",
                                    file=file or current.origin, line=int(line) if line.isdigit() else None,
                                    key="parent_id", hint="fix the parent_id of one message in the loop")
            chain.append(current.message_id)
            on_chain.add(current.message_id)
            current = nodes.get(current.parent_id) if current.parent_id is not None else None
        reaches_root.update(chain)


def _filter(node: Node, opts: Oasst1Options, dropped: dict[str, list[str]]) -> Node | None:
    """The tree without deleted / other-language / synthetic messages and their subtrees."""
    reason = None
    if node.deleted:
        reason = "deleted message (with its replies)"
    elif opts.lang and node.lang is not None and node.lang not in opts.lang:
        reason = f"language not in {opts.lang} (with its replies)"
    elif node.synthetic and not opts.include_synthetic:
        reason = "synthetic (model-written) message (with its replies)"
    if reason:
        dropped.setdefault(reason, []).append(node.origin)
        return None
    node.children = [c for c in (_filter(child, opts, dropped) for child in node.children) if c is not None]
    return node


# --- trees -> conversations -------------------------------------------------------------------------------------------
def _best_child(node: Node) -> Node | None:
    """The rank-0 (best) reply; unranked replies come after ranked ones, ties in file order."""
    if not node.children:
        return None
    return min(enumerate(node.children), key=lambda ic: (ic[1].rank is None, ic[1].rank or 0, ic[0]))[1]


def _best_path(root: Node, multi_turn: bool, dropped: dict[str, list[str]]) -> list[Conversation]:
    path = [root]
    while (child := _best_child(path[-1])) is not None:
        path.append(child)
        if not multi_turn and len(path) == 2:
            break
    while path and path[-1].role != "assistant":  # a question nobody answered is not a training example
        path.pop()
    if not path:
        dropped.setdefault("no assistant reply", []).append(root.origin)
        return []
    return [Conversation([Message(n.role, n.text) for n in path], path[-1].origin)]


def _pairs(root: Node) -> list[Conversation]:
    out: list[Conversation] = []

    def walk(node: Node, history: list[Node]) -> None:
        here = [*history, node]
        for child in node.children:
            if node.role == "user" and child.role == "assistant":
                context = [Message(n.role, n.text, trainable=False) for n in here]
                out.append(Conversation([*context, Message("assistant", child.text)], child.origin))
            walk(child, here)

    walk(root, [])
    return out
