"""Params: one validated section per stage, read through one loader.

``params.yaml`` has one section per stage plus ``base``. Each section is a strict pydantic model
(unknown keys and wrong types are errors). A stage asks :func:`load_stage_params` for its params;
the loader returns only the sections that stage declares in ``dvc.yaml``, so a stage cannot read a
param DVC does not know it depends on (which would break "change only the ratio, reuse the rest").
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class Base(Section):
    seed: int = Field(0, ge=0, description="master seed; every random choice derives from it")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="forward passes in bf16 where the hardware has it (CUDA, AMX/AVX512-BF16 CPUs), else fp32")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    compile: bool | str = Field(
        False, description="torch.compile each trained model in this mode (true = default); reduce-overhead "
                           "(CUDA graphs) pays on a GPU for long runs, nothing pays on CPU")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or value in COMPILE_MODES:
            return value
        raise ValueError(f"must be false, true or one of {', '.join(COMPILE_MODES)}")


class Synthetic(Section):
    n_train: int = Field(4000, ge=1)
    n_test: int = Field(1000, ge=0)
    n_classes: int = Field(10, ge=2)
    image_size: int = Field(28, ge=8, le=256)
    channels: Literal[1, 3] = 1
    separation: float = Field(1.0, gt=0, description="distance between class prototypes (higher = easier)")
    ambiguous_share: float = Field(0.1, ge=0, le=1, description="share of samples blended between two classes")
    mislabeled_share: float = Field(0.05, ge=0, le=1, description="share of train samples whose dataset label is wrong")


class Subsample(Section):
    train: int | None = Field(None, ge=1, description="keep this many train samples (stratified, seeded)")
    test: int | None = Field(None, ge=1, description="keep this many test samples (stratified, seeded)")


class LongTail(Section):
    imbalance: float = Field(1.0, gt=0, le=1, description="smallest/largest class size in train; 1 = off")


class Corrupt(Section):
    share: float = Field(0.0, ge=0, le=1, description="share of train samples corrupted; 0 = off")
    kinds: list[Literal["noise", "blur", "occlusion", "contrast"]] = ["noise", "blur", "occlusion", "contrast"]
    severity: int = Field(3, ge=1, le=5)

    @model_validator(mode="after")
    def _kinds(self):
        if self.share > 0 and not self.kinds:
            raise ValueError("kinds is empty while share > 0: name at least one corruption")
        return self


class Labeled(Section):
    """The labeled subset. Set at most one of per_class / fraction / count.

    None of them: every human label the source has is used (an imagefolder with a labels CSV uses
    exactly the labeled files; a benchmark source becomes fully labeled, the full-label oracle).
    """

    per_class: int | None = Field(100, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    count: int | None = Field(None, ge=1, description="a total label budget, split evenly across classes")

    @model_validator(mode="after")
    def _one(self):
        chosen = [k for k in ("per_class", "fraction", "count") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set only one of per_class, fraction, count (got {', '.join(chosen)}); set the others to null")
        return self


class Data(Section):
    source: Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "fashion-mnist"
    root: str | None = Field("data/fashion-mnist", description="dataset folder; see README for each source")
    download: bool = True
    test_root: str | None = Field(None, description="imagefolder: labeled test images in class sub-folders")
    labels_csv: str | None = Field(None, description="imagefolder: CSV sample_id,label labelling some files")
    image_size: int = Field(32, ge=8, le=512, description="imagefolder: images are resized to this square size")
    channels: Literal[1, 3] = 3
    max_image_pixels: int = Field(50_000_000, ge=1, description="refuse images that decompress to more pixels")
    synthetic: Synthetic = Synthetic()
    subsample: Subsample = Subsample()
    long_tail: LongTail = LongTail()
    corrupt: Corrupt = Corrupt()
    labeled: Labeled = Labeled()


class SSL(Section):
    """ssl_train: semi-supervised training of the labeling model (see METHODS.md, SemiPrune)."""

    algorithm: Literal["fixmatch", "flexmatch", "freematch", "supervised"] = "fixmatch"
    model: str = "fastcnn"
    epochs: int = Field(10, ge=1, description="passes over the unlabeled pool (supervised: the same steps)")
    batch_size: int = Field(64, ge=1, description="labeled batch B; the unlabeled batch is mu * B")
    mu: int = Field(7, ge=1)
    threshold: float = Field(0.8, gt=0, le=1, description="confidence threshold tau")
    lambda_u: float = Field(2.0, ge=0)
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA of the weights; the EMA model labels the pool")
    freematch_momentum: float = Field(0.999, gt=0, lt=1)
    lr: float = Field(0.03, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup: float = Field(0.0, ge=0, lt=1)
    max_seconds: float | None = Field(None, gt=0, description="wall-clock guard on training; null = none")


class Pseudo(Section):
    """pseudo_label: label every train sample with the SSL model on un-augmented images."""

    batch_size: int = Field(1024, ge=1)
    targets: Literal["ssl", "oracle", "clusters"] = Field(
        "ssl", description="ssl: the SSL model's pseudo-labels (human labels win); baselines: oracle (the "
                           "dataset's true labels everywhere, benchmarks only) or clusters (label-free k-means)")
    cluster_dims: int = Field(50, ge=1, description="clusters: principal components of the pixels k-means runs on")


class CV(Section):
    """Folds for out-of-sample scoring: proxy k trains on every fold but k."""

    k: int = Field(2, ge=2, le=127)
    folds: list[int] = Field([0, 1], description="the fold ids 0..k-1, one score@fold stage each (dvc.yaml foreach)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _folds(self):
        if self.folds != list(range(self.k)):
            raise ValueError(f"folds must list 0..k-1 for k={self.k}, e.g. {list(range(self.k))}")
        return self


class Supervised(Section):
    """A supervised training run: model and schedule (shared by the proxy and evaluate sections)."""

    model: str = "fastcnn"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    view: Literal["none", "weak", "strong"] = "weak"


class Proxy(Supervised):
    """score@fold: the proxy model trained on the other folds with the pipeline's target labels."""

    stop_after: int | None = Field(
        None, ge=1, description="train and record only the first N of the `epochs`-long schedule: enough for early-epoch "
                                "scores (DUAL over scores.first_dual, EL2N over scores.first_el2n); null = all epochs")


class Scores(Section):
    """scores: trajectories -> per-sample scores (windows and horizons in epochs; see METHODS.md)."""

    window: int = Field(3, ge=1, description="w for dynunc and dual")
    first_dual: int = Field(10, ge=1, description="T: dual and target_prob_mean_T use the first T epochs")
    first_el2n: int = Field(5, ge=1, description="el2n averages the first T_e epochs")


class Select(Section):
    """select: the coreset at a pruning ratio by a named strategy (see METHODS.md)."""

    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of the pool pruned")
    strategy: Literal["random", "easy", "hard", "ccs", "aum_cutoff", "dual_beta", "prototypicality",
                      "unseen_multistep"] = "aum_cutoff"
    score: str = Field("oos_aum", description="the scores column ranked: oos_<score> (unseen) or ins_<score>")
    cutoff: float | Literal["auto"] = Field(
        0.2, description="m: fraction dropped as hardest (ccs, aum_cutoff); auto = the authors' value for the ratio")
    strata: int = Field(50, ge=1, description="ccs: equal-width score strata")
    c_d: float = Field(4.0, gt=0, description="dual_beta: how fast the Beta window moves to easy samples with ratio")
    clusters: int | None = Field(None, ge=1, description="prototypicality: k-means clusters (null = number of classes)")
    class_balance: bool = False
    min_per_class: int = Field(0, ge=0)
    keep_labeled: bool = Field(True, description="always keep the human-labeled seed set (it counts towards the budget)")
    steps: int = Field(3, ge=2, description="unseen_multistep: steps to reach the budget")
    step_strategy: Literal["random", "easy", "hard", "ccs", "aum_cutoff"] = Field(
        "aum_cutoff", description="unseen_multistep: the strategy each step applies")
    class_aware: bool = Field(False, description="unseen_multistep: split each step's quota by the scorer's error per class")
    step_epochs: int | None = Field(None, ge=1, description="unseen_multistep: epochs of each step's scorer (null = proxy.epochs)")

    @field_validator("cutoff", mode="before")
    @classmethod
    def _cutoff(cls, value: Any) -> Any:
        if value == "auto" or (type(value) in (int, float) and 0 <= value < 1):
            return value
        raise ValueError("must be a number in [0, 1) or auto")

    @property
    def cutoff_value(self) -> float:
        """The cutoff in force: the number given, or the published one for this ratio."""
        from .selection.strategies import auto_cutoff

        return auto_cutoff(self.ratio) if self.cutoff == "auto" else float(self.cutoff)

    @field_validator("score")
    @classmethod
    def _score(cls, value: str) -> str:
        from .scoring import HIGHER_MEANS

        known = [f"{v}_{name}" for v in ("oos", "ins") for name in HIGHER_MEANS]
        if value not in known:
            raise ValueError(f"unknown score; choose one of {', '.join(known)}")
        return value


class Evaluate(Supervised):
    """evaluate: a fresh model trained on the coreset alone, measured on the test split."""

    model: str = "fastcnn_s"
    epochs: int = Field(15, ge=1)
    labels: Literal["annotation", "target"] = Field(
        "annotation", description="annotation: the true label where the dataset has one (what a labeler would give), "
                                  "else the target; target: the pipeline's target labels")


SECTIONS: dict[str, type[Section]] = {"base": Base, "data": Data, "ssl": SSL, "pseudo": Pseudo, "cv": CV,
                                      "proxy": Proxy, "scores": Scores, "select": Select, "evaluate": Evaluate}


def register_section(name: str, model: type[Section]) -> None:
    """Later stages add their sections here (e.g. ``ssl``, ``select``)."""
    SECTIONS[name] = model


class _Short(reprlib.Repr):
    """repr() cut to a few dozen characters and levels: a value echoed in an error stays one short
    line even when it is huge or shares itself many times over (YAML anchors)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 2, 60, 60

    def repr_int(self, x, level):
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than Python turns into text
            return f"<an integer of {x.bit_length()} bits>"


_short = _Short().repr


def _one_line(err: ValidationError, source: str, section: str) -> str:
    first = err.errors()[0]
    where = ".".join([section, *(p if isinstance(p, str) else _short(p) for p in first["loc"])])
    got = first.get("input")
    quiet = isinstance(got, Mapping) or first["type"] in ("missing", "extra_forbidden")
    got_txt = "" if quiet else f" (got {_short(got)})"
    extra = f" and {len(err.errors()) - 1} more" if len(err.errors()) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {where}: {msg}{got_txt}{extra}"


def validate(raw: Mapping[str, Any], *, source: str = "params.yaml") -> dict[str, Section]:
    """Validate every section in ``raw``; unknown sections or keys are errors."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must be a mapping of sections", "see params.yaml in the repository for the layout")
    unknown = sorted((k for k in raw if k not in SECTIONS), key=_short)  # keys of any type (YAML allows 1: or null:)
    if unknown:
        raise ConfigError(f"{source}: unknown section {_short(unknown[0])}", f"known sections are {', '.join(sorted(SECTIONS))}")
    out = {}
    for name, model in SECTIONS.items():
        body = raw.get(name) or {}
        try:
            out[name] = model.model_validate(body)
        except ValidationError as err:
            unknown = err.errors()[0]["type"] == "extra_forbidden"
            fix = "remove it or check its spelling (see params.yaml for every key)" if unknown else "fix that value"
            raise ConfigError(_one_line(err, source, name), fix) from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found", "run from the project root, or pass the right path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    # ValueError: also not UTF-8, or a value PyYAML cannot build (a date 2001-13-01, an int of 5000 digits)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}", "fix its syntax") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror})", "check the file and its permissions") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__}, not a mapping of keys to values",
                          "write it as key: value lines, like params.yaml")
    return data or {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"select.ratio=0.5"`` -> (["select", "ratio"], 0.5); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} is not key=value", "write it like --set select.ratio=0.5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # nothing PyYAML can build: keep the text for validation to name
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a deep copy of ``raw`` with each ``key=value`` override applied."""
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is a value, not a section", "check the key path")
            node = child
        node[keys[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` onto ``base`` (a profile onto params.yaml)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def stage_sections(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The params sections ``stage`` declares in dvc.yaml (``score@0`` looks up ``score``)."""
    spec = read_yaml(dvc_yaml).get("stages", {})
    body = spec.get(stage) or spec.get(stage.split("@")[0])
    if body is None:
        raise ConfigError(f"stage {stage!r} is not in {dvc_yaml}", f"stages are {', '.join(spec)}")
    if "do" in body:  # foreach stage
        body = body["do"]
    names = []
    for entry in body.get("params", []):
        if isinstance(entry, str):
            names.append(entry)
        else:  # {file: [keys]}
            for keys in entry.values():
                names.extend(keys)
    return [n.split(".")[0] for n in names]


class StageParams(dict):
    """Mapping section -> validated params; reading an undeclared section is an error."""

    def __init__(self, stage: str, sections: Mapping[str, Section]):
        super().__init__(sections)
        self.stage = stage

    def __missing__(self, key):
        raise ConfigError(
            f"stage {self.stage!r} read params section {key!r} it does not declare",
            f"add {key!r} to its params in dvc.yaml",
        )

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v.model_dump(mode="json") for k, v in self.items()}


def param_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted.key, old value, new value)`` for every leaf that differs between two params trees."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += param_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def load_stage_params(stage: str, *, root: str | Path = ".") -> StageParams:
    root = Path(root)
    allowed = stage_sections(stage, root / "dvc.yaml")
    sections = validate(read_yaml(root / "params.yaml"))
    return StageParams(stage, {k: sections[k] for k in allowed})
