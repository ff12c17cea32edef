"""Class taxonomies: trees of class names defined in YAML.

A taxonomy is a rooted tree. The root is implicit (named by ``root:``, default
``"root"``); the mapping under ``tree:`` lists its children. A leaf maps to
nothing (``Normal:`` or ``Normal: null``); a list is shorthand for a mapping of
leaves::

    name: leukemia7
    tree:
      Normal:
      Reactive:
      Leukemia:
        Acute: [ALL, AML, APML]
        Chronic: [CLL, CML]

The same tree may instead be given as ``parents:``, a mapping of every node to its
parent (the root's children map to the root's name).

Rules, each enforced with an error that names the node:

- node names are non-empty strings, unique across the whole tree (root included)
  and contain no ``/`` (paths are written ``Leukemia/Acute/ALL``);
- the tree is not empty and has no cycles;
- every inner node has at least two children. A node with a single child carries
  no decision (its head would always answer 1.0); merge the two levels or add a
  sibling.

Leaves may sit at different depths. Labels may name any node but the root: a cell
labelled ``Acute`` is known to be acute leukemia of unknown subtype.

``aliases:`` maps other spellings to nodes (``APL: APML``): a label, a label folder or a
manifest cell may use either; models, tables and files always use the node's name.

``kind:`` says what a model of the taxonomy classifies (:data:`KINDS`): ``diagnosis``
(the default: a patient's cells add up to one diagnosis, e.g. ``leukemia7``) or
``cells`` (cell types, e.g. ``pbc``: a patient's cells add up to a differential count,
not a diagnosis). A taxonomy saved without ``kind`` (by an older version) that is a
built-in one, same name and tree, takes the built-in's kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from leukotree.errors import LeukotreeError, TaxonomyError, UnknownLabelError, did_you_mean
from leukotree.rundir import parse_yaml, read_yaml

_DOC_KEYS = {"name", "root", "tree", "parents", "description", "aliases", "kind"}
#: What a taxonomy's models classify: patients' diagnoses, or cell types.
KINDS = ("diagnosis", "cells")
#: Deepest tree accepted (levels below the root).
MAX_DEPTH = 32


@dataclass(frozen=True)
class _Node:
    name: str
    parent: str | None
    children: tuple[str, ...]
    depth: int


class Taxonomy:
    """An immutable rooted tree of class names.

    Build one with :meth:`from_tree`, :meth:`from_parents`, :meth:`from_yaml` or
    :func:`load_taxonomy` (built-in names or YAML files).
    """

    def __init__(
        self,
        children: Mapping[str, Sequence[str]],
        root: str = "root",
        name: str = "custom",
        description: str = "",
        aliases: Mapping[str, str] | None = None,
        kind: str = "diagnosis",
    ) -> None:
        self.name = name
        self.root = root
        self.description = description
        if kind not in KINDS:
            raise TaxonomyError(f"Taxonomy '{name}': kind {kind!r} is not one of "
                                f"{', '.join(KINDS)} (diagnosis: a patient's cells add up "
                                "to a diagnosis; cells: the leaves are cell types)."
                                + did_you_mean(str(kind), KINDS))
        self.kind = kind
        if not children.get(root):
            raise TaxonomyError(
                f"Taxonomy '{name}' is empty: its root '{root}' has no children. "
                "List at least two classes under 'tree:'."
            )
        nodes: dict[str, _Node] = {}
        order: list[str] = []

        def visit(node: str, parent: str | None, depth: int, trail: tuple[str, ...]) -> None:
            if depth > MAX_DEPTH:
                raise TaxonomyError(
                    f"Taxonomy '{name}' is deeper than {MAX_DEPTH} levels (at "
                    f"'{'/'.join(trail[:3])}/.../{node}'); no cell taxonomy needs that many.")
            if node in trail:
                cycle = " -> ".join((*trail[trail.index(node):], node))
                raise TaxonomyError(f"Taxonomy '{name}' has a cycle: {cycle}.")
            if node in nodes:
                raise TaxonomyError(
                    f"Taxonomy '{name}': node name '{node}' appears twice, under "
                    f"'{nodes[node].parent}' and under '{parent}'. Node names must be unique; "
                    "rename one of them."
                )
            kids = tuple(children.get(node, ()))
            if len(kids) == 1:
                raise TaxonomyError(
                    f"Taxonomy '{name}': inner node '{node}' has a single child '{kids[0]}'. "
                    "A node with one child carries no decision: merge the two levels or "
                    "add a sibling class."
                )
            nodes[node] = _Node(node, parent, kids, depth)
            order.append(node)
            for kid in kids:
                visit(kid, node, depth + 1, (*trail, node))

        visit(root, None, 0, ())
        unreachable = sorted(set(children) - set(nodes))
        if unreachable:
            raise TaxonomyError(
                f"Taxonomy '{name}': nodes {unreachable} are not connected to the root "
                f"'{root}' (their parent chain never reaches it, or forms a cycle)."
            )
        self._nodes = nodes
        self._order = tuple(order)
        self.aliases = self._check_aliases(dict(aliases or {}))

    def _check_aliases(self, aliases: dict[str, str]) -> dict[str, str]:
        """``{other spelling: node}``; an alias is no node's name and names a node."""
        for alias, node in aliases.items():
            _check_name(alias, f"aliases/{alias}", self.name)
            if alias in self._nodes:
                raise TaxonomyError(
                    f"Taxonomy '{self.name}': alias '{alias}' is also a node's name; an alias "
                    "is another spelling of a node, not a node.")
            if not isinstance(node, str) or node not in self._nodes or node == self.root:
                raise TaxonomyError(
                    f"Taxonomy '{self.name}': alias '{alias}' points to {node!r}, which is not "
                    "a node." + did_you_mean(str(node), self.nodes))
        return aliases

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_tree(
        cls, tree: Any, root: str = "root", name: str = "custom", description: str = "",
        aliases: Mapping[str, str] | None = None, kind: str = "diagnosis",
    ) -> Taxonomy:
        """Build from a nested mapping (``None`` marks a leaf, a list is a set of leaves)."""
        _check_name(root, "root", name)
        children: dict[str, list[str]] = {}

        def walk(parent: str, sub: Any, where: str, seen: tuple[int, ...]) -> None:
            if len(seen) > MAX_DEPTH:
                raise TaxonomyError(
                    f"Taxonomy '{name}' is deeper than {MAX_DEPTH} levels (at "
                    f"'{where[:60]}...'); no cell taxonomy needs that many.")
            if id(sub) in seen:
                raise TaxonomyError(
                    f"Taxonomy '{name}' has a cycle at '{where}': a YAML alias refers to one "
                    "of its own ancestors."
                )
            if isinstance(sub, list):
                items: list[tuple[Any, Any]] = []
                for item in sub:
                    if isinstance(item, Mapping):
                        items.extend(item.items())
                    else:
                        items.append((item, None))
            elif isinstance(sub, Mapping):
                if not sub:
                    raise TaxonomyError(
                        f"Taxonomy '{name}': node '{where}' is an empty mapping. Write "
                        f"'{where.rsplit('/', 1)[-1]}:' with nothing after it for a leaf, or "
                        "give it children."
                    )
                items = list(sub.items())
            else:
                raise TaxonomyError(
                    f"Taxonomy '{name}': the children of '{where}' must be a mapping, a list "
                    f"or nothing (a leaf); found {type(sub).__name__} {sub!r}."
                )
            for key, value in items:
                _check_name(key, f"{where}/{key}", name)
                if key == root:
                    raise TaxonomyError(
                        f"Taxonomy '{name}': node name '{key}' at '{where}/{key}' is also the "
                        "root's name. Node names must be unique; rename it or set 'root:'.")
                children.setdefault(parent, []).append(key)
                if value is not None:
                    walk(key, value, f"{where}/{key}", (*seen, id(sub)))

        if tree is None or (isinstance(tree, Mapping | list) and not tree):
            raise TaxonomyError(
                f"Taxonomy '{name}' is empty: 'tree:' lists no classes. List at least two."
            )
        walk(root, tree, root, ())
        return cls(children, root=root, name=name, description=description, aliases=aliases,
                   kind=kind)

    @classmethod
    def from_parents(
        cls,
        parents: Mapping[str, str],
        root: str = "root",
        name: str = "custom",
        description: str = "",
        aliases: Mapping[str, str] | None = None,
        kind: str = "diagnosis",
    ) -> Taxonomy:
        """Build from a ``{child: parent}`` mapping; the root's children map to ``root``."""
        if not parents:
            raise TaxonomyError(f"Taxonomy '{name}' is empty: 'parents:' lists no classes.")
        _check_name(root, "root", name)
        children: dict[str, list[str]] = {}
        for child, parent in parents.items():
            _check_name(child, str(child), name)
            _check_name(parent, f"parent of {child}", name)
            if child == root:
                raise TaxonomyError(
                    f"Taxonomy '{name}': the root '{root}' cannot have a parent "
                    f"(found '{root}: {parent}')."
                )
            if parent != root and parent not in parents:
                raise TaxonomyError(
                    f"Taxonomy '{name}': the parent '{parent}' of '{child}' is not a node."
                    + did_you_mean(parent, [root, *parents])
                )
            children.setdefault(parent, []).append(child)
        for start in parents:
            trail = [start]
            while trail[-1] != root:
                nxt = parents[trail[-1]]
                if nxt in trail:
                    cycle = " -> ".join([*trail[trail.index(nxt):], nxt])
                    raise TaxonomyError(f"Taxonomy '{name}' has a cycle: {cycle}.")
                trail.append(nxt)
        return cls(children, root=root, name=name, description=description, aliases=aliases,
                   kind=kind)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "<dict>") -> Taxonomy:
        """Build from a parsed YAML document with ``name``, ``root`` and ``tree`` or ``parents``."""
        if not isinstance(doc, Mapping):
            raise TaxonomyError(
                f"Taxonomy file {source}: expected a mapping with a 'tree:' key, "
                f"found {type(doc).__name__}."
            )
        unknown = sorted(set(map(str, doc)) - _DOC_KEYS)
        if unknown:
            raise TaxonomyError(
                f"Taxonomy file {source}: unknown keys {unknown}; allowed keys are "
                f"{sorted(_DOC_KEYS)}."
            )
        name = str(doc.get("name") or Path(source).stem)
        root = doc.get("root", "root")
        description = str(doc.get("description") or "")
        aliases = doc.get("aliases") or {}
        if not isinstance(aliases, Mapping):
            raise TaxonomyError(
                f"Taxonomy file {source}: 'aliases:' must map each other spelling to a node "
                "(e.g. 'APL: APML').")
        if ("tree" in doc) == ("parents" in doc):
            raise TaxonomyError(
                f"Taxonomy file {source}: give exactly one of 'tree:' (nested mapping) or "
                "'parents:' (child: parent mapping)."
            )
        kind = doc.get("kind", "diagnosis")
        if "tree" in doc:
            tax = cls.from_tree(doc["tree"], root=root, name=name, description=description,
                                aliases=aliases, kind=kind)
        else:
            parents = doc["parents"]
            if not isinstance(parents, Mapping):
                raise TaxonomyError(
                    f"Taxonomy file {source}: 'parents:' must map each node to its parent."
                )
            tax = cls.from_parents(parents, root=root, name=name, description=description,
                                   aliases=aliases, kind=kind)
        if "kind" not in doc:
            tax.kind = _builtin_kind(tax)
        return tax

    @classmethod
    def from_yaml(cls, path: str | Path) -> Taxonomy:
        """Read a taxonomy YAML file (strictly: no aliases, no repeated keys)."""
        path = Path(path)
        try:
            return cls.from_dict(read_yaml(path, "Taxonomy file"), source=str(path))
        except LeukotreeError as err:
            text = str(err)
            raise TaxonomyError(text if str(path) in text else f"{text} (in '{path}')") from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML document that rebuilds this taxonomy (``Taxonomy.from_dict``)."""

        def sub(node: str) -> dict[str, Any] | None:
            kids = self._nodes[node].children
            return {k: sub(k) for k in kids} if kids else None

        doc: dict[str, Any] = {"name": self.name, "root": self.root}
        if self.description:
            doc["description"] = self.description
        doc["kind"] = self.kind
        doc["tree"] = sub(self.root)
        if self.aliases:
            doc["aliases"] = dict(self.aliases)
        return doc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ structure
    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """All nodes except the root, in pre-order (parents before children)."""
        return self._order[1:]

    @cached_property
    def leaves(self) -> tuple[str, ...]:
        """Leaf classes in pre-order; this is the class order of flat models."""
        return tuple(n for n in self.nodes if not self._nodes[n].children)

    @cached_property
    def inner_nodes(self) -> tuple[str, ...]:
        """Nodes with children, root first, in pre-order; one head per inner node."""
        return tuple(n for n in self._order if self._nodes[n].children)

    @cached_property
    def max_depth(self) -> int:
        return max(self._nodes[n].depth for n in self.leaves)

    @cached_property
    def leaf_index(self) -> dict[str, int]:
        return {leaf: i for i, leaf in enumerate(self.leaves)}

    @cached_property
    def node_index(self) -> dict[str, int]:
        """Index of each non-root node in :attr:`nodes`."""
        return {n: i for i, n in enumerate(self.nodes)}

    def __contains__(self, name: object) -> bool:
        """True for a node's name or one of its aliases."""
        return isinstance(name, str) and (name in self._nodes or name in self.aliases)

    def __len__(self) -> int:
        return len(self.nodes)

    def _structure(self) -> str:
        doc = self.to_dict()
        doc.pop("aliases", None)
        doc.pop("kind", None)  # how its models are read, not what they output
        return yaml.safe_dump(doc, sort_keys=False)

    def __eq__(self, other: object) -> bool:
        # Sibling order matters: it sets the class order of every model. Aliases do not:
        # they are other spellings of the same nodes.
        return isinstance(other, Taxonomy) and self._structure() == other._structure()

    def __hash__(self) -> int:
        return hash(self._structure())

    def __repr__(self) -> str:
        return (
            f"Taxonomy(name={self.name!r}, leaves={len(self.leaves)}, "
            f"inner_nodes={len(self.inner_nodes)}, max_depth={self.max_depth})"
        )

    def _get(self, node: str) -> _Node:
        try:
            return self._nodes[node]
        except KeyError:
            raise UnknownLabelError(
                f"'{node}' is not a node of taxonomy '{self.name}'."
                + did_you_mean(str(node), self._nodes)
            ) from None

    def parent(self, node: str) -> str | None:
        return self._get(node).parent

    def children(self, node: str) -> tuple[str, ...]:
        return self._get(node).children

    def depth(self, node: str) -> int:
        """Distance from the root (the root's children have depth 1)."""
        return self._get(node).depth

    def is_leaf(self, node: str) -> bool:
        return not self._get(node).children

    def path(self, node: str) -> tuple[str, ...]:
        """Nodes from depth 1 down to ``node`` (root excluded)."""
        out: list[str] = []
        cur: str | None = node
        while cur is not None and cur != self.root:
            out.append(cur)
            cur = self._get(cur).parent
        return tuple(reversed(out))

    def ancestors(self, node: str) -> tuple[str, ...]:
        """Strict ancestors from depth 1 down to the parent (root excluded)."""
        return self.path(node)[:-1]

    def descendant_leaves(self, node: str) -> tuple[str, ...]:
        """Leaves under ``node`` (``(node,)`` for a leaf), in leaf order."""
        if node == self.root:
            return self.leaves
        if self.is_leaf(node):
            return (node,)
        return tuple(leaf for leaf in self.leaves if node in self.path(leaf))

    def path_string(self, node: str, sep: str = "/") -> str:
        return sep.join(self.path(node))

    def render(self) -> str:
        """A text drawing of the tree."""
        lines = [f"{self.root}  [taxonomy '{self.name}': {len(self.leaves)} leaves]"]

        def draw(node: str, prefix: str) -> None:
            kids = self.children(node)
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                lines.append(f"{prefix}{'└── ' if last else '├── '}{kid}")
                draw(kid, prefix + ("    " if last else "│   "))

        draw(self.root, "")
        return "\n".join(lines)

    # ------------------------------------------------------------------ labels
    def resolve(self, label: object, where: str = "") -> str:
        """Return ``label`` as a node name, or raise with a did-you-mean hint.

        ``where`` names the source (``"manifest.csv line 17"``) for the message.
        """
        text = "" if label is None else str(label).strip()
        text = self.aliases.get(text, text)
        loc = f" in {where}" if where else ""
        if text == self.root:
            raise UnknownLabelError(
                f"Label '{text}'{loc} is the root of taxonomy '{self.name}', which says "
                "nothing about the class; label the image with a class or leave it out."
            )
        if text not in self._nodes:
            raise UnknownLabelError(
                f"Unknown label '{text}'{loc}: not a node of taxonomy '{self.name}'."
                + did_you_mean(text, [*self.nodes, *self.aliases])
            )
        return text

    def node_leaf_matrix(self) -> np.ndarray:
        """Boolean matrix ``M[i, j]``: leaf ``j`` lies under (or is) node ``nodes[i]``.

        Probabilities of inner nodes follow from leaf probabilities as ``M @ p``.
        """
        out = np.zeros((len(self.nodes), len(self.leaves)), dtype=bool)
        for j, leaf in enumerate(self.leaves):
            for node in self.path(leaf):
                out[self.node_index[node], j] = True
        return out

    def encode_leaves(self, labels: Iterable[str]) -> np.ndarray:
        """Leaf index per label, ``-1`` for labels that name an inner node."""
        return np.array([self.leaf_index.get(self.resolve(lab), -1) for lab in labels],
                        dtype=np.int64)

    def leaf_mask(self, labels: Iterable[str]) -> np.ndarray:
        """Boolean ``(n, n_leaves)``: the leaves compatible with each label.

        A leaf label has one ``True``; an inner-node label has all leaves below it.
        """
        matrix = self.node_leaf_matrix()
        rows = [self.node_index[self.resolve(lab)] for lab in labels]
        return matrix[rows] if rows else np.zeros((0, len(self.leaves)), dtype=bool)

    def encode_heads(self, labels: Iterable[str]) -> np.ndarray:
        """Per-head targets ``(n, n_inner)``: the child index taken at each inner node.

        Column ``k`` belongs to ``inner_nodes[k]``. The value is ``-1`` (ignore) when
        the label's path does not pass through that node, or stops at or above it
        (an image labelled ``Acute`` trains the root and ``Leukemia`` heads only).
        """
        col = {n: k for k, n in enumerate(self.inner_nodes)}
        labels = list(labels)
        out = np.full((len(labels), len(self.inner_nodes)), -1, dtype=np.int64)
        for i, lab in enumerate(labels):
            parent = self.root
            for node in self.path(lab):
                out[i, col[parent]] = self.children(parent).index(node)
                parent = node
        return out

    def encode_levels(self, labels: Iterable[str]) -> np.ndarray:
        """Node index at each depth ``(n, max_depth)``; ``-1`` below the label's depth."""
        labels = list(labels)
        out = np.full((len(labels), self.max_depth), -1, dtype=np.int64)
        for i, lab in enumerate(labels):
            for d, node in enumerate(self.path(lab)):
                out[i, d] = self.node_index[node]
        return out

    def lowest_common_ancestor(self, a: str, b: str) -> str:
        pa, pb = self.path(a), self.path(b)
        lca = self.root
        for x, y in zip(pa, pb, strict=False):
            if x != y:
                break
            lca = x
        return lca


def _check_name(name: object, where: str, taxonomy: str) -> None:
    if not isinstance(name, str):
        raise TaxonomyError(
            f"Taxonomy '{taxonomy}': node name at '{where}' is {type(name).__name__} "
            f"{name!r}, not text. Quote it in the YAML (YAML reads yes/no/on/off as "
            "booleans and digits as numbers)."
        )
    if not name.strip() or name != name.strip() or "/" in name:
        raise TaxonomyError(
            f"Taxonomy '{taxonomy}': invalid node name {name!r} at '{where}': names must be "
            "non-empty, without surrounding spaces and without '/'."
        )


def _builtin_kind(tax: Taxonomy) -> str:
    """The kind of the built-in taxonomy that ``tax`` is (same name and tree), for a
    taxonomy saved before ``kind`` existed; ``diagnosis`` otherwise."""
    if tax.name not in builtin_taxonomies():
        return "diagnosis"
    builtin = load_taxonomy(tax.name)
    return builtin.kind if builtin == tax else "diagnosis"


def builtin_taxonomies() -> list[str]:
    """Names of the taxonomies shipped with leukotree."""
    folder = resources.files("leukotree") / "taxonomies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_taxonomy(spec: str | Path | Taxonomy) -> Taxonomy:
    """A built-in taxonomy by name (``leukemia7``, ``cnmc``, ``pbc``...) or a YAML file."""
    if isinstance(spec, Taxonomy):
        return spec
    text = str(spec)
    names = builtin_taxonomies()
    if text in names:
        res = resources.files("leukotree") / "taxonomies" / f"{text}.yaml"
        doc = parse_yaml(res.read_text(encoding="utf-8"), f"built-in taxonomy '{text}'")
        return Taxonomy.from_dict(doc, source=f"built-in taxonomy '{text}'")
    path = Path(text)
    if path.suffix.lower() in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise TaxonomyError(f"Taxonomy file '{path}' does not exist.")
        return Taxonomy.from_yaml(path)
    raise TaxonomyError(
        f"Unknown taxonomy '{text}': not a built-in ({', '.join(names)}) and not a YAML file."
        + did_you_mean(text, names)
    )
