"""Taxonomies: built-ins, structure, label encodings, builders and every rule's error."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from leukotree.errors import LeukotreeError, TaxonomyError, UnknownLabelError
from leukotree.taxonomy import Taxonomy, builtin_taxonomies, load_taxonomy

LEUKEMIA7_PARENTS = {
    "Normal": "root",
    "Reactive": "root",
    "Leukemia": "root",
    "Acute": "Leukemia",
    "ALL": "Acute",
    "AML": "Acute",
    "APML": "Acute",
    "Chronic": "Leukemia",
    "CLL": "Chronic",
    "CML": "Chronic",
}


def msg(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------- built-ins
def test_builtin_taxonomies_listed():
    names = builtin_taxonomies()
    assert {"leukemia7", "cnmc", "pbc", "pbc-fine"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["leukemia7", "cnmc", "pbc", "pbc-fine"])
def test_builtins_load_and_are_valid(name):
    tax = load_taxonomy(name)
    assert tax.name == name
    assert tax.description  # every built-in documents itself
    assert len(tax.leaves) >= 2
    # every inner node has >= 2 children, every leaf none
    for node in tax.inner_nodes:
        assert len(tax.children(node)) >= 2
    for leaf in tax.leaves:
        assert tax.children(leaf) == ()


def test_load_taxonomy_passes_a_taxonomy_through(leukemia7):
    assert load_taxonomy(leukemia7) is leukemia7


# --------------------------------------------------------------------- structure
def test_leukemia7_structure(leukemia7):
    tax = leukemia7
    assert tax.root == "root"
    assert tax.leaves == ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML")
    assert tax.inner_nodes == ("root", "Leukemia", "Acute", "Chronic")
    assert tax.nodes == (
        "Normal", "Reactive", "Leukemia", "Acute", "ALL", "AML", "APML", "Chronic", "CLL", "CML",
    )
    assert len(tax) == 10
    assert tax.children("root") == ("Normal", "Reactive", "Leukemia")
    assert tax.children("Leukemia") == ("Acute", "Chronic")
    assert tax.children("Acute") == ("ALL", "AML", "APML")
    assert tax.children("Chronic") == ("CLL", "CML")
    assert tax.depth("root") == 0
    assert tax.depth("Normal") == 1
    assert tax.depth("Leukemia") == 1
    assert tax.depth("Acute") == 2
    assert tax.depth("ALL") == 3
    assert tax.max_depth == 3
    assert tax.parent("ALL") == "Acute"
    assert tax.parent("Normal") == "root"
    assert tax.parent("root") is None
    assert tax.is_leaf("CML") and not tax.is_leaf("Chronic")
    assert tax.leaf_index == {"Normal": 0, "Reactive": 1, "ALL": 2, "AML": 3, "APML": 4,
                              "CLL": 5, "CML": 6}
    assert "ALL" in tax and "Acute" in tax and "root" in tax
    assert "all" not in tax and 3 not in tax


def test_leukemia7_paths_and_ancestors(leukemia7):
    tax = leukemia7
    assert tax.path("ALL") == ("Leukemia", "Acute", "ALL")
    assert tax.ancestors("ALL") == ("Leukemia", "Acute")
    assert tax.path("Normal") == ("Normal",)
    assert tax.ancestors("Normal") == ()
    assert tax.path("Chronic") == ("Leukemia", "Chronic")
    assert tax.path_string("CML") == "Leukemia/Chronic/CML"
    assert tax.path_string("CML", sep=" > ") == "Leukemia > Chronic > CML"
    assert tax.lowest_common_ancestor("ALL", "AML") == "Acute"
    assert tax.lowest_common_ancestor("ALL", "CML") == "Leukemia"
    assert tax.lowest_common_ancestor("Normal", "ALL") == "root"
    assert tax.lowest_common_ancestor("APML", "APML") == "APML"


def test_leukemia7_descendant_leaves(leukemia7):
    tax = leukemia7
    assert tax.descendant_leaves("Leukemia") == ("ALL", "AML", "APML", "CLL", "CML")
    assert tax.descendant_leaves("Acute") == ("ALL", "AML", "APML")
    assert tax.descendant_leaves("Chronic") == ("CLL", "CML")
    assert tax.descendant_leaves("ALL") == ("ALL",)
    assert tax.descendant_leaves("root") == tax.leaves


def test_unknown_node_in_structure_query_names_it(leukemia7):
    with pytest.raises(UnknownLabelError) as excinfo:
        leukemia7.depth("Acutee")
    assert "'Acutee'" in msg(excinfo)
    assert "Did you mean 'Acute'" in msg(excinfo)


def test_pbc_structure():
    tax = load_taxonomy("pbc")
    assert tax.root == "blood_cell"
    assert tax.leaves == ("neutrophil", "ig", "eosinophil", "basophil", "lymphocyte",
                          "monocyte", "erythroblast", "platelet")
    assert tax.inner_nodes == ("blood_cell", "leukocyte", "granulocyte", "mononuclear")
    assert tax.children("blood_cell") == ("leukocyte", "erythroblast", "platelet")
    assert tax.children("leukocyte") == ("granulocyte", "mononuclear")
    assert tax.path("ig") == ("leukocyte", "granulocyte", "ig")
    assert tax.depth("platelet") == 1
    assert tax.depth("monocyte") == 3
    assert tax.max_depth == 3


def test_pbc_fine_has_leaves_at_several_depths():
    tax = load_taxonomy("pbc-fine")
    assert tax.root == "blood_cell"
    assert len(tax.leaves) == 11
    assert tax.inner_nodes == ("blood_cell", "leukocyte", "granulocyte", "neutrophil", "ig",
                               "mononuclear")
    assert tax.path("metamyelocyte") == ("leukocyte", "granulocyte", "ig", "metamyelocyte")
    assert tax.depth("metamyelocyte") == 4
    assert tax.depth("eosinophil") == 3
    assert tax.depth("platelet") == 1
    assert tax.max_depth == 4
    assert tax.descendant_leaves("neutrophil") == ("segmented_neutrophil", "band_neutrophil")


def test_cnmc_structure():
    tax = load_taxonomy("cnmc")
    assert tax.root == "cell"
    assert tax.leaves == ("all", "hem")
    assert tax.inner_nodes == ("cell",)


def test_render_draws_every_node(leukemia7):
    text = leukemia7.render()
    lines = text.splitlines()
    assert lines[0].startswith("root")
    assert "7 leaves" in lines[0]
    assert len(lines) == 1 + len(leukemia7.nodes)
    assert "└── CML" in text and "├── ALL" in text


# --------------------------------------------------------------------- encodings
LABELS = ["Normal", "ALL", "Acute", "CML"]


def test_encode_heads_hand_computed(leukemia7):
    # columns: root, Leukemia, Acute, Chronic; value: child index taken; -1: ignore
    expected = np.array([
        [0, -1, -1, -1],  # Normal: root -> Normal (child 0)
        [2, 0, 0, -1],  # ALL: root -> Leukemia (2) -> Acute (0) -> ALL (0)
        [2, 0, -1, -1],  # Acute: only the root and Leukemia heads are trained
        [2, 1, -1, 1],  # CML: root -> Leukemia (2) -> Chronic (1) -> CML (1)
    ])
    out = leukemia7.encode_heads(LABELS)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)


def test_encode_heads_accepts_a_generator(leukemia7):
    out = leukemia7.encode_heads(lab for lab in ["Reactive"])
    np.testing.assert_array_equal(out, [[1, -1, -1, -1]])


def test_encode_heads_unknown_label_raises(leukemia7):
    with pytest.raises(UnknownLabelError, match="'Bogus'"):
        leukemia7.encode_heads(["Bogus"])


def test_encode_leaves(leukemia7):
    np.testing.assert_array_equal(leukemia7.encode_leaves(LABELS), [0, 2, -1, 6])
    np.testing.assert_array_equal(leukemia7.encode_leaves(["Leukemia", "Chronic"]), [-1, -1])


def test_leaf_mask(leukemia7):
    mask = leukemia7.leaf_mask(["ALL", "Acute", "Leukemia", "Normal"])
    expected = np.array([
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
    ], dtype=bool)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)
    assert leukemia7.leaf_mask([]).shape == (0, 7)


def test_leaf_mask_accepts_numpy_labels(leukemia7):
    # Regression (fixed): taxonomy.py Taxonomy.leaf_mask (line 400) tests ``if labels`` on its
    # Iterable argument: a numpy array of 2+ labels raises "ValueError: The truth value
    # of an array with more than one element is ambiguous"; an empty generator raises
    # "need at least one array to stack". encode_heads/encode_leaves accept both.
    labels = np.array(["ALL", "Acute"])
    np.testing.assert_array_equal(
        leukemia7.leaf_mask(labels), leukemia7.leaf_mask(["ALL", "Acute"])
    )
    assert leukemia7.leaf_mask(lab for lab in []).shape == (0, 7)


def test_node_leaf_matrix(leukemia7):
    m = leukemia7.node_leaf_matrix()
    assert m.shape == (10, 7)
    # rows follow ``nodes``: a leaf covers itself, an inner node its descendant leaves
    np.testing.assert_array_equal(m.sum(axis=1), [1, 1, 5, 3, 1, 1, 1, 2, 1, 1])
    # each leaf is covered by every node on its path: its depth
    np.testing.assert_array_equal(m.sum(axis=0), [1, 1, 3, 3, 3, 3, 3])
    # inner-node probabilities are M @ p
    p = np.array([0.1, 0.1, 0.2, 0.1, 0.1, 0.3, 0.1])
    probs = dict(zip(leukemia7.nodes, m @ p, strict=True))
    assert probs["Leukemia"] == pytest.approx(0.8)
    assert probs["Acute"] == pytest.approx(0.4)
    assert probs["Chronic"] == pytest.approx(0.4)
    # a leaf's row has one True, at its own column
    for leaf, j in leukemia7.leaf_index.items():
        row = m[leukemia7.node_index[leaf]]
        assert row.sum() == 1 and row[j]


def test_encode_levels(leukemia7):
    # node_index: Normal 0, Reactive 1, Leukemia 2, Acute 3, ALL 4, ..., Chronic 7, CML 9
    expected = [[0, -1, -1], [2, 3, 4], [2, 3, -1], [2, 7, 9]]
    np.testing.assert_array_equal(leukemia7.encode_levels(LABELS), expected)


# --------------------------------------------------------------------- builders
def test_to_dict_from_dict_round_trip(leukemia7):
    doc = leukemia7.to_dict()
    assert doc["name"] == "leukemia7" and doc["root"] == "root"
    assert doc["tree"] == {
        "Normal": None,
        "Reactive": None,
        "Leukemia": {"Acute": {"ALL": None, "AML": None, "APML": None},
                     "Chronic": {"CLL": None, "CML": None}},
    }
    again = Taxonomy.from_dict(doc)
    assert again == leukemia7
    assert hash(again) == hash(leukemia7)
    assert again.leaves == leukemia7.leaves
    via_yaml = Taxonomy.from_dict(yaml.safe_load(leukemia7.to_yaml()))
    assert via_yaml == leukemia7


def test_equality_depends_on_tree_and_name(leukemia7):
    doc = leukemia7.to_dict()
    other_name = Taxonomy.from_dict({**doc, "name": "other"})
    assert other_name != leukemia7
    other_tree = Taxonomy.from_tree(
        {"Normal": None, "Reactive": None, "Leukemia": ["ALL", "AML", "CLL", "CML"]},
        name="leukemia7", description=leukemia7.description,
    )
    assert other_tree != leukemia7
    assert leukemia7 != "leukemia7"


def test_equality_respects_sibling_order():
    # Regression (fixed): taxonomy.py Taxonomy.__eq__ (line 287-288) compares to_dict() results,
    # and dict equality ignores key order, so two taxonomies that differ only in the
    # order of siblings compare equal although their ``leaves`` (the class order of
    # flat models), ``leaf_index`` and every encode_* output differ. __hash__ (line
    # 290-291) hashes the order-sensitive YAML, so a == b while hash(a) != hash(b),
    # breaking Python's hash/eq contract (both land in one set as two members).
    a = Taxonomy.from_tree(["x", "y"])
    b = Taxonomy.from_tree(["y", "x"])
    assert a.leaves != b.leaves
    assert a != b
    assert len({a, b, Taxonomy.from_tree(["x", "y"])}) == 2


def test_from_parents_equivalent_to_from_tree(leukemia7):
    tax = Taxonomy.from_parents(LEUKEMIA7_PARENTS, name="leukemia7",
                                description=leukemia7.description)
    assert tax == leukemia7
    assert tax.leaves == leukemia7.leaves
    assert tax.inner_nodes == leukemia7.inner_nodes
    via_doc = Taxonomy.from_dict({"name": "leukemia7", "parents": LEUKEMIA7_PARENTS,
                                  "description": leukemia7.description})
    assert via_doc == leukemia7


def test_list_shorthand():
    as_lists = Taxonomy.from_tree({"a": ["x", "y"], "b": None})
    as_maps = Taxonomy.from_tree({"a": {"x": None, "y": None}, "b": None})
    assert as_lists == as_maps
    assert as_lists.leaves == ("x", "y", "b")
    # a list may mix leaves and sub-trees
    mixed = Taxonomy.from_tree(["p", {"q": ["r", "s"]}])
    assert mixed.leaves == ("p", "r", "s")
    assert mixed.children("root") == ("p", "q")


def test_custom_root_name():
    tax = Taxonomy.from_dict(yaml.safe_load("name: t\nroot: cell\ntree: [a, b]\n"))
    assert tax.root == "cell"
    assert tax.inner_nodes == ("cell",)
    with pytest.raises(UnknownLabelError, match="root"):
        tax.resolve("cell")


def test_from_dict_name_defaults_to_source_stem():
    tax = Taxonomy.from_dict({"tree": ["a", "b"]}, source="/x/my-tax.yaml")
    assert tax.name == "my-tax"


# --------------------------------------------------------------------- errors
def test_duplicate_names_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_tree({"a": ["x", "y"], "b": ["x", "z"]})
    assert "'x' appears twice" in msg(excinfo)
    assert "'a'" in msg(excinfo) and "'b'" in msg(excinfo)


def test_duplicate_name_within_one_list_rejected():
    with pytest.raises(TaxonomyError, match="'x' appears twice"):
        Taxonomy.from_tree({"a": ["x", "x"], "b": None})


def test_node_named_like_the_root_rejected():
    # Names must be unique with the root included. (The message currently calls it a
    # cycle "root -> root" rather than a duplicate; it still names the node.)
    with pytest.raises(TaxonomyError, match="root"):
        Taxonomy.from_tree({"root": None, "b": None})


def test_cycle_via_parents_with_other_valid_nodes_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_parents({"a": "b", "b": "a", "c": "root", "d": "root"})
    text = msg(excinfo)
    assert "a -> b -> a" in text
    assert "cycle" in text


def test_cycle_via_parents_alone_names_the_nodes():
    # Regression (fixed): taxonomy.py Taxonomy.__init__ (lines 74-78): for
    # from_parents({"a": "b", "b": "a"}) the root has no children, so the error is
    # "Taxonomy 'custom' is empty: its root 'root' has no children. List at least two
    # classes under 'tree:'." It names neither 'a' nor 'b' nor the cycle, and points the
    # user to 'tree:' although they wrote 'parents:'.
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_parents({"a": "b", "b": "a"})
    text = msg(excinfo)
    assert "a -> b -> a" in text
    assert "cycle" in text


def test_cycle_via_recursive_yaml_alias_is_a_taxonomy_error():
    doc = yaml.safe_load("tree: &a {x: *a, y: null}")
    assert doc["tree"]["x"] is doc["tree"]  # the YAML really is recursive
    with pytest.raises(TaxonomyError) as excinfo:  # not RecursionError
        Taxonomy.from_dict(doc)
    assert "cycle" in msg(excinfo)
    assert "root/x" in msg(excinfo)


def test_cycle_via_yaml_file(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: loop\ntree: &a\n  x: *a\n  y:\n")
    with pytest.raises(TaxonomyError, match="cycle"):
        load_taxonomy(path)


@pytest.mark.parametrize("tree", [None, {}, []])
def test_empty_tree_rejected(tree):
    with pytest.raises(TaxonomyError, match="empty"):
        Taxonomy.from_tree(tree, name="nothing")


def test_empty_parents_rejected():
    with pytest.raises(TaxonomyError, match="empty"):
        Taxonomy.from_parents({})


def test_empty_mapping_node_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_dict(yaml.safe_load("tree:\n  a: {}\n  b:\n"))
    assert "'root/a' is an empty mapping" in msg(excinfo)
    assert "'a:'" in msg(excinfo)  # tells how to write a leaf


def test_single_child_inner_node_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_tree({"a": ["x"], "b": None})
    assert "inner node 'a' has a single child 'x'" in msg(excinfo)


def test_single_top_level_class_rejected():
    with pytest.raises(TaxonomyError, match="'root' has a single child 'a'"):
        Taxonomy.from_tree({"a": None})


def test_non_string_name_rejected():
    doc = yaml.safe_load("tree:\n  yes:\n  b:\n")
    assert True in doc["tree"]  # YAML 1.1 reads 'yes' as a boolean
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_dict(doc)
    assert "bool True" in msg(excinfo)
    assert "Quote it" in msg(excinfo)


def test_numeric_name_rejected():
    with pytest.raises(TaxonomyError, match="int 3"):
        Taxonomy.from_dict(yaml.safe_load("tree: [3, b]"))


@pytest.mark.parametrize("bad", ["a/b", " a", "a ", ""])
def test_invalid_name_rejected(bad):
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_tree({bad: None, "c": None})
    assert repr(bad) in msg(excinfo)


def test_leaf_value_of_wrong_type_rejected():
    with pytest.raises(TaxonomyError, match="children of 'root/b' must be"):
        Taxonomy.from_tree({"a": None, "b": 3})


def test_unknown_top_level_key_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_dict({"name": "t", "tree": ["a", "b"], "leaves": ["a"]})
    assert "['leaves']" in msg(excinfo)
    assert "allowed keys" in msg(excinfo)


def test_both_tree_and_parents_rejected():
    with pytest.raises(TaxonomyError, match="exactly one of 'tree:'"):
        Taxonomy.from_dict({"tree": ["a", "b"], "parents": {"a": "root", "b": "root"}})


def test_neither_tree_nor_parents_rejected():
    with pytest.raises(TaxonomyError, match="exactly one of 'tree:'"):
        Taxonomy.from_dict({"name": "t"})


def test_document_not_a_mapping_rejected():
    with pytest.raises(TaxonomyError, match="expected a mapping"):
        Taxonomy.from_dict(["a", "b"])


def test_unknown_parent_rejected():
    with pytest.raises(TaxonomyError) as excinfo:
        Taxonomy.from_parents({"a": "root", "b": "root", "c": "bb", "d": "b"})
    assert "the parent 'bb' of 'c' is not a node" in msg(excinfo)
    assert "Did you mean 'b'" in msg(excinfo)


def test_root_with_parent_rejected():
    with pytest.raises(TaxonomyError, match="root 'root' cannot have a parent"):
        Taxonomy.from_parents({"root": "a", "a": "root", "b": "root"})


def test_resolve(leukemia7):
    assert leukemia7.resolve("AML") == "AML"
    assert leukemia7.resolve("  Acute ") == "Acute"
    with pytest.raises(UnknownLabelError) as excinfo:
        leukemia7.resolve("AMl", where="manifest.csv line 7")
    text = msg(excinfo)
    assert "Unknown label 'AMl' in manifest.csv line 7" in text
    assert "Did you mean 'AML'" in text  # case-insensitive match proposed first


def test_resolve_refuses_the_root(leukemia7):
    with pytest.raises(UnknownLabelError) as excinfo:
        leukemia7.resolve("root")
    assert "is the root of taxonomy 'leukemia7'" in msg(excinfo)


def test_resolve_empty_label(leukemia7):
    with pytest.raises(UnknownLabelError, match="Unknown label ''"):
        leukemia7.resolve(None)


def test_errors_are_leukotree_errors():
    assert issubclass(TaxonomyError, LeukotreeError)
    assert issubclass(UnknownLabelError, LeukotreeError)


@pytest.mark.parametrize(("spec", "hint"), [("leukemia8", "'leukemia7'"),
                                            ("pbc_fine", "'pbc-fine'"),
                                            ("CNMC", "'cnmc'")])
def test_load_unknown_taxonomy_suggests_builtins(spec, hint):
    with pytest.raises(TaxonomyError) as excinfo:
        load_taxonomy(spec)
    text = msg(excinfo)
    assert f"Unknown taxonomy '{spec}'" in text
    assert f"Did you mean {hint}" in text


def test_load_taxonomy_from_yaml_file(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text(
        "name: mine\n"
        "root: cell\n"
        "tree:\n"
        "  blast: [lymphoblast, myeloblast]\n"
        "  mature:\n"
    )
    tax = load_taxonomy(path)
    assert tax.name == "mine"
    assert tax.root == "cell"
    assert tax.leaves == ("lymphoblast", "myeloblast", "mature")
    assert load_taxonomy(str(path)) == tax
    assert Taxonomy.from_yaml(path) == tax


def test_load_taxonomy_missing_yaml_file(tmp_path):
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_load_taxonomy_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tree: [a, b\n")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        load_taxonomy(path)


def test_aliases_are_other_spellings_of_nodes(tmp_path):
    tax = load_taxonomy("leukemia7")
    assert tax.resolve("APL") == "APML" and "APL" in tax
    assert tax.encode_leaves(["APL", "APML"]).tolist() == [4, 4]
    assert load_taxonomy("aml-apl").resolve("APML") == "APL"
    again = Taxonomy.from_dict(tax.to_dict())
    assert again.aliases == {"APL": "APML"} and again == tax
    for aliases, match in (({"ALL": "AML"}, "also a node's name"),
                           ({"X": "Nowhere"}, "not a node"), ({"X": "root"}, "not a node")):
        doc = {"tree": {"A": None, "B": None, "ALL": None, "AML": None}, "aliases": aliases}
        with pytest.raises(TaxonomyError, match=match):
            Taxonomy.from_dict(doc)
    with pytest.raises(UnknownLabelError, match="Did you mean 'APL'"):
        tax.resolve("APl ")


def test_cell_types_of_the_deepapl_data_resolve():
    cells = load_taxonomy("jhh-cells")
    names = ["blast-no-lineage-spec", "lymphocyte", "smudge-cells", "segmented-neutrophils",
             "monocyte", "promyelocyte", "erythroblast", "lymphocyte-variant",
             "band-neutrophils", "myelocyte", "eosinophils", "promonocyte", "metamyelocyte",
             "basophil", "giant-thrombocyte", "plasma-cells", "thrombocyte-aggregation",
             "unknown"]
    resolved = [cells.resolve(n) for n in names]
    assert all(cells.is_leaf(r) for r in resolved)
    assert cells.resolve("lymphocyte") == "lymphocyte"  # the mature cell, a leaf


# --------------------------------------------------------------------- kind
def test_builtin_kinds_cell_types_or_diagnoses():
    kinds = {name: load_taxonomy(name).kind for name in builtin_taxonomies()}
    assert kinds == {"aml-apl": "diagnosis", "cnmc": "diagnosis", "jhh-cells": "cells",
                     "leukemia7": "diagnosis", "pbc": "cells", "pbc-fine": "cells"}


def test_kind_defaults_to_diagnosis_and_round_trips():
    tax = Taxonomy.from_tree(["x", "y"])
    assert tax.kind == "diagnosis"
    cells = Taxonomy.from_dict({"name": "mine", "kind": "cells", "tree": ["x", "y"]})
    assert cells.kind == "cells" and Taxonomy.from_dict(cells.to_dict()).kind == "cells"
    assert Taxonomy.from_dict(yaml.safe_load(cells.to_yaml())).kind == "cells"
    # the kind says how models are read, not what they output: equal trees stay equal
    assert cells == Taxonomy.from_dict({"name": "mine", "tree": ["x", "y"]})


def test_a_taxonomy_saved_before_kind_takes_the_builtins_kind():
    old = load_taxonomy("pbc").to_dict()
    old.pop("kind")
    assert Taxonomy.from_dict(old).kind == "cells"
    changed = {**old, "tree": {"a": None, "b": None}}  # same name, another tree
    assert Taxonomy.from_dict(changed).kind == "diagnosis"


def test_an_unknown_kind_is_refused_with_the_choices():
    with pytest.raises(TaxonomyError, match=r"kind 'cell' is not one of diagnosis, cells.*"
                                            r"Did you mean 'cells'"):
        Taxonomy.from_dict({"name": "t", "kind": "cell", "tree": ["x", "y"]})
