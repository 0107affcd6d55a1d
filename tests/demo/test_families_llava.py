"""The app's LLaVA-1.5-7B family and the AutoRound W4A16 (PTQ) column of the Qwen3-VL-2B family."""

from demo import families, settings


def test_llava_family_forced_on():
    llava = families.llava_family("on")
    assert llava.name == families.LLAVA_FAMILY
    assert [v.source for v in llava.variants if v.default] == [
        "ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128", "ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128-AWQ", "llava-hf/llava-1.5-7b-hf"]
    assert llava.reference(llava.default_labels) == "LLaVA-1.5-7B fp16 (reference)"
    assert families.llava_family("off") is None


def test_llava_family_offered_only_when_cached_or_reachable(monkeypatch, fixtures_dir, tmp_path):
    monkeypatch.setattr(families, "hub_reachable", lambda timeout=3.0: False)
    cached = set()
    monkeypatch.setattr(families, "hub_cached", lambda repo: repo in cached)
    assert families.llava_family("auto") is None
    cached.update(repo for _, repo, _, default in families.LLAVA_VARIANTS if default)
    assert families.llava_family("auto") is None             # the CLIP tower is needed too
    cached.add(families.LLAVA_VISION_TOWER)
    assert families.llava_family("auto").name == families.LLAVA_FAMILY
    s = settings.Settings(zoo_dir=tmp_path / "no-zoo", fixtures_dir=fixtures_dir, hub="auto")
    assert families.LLAVA_FAMILY in families.build_registry(s).names()


def test_autoround_column_is_optional_and_labelled_ptq():
    hub = families.hub_family("on")
    column = next(v for v in hub.variants if "AutoRound" in v.label)
    assert column.kind == "int4" and not column.default and "PTQ" in column.label
