"""ckpttool.align: common prefixes, prefix alignment, name pairing and --rename rules."""
from __future__ import annotations

import re

import pytest

from ckpttool.align import Alignment, Rename, align, apply_renames, common_prefix, pair_names
from ckpttool.errors import CkptError, UsageError

RESNET_LIKE = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn1.running_mean",
               "layer2.0.downsample.0.weight", "fc.weight", "fc.bias"]


def prefixed(prefix, names):
    return [prefix + n for n in names]


# --- common_prefix -------------------------------------------------------------------------------

@pytest.mark.parametrize("names, expected", [
    ([], []),
    (["weight"], []),
    (["module.weight"], ["module"]),
    (["module.model.conv.weight", "module.model.fc.bias"], ["module", "model"]),
    (["a.b.c", "a.b.d"], ["a", "b"]),
    (["a.b.c.d", "a.b.c.e", "a.x.c.d"], ["a"]),
    # Components, not characters: layer1 and layer10 share no component.
    (["layer1.weight", "layer10.weight"], []),
    (["model_a.x.w", "model_b.y.w"], []),
    # Never a whole name: "a.b" is a name, so only "a" can be common.
    (["a.b", "a.b.c"], ["a"]),
    (["fc.weight", "fc.weight"], ["fc"]),
    (["conv.weight", "fc.weight"], []),
])
def test_common_prefix(names, expected):
    assert common_prefix(names) == expected


def test_common_prefix_of_resnet_keys_under_wrappers():
    assert common_prefix(prefixed("module.", RESNET_LIKE)) == ["module"]
    assert common_prefix(prefixed("_orig_mod.module.", RESNET_LIKE)) == ["_orig_mod", "module"]
    assert common_prefix(RESNET_LIKE) == []


# --- align ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod.",
                                    "model.", "backbone.", "module.model."])
def test_align_strips_a_wrapper_prefix_from_the_source(prefix):
    a = align(prefixed(prefix, RESNET_LIKE), RESNET_LIKE)
    assert a == Alignment(prefix, "")
    assert a.active


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module.", "model.", "backbone."])
def test_align_strips_a_wrapper_prefix_from_the_target(prefix):
    assert align(RESNET_LIKE, prefixed(prefix, RESNET_LIKE)) == Alignment("", prefix)


def test_align_strips_different_prefixes_on_both_sides():
    assert align(prefixed("_orig_mod.module.", RESNET_LIKE), prefixed("model.", RESNET_LIKE)) == \
        Alignment("_orig_mod.module.", "model.")
    assert align(["_orig_mod.module.conv.weight"], ["model.conv.weight"]) == \
        Alignment("_orig_mod.module.", "model.")


def test_align_strips_only_as_much_as_helps():
    # Every source key is under module.layer1.; only module. is a wrapper.
    src = ["module.layer1.0.conv1.weight", "module.layer1.0.bn1.weight", "module.layer1.1.conv1.weight"]
    tgt = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.1.conv1.weight", "fc.weight"]
    assert align(src, tgt) == Alignment("module.", "")


def test_align_does_not_strip_when_names_already_meet():
    assert align(RESNET_LIKE, RESNET_LIKE) == Alignment("", "")
    assert not align(RESNET_LIKE, RESNET_LIKE).active
    # Both sides under model.: stripping both would match just as many, so nothing is stripped.
    both = prefixed("model.", RESNET_LIKE)
    assert align(both, both) == Alignment("", "")


def test_align_does_not_strip_when_it_does_not_help():
    assert align(prefixed("module.", ["a.weight", "b.weight"]), ["x.weight", "y.weight"]) == Alignment("", "")
    # Stripping model. from A makes no more names meet than before (one), so nothing is stripped.
    assert align(["model.x.w", "model.y.w"], ["model.x.w", "z.w"]) == Alignment("", "")


def test_align_never_strips_a_prefix_only_some_keys_carry():
    src = ["module.fc.weight", "module.fc.bias", "conv.weight"]
    tgt = ["fc.weight", "fc.bias", "conv.weight"]
    assert align(src, tgt) == Alignment("", "")
    # A character-level prefix ("model" of model_a / model_b) is no prefix at all.
    assert align(["model_a.w", "model_b.w"], ["_a.w", "_b.w"]) == Alignment("", "")


def test_align_of_empty_sides():
    assert align([], []) == Alignment("", "")
    assert align([], ["fc.weight"]) == Alignment("", "")
    assert align(["module.fc.weight"], []) == Alignment("", "")


def test_alignment_helpers():
    a = Alignment("module.", "model.")
    assert a.canon_a("module.fc.weight") == "fc.weight"
    assert a.canon_b("model.fc.weight") == "fc.weight"
    assert a.to_b("fc.weight") == "model.fc.weight"
    assert a.to_dict() == {"a": "module.", "b": "model."}
    assert a.describe("the source", "the target") == \
        "stripped 'module.' from every key of the source; stripped 'model.' from every key of the target"
    none = Alignment()
    assert not none.active and none.to_dict() is None and none.describe() == "none"
    assert none.canon_a("x.y") == "x.y" and none.to_b("x.y") == "x.y"
    assert Alignment("", "module.").describe() == "stripped 'module.' from every key of B"


# --- Rename ----------------------------------------------------------------------------------------

def test_rename_parse_and_apply():
    r = Rename.parse(r"^encoder\.=backbone.")
    assert r.pattern.pattern == r"^encoder\." and r.repl == "backbone."
    assert r.apply("encoder.layer.weight") == "backbone.layer.weight"
    assert r.apply("head.encoder.weight") == "head.encoder.weight"  # anchored


def test_rename_with_back_references():
    r = Rename.parse(r"^layer(\d+)\.(\d+)\.=stage\1.block\2.")
    assert r.apply("layer3.1.conv1.weight") == "stage3.block1.conv1.weight"
    r = Rename.parse(r"^(?P<m>\w+)\.gamma$=\g<m>.weight")
    assert r.apply("norm.gamma") == "norm.weight"


def test_rename_splits_at_the_first_equals_sign():
    r = Rename.parse("a=b=c")
    assert r.pattern.pattern == "a" and r.repl == "b=c"
    assert Rename.parse("^head=").apply("head.weight") == ".weight"  # an empty replacement is allowed


def test_rename_escaped_equals_belongs_to_the_regex():
    # Rename.parse's docstring: "The first ``=`` not inside the regex's escapes splits."
    r = Rename.parse(r"a\=b=c")
    assert r.pattern.pattern == r"a\=b"
    assert r.repl == "c"
    assert r.apply("a=b.weight") == "c.weight"


@pytest.mark.parametrize("spec, message", [
    ("no_equals_sign", "--rename 'no_equals_sign' is not REGEX=REPL"),
    ("(unclosed=x", "--rename '(unclosed=x': not a valid regular expression: missing ), unterminated subpattern "
                    "at position 0"),
    ("[a-=x", "--rename '[a-=x': not a valid regular expression: unterminated character set at position 0"),
])
def test_rename_parse_errors(spec, message):
    with pytest.raises(UsageError) as e:
        Rename.parse(spec)
    assert str(e.value) == message
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)


def test_rename_bad_group_reference_is_a_usage_error():
    r = Rename.parse(r"^(a)\.=\2.")
    with pytest.raises(UsageError) as e:
        r.apply("a.weight")
    assert str(e.value).startswith(r"--rename ^(a)\.=\2.: invalid group reference 2")


def test_apply_renames_in_order():
    rules = [Rename.parse(r"^encoder\.=backbone."), Rename.parse(r"^backbone\.(\d+)=backbone.stage\1")]
    # The second rule sees what the first produced.
    assert apply_renames("encoder.3.weight", rules) == "backbone.stage3.weight"
    # In the other order the second rule never applies.
    assert apply_renames("encoder.3.weight", rules[::-1]) == "backbone.3.weight"
    assert apply_renames("x", []) == "x"


# --- pair_names ------------------------------------------------------------------------------------

def test_pair_names_plain():
    pairs, only_a, only_b = pair_names(["a.w", "b.w", "c.w"], ["c.w", "d.w", "a.w"], Alignment())
    assert pairs == {"a.w": "a.w", "c.w": "c.w"}
    assert only_a == ["b.w"]
    assert only_b == ["d.w"]


def test_pair_names_with_alignment_maps_to_the_target_names():
    a = ["module.conv.weight", "module.fc.weight", "module.extra"]
    b = ["model.conv.weight", "model.fc.weight", "model.new.weight"]
    pairs, only_a, only_b = pair_names(a, b, Alignment("module.", "model."))
    assert pairs == {"module.conv.weight": "model.conv.weight", "module.fc.weight": "model.fc.weight"}
    assert only_a == ["module.extra"]
    assert only_b == ["model.new.weight"]


def test_pair_names_keeps_the_orders_of_both_sides():
    a = ["z", "y", "x", "w"]
    b = ["q", "x", "p", "z"]
    pairs, only_a, only_b = pair_names(a, b, Alignment())
    assert list(pairs) == ["z", "x"]
    assert only_a == ["y", "w"]
    assert only_b == ["q", "p"]


def test_pair_names_renames_apply_after_alignment_in_order():
    a = ["module.layer1.0.weight", "module.layer2.0.weight", "module.fc.weight"]
    b = ["stage1.0.weight", "stage2.0.weight", "head.weight"]
    rules = [Rename.parse(r"^layer(\d)\.=stage\1."), Rename.parse(r"^fc\.=head.")]
    pairs, only_a, only_b = pair_names(a, b, Alignment("module.", ""), rules)
    assert pairs == {"module.layer1.0.weight": "stage1.0.weight", "module.layer2.0.weight": "stage2.0.weight",
                     "module.fc.weight": "head.weight"}
    assert only_a == [] and only_b == []


def test_pair_names_rename_that_merges_two_keys_is_an_error():
    rules = [Rename.parse(r"^(old|new)_fc\.=fc.")]
    with pytest.raises(UsageError) as e:
        pair_names(["old_fc.weight", "new_fc.weight"], ["fc.weight"], Alignment(), rules)
    assert str(e.value) == "keys 'old_fc.weight' and 'new_fc.weight' both map to 'fc.weight'; check the --rename rules"
    assert isinstance(e.value, CkptError) and e.value.exit_code == 2


def test_pair_names_merge_onto_an_existing_name_is_an_error():
    # fc.weight matches as is; the rule also sends head.weight there.
    with pytest.raises(UsageError, match=re.escape("both map to 'fc.weight'")):
        pair_names(["fc.weight", "head.weight"], ["fc.weight"], Alignment(), [Rename.parse(r"^head\.=fc.")])


def test_pair_names_rename_to_a_name_the_target_lacks_drops_it():
    pairs, only_a, only_b = pair_names(["fc.weight"], ["fc.weight"], Alignment(), [Rename.parse(r"^fc\.=head.")])
    assert pairs == {} and only_a == ["fc.weight"] and only_b == ["fc.weight"]
