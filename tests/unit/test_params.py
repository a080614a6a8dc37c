"""The params contract: strict sections, DVC-visible keys, stage isolation, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from semiprune_core.config import (
    SECTIONS, Section, apply_overrides, load_stage_params, merge, parse_override, read_yaml, stage_sections, validate,
)
from semiprune_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _keys(model: type[Section], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def _flat(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_params_yaml_spells_out_every_key_so_dvc_tracks_it():
    # DVC only sees values written in params.yaml; a default living only in code would change
    # results without invalidating any stage.
    raw = read_yaml(REPO / "params.yaml")
    for name in raw:
        assert _keys(SECTIONS[name]) == _flat(raw[name]), name
    validate(raw)


def test_every_profile_is_valid():
    raw = read_yaml(REPO / "params.yaml")
    for profile in (REPO / "profiles").glob("*.yaml"):
        validate(merge(raw, read_yaml(profile)), source=profile.name)


def test_stage_reads_only_declared_sections(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "x", "params": ["base", "data"]},
                                                                  "late": {"cmd": "y", "params": ["base"]}}}))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert stage_sections("prepare", tmp_path / "dvc.yaml") == ["base", "data"]
    params = load_stage_params("late", root=tmp_path)
    assert params["base"].seed == 0
    with pytest.raises(ConfigError, match="does not declare"):
        params["data"]


def test_wrong_type_and_unknown_keys_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        validate({"base": {"seed": "zero"}})
    assert "base.seed" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown section 'dta'"):
        validate({"dta": {}})
    with pytest.raises(ConfigError, match="only one of"):
        validate({"data": {"labeled": {"per_class": 3, "fraction": 0.1}}})


@pytest.mark.parametrize("cutoff", ["x", "0.2", 1.0, -0.1, True, None])
def test_a_cutoff_is_a_share_below_1_or_auto(cutoff):
    with pytest.raises(ConfigError, match=r"select\.cutoff: must be a number in \[0, 1\) or auto"):
        validate({"select": {"cutoff": cutoff}})
    assert validate({"select": {"cutoff": 0}})["select"].cutoff_value == 0.0
    assert validate({"select": {"cutoff": "auto", "ratio": 0.9}})["select"].cutoff_value == pytest.approx(0.7)


@pytest.mark.parametrize("mode", ["fast", "off", 1, None, ["default"]])
def test_compile_is_a_bool_or_a_torch_compile_mode(mode):
    with pytest.raises(ConfigError, match=r"base\.compile: must be false, true or one of default, reduce-overhead"):
        validate({"base": {"compile": mode}})
    for ok in (False, True, "reduce-overhead", "max-autotune"):
        assert validate({"base": {"compile": ok}})["base"].compile == ok


def test_overrides_parse_yaml_values_and_never_touch_the_input():
    raw = {"data": {"labeled": {"per_class": 100}}}
    out = apply_overrides(raw, ["data.labeled.per_class=5", "base.seed=7", "data.root=null"])
    assert out == {"data": {"labeled": {"per_class": 5}, "root": None}, "base": {"seed": 7}}
    assert raw == {"data": {"labeled": {"per_class": 100}}}
    assert parse_override("data.corrupt.kinds=[noise, blur]") == (["data", "corrupt", "kinds"], ["noise", "blur"])
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match="key=value"):
            parse_override(bad)
